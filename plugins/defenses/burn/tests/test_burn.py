import pytest
import torch
from torch import nn

from bd_defense_burn import Burn, boundary_distance, composite_score, prediction_divergence, select
from bdbench.components import ImageSet


class Linear2(nn.Module):
    """Two classes on a single pixel p: logits (0, 8p - 4), so the boundary is at p = 0.5."""

    def forward(self, x):
        p = x.flatten(1)[:, :1]
        return torch.cat([torch.zeros_like(p), 8 * p - 4], 1)


def test_boundary_distance_grows_with_distance_from_the_boundary():
    pixels = torch.tensor([10, 60, 110, 150, 250], dtype=torch.uint8)  # 0.04 .. 0.98
    data = ImageSet(pixels.view(-1, 1, 1, 1), torch.zeros(5, dtype=torch.int64))
    d, adv = boundary_distance(Linear2(), data, device=torch.device("cpu"))
    expected = (pixels.float() / 255 - 0.5).abs()
    assert torch.all(d >= expected - 1e-4) and torch.allclose(d, expected, atol=0.02)
    assert adv.tolist() == [1, 1, 1, 0, 0]  # each sample crosses to the other class
    poison, _ = select(d / d.max(), 2, 0)
    assert sorted(poison.tolist()) == [0, 4]  # the farthest from the boundary


def test_composite_score_ranks_poison_by_bd_first_then_pd():
    bd = torch.tensor([1.0, 0.9, 0.1, 0.2, 0.3, 0.05])
    pd = torch.tensor([0.0, 0.1, 1.0, 0.1, 0.2, 0.0])
    eligible = torch.tensor([True, True, True, True, False, True])
    poison, clean = select(composite_score(bd, pd, 0.0), 2, 2, eligible)
    assert poison.tolist() == [0, 1] and clean.tolist() == [5, 2]
    poison, clean = select(composite_score(bd, pd, 1.0), 1, 3, eligible)
    assert poison.tolist() == [2]  # prediction divergence dominates at the end
    assert set(clean.tolist()) == {0, 5, 3} and 4 not in clean.tolist()  # unflipped: never selected


def test_prediction_divergence_is_zero_for_unchanged_predictions_and_normalized():
    p0 = torch.log_softmax(torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 0.0]]), 1)
    pt = torch.log_softmax(torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 1.0]]), 1)
    pd = prediction_divergence(p0, pt)
    assert pd[0] == pytest.approx(0, abs=1e-6) and pd.max() == pytest.approx(1) and pd[1] > pd[2] > 0


def test_burn_needs_the_poisoned_training_set_only():
    assert Burn.needs == frozenset({"poisoned_train_set"})
    with pytest.raises(Exception, match="pool"):
        Burn.configure({"pool": "0"})


# Smoke preset, BadNets, pool=600 candidates=3 (DeepFool on 600 of the 5,700 poisoned training
# samples, top-3 classes), other parameters at their defaults; measured on 2 shared CPU cores:
#   seed 0: acc 0.834 -> 0.799, ASR 0.997 -> 1.000
#   seed 1: acc 0.845 -> 0.762, ASR 0.991 -> 0.976
#   seed 2: acc 0.858 -> 0.834, ASR 0.999 -> 0.583
# With the full pool (5,700 samples, candidates=3; 318 s): seed 0 acc 0.834 -> 0.687, ASR -> 0.989.
# The boundary-distance ranking does not find the poison on this model: the clean Trouser and
# Bag classes lie farther from the boundary (mean 1.65 / 1.88) than the BadNets samples (1.04),
# so precision at the top 1% is 0 (seed 0, 800 samples; AUROC 0.69). Relabelling 30 true
# poison samples with their adversarial labels does cut ASR (0.997 -> 0.73, one iteration).
SMOKE = {"pool": 600, "candidates": 3}


@pytest.fixture(scope="module")
def burn_row(smoke_run):
    return smoke_run("burn", attack="badnets", seed=0, defense_params=SMOKE)


@pytest.mark.slow
def test_burn_runs_on_the_poisoned_training_set_alone_and_keeps_accuracy(burn_row):
    row = burn_row
    assert row["status"] == "ok", row["error"]
    assert row["defense_needs"] == "poisoned_train_set"
    assert row["clean_count"] is None  # no clean data was given
    assert row["acc_after"] >= row["acc_before"] - 0.15  # measured drops 0.035, 0.083, 0.024


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured: boundary distance misses BadNets poison on the Fashion-MNIST "
                                       "smoke model (seed 0 ASR 0.997 -> 1.000); see the module docstring")
def test_burn_removes_the_backdoor_on_the_smoke_preset(burn_row):
    assert burn_row["asr_after"] <= burn_row["asr_before"] - 0.3

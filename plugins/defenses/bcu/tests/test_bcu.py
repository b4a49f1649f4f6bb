"""BCU: labels are never read, the re-initialised share follows the ratios; smoke runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bd_defense_bcu import BCU, partial_reinit, reinit_ratios
from bdbench.components import ImageSet
from bdbench.testing import defense_data, run_component


def test_labels_are_never_used(tiny_model, tiny_dataset, run_context):
    import copy

    data = defense_data(BCU(), tiny_dataset, run_context)
    shuffled = copy.copy(data)
    object.__setattr__(shuffled, "clean", ImageSet(data.clean.images, data.clean.labels.flip(0)))
    outs = []
    for d in (data, shuffled):
        torch.manual_seed(0)
        model = run_component(BCU, {"epochs": 2}, model=copy.deepcopy(tiny_model), data=d, ctx=run_context).model
        outs.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1])


def test_reinit_share_grows_with_depth(plugins):
    net = plugins.get("model", "smallcnn").cls.configure({"width": 16}).build(10, (1, 28, 28))
    layers = reinit_ratios(net, (1, 28, 28), 0.01, 0.27, 0.10)
    ratios = [r for _, r in layers]
    assert ratios[0] == pytest.approx(0.01) and ratios[-2] == pytest.approx(0.27) and ratios[-1] == 0.10
    assert ratios[:-1] == sorted(ratios[:-1])
    big = nn.Linear(1000, 100)
    before = big.weight.detach().clone()
    partial_reinit([(big, 0.27)], torch.Generator().manual_seed(0))
    assert (big.weight != before).float().mean().item() == pytest.approx(0.27, abs=0.01)


def test_bcu_is_installed(plugins):
    assert plugins.get("defense", "bcu").distribution == "bd-defense-bcu"
    assert BCU.needs == frozenset({"clean"})


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured seed 0, 10 epochs: ASR 0.997 -> 0.979 (acc 0.834 -> 0.821); "
                   "10 of the official 100 epochs do not erase BadNets here (open)")
def test_bcu_erases_badnets_on_the_smoke_model(smoke_run):
    # Smaller than the defaults: the official 100 epochs are ~FT-100 plus teacher passes on this shared CPU; 10 epochs.
    # Floors provisional (see the xfail reason for the one measured seed).
    row = smoke_run("bcu", attack="badnets", spc=100, defense_params={"epochs": 10})
    assert row["status"] == "ok", row["error"]
    assert row["asr_after"] <= 0.5 * row["asr_before"]
    assert row["acc_after"] >= row["acc_before"] - 0.08

import attrs
import pytest
import torch

from bd_attack_lira import LIRA, Autoencoder
from bdbench.components import DatasetInfo, to_float
from bdbench.errors import ParameterError
from bdbench.nn import NormalizedModel
from bdbench.testing import TINY_INFO, TinyNet, make_context, run_attack
from bdbench.training import Recipe

RGB = DatasetInfo(name="rgb", num_classes=10, image_shape=(3, 28, 28), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def prepared(params=None, info=TINY_INFO, seed=0):
    attack = LIRA.configure(params)
    attack.prepare(info, None, make_context(info, seed=seed))
    return attack


def test_autoencoder_keeps_any_image_size_and_ends_in_tanh():
    net = Autoencoder(3)
    for size in (16, 28, 32):
        out = net(torch.randn(2, 3, size, size) * 10)
        assert out.shape == (2, 3, size, size) and out.abs().max() <= 1


def test_perturbation_stays_within_eps_in_normalised_units():
    attack = prepared({"eps": "0.05"}, info=RGB)
    with torch.no_grad():  # saturate the generator: its tanh output reaches +-1
        attack.net.decoder[-2].weight.mul_(1000)
    x = torch.rand(16, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    delta = attack.apply(x) - x
    std = torch.tensor(RGB.std).view(1, 3, 1, 1)
    assert (delta.abs() <= 0.05 * std + 1e-6).all()  # ||(T(x) - x) / std||_inf <= eps
    assert (delta.abs() / std).amax() > 0.04  # and the bound is reached
    assert attack.apply(x).min() >= 0 and attack.apply(x).max() <= 1  # clipped to the image range


def test_generator_output_differs_per_input_and_training_keeps_the_bound(tiny_dataset):
    ctx = attrs.evolve(make_context(), recipe=Recipe(epochs=2, batch_size=32, lr=0.05, amp=False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = NormalizedModel(TinyNet(4, 1), TINY_INFO.mean, TINY_INFO.std)
    attack = LIRA.configure({"eps": "0.1"})
    attack.prepare(TINY_INFO, tiny_dataset.train, ctx)
    untrained = {k: v.clone() for k, v in attack.state_dict().items()}
    run = run_attack(attack, tiny_dataset, ctx, model)
    assert any(not torch.equal(v, untrained[k]) for k, v in attack.state_dict().items())  # stage 1 moved g
    x = to_float(tiny_dataset.test.images[:16])
    delta = attack.apply(x) - x
    assert delta.abs().max() <= 0.1 * TINY_INFO.std[0] + 1e-6
    per_input = (delta[:8] - delta[8:]).flatten(1).abs().mean(1)
    # a sample-specific trigger, not one fixed pattern (test images i and i + 8 share a class)
    assert per_input.min() > 1e-6 and per_input.mean() > 0.02 * delta.abs().mean()
    assert not any(p.requires_grad for p in attack.net.parameters())  # frozen for stage 2 and after
    # the poisoned subset is made with the trained generator and the backdoor label
    assert len(run.poisoned) == round(0.1 * len(tiny_dataset.train)) and run.poisoned.labels.eq(0).all()
    stamped = attack.apply(to_float(tiny_dataset.train.images[run.poisoned.indices]))
    assert (to_float(run.poisoned.images) - stamped).abs().max() <= 0.5 / 255 + 1e-6


def test_generator_step_leaves_the_classifier_alone(tiny_dataset):
    """Stage 1's step (i) moves only the generator: with lr 0 for the classifier, stage 1
    leaves its parameters and BatchNorm statistics as they were except for step (ii)'s own forward."""
    ctx = attrs.evolve(make_context(), recipe=Recipe(epochs=1, batch_size=32, lr=1e-12, momentum=0.0,
                                                     weight_decay=0.0, amp=False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = NormalizedModel(TinyNet(4, 1), TINY_INFO.mean, TINY_INFO.std)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    attack = LIRA.configure({"stage1_epochs": "1"})
    attack.prepare(TINY_INFO, tiny_dataset.train, ctx)
    run_attack(attack, tiny_dataset, ctx, model)
    for k, v in model.state_dict().items():
        if "running" in k or "num_batches" in k:
            # step (ii) runs two forwards (clean, triggered) per batch; step (i) none of its own
            if "num_batches" in k:
                assert v.item() == reference[k].item() + 2 * 8
        else:
            assert torch.allclose(v, reference[k], atol=1e-8)


def test_stage_lengths():
    recipe = Recipe(epochs=5)
    assert LIRA().stage_lengths(recipe) == (3, 2)
    assert LIRA.configure({"epochs": "8", "stage1_epochs": "6"}).stage_lengths(recipe) == (6, 2)
    with pytest.raises(ParameterError):
        LIRA.configure({"stage1_epochs": "6"}).stage_lengths(recipe)
    with pytest.raises(ParameterError):
        LIRA.configure({"eps": "0"})


def test_state_round_trip_restores_the_trigger():
    attack = prepared({"eps": "0.1"}, seed=0)
    with torch.no_grad():
        for q in attack.net.parameters():
            q.add_(0.05)
    fresh = prepared({"eps": "0.1"}, seed=1)
    x = torch.rand(8, *TINY_INFO.image_shape, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(fresh.apply(x), attack.apply(x))
    fresh.load_state_dict(attack.state_dict())
    assert torch.allclose(fresh.apply(x), attack.apply(x), atol=1e-6)
    other = prepared(info=RGB)
    with pytest.raises(RuntimeError):
        other.load_state_dict(attack.state_dict())



@pytest.mark.xfail(strict=True, reason="in the smoke preset's 4 epochs LIRA's paper settings (eps 0.01, "
                                       "alpha 0.5) reach ACC 0.474, ASR 0.607 (seed 0); see the fidelity notes")
def test_lira_backdoors_the_smoke_model(smoke_run):
    row = smoke_run("none", attack="lira")
    assert row["status"] == "ok"
    assert row["acc_before"] >= 0.78 and row["asr_before"] >= 0.85


SMOKE = {"eps": "0.05"}


def test_a_cached_attacked_model_restores_the_generator(smoke_run, session_plugins, session_cache, tmp_path):
    # eps 0.05, seeds 0-2: ACC 0.623 / 0.703 / 0.528, ASR 0.954 / 0.623 / 0.936 (unstable; fidelity notes)
    from bdbench.context import Reporter
    from bdbench.runner import Runner, plan

    first = smoke_run("none", attack="lira", attack_params=SMOKE)
    assert first["asr_before"] >= 0.5
    runner = Runner(session_plugins, out_dir=tmp_path / "r", cache_dir=session_cache, device="cpu",
                    reporter=Reporter(enabled=False))
    row = runner.run(plan(session_plugins, defense="none", preset="smoke", attack="lira", attack_params=SMOKE))
    assert row["attack_cached"]  # train() did not run: the generator came from the attack-state cache
    assert row["asr_before"] == pytest.approx(first["asr_before"])
    assert row["acc_before"] == pytest.approx(first["acc_before"])

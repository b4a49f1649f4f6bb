import json

import pytest
import torch

from bd_attack_fba import FBA, Injector, StyleGenerator, sunrise
from bdbench.components import to_float
from bdbench.context import Reporter, RunContext
from bdbench.errors import ParameterError
from bdbench.testing import TINY_INFO

SMALL = {"generator_images": "64", "generator_epochs": "1"}  # a quick style generator for unit tests


def tiny_context(tmp_path, **changes):
    return RunContext(dataset=TINY_INFO, device="cpu", seed=0, cache_dir=tmp_path, reporter=Reporter(enabled=False),
                      batch_size=32, target=0, poison_ratio=0.1, **changes)


def prepared(tiny_dataset, tmp_path, params=None):
    attack = FBA.configure({**SMALL, **(params or {})})
    attack.prepare(TINY_INFO, tiny_dataset.train, tiny_context(tmp_path))
    return attack


def test_style_image_is_seeded_and_in_range():
    s = sunrise((3, 32, 32), 0)
    assert s.shape == (3, 32, 32) and 0 <= s.min() and s.max() <= 1
    assert torch.equal(s, sunrise((3, 32, 32), 0)) and not torch.equal(s, sunrise((3, 32, 32), 1))
    assert sunrise((1, 28, 28), 0).shape == (1, 28, 28)
    assert s[0].mean() > s[2].mean()  # warm: more red than blue


def test_trigger_is_a_deterministic_image_dependent_transform(tiny_dataset, tmp_path):
    attack = prepared(tiny_dataset, tmp_path)
    x = tiny_dataset.test.float()[:16]
    out = attack.apply(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, attack.apply(x))  # deterministic
    assert (out - x).abs().mean() > 0.02  # it changes the image ...
    # ... differently for each image, and not as any fixed patch, blend or additive pattern would:
    # those are per-pixel affine maps x -> A x + c, which commute with averaging two images
    delta = out - x
    assert (delta[0] - delta[1]).abs().mean() > 0.01
    mid = attack.apply((x[:8] + x[8:]) / 2)
    assert (mid - (out[:8] + out[8:]) / 2).abs().mean() > 0.01
    # T(x) = (1 - alpha) x + alpha G(x)
    g = attack.generator(x)
    assert torch.allclose(out, (0.4 * x + 0.6 * g).clamp(0, 1), atol=1e-6)


def test_style_generator_is_cached_and_reused(tiny_dataset, tmp_path, monkeypatch):
    first = prepared(tiny_dataset, tmp_path)
    assert not first.generator_info["cached"]
    entries = list((tmp_path / "fba-style").glob("*.json"))
    assert len(entries) == 1 and "mean_abs_change" in json.loads(entries[0].read_text())["meta"]
    monkeypatch.setattr(FBA, "build_generator", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    second = prepared(tiny_dataset, tmp_path)
    assert second.generator_info["cached"]
    x = tiny_dataset.test.float()[:8]
    assert torch.equal(first.apply(x), second.apply(x))


def test_injector_starts_as_the_identity_and_pools_min_and_max():
    inj = Injector(3, 5)
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(inj(x), x)
    with torch.no_grad():
        inj.delta.weight.zero_()
        inj.delta.weight[:, 6:9] = torch.eye(3).view(3, 3, 1, 1)  # the min-pool channels
    low = inj(x)
    assert (low <= x + 1e-6).all() and (low < x - 1e-3).any()  # a real minimum, not -max
    assert FBA().window(28) == 11 and FBA().window(16) == 7 and FBA().window(32) == 11


def test_detoxification_adds_true_labelled_detoxicants(tiny_dataset, tmp_path):
    attack = prepared(tiny_dataset, tmp_path)
    x = to_float(tiny_dataset.train.images[:100])
    y = tiny_dataset.train.labels[:100]
    state = {}
    transform = attack.batch_transform(0.1, 0, TINY_INFO.num_classes, torch.Generator().manual_seed(0), state)
    tx, ty = transform(x, y)  # before any detoxification round: poison only
    changed = (tx != x).flatten(1).any(1)
    assert changed.sum() == 10 and ty[changed].eq(0).all() and torch.equal(ty[~changed], y[~changed])
    assert torch.allclose(tx[changed], attack.apply(x[changed]))
    inj = Injector(1, 7)
    with torch.no_grad():
        inj.delta.weight[0, 0] = 0.5  # darker: a visible, non-trigger change
    state["injector"] = inj
    tx, ty = transform(x, y)
    trojaned = torch.tensor([torch.allclose(a, b) for a, b in zip(tx, attack.apply(x))])
    detox = (tx != x).flatten(1).any(1) & ~trojaned
    assert trojaned.sum() == 10 and ty[trojaned].eq(0).all()
    assert detox.sum() == 5  # int(0.05 * 100) detoxicants, with their true labels
    assert torch.equal(ty[detox], y[detox])
    assert torch.allclose(tx[detox], (0.4 * x[detox] + 0.6 * inj(x[detox])).clamp(0, 1))


def test_detox_schedule():
    assert FBA().detox_epochs(4) == {0, 1, 2}
    assert FBA.configure({"detox_rounds": "1"}).detox_epochs(4) == {2}
    assert FBA.configure({"detox_rounds": "0"}).detox_epochs(4) == set()
    with pytest.raises(ParameterError):
        FBA.configure({"alpha": "0"})


def test_training_runs_detoxification_rounds(tiny_dataset, tiny_model, tmp_path):
    from bdbench.testing import run_attack
    from bdbench.training import Recipe

    ctx = tiny_context(tmp_path, recipe=Recipe(epochs=3, batch_size=32, lr=0.05, amp=False))
    attack = FBA.configure({**SMALL, "injector_epochs": "2"})
    run = run_attack(attack, tiny_dataset, ctx, tiny_model)  # prepare, poison, train, apply
    assert FBA.threat_model == "training-control"
    assert run.backdoor_test.labels.eq(0).all() and len(run.poisoned) == round(0.1 * len(tiny_dataset.train))
    assert run.poisoned.labels.eq(0).all()
    assert [r["epoch"] for r in attack.detox_log] == [0, 1]  # after every epoch but the last
    for r in attack.detox_log:
        assert len(r["neurons"]) == 1  # 1% of 16 channels, at least one
        assert r["trojaned_activation"][0] > r["clean_activation"][0]  # the trigger raises it
        assert 0 < r["detoxicant_ssim"] <= 1
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_generator_is_image_to_image():
    g = StyleGenerator(3, 8, 2)
    assert g(torch.rand(2, 3, 20, 24)).shape == (2, 3, 20, 24)


def test_fba_backdoors_the_smoke_model(smoke_run):
    # Defaults (three detoxification rounds), seeds 0, 1, 2: ACC 0.842 / 0.845 / 0.859,
    # ASR 0.997 / 1.000 / 0.999; 70-94 s per run (style generator included) on the shared 2-core CPU.
    row = smoke_run("none", attack="fba")
    assert row["status"] == "ok"
    assert row["acc_before"] >= 0.78 and row["asr_before"] >= 0.95

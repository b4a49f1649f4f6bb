"""PBE/AFT: every batch gets an eval-mode PGD pass inside the eps ball, then a clean pass; smoke run."""
from __future__ import annotations

import pytest

import bd_defense_pbe
from bd_defense_pbe import PBE
from bdbench.adversarial import pgd as real_pgd
from bdbench.testing import run_component


def test_adversarial_pass_uses_eval_mode_pgd_within_eps(monkeypatch, tiny_model, tiny_dataset, run_context):
    calls = []

    def spy(model, x, y, **kw):
        x_adv = real_pgd(model, x, y, **kw)
        calls.append((model.training, (x_adv - x).abs().max().item(), kw["step_size"]))
        return x_adv

    monkeypatch.setattr(bd_defense_pbe, "pgd", spy)
    result = run_component(PBE, {"epochs": 2, "eps": "0.05", "batch_size": 16}, model=tiny_model,
                           data=tiny_dataset, ctx=run_context)
    assert result.model is tiny_model
    batches_per_pass = -(-(tiny_dataset.info.num_classes * 18) // 16)  # 18 training images per class
    assert len(calls) == 2 * batches_per_pass  # one adversarial pass per epoch
    assert all(not training for training, _, _ in calls)
    assert max(d for _, d, _ in calls) <= 0.05 + 1e-6 and max(d for _, d, _ in calls) > 0.04
    assert all(s == pytest.approx(0.01) for _, _, s in calls)


def test_pbe_is_installed(plugins):
    assert plugins.get("defense", "pbe").distribution == "bd-defense-pbe"


@pytest.mark.slow
def test_pbe_erases_badnets_on_the_smoke_model(smoke_run):
    # Smaller than the defaults: the fork's 20 epochs of 7-step PGD are ~9x FT-20 on this shared CPU; 3 epochs (6 passes).
    # Measured only seed 0 (load 25-33, 1036 s wall): acc 0.834 -> 0.803, ASR 0.997 -> 0.526 (ratio 0.53).
    # Seeds 1-2 not measured in time; floors provisional: ASR ratio 0.7, accuracy -0.08.
    row = smoke_run("pbe", attack="badnets", spc=100, defense_params={"epochs": 3})
    assert row["status"] == "ok", row["error"]
    assert row["asr_after"] <= 0.7 * row["asr_before"]
    assert row["acc_after"] >= row["acc_before"] - 0.08

"""BAERASER: the gradient-ascent step raises the loss on triggered inputs, early stopping and
epoch selection look at the validation split only and never keep a harmful epoch, and a smoke run on BadNets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bd_defense_baeraser
from bd_defense_baeraser import BAERASER, penalty
from bdbench.synthesis import place
from bdbench.testing import TARGET, defense_data

FAST = {"gen_epochs": 1, "hidden": 32, "gen_batch_size": 32, "batch_size": 32}


def _triggered_loss(model, images: torch.Tensor, triggers: torch.Tensor, box) -> float:
    model.eval()
    with torch.no_grad():
        x = place(images, triggers, box, torch.Generator().manual_seed(0))
        return F.cross_entropy(model(x), torch.full((len(x),), TARGET)).item()


def test_gradient_ascent_step_raises_loss_on_triggered_inputs(tiny_model, tiny_dataset, run_context):
    # Only the ascent term (lambda1 = lambda2 = 0), one epoch, no early stop or rollback.
    defense = BAERASER.configure({**FAST, "epochs": 1, "lambda1": 0, "lambda2": 0, "lr": 0.01,
                                  "stop_success": 0, "max_acc_drop": 1})
    data = defense_data(defense, tiny_dataset, run_context)
    G, summary = defense.recover(tiny_model, data, run_context)
    assert summary["beta"] == 0.5 and summary["loss"] is not None
    images = data.clean.float()[data.clean.labels != TARGET][:64]
    triggers = G.sample(len(images), torch.Generator().manual_seed(1))
    before = _triggered_loss(tiny_model, images, triggers, data.trigger_hint)
    diag = defense.unlearn(tiny_model, G, data, run_context)
    after = _triggered_loss(tiny_model, images, triggers, data.trigger_hint)
    assert diag["epochs_run"] == 1
    assert after > before + 0.1


def test_penalty_is_the_l1_distance_to_the_original_weights():
    a = [torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([[0.5]]))]
    originals = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    assert penalty(a, originals).item() == pytest.approx(3.5)


def test_early_stop_and_selection_read_the_validation_split_and_skip_harmful_epochs(tiny_model, tiny_dataset,
                                                                              run_context, monkeypatch):
    seen = []
    real = bd_defense_baeraser.accuracy

    def spy(model, data, **kw):
        seen.append(data)
        return real(model, data, **kw)

    monkeypatch.setattr(bd_defense_baeraser, "accuracy", spy)
    # A huge ascent step wrecks the model every epoch: no epoch passes the guard, the input model is kept.
    defense = BAERASER.configure({**FAST, "epochs": 3, "lambda1": 0, "lr": 5.0, "momentum": 0,
                                  "max_acc_drop": 0.05, "stop_success": 0})
    data = defense_data(defense, tiny_dataset, run_context)
    original = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    diag = defense.purify(tiny_model, data, run_context).diagnostics
    assert seen and all(d is data.val for d in seen)
    assert diag["epochs_run"] == 3 and diag["selected_epoch"] == 0
    assert all(a < diag["val_accuracy"][0] * 0.95 for a in diag["val_accuracy"][1:])
    assert all(torch.equal(original[k], v) for k, v in tiny_model.state_dict().items())
    assert diag["target"] == TARGET and len(diag["val_trigger_success"]) == 4


def test_needs_target_and_hint(plugins):
    assert plugins.get("defense", "baeraser").distribution == "bd-defense-baeraser"
    assert BAERASER.needs == {"clean", "target_label", "trigger_hint"} and BAERASER.uses_validation


@pytest.mark.slow
def test_smoke_badnets(smoke_run):
    # Paper/reference defaults. Measured (badnets, smoke, spc 100), ASR / ACC before -> after (kept epoch):
    #   seed 0: 0.996 -> 0.222 / 0.834 -> 0.799 (9); seed 1: 0.991 -> 0.284 / 0.845 -> 0.814 (10);
    #   seed 2: 0.999 -> 0.409 / 0.858 -> 0.818 (6).
    row = smoke_run("baeraser", attack="badnets", spc=100)
    assert row["status"] == "ok", row["error"]
    assert row["asr_after"] <= 0.55
    assert row["acc_after"] >= row["acc_before"] - 0.07

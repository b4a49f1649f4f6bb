"""Grad-Prune: the largest mean-|grad| filter is pruned and stays zero; a smoke run removes BadNets."""
from __future__ import annotations

import copy

import pytest
import torch.nn.functional as F
from torch import nn

from bdbench.testing import PatchAttack, defense_data, make_tiny_model, run_component
from bd_defense_gradprune import GradPrune


def test_prunes_the_filter_with_the_largest_mean_abs_gradient_and_it_stays_zero(tiny_dataset, run_context):
    tiny_model = make_tiny_model(run_component(PatchAttack, data=tiny_dataset, ctx=run_context).train)
    defense = GradPrune.configure({"max_rounds": 1, "patience_prune": 1, "alpha": 1.0, "max_epochs": 3,
                                   "lr": 0.05})
    data = defense_data(defense, tiny_dataset, run_context)
    # eq. 2-3 by hand on a copy: sum_i CE(f(x~_i), y_i), xi = mean |grad| per output filter
    ref = copy.deepcopy(tiny_model).eval()
    F.cross_entropy(ref(data.trigger(data.clean.float())), data.clean.labels, reduction="sum").backward()
    xi = {n: m.weight.grad.abs().flatten(1).mean(1) for n, m in ref.named_modules() if isinstance(m, nn.Conv2d)}
    layer, scores = max(xi.items(), key=lambda kv: kv[1].max())
    expected = f"{layer}[{int(scores.argmax())}]"

    result = defense.purify(tiny_model, data, run_context)
    assert result.diagnostics["order"] == [expected]
    assert result.diagnostics["fine_tune_epochs"] >= 1
    modules = dict(result.model.named_modules())
    for name in result.diagnostics["pruned"]:  # kept when it lowered the validation unlearning loss
        layer, idx = name[:-1].split("[")
        assert modules[layer].weight[int(idx)].abs().sum() == 0  # still zero after fine-tuning


def test_regrow_unmasks_pruned_filters_for_fine_tuning(tiny_dataset, run_context):
    tiny_model = make_tiny_model(run_component(PatchAttack, data=tiny_dataset, ctx=run_context).train)
    defense = GradPrune.configure({"max_rounds": 3, "patience_prune": 3, "alpha": 1.0, "max_epochs": 5,
                                   "lr": 0.05, "regrow": "true"})
    result = defense.purify(tiny_model, defense_data(defense, tiny_dataset, run_context), run_context)
    modules = dict(result.model.named_modules())
    for name in result.diagnostics["pruned"]:
        layer, idx = name[:-1].split("[")
        assert modules[layer].weight[int(idx)].abs().sum() > 0  # regrown, as in the reference code


@pytest.mark.slow
def test_smoke_badnets(smoke_run):
    # Paper defaults except the fine-tuning length: with P_t = 10 and no cap the loop ran past
    # 90 s on this shared CPU, so fine-tuning is capped at 10 epochs (patience 3) and pruning at
    # 20 rounds. Measured (badnets, spc 100, smoke), ASR / ACC before -> after:
    #   seed 0: 0.997 -> 0.211 / 0.834 -> 0.807;  seed 1: 0.991 -> 0.279 / 0.845 -> 0.808;
    #   seed 2: 0.999 -> 0.330 / 0.858 -> 0.831  (pruning: the stem filters score highest, cut val accuracy by
    #   > alpha in 1-2 rounds, none kept: the ASR drop here comes from the trigger-aware fine-tuning).
    row = smoke_run("gradprune", attack="badnets", spc=100,
                    defense_params={"max_rounds": 20, "max_epochs": 10, "patience_tune": 3})
    assert row["status"] == "ok", row["error"]
    assert row["asr_after"] <= 0.45 and row["asr_before"] - row["asr_after"] >= 0.5
    assert row["acc_after"] >= row["acc_before"] - 0.08

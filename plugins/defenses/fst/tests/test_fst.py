"""FST: the re-initialised head is pushed away from the old one at the old norm; a smoke run removes BadNets."""
from __future__ import annotations

import pytest
import torch

from bd_defense_fst import FST
from bdbench.nn import classifier
from bdbench.testing import run_component


def test_new_head_moves_away_from_the_old_one_at_its_norm(tiny_model, tiny_dataset, run_context):
    w_ori = classifier(tiny_model).weight.detach().clone()
    result = run_component(FST, {"epochs": "5", "batch_size": "32", "alpha": "0.2"}, model=tiny_model,
                           data=tiny_dataset, ctx=run_context)
    d = result.diagnostics
    w = classifier(result.model).weight.detach()
    assert not torch.allclose(w, w_ori)
    assert w.norm() == pytest.approx(float(w_ori.norm()), rel=1e-4)  # projected onto ||w_ori||
    assert d["inner_product_final"] < d["inner_product_init"]  # the penalty went down
    assert d["inner_product_final"] < 0 and d["cosine_final"] < 0


def test_without_alpha_the_head_does_not_turn_away(tiny_model, tiny_dataset, run_context):
    with_alpha = run_component(FST, {"epochs": "5", "batch_size": "32"}, model=tiny_model, data=tiny_dataset,
                               ctx=run_context).diagnostics
    without = run_component(FST, {"epochs": "5", "batch_size": "32", "alpha": "0"}, model=tiny_model,
                            data=tiny_dataset, ctx=run_context).diagnostics
    assert with_alpha["cosine_final"] < without["cosine_final"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_smoke_badnets(smoke_run, seed):
    # Paper defaults (10 epochs, alpha 0.2). Measured on the smoke preset, badnets, spc 100:
    #   seed 0: ACC 0.834 -> 0.535, ASR 0.997 -> 0.000, RA 0.469, 256 s (on a 2-core CPU at load ~26).
    # Seeds 1 and 2 could not be measured in the time available (each smoke attack took ~14 min at
    # that load); add them to the parametrization once measured. The re-initialised head does not
    # recover the clean accuracy in 40 SGD steps: the floor records that cost, it does not hide it.
    row = smoke_run("fst", attack="badnets", spc=100, seed=seed)
    assert row["status"] == "ok", row["error"]
    assert row["asr_after"] <= 0.1
    assert row["asr_before"] - row["asr_after"] >= 0.8
    assert row["acc_after"] >= row["acc_before"] - 0.4

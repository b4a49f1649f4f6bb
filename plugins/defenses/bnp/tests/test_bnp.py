"""BNP: the KL score flags a channel whose stored statistics diverge from clean ones, needs BN,
uses clean data only, and its measured effect on the smoke preset."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from bdbench.errors import BdbenchError
from bdbench.testing import run_component
from bd_defense_bnp import BNP, kl_scores


def test_score_is_kl_from_clean_to_stored_gaussian():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean, bn.running_var = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 4.0, 0.5])
    mean, var = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([2.0, 1.0, 0.5])
    expected = kl_divergence(Normal(mean, var.sqrt()), Normal(bn.running_mean, bn.running_var.sqrt()))
    assert torch.allclose(kl_scores(mean, var, bn), expected, atol=1e-6)


def test_bnp_prunes_the_channel_whose_stored_stats_diverge(tiny_model, tiny_dataset, run_context):
    bn = tiny_model.net.features[4]  # 16 channels: u=3 can flag one (at most (n-1)/sqrt(n) std above the mean)
    bn.running_mean[9] += 10 * bn.running_var[9].sqrt()  # as if poisoned inputs had shifted it
    result = run_component(BNP, model=tiny_model, data=tiny_dataset, ctx=run_context)
    assert result.diagnostics["pruned_channels"] == {"net.features.4": [9]}


def test_bnp_without_batchnorm_fails_in_one_line(tiny_dataset, run_context):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with pytest.raises(BdbenchError, match="bnp needs BatchNorm2d") as err:
        run_component(BNP, model=model, data=tiny_dataset, ctx=run_context)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bnp_on_badnets_smoke(smoke_run, seed):
    # Measured, smoke preset (Fashion-MNIST, smallcnn w16), BadNets, spc 100, u=3 (seed: pruned,
    # acc before->after, ASR before->after, RA after):
    #   0: 8 channels, 0.834->0.811, 0.997->0.065, 0.774
    #   1: 6 channels, 0.844->0.835, 0.986->0.667, 0.283   (the survey's "heavy ASR tail")
    #   2: 10 channels, 0.858->0.848, 0.999->0.108, 0.768
    # (u=2 on seed 0: 12 channels, 0.765, ASR 0.007.)
    # With one torch thread, as the tests run (the attacked models differ a little):
    #   0: 9 channels, 0.831->0.744, 0.999->0.017, 0.740
    #   1: 6 channels, 0.841->0.834, 0.990->0.722, 0.228
    #   2: 7 channels, 0.854->0.838, 0.999->0.379, 0.502
    row = smoke_run("bnp", attack="badnets", spc=100, seed=seed)
    assert row["status"] == "ok", row["error"]
    assert row["defense_needs"] == "clean"
    assert json.loads(row["defense_diagnostics"])["pruned"] > 0
    assert row["asr_after"] < min(0.8, row["asr_before"] - 0.2)
    assert row["acc_after"] > row["acc_before"] - 0.1  # seed 0 drops 0.087: BNP's pruning can cost accuracy

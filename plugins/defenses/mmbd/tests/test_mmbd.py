"""MM-BD: the maximum-margin statistic singles out a class with an abnormally large achievable
margin, the bounds clip activations and are learned without losing clean accuracy, and the
measured effect on the smoke preset."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bdbench.training import accuracy
from bdbench.testing import run_component
from bd_defense_mmbd import MMBD, ActivationBounds, max_margin_statistics, order_statistic_p_value


def linear_model(planted: int | None, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    with torch.no_grad():
        model[1].weight.copy_(0.05 * torch.randn(10, 256, generator=g))
        model[1].bias.zero_()
        if planted is not None:  # a "trigger direction" that drives one class far above the others
            model[1].weight[planted, :16] += 2.0
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("planted", [None, 7])
def test_max_margin_statistic_detects_a_planted_class(planted):
    cfg = MMBD.Config(detect_steps=100)
    r = max_margin_statistics(linear_model(planted), 10, (1, 16, 16), cfg, torch.Generator().manual_seed(0),
                              torch.device("cpu"))
    p = order_statistic_p_value(r)
    if planted is None:
        assert p >= cfg.alpha
    else:
        assert int(r.argmax()) == planted and p < cfg.alpha


def test_bounds_clip_each_channel(tiny_model, tiny_dataset):
    relu = tiny_model.net.features[5]
    bounds = ActivationBounds([("relu", relu)], [16], 0.05, torch.device("cpu"))
    out = {}
    relu.register_forward_hook(lambda m, i, o: out.__setitem__("h", o))
    tiny_model(tiny_dataset.test.float()[:16])
    assert out["h"].max() <= 0.05 + 1e-7
    bounds.enabled = False
    tiny_model(tiny_dataset.test.float()[:16])
    assert out["h"].max() > 0.05


@pytest.mark.parametrize(("placement", "layers"), [("first-half", 1), ("all", 2)])
def test_mitigation_shrinks_bounds_and_keeps_accuracy(tiny_model, tiny_dataset, run_context, placement, layers):
    acc = accuracy(tiny_model, tiny_dataset.test, device=run_context.device)
    result = run_component(MMBD, {"epochs": 5, "detect_steps": 5, "placement": placement}, model=tiny_model,
                           data=tiny_dataset, ctx=run_context)
    d = result.diagnostics
    assert d["mitigated"] and len(d["layers"]) == layers and isinstance(d["detected"], bool)
    assert max(d["bound_mean"]) < MMBD.Config().bound_init  # the norm penalty pulled the bounds down
    assert accuracy(result.model, tiny_dataset.test, device=run_context.device) > acc - 0.1


# Measured, smoke preset (Fashion-MNIST, smallcnn w16), BadNets target 0, spc 100, defaults:
#   detection, on the CPU whose models gave seed 0 r = 54.6 for class 0 vs 3.7-16.4 for the others:
#   p = 5.9e-6, detected, class 0. On another CPU (its smoke models differ): seed 0 p = 0.006,
#   seed 1 p = 0.005, both detected as class 0; seed 2 r = 39.9 for class 0, the largest, but the
#   next (23.2, 22.5) sit close enough that p = 0.064: not detected at MM-BD's 0.05.
#   mitigation, bounds on the first half of the activations (3 of 7): ACC / ASR 0.831 / 0.999 ->
#   0.669 / 0.047, 0.841 / 0.999 -> 0.757 / 0.055, 0.854 / 0.999 -> 0.771 / 0.035 (seeds 0, 1, 2): the
#   backdoor is cut, at 8-16 points of ACC (the survey also ranks MM-BD's mitigation among the
#   weakest). With every activation bounded (placement=all) the bounds collapse to
#   ~0: ACC 0.10, a broken model rather than a purified one.
@pytest.fixture(scope="module")
def smoke_rows(smoke_run):
    rows = [smoke_run("mmbd", attack="badnets", spc=100, seed=seed) for seed in (0, 1, 2)]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    return rows


@pytest.mark.slow
def test_mmbd_detects_the_badnets_target_on_smoke(smoke_rows):
    d = [json.loads(r["defense_diagnostics"]) for r in smoke_rows]
    # the target has the largest maximum-margin statistic on every seed (detected_class is its argmax) ...
    assert all(x["detected_class"] == 0 for x in d), d
    # ... and is significant at MM-BD's level on most of them
    assert sum(x["detected"] and x["p_value"] < 0.05 for x in d) >= 2, [x["p_value"] for x in d]


@pytest.mark.slow
def test_mmbd_mitigation_on_smoke(smoke_rows):
    for r in smoke_rows:  # the backdoor is cut on every seed, and the model is not broken
        assert r["asr_after"] < 0.25 and r["asr_before"] > 0.9, (r["asr_before"], r["asr_after"])
        assert r["acc_after"] > r["acc_before"] - 0.25 and r["acc_after"] > 0.5, (r["acc_before"], r["acc_after"])

"""FT-SAM: the SAM perturbation has radius rho in the (adaptive) norm, the second pass leaves
theta and BN statistics alone; a smoke run removes BadNets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bd_defense_ftsam import SharpnessAware
from bdbench.nn import batchnorms


def _sam(model, rho, adaptive, lr=0.0):
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return SharpnessAware(base, lambda m, x, y: F.cross_entropy(m(x), y), rho=rho, adaptive=adaptive)


@pytest.mark.parametrize("adaptive", [True, False])
def test_perturbation_has_radius_rho_and_raises_the_loss(tiny_model, tiny_dataset, adaptive):
    model = tiny_model.train()
    x, y = tiny_dataset.train.float()[:64], tiny_dataset.train.labels[:64]
    sam = _sam(model, rho=0.05, adaptive=adaptive)
    sam.objective(model, x, y).backward()
    eps = sam.perturbation()
    # ||T^-1 eps||_2 = rho, T = diag(|theta|) (ASAM) or I (SAM); eps is 0 where theta is 0
    with torch.no_grad():
        scaled = [torch.where(p != 0, e / p.abs(), torch.zeros_like(e)) if adaptive else e for p, e in eps]
        radius = float(torch.linalg.vector_norm(torch.cat([s.flatten() for s in scaled])))
    assert radius == pytest.approx(0.05, rel=1e-3)
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y)
        for p, e in eps:
            p.add_(e)
        loss_eps = F.cross_entropy(model(x), y)
    assert loss_eps > loss  # eps is an ascent direction


def test_second_pass_restores_theta_and_bn_statistics(tiny_model, tiny_dataset):
    model = tiny_model.train()
    x, y = tiny_dataset.train.float()[:64], tiny_dataset.train.labels[:64]
    sam = _sam(model, rho=2.0, adaptive=True, lr=0.0)  # lr 0: the base step changes nothing
    sam.objective(model, x, y).backward()  # first pass updates running statistics
    params = [p.detach().clone() for p in model.parameters()]
    stats = [bn.running_mean.clone() for _, bn in batchnorms(model)]
    sam.step()
    assert all(torch.allclose(a, p, atol=1e-6) for a, p in zip(params, model.parameters()))
    assert all(torch.equal(s, bn.running_mean) for s, (_, bn) in zip(stats, batchnorms(model)))
    assert all(bn.momentum == 0.1 for _, bn in batchnorms(model))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_smoke_badnets(smoke_run, seed):
    # epochs 10 instead of 100: each SAM step is two forward/backward passes, and 100 epochs would
    # take well over the ~90 s smoke budget on this CPU. Measured on the smoke preset, badnets, spc 100:
    #   seed 0: ACC 0.834 -> 0.807, ASR 0.997 -> 0.411, RA 0.536, 676 s (2-core CPU at load ~30;
    #   about 20x less CPU time than that). Seeds 1 and 2 not measured yet (time ran out): add
    #   them to the parametrization once measured and tighten the floors.
    row = smoke_run("ftsam", attack="badnets", spc=100, seed=seed, defense_params={"epochs": 10})
    assert row["status"] == "ok", row["error"]
    assert row["asr_before"] - row["asr_after"] >= 0.45
    assert row["acc_after"] >= row["acc_before"] - 0.08

"""Adversarial input perturbations, shared by every defense and attack that needs one.

All functions act on float images in pixel space [0, 1] and keep x + delta inside [0, 1].

- :func:`perturb`: projected gradient ascent on any per-batch objective (PGD, Madry et al.,
  arXiv:1706.06083), under an L-inf or L2 budget; the building block of the others;
- :func:`pgd`: untargeted (maximise CE on the true label) or targeted (minimise CE on a target);
- :func:`universal`: one perturbation shared by a whole dataset (i-BAU, AWM, LF);
- :func:`minimal_perturbation`: the smallest L2 step that crosses the nearest decision boundary
  (DeepFool, Moosavi-Dezfooli et al., arXiv:1511.04599), used to measure boundary distances.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdbench.components import ImageSet
from bdbench.nn import frozen
from bdbench.training import batches

Objective = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, x_adv) -> loss to maximise
Norm = Literal["linf", "l2", "l1"]  # "l1": a radial rescale (project); no signed PGD step is defined


def project(delta: torch.Tensor, eps: float, norm: Norm, batched: bool = True) -> torch.Tensor:
    """Project ``delta`` (per sample when ``batched``) onto the L-inf or L2 ball of radius ``eps``.

    ``norm="l1"`` rescales ``delta`` radially into the L1 ball, ``delta * min(1, eps / ||delta||_1)``
    (AWM's trigger bound, arXiv:2207.04497 Alg. 1; not the Euclidean projection onto the L1 ball).
    """
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1) if batched else delta.flatten().unsqueeze(0)
    size = flat.abs().sum(dim=1) if norm == "l1" else flat.norm(dim=1)
    scale = (eps / size.clamp_min(1e-12)).clamp(max=1.0)
    return delta * (scale.view(-1, *([1] * (delta.dim() - 1))) if batched else scale)


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm, clip: bool = True) -> torch.Tensor:
    delta = project(delta, eps, norm)
    return (x + delta).clamp(0, 1) - x if clip else delta


def _step(grad: torch.Tensor, step_size: float, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return step_size * grad.sign()
    flat = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return step_size * grad / flat


def perturb(model: nn.Module, x: torch.Tensor, objective: Objective, *, eps: float, step_size: float, steps: int,
            norm: Norm = "linf", random_start: bool = True, generator: torch.Generator | None = None,
            optimizer: Literal["sign", "adam"] = "sign", start: Literal["random", "zero", "max"] | None = None,
            clip: bool = True, stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """delta within the ``eps`` ball maximising ``objective(model, x + delta)`` by projected ascent.

    ``optimizer="sign"`` takes PGD steps of ``step_size`` (the sign of the gradient under L-inf);
    ``"adam"`` takes Adam steps with learning rate ``step_size`` (GIC). ``start`` is where delta
    begins: ``"random"`` (uniform in the ball), ``"zero"``, or ``"max"`` (+eps in every pixel,
    SAU's reference); None follows ``random_start``. With ``clip`` (the default) x + delta stays
    in [0, 1]; without it only the ball constrains delta (SAU's reference does not clip).
    ``stop``, asked after each evaluation of the objective and before its step, ends the ascent
    early (an objective whose gradient has vanished, e.g. SAU once every sample is shared).
    Parameters of ``model`` get no gradient; the model's mode (train/eval) is left as it is.
    """
    if norm == "l1" and optimizer == "sign":
        raise ValueError("perturb() takes no signed L1 step: use optimizer='adam' with an L1 bound")
    with frozen(model):
        start = start or ("random" if random_start else "zero")
        if start == "random":
            noise = torch.rand(x.shape, generator=generator).to(x) * 2 - 1
            delta = _project(noise * eps, x, eps, norm, clip)
        elif start == "max":
            delta = _project(torch.full_like(x, eps), x, eps, norm, clip)
        elif start == "zero":
            delta = torch.zeros_like(x)
        else:
            raise ValueError(f"perturb: unknown start {start!r} (random, zero or max)")
        if optimizer == "adam":
            delta.requires_grad_(True)
            adam = torch.optim.Adam([delta], lr=step_size)
            for _ in range(steps):
                adam.zero_grad(set_to_none=True)
                loss = objective(model, x + delta)
                if stop is not None and stop():
                    break
                (-loss).backward()
                adam.step()
                with torch.no_grad():
                    delta.copy_(_project(delta, x, eps, norm, clip))
        else:
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = objective(model, x + delta)
                if stop is not None and stop():
                    break
                (grad,) = torch.autograd.grad(loss, delta)
                delta = _project(delta.detach() + _step(grad, step_size, norm), x, eps, norm, clip)
    return delta.detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
        target: torch.Tensor | None = None, norm: Norm = "linf", random_start: bool = True,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial examples x + delta: untargeted on labels ``y``, or targeted on ``target``."""
    if target is None:
        def objective(m, xa):
            return F.cross_entropy(m(xa), y)
    else:
        def objective(m, xa):
            return -F.cross_entropy(m(xa), target)
    return x + perturb(model, x, objective, eps=eps, step_size=step_size, steps=steps, norm=norm,
                       random_start=random_start, generator=generator)


def universal(model: nn.Module, data: ImageSet, objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
              *, eps: float, lr: float, epochs: int, batch_size: int, device: torch.device, norm: Norm = "linf",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One perturbation delta (C x H x W) maximising ``objective(model, x + delta, y)`` over ``data``.

    Optimised with Adam on the mean objective of each batch, projected onto the ``eps`` ball.
    """
    delta = torch.zeros(data.shape, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    with frozen(model):
        for _ in range(epochs):
            for x, y in batches(data, batch_size, device=device, shuffle=True, generator=generator):
                opt.zero_grad(set_to_none=True)
                (-objective(model, (x + delta).clamp(0, 1), y)).backward()
                opt.step()
                with torch.no_grad():
                    delta.copy_(project(delta, eps, norm, batched=False))
    return delta.detach()


def minimal_perturbation(model: nn.Module, x: torch.Tensor, *, max_iter: int = 50, overshoot: float = 0.02,
                         candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepFool: per-sample minimal L2 perturbation ``r`` with argmax f(x + r) != argmax f(x).

    Linearises the classifier around the current point and steps to the nearest linearised
    boundary among the ``candidates`` most likely classes (all by default), ``overshoot``
    past it. Returns ``(r, adversarial_label)``; a sample that does not flip within
    ``max_iter`` steps keeps its last ``r`` and label -1.
    """
    model.eval()
    with torch.no_grad():
        logits0 = model(x)
    orig = logits0.argmax(1)
    k = logits0.shape[1] if candidates is None else min(candidates, logits0.shape[1])
    classes = logits0.argsort(1, descending=True)[:, :k]
    r_total = torch.zeros_like(x)
    adv_label = torch.full_like(orig, -1)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for _ in range(max_iter):
        if not active.any():
            break
        idx = active.nonzero().flatten()
        xa = (x[idx] + (1 + overshoot) * r_total[idx]).clamp(0, 1).requires_grad_(True)
        logits = model(xa)
        pred = logits.argmax(1)
        flipped = pred != orig[idx]
        adv_label[idx[flipped]] = pred[flipped]
        active[idx[flipped]] = False
        keep = ~flipped
        if not keep.any():
            break
        idx, xa_logits = idx[keep], logits[keep]
        f0 = xa_logits.gather(1, orig[idx].unsqueeze(1)).squeeze(1)
        g0 = torch.autograd.grad(f0.sum(), xa, retain_graph=True)[0][keep]
        best_dist = torch.full((len(idx),), float("inf"), device=x.device)
        best_r = torch.zeros_like(x[idx])
        for j in range(1, k):
            cls = classes[idx, j]
            fk = xa_logits.gather(1, cls.unsqueeze(1)).squeeze(1)
            gk = torch.autograd.grad(fk.sum(), xa, retain_graph=True)[0][keep]
            w = gk - g0
            f = (fk - f0).detach()
            wn = w.flatten(1).norm(dim=1).clamp_min(1e-8)
            dist = f.abs() / wn
            better = dist < best_dist
            step = ((dist + 1e-4) / wn).view(-1, *([1] * (x.dim() - 1))) * w
            best_r[better] = step[better]
            best_dist = torch.where(better, dist, best_dist)
        r_total[idx] = r_total[idx] + best_r.detach()
    return ((1 + overshoot) * r_total).detach(), adv_label


def boundary_distances(model: nn.Module, x: torch.Tensor, *, device: torch.device, batch_size: int = 256,
                       max_iter: int = 50, overshoot: float = 0.02, candidates: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(||r_i||_2, adversarial label) of :func:`minimal_perturbation` for float images ``x``, batched
    (Burn's boundary distance; the label is -1 where the sample did not flip)."""
    norms, labels = [], []
    for start in range(0, len(x), batch_size):
        r, adv = minimal_perturbation(model, x[start:start + batch_size].to(device), max_iter=max_iter,
                                      overshoot=overshoot, candidates=candidates)
        norms.append(r.flatten(1).norm(dim=1).cpu())
        labels.append(adv.cpu())
    if not norms:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(norms), torch.cat(labels)

"""FT-SAM: fine-tuning the backdoored model with (adaptive) sharpness-aware minimization.

Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023, arXiv:2304.11823. Vanilla fine-tuning barely moves the
backdoor-related neurons (which have large weight norms); fine-tuning on the sharpness-aware
objective (section 4, the adaptive-SAM form of Kwon et al., arXiv:2102.11600)

    min_theta  max_{||T_theta^-1 eps||_2 <= rho}  L(theta + eps),   T_theta = diag(|theta|),

shrinks them and escapes the backdoored minimum. Per step on a batch (the paper's algorithm):

1. g = grad L(theta)                                   (train mode, BN statistics updated);
2. eps = rho T_theta^2 g / ||T_theta g||_2             (norm over all parameters jointly);
3. g' = grad L(theta + eps)                            (BN running statistics left untouched);
4. theta <- theta, restored; then the base SGD step with g'.

L is cross-entropy with label smoothing. Plain SAM (Foret et al., arXiv:2010.01412) is the same
with T_theta = I (``adaptive=false``).

Fidelity notes:
- Defaults are BackdoorBench's CIFAR-10 ones (``defense/ft-sam.py``, ``config/defense/ft-sam``,
  kept by the survey's fork): rho 2 (rho_max = rho_min, so constant), adaptive on, label smoothing
  0.1, and the fine-tuning recipe of :class:`bdbench.training.FineTuning` (100 epochs, SGD lr
  0.01, momentum 0.9, wd 5e-4, batch 256, cosine, crop (+ flip on natural images)).
- The cosine schedule steps once per epoch over ``epochs`` (the shared training loop). BackdoorBench
  steps it every *iteration* with T_max 100, so its lr oscillates with a 200-iteration period: an
  artefact, not copied.
- The optional GSAM decomposition (alpha, off by default in BackdoorBench) and the lr-proportional
  rho schedule (inactive when rho_max = rho_min) are not implemented.
- Mixed precision is off for this defense: the second gradient is taken outside the shared loop's
  gradient scaler (a CPU run is unaffected).
- The SAM update is an optimizer wrapper handed to :func:`bdbench.training.fit`; the loss it sees
  last is the batch it re-evaluates at theta + eps. Running statistics are frozen in the second pass
  by setting each BatchNorm's momentum to 0 (as the reference does).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult
from bdbench.nn import batchnorms
from bdbench.params import param, positive, unit_interval
from bdbench.training import FineTuning, fit, make_optimizer

REF = "BackdoorBench config/defense/ft-sam/cifar10.yaml"


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep normalising with batch statistics but leave running statistics as they are."""
    saved = [(bn, bn.momentum) for _, bn in batchnorms(model)]
    for bn, _ in saved:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum


class SharpnessAware(torch.optim.Optimizer):
    """(A)SAM around a base optimizer: ``step()`` re-evaluates the last batch at theta + eps and
    steps the base optimizer with that gradient. Pass :meth:`objective` to ``fit`` as ``loss_fn``."""

    def __init__(self, base: torch.optim.Optimizer, loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                 *, rho: float, adaptive: bool) -> None:
        super().__init__(base.param_groups, {})
        self.param_groups = base.param_groups  # the scheduler's lr changes reach the base optimizer
        self.base, self.loss, self.rho, self.adaptive = base, loss, rho, adaptive
        self._batch: tuple[nn.Module, torch.Tensor, torch.Tensor] | None = None

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._batch = (model, x, y)
        return self.loss(model, x, y)

    @torch.no_grad()
    def perturbation(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Step 2: eps = rho T^2 g / ||T g||_2 for every parameter with a gradient (T = |theta| or I)."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        scaled = [(p.abs() * p.grad) if self.adaptive else p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled])).clamp_min(1e-12)
        return [(p, self.rho * ((p.abs() * s) if self.adaptive else s) / norm) for p, s in zip(params, scaled)]

    def step(self, closure=None):
        if self._batch is None:
            raise RuntimeError("SharpnessAware.step() before objective() saw a batch")
        model, x, y = self._batch
        eps = self.perturbation()
        with torch.no_grad():
            for p, e in eps:
                p.add_(e)  # theta + eps
        self.base.zero_grad(set_to_none=True)
        with torch.enable_grad(), frozen_running_stats(model):
            self.loss(model, x, y).backward()  # step 3: g' = grad L(theta + eps)
        with torch.no_grad():
            for p, e in eps:
                p.sub_(e)  # step 4: restore theta
        self.base.step()
        self._batch = None


class FTSAM(Defense):
    """Fine-tuning with adaptive sharpness-aware minimization on the clean budget."""

    name = "ftsam"
    needs = frozenset({"clean"})
    paper = Paper(title="Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization",
                  venue="ICCV", year=2023, arxiv="2304.11823")

    @attrs.frozen(kw_only=True)
    class Config(FineTuning):
        rho: float = param(2.0, source=f"{REF} (rho_max = rho_min = 2)", help="neighbourhood radius", check=positive)
        adaptive: bool = param(True, source=f"{REF} (--adaptive is store_false: ASAM on); paper sec. 4",
                               help="adaptive SAM (T = |theta|); false: plain SAM")
        label_smoothing: float = param(0.1, source=f"{REF} (label_smoothing)", check=unit_interval)

    def purify(self, model, data, ctx) -> DefenseResult:
        c = self.config
        recipe = attrs.evolve(c.recipe(ctx.dataset.hflip), amp=False)

        def loss(m, x, y):
            return F.cross_entropy(m(x), y, label_smoothing=c.label_smoothing)

        sam = SharpnessAware(make_optimizer(model.parameters(), recipe), loss, rho=c.rho, adaptive=c.adaptive)
        fit(model, data.clean, recipe, ctx, loss_fn=sam.objective, optimizer=sam, description="ftsam: SAM fine-tuning")
        return DefenseResult(model=model)


@hookimpl
def register_defenses(register):
    register(FTSAM)

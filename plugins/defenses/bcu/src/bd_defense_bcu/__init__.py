"""BCU: backdoor cleansing with unlabeled data, distillation into a partly re-initialised copy.

Pang, Sun, Ling, Chen, "Backdoor Cleansing with Unlabeled Data", CVPR 2023, arXiv:2211.12044,
section 3:

1. teacher T = the backdoored model (frozen);
2. student S = T with each weight and bias element of every conv/linear layer replaced, with
   probability r_l, by the matching element of a freshly initialised layer; r_l grows with depth;
3. min_S KL( softmax(z_T(x) / tau) || softmax(z_S(x) / tau) ) over the defender's images x, with
   the temperature rising linearly over training, tau_e = 1 + 3 (e + 1) / E.

The objective uses no label, so any images of the right shape serve: the defender's budget with
its labels ignored, or out-of-distribution data (``--source brightness``). ``needs`` is
``{"clean"}`` only because that is how bdbench hands images over; the labels are never read.

Fidelity notes:
- Ratios: the official ResNet-18 ratios rise x3 per stage, 0.01 (stem, layer1) / 0.03 / 0.09 / 0.27,
  and 0.10 for the head. On any model we give the i-th of n convolutions (call order)
  r = r_first (r_last / r_first)^(i / (n - 1)) and the head ``r_head``: the same geometric ladder
  without name matching (the official prefix match silently falls back to the first ratio for
  unknown names such as PreAct-ResNet18's ``linear``: not copied).
- Loss: KL with batch mean and no tau^2 factor, as the official code
  (``bdbench.losses.distillation_kl`` divided by tau^2). Its unused pseudo-label CE is omitted.
- BN parameters and running statistics are kept from the backdoored model; the student trains in
  train mode, the teacher in eval mode, with the training augmentation, as the official code.
- Defaults are the official run's: 100 epochs, SGD lr 0.01, momentum 0.9, wd 5e-4, cosine, batch
  256. Its data is 5,000 unlabeled CIFAR-10 images; here it is the run's budget.
"""
from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult
from bdbench.losses import distillation_kl
from bdbench.nn import call_order, classifier, clone, example_input
from bdbench.params import param, unit_interval
from bdbench.training import FineTuning, fit


def reinit_ratios(model: nn.Module, input_shape: tuple[int, int, int], first: float, last: float,
                  head: float) -> list[tuple[nn.Module, float]]:
    """(layer, ratio) for every Conv2d (geometric from ``first`` to ``last`` in call order) and the head."""
    convs = [m for _, m in call_order(model, example_input(model, input_shape), (nn.Conv2d,))]
    n = len(convs)
    ladder = [(m, first * (last / first) ** (i / max(n - 1, 1)) if first > 0 else last * (i / max(n - 1, 1)))
              for i, m in enumerate(convs)]
    return ladder + [(classifier(model), head)]


@torch.no_grad()
def partial_reinit(layers: list[tuple[nn.Module, float]], generator: torch.Generator) -> float:
    """Replace each weight/bias element with prob. r by a fresh initialisation; return the share replaced."""
    changed = total = 0
    for layer, r in layers:
        fresh = clone(layer)
        fresh.reset_parameters()
        for name in ("weight", "bias"):
            p = getattr(layer, name, None)
            if p is None:
                continue
            mask = torch.rand(p.shape, generator=generator) < r
            p.copy_(torch.where(mask.to(p.device), getattr(fresh, name), p))
            changed, total = changed + int(mask.sum()), total + mask.numel()
    return changed / max(total, 1)


class BCU(Defense):
    """BCU: distil the backdoored model into a partly re-initialised copy on unlabeled (even OOD) images."""

    name = "bcu"
    needs = frozenset({"clean"})  # images only: labels are never used
    paper = Paper(title="Backdoor Cleansing with Unlabeled Data", venue="CVPR", year=2023, arxiv="2211.12044")

    @attrs.frozen(kw_only=True)
    class Config(FineTuning):
        ratio_first: float = param(0.01, source="official BCU distillation_dropout_increase.py (stem, layer1)",
                                   help="re-init probability of the first conv", check=unit_interval)
        ratio_last: float = param(0.27, source="official BCU (layer4)", help="... of the last conv",
                                  check=unit_interval)
        ratio_head: float = param(0.10, source="official BCU (fc)", check=unit_interval)
        tau_start: float = param(1.0, source="official BCU: tau_e = 1 + 3 (e + 1) / E", help="temperature ramp base")
        tau_rise: float = param(3.0, source="official BCU: tau_e = 1 + 3 (e + 1) / E", help="temperature ramp height")

    def purify(self, model, data, ctx) -> DefenseResult:
        c = self.config
        teacher = clone(model).eval()
        for q in teacher.parameters():
            q.requires_grad_(False)
        layers = reinit_ratios(model, data.image_shape, c.ratio_first, c.ratio_last, c.ratio_head)
        replaced = partial_reinit(layers, ctx.generator("bcu-reinit"))
        recipe = c.recipe(ctx.dataset.hflip)
        steps_per_epoch = math.ceil(len(data.clean) / recipe.batch_size)
        step = [0]

        def kd_loss(student, x, _labels_unused):
            epoch = step[0] // steps_per_epoch
            step[0] += 1
            tau = c.tau_start + c.tau_rise * (epoch + 1) / c.epochs
            with torch.no_grad():
                z_t = teacher(x)
            return distillation_kl(student(x), z_t, tau) / tau ** 2

        fit(model, data.clean, recipe, ctx, loss_fn=kd_loss, description="bcu: distillation", stream="bcu")
        return DefenseResult(model=model, diagnostics={"reinitialised": replaced})


@hookimpl
def register_defenses(register):
    register(BCU)

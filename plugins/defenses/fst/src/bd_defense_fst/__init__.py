"""FST: Feature Shift Tuning, re-initialise the linear head and push it away from the old one while fine-tuning.

Min, Qin, Shen, Cheng, "Towards Stable Backdoor Purification through Feature Shift Tuning",
NeurIPS 2023, arXiv:2310.01875 (section 4). With the model split into a feature extractor and a
linear head (w, b):

1. keep w_ori, the backdoored head's weight; re-initialise w, b ~ U(-1/sqrt(d), 1/sqrt(d)),
   d the head's fan-in;
2. fine-tune all parameters on  L = CE(f(x), y) + alpha <w, w_ori>_F  (the inner product
   sum_jk w_jk w_ori_jk), which drives the new head away from the old one and so shifts the
   features away from the backdoor's;
3. after every optimiser step project w back onto the sphere ||w||_F = ||w_ori||_F.

Fidelity notes:
- Defaults: paper section 5 / appendix for CIFAR-10 and the official
  ``AISafety-HKUST/stable_backdoor_purification`` ``fine_tune/ft.py --ft_mode fst`` (alpha 0.2,
  10 epochs, SGD lr 0.01, momentum 0.9, cosine, no weight decay); batch 256 and crop (+ flip on
  natural images) as the survey's fork. The paper lowers alpha (0.1 GTSRB, 0.001 CIFAR-100/Tiny)
  and lr (0.001) on other datasets; set them with ``--param``.
- The head is the model's final linear layer (:func:`bdbench.nn.classifier`). The fork also
  re-initialises the hidden classifier layers of VGG19-BN and MobileNetV3; we do not, as the paper
  names only the linear head.
- The bias is drawn with the weight's fan-in bound, as in the official code.
- BatchNorm is in train mode (the reference's); the last epoch's model is returned (no test-set
  selection).
"""
from __future__ import annotations

import math

import attrs
import torch

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult
from bdbench.nn import classifier
from bdbench.params import non_negative, param, positive
from bdbench.training import FineTuning, cross_entropy, fit

PAPER = "paper sec. 5 (CIFAR-10)"
OFFICIAL = "official fine_tune/ft.py"


class FST(Defense):
    """Feature Shift Tuning: re-initialised head, penalised inner product with the old head, fine-tuning."""

    name = "fst"
    needs = frozenset({"clean"})
    paper = Paper(title="Towards Stable Backdoor Purification through Feature Shift Tuning",
                  venue="NeurIPS", year=2023, arxiv="2310.01875")

    @attrs.frozen(kw_only=True)
    class Config(FineTuning):
        epochs: int = param(10, source=f"{PAPER}; survey fork config/defense/fst", check=positive)
        lr: float = param(0.01, source=f"{PAPER}; {OFFICIAL}", check=positive)
        weight_decay: float = param(0.0, source=f"{OFFICIAL} (no weight decay)", check=non_negative)
        alpha: float = param(0.2, source=f"{PAPER}; {OFFICIAL} (--alpha); survey fork",
                             help="weight of the inner product <w, w_ori>", check=non_negative)

    def purify(self, model, data, ctx) -> DefenseResult:
        c = self.config
        head = classifier(model)
        w_ori = head.weight.detach().clone()
        norm_ori = w_ori.norm()
        bound = 1 / math.sqrt(head.in_features)
        gen = ctx.generator("fst: head")
        with torch.no_grad():  # step 1: re-initialise the head
            head.weight.copy_(torch.rand(head.weight.shape, generator=gen) * 2 * bound - bound)
            if head.bias is not None:
                head.bias.copy_(torch.rand(head.bias.shape, generator=gen) * 2 * bound - bound)
        inner_init = float((head.weight.detach() * w_ori).sum())

        def loss_fn(m, x, y):  # step 2
            return cross_entropy(m, x, y) + c.alpha * (head.weight * w_ori.to(head.weight)).sum()

        def after_step():  # step 3: back onto the sphere of radius ||w_ori||
            with torch.no_grad():
                head.weight.mul_(norm_ori.to(head.weight) / head.weight.norm().clamp_min(1e-12))

        fit(model, data.clean, c.recipe(ctx.dataset.hflip), ctx, loss_fn=loss_fn, after_step=after_step,
            description="fst: feature shift tuning")
        w = head.weight.detach()
        return DefenseResult(model=model, diagnostics={
            "inner_product_init": inner_init,
            "inner_product_final": float((w * w_ori.to(w)).sum()),
            "cosine_final": float((w * w_ori.to(w)).sum() / (w.norm() * norm_ori.to(w)).clamp_min(1e-12)),
        })


@hookimpl
def register_defenses(register):
    register(FST)

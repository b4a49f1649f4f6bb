"""AWM: Adversarial Weight Masking, a soft weight mask that resists a recovered universal trigger.

Chai & Chen, "One-shot Neural Backdoor Erasing via Adversarial Weight Masking", NeurIPS 2022,
arXiv:2207.04497, Algorithm 1. A soft mask m, one entry per convolution weight, initialised to 1,
makes the network f(.; m * theta). For each outer epoch e = 1..E:

1. Trigger recovery (inner max), a universal perturbation Delta, reset to 0 each epoch:
       Delta = argmax_{||Delta||_1 <= tau} E_D CE(f(x + Delta; m * theta), y)
2. Mask update (outer min):
       min_m  alpha CE(f(x; m * theta), y) + beta CE(f(x + Delta; m * theta), y) + gamma ||m||_1,
   one optimizer step on m per batch, then m is clipped to [0, 1].

The purified model keeps the soft mask: theta <- m * theta (no binarisation, unlike ANP).

Fidelity notes:
- Masks: every Conv2d weight element (official masked-conv layers; ``bdbench.masking.WeightMasks``);
  biases, BatchNorm and the linear head are not masked. The survey's fork masks BN channels
  instead (RNP's masked BN), which turns AWM into neuron masking; we follow the paper.
- Trigger recovery uses ``bdbench.adversarial.universal``: Adam steps of ``trigger_lr`` on the
  mean CE of each batch, with x + Delta clipped to [0, 1] (pixel space), and Delta rescaled into
  the L1 ball of radius ``tau`` after every step. The official code takes SGD steps of lr 10 on
  the same loss and rescales once at the end of the phase; the fork adds Delta to normalised
  tensors and clips them to [0, 1] (a bug not copied). As in the official code, the labels of
  the recovery are the model's current predictions argmax f(x), not y.
- Both phases run ``inner`` passes over the defender's data per outer epoch (official: one
  loader of floor(n / b) * inner batches drawn with replacement).
- The perturbed input of the mask loss is clipped to [0, 1]. alpha and beta are separate
  parameters (paper); the official code ties beta = 1 - alpha, which the defaults satisfy.
- The whole model stays in eval mode (BatchNorm frozen), as in the official code and the fork.
  The network's own weights are frozen; only m is optimised (Adam, lr 0.01, official).
- tau = 1000 is the official L1 bound in pixel units for 3x32x32 CIFAR images (a mean of 0.33
  per pixel); it is not rescaled for other image sizes (on 1x28x28 it bounds nothing that the
  [0, 1] clipping does not). gamma ||m||_1 is not normalised by the number of weights (survey).
- The official optional "shrink" pre-phase (``shrink_steps`` 0) and one-shot augmentation are
  not implemented; the official lr decay per epoch (off by default) is ``lr_decay``.
- Measured on the smoke preset (Fashion-MNIST subset, smallcnn width 16, BadNets, spc 100), with
  5 outer epochs x 2 passes (the test's budget; the rest official), ACC / ASR before -> after:
  seed 0 0.834 -> 0.826 / 0.996 -> 0.049; seed 1 0.845 -> 0.803 / 0.991 -> 0.054; seed 2
  0.858 -> 0.805 / 0.999 -> 0.034 (RA 0.76-0.81; 44-55 s on a loaded 2-core CPU).
"""
from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from bdbench import Defense, Paper, hookimpl
from bdbench.adversarial import universal
from bdbench.components import DefenseResult, ImageSet
from bdbench.masking import WeightMasks
from bdbench.params import non_negative, param, positive, unit_interval
from bdbench.training import Recipe, fit, make_optimizer, predict

OFFICIAL = "official jinghuichen/AWM main.py"


class AWM(Defense):
    """AWM: learn a soft mask on every conv weight that keeps clean accuracy under a recovered universal trigger."""

    name = "awm"
    needs = frozenset({"clean"})
    paper = Paper(title="One-shot Neural Backdoor Erasing via Adversarial Weight Masking", venue="NeurIPS",
                  year=2022, arxiv="2207.04497")

    @attrs.frozen(kw_only=True)
    class Config:
        epochs: int = param(20, source=f"{OFFICIAL} (outer epochs); fork 20", help="outer epochs E", check=positive)
        inner: int = param(5, source=f"{OFFICIAL} (inner)", help="passes over the data per phase", check=positive)
        batch_size: int = param(128, source=f"{OFFICIAL} (batch size)", check=positive)
        alpha: float = param(0.9, source=f"{OFFICIAL}; fork", help="weight of the clean loss",
                             check=non_negative)
        beta: float = param(0.1, source=f"{OFFICIAL} (1 - alpha)", help="weight of the loss under Delta",
                            check=non_negative)
        gamma: float = param(1e-8, source=f"{OFFICIAL}; fork hyper_gamma", help="weight of ||m||_1",
                             check=non_negative)
        tau: float = param(1000.0, source=f"{OFFICIAL}; fork trigger_norm", help="L1 bound of Delta (pixel units)",
                           check=positive)
        lr: float = param(0.01, source=f"{OFFICIAL} (Adam)", help="mask learning rate", check=positive)
        lr_decay: float = param(1.0, source=f"{OFFICIAL} (decay off); fork ExponentialLR 0.9",
                                help="mask lr factor per outer epoch", check=unit_interval)
        trigger_lr: float = param(0.1, source="ours: Adam step of core universal() (official: SGD lr 10)",
                                  help="Adam learning rate of Delta (pixel units)", check=positive)

    def recover_trigger(self, model, data: ImageSet, ctx, generator) -> torch.Tensor:
        """Step 1: the universal Delta (||Delta||_1 <= tau) maximising CE on the model's own predictions."""
        c = self.config
        model.eval()
        own = ImageSet(data.images, predict(model, data.images, device=ctx.device, batch_size=ctx.eval_batch_size))
        return universal(model, own, lambda m, xa, y: F.cross_entropy(m(xa), y), eps=c.tau, lr=c.trigger_lr,
                         epochs=c.inner, batch_size=c.batch_size, device=ctx.device, norm="l1", generator=generator)

    def purify(self, model, data, ctx) -> DefenseResult:
        c = self.config
        model.to(ctx.device).eval()
        masks = WeightMasks(model, method="awm")  # only m is optimised: fit() freezes theta
        recipe = Recipe(epochs=c.inner, batch_size=c.batch_size, lr=c.lr, optimizer="adam", weight_decay=0.0,
                        schedule="constant", amp=False)
        opt = make_optimizer(masks.parameters(), recipe)
        gen = ctx.generator("awm: trigger")
        trigger_l1, mask_mean = [], []
        try:
            for e in range(c.epochs):
                delta = self.recover_trigger(model, data.clean, ctx, gen)
                trigger_l1.append(delta.abs().sum().item())

                def loss_fn(net, x, y, delta=delta):
                    net.eval()  # BatchNorm frozen (official)
                    logits, logits_adv = net(torch.cat([x, (x + delta).clamp(0, 1)])).split(len(x))
                    return (c.alpha * F.cross_entropy(logits, y) + c.beta * F.cross_entropy(logits_adv, y)
                            + c.gamma * masks.l1())

                for group in opt.param_groups:
                    group["lr"] = c.lr * c.lr_decay ** e
                fit(model, data.clean, recipe, ctx, loss_fn=loss_fn, params=masks.parameters(), optimizer=opt,
                    after_step=masks.clamp_, description=f"awm: epoch {e + 1}", stream=f"awm-{e}")
                mask_mean.append(masks.flat().mean().item())
            values = masks.flat()
            masks.bake()
        except BaseException:
            masks.remove()
            raise
        model.eval()
        return DefenseResult(model=model, diagnostics={
            "weights": len(values), "mask_mean": float(values.mean()),
            "mask_below_half": float((values < 0.5).float().mean()), "mask_zero": float((values == 0).float().mean()),
            "trigger_l1": [round(v, 2) for v in trigger_l1], "mask_mean_per_epoch": [round(v, 4) for v in mask_mean],
            "steps": c.epochs * c.inner * math.ceil(len(data.clean) / c.batch_size)})


@hookimpl
def register_defenses(register):
    register(AWM)

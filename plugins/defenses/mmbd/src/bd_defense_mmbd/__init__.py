"""MM-BD: maximum-margin backdoor detection, and its mitigation MM-BM (learned activation bounds).

Wang, Xiang, Miller, Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary
Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024, arXiv:2205.06900.

Detection (sec. 4, data-free):

1. For every class k, the maximum margin statistic
   r_k = max_{x in [0,1]^d} [ z_k(x) - max_{j != k} z_j(x) ]     (z: the logits),
   estimated by projected gradient ascent from ``detect_images`` uniform random images (SGD with
   momentum; a class stops when its loss changes by less than ``detect_tol`` relative), r_k the
   largest margin reached.
2. Null model: a Gamma distribution fitted (shape, location, scale) to the K - 1 statistics other
   than the largest; the order-statistic p-value of the largest is p = 1 - F(r_max)^K.
3. Detect an attack when p < ``alpha``; the detected target class is argmax_k r_k.

Mitigation MM-BM (sec. 6): backdoor inputs drive abnormally large activations, so a
per-channel upper bound z_l is put on the output of every activation layer l,
h_l <- min(h_l, z_l), and with the weights frozen the bounds are learned on the clean data D by
   min_Z (1/|D|) sum_{x in D} MSE(f_Z(x), f(x)) + lambda * sum_l ||z_l||_2,
keeping the clean logits while shrinking the bounds. At epochs 20, 30 and 40, lambda is
multiplied by ``a`` if the bounded model's accuracy that epoch is at least ``acc_threshold``,
and divided by ``a`` otherwise.

Fidelity notes:
- Margins are on logits (the paper's "outputs prior to the softmax" and the official code; the
  survey writes softmax). Random images and bounds live in pixel space [0, 1]; the core's model
  normalizes inside, as the official code feeds unnormalized images.
- The K detection problems run as one batch; a class that meets the stopping rule is frozen, so
  each class follows its own optimisation as in the official per-class loop.
- Placement: the official code bounds three ResNet-18 points, the outputs of the stem, layer1 and
  layer2, all in the first half of the network (the 1st, 5th and 9th of its 17 ReLUs); the survey
  fork bounds nearly every activation. ``placement="first-half"`` (default) bounds the activation
  modules (ReLU, ReLU6, LeakyReLU, Hardswish, SiLU, GELU) in the first half of the forward order,
  floor(L / 2) of L, the official region for any architecture; ``placement="all"`` bounds every
  one. Initial value 8.0, Adam lr 0.1, 50 epochs, batch 200, lambda 0.5, a 1.2 are the official
  ``univ_bm.py`` values (the fork's lr 1e-3 from the layer maximum barely moves the bounds, per
  the defense card).
- As in the official code, D keeps only the clean samples the model classifies correctly, so the
  95% accuracy rule is a 5% relative drop; bounds are not clamped to be >= 0.
- Mitigation runs whatever the detection says (``mitigate="always"``, how the survey evaluates
  it); ``mitigate="detected"`` returns the model unchanged when no attack is detected.
- The model stays in eval mode throughout (BN running statistics), as in the official code.
- Measured (smoke preset, smallcnn width 16, BadNets, seed 0, ACC 0.831, ASR 0.999): with
  ``placement="all"`` the official lambda 0.5 drives all 7 layers' bounds to ~0 (the penalty is
  an unsquared L2 norm, whose gradient keeps its size down to zero) and ACC falls to 0.10; on
  the first 1, 2 and 3 layers ACC / ASR are 0.817 / 0.991, 0.776 / 0.979 and 0.669 / 0.047.
  The default (first half: 3 of 7) on seeds 1 and 2: ACC 0.841 -> 0.757 and 0.854 -> 0.771, ASR
  0.055 and 0.035. The bounds cut the backdoor at a cost of 8-16 points of ACC, because the
  official lambda is lowered only three times, by a factor of 1.2 each.
"""
from __future__ import annotations

import warnings
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult
from bdbench.errors import BdbenchError
from bdbench.nn import call_order, capture, example_input
from bdbench.params import fraction, param, positive
from bdbench.training import Recipe, fit, predict

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.SiLU, nn.GELU)


def margins(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """z_k(x) - max_{j != k} z_j(x) for each row's class k."""
    own = logits.gather(1, classes.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, classes.view(-1, 1), float("-inf")).max(1).values
    return own - others


def max_margin_statistics(model, num_classes, image_shape, cfg, generator, device) -> torch.Tensor:
    """r_k for every class k (step 1), by projected SGD with momentum on random images."""
    n = cfg.detect_images
    classes = torch.arange(num_classes).repeat_interleave(n).to(device)
    x = torch.rand(num_classes * n, *image_shape, generator=generator).to(device)
    velocity = torch.zeros_like(x)
    active = torch.ones(num_classes, dtype=torch.bool, device=device)
    previous = None
    for _ in range(cfg.detect_steps):
        x.requires_grad_(True)
        loss = -margins(model(x), classes).view(num_classes, n).sum(1)  # one loss per class
        (grad,) = torch.autograd.grad(loss.sum(), x)
        with torch.no_grad():
            rows = active.repeat_interleave(n).view(-1, *([1] * len(image_shape)))
            velocity = torch.where(rows, cfg.detect_momentum * velocity + grad, velocity)
            x = torch.where(rows, (x - cfg.detect_lr * velocity).clamp_(0, 1), x).detach()
            loss = loss.detach()
            if previous is not None:
                active &= (previous - loss).abs() / previous.abs().clamp_min(1e-12) >= cfg.detect_tol
            previous = loss
        if not active.any():
            break
    with torch.no_grad():
        return margins(model(x), classes).view(num_classes, n).max(1).values.cpu()


def order_statistic_p_value(r: torch.Tensor) -> float:
    """p = 1 - F(r_max)^K, F a Gamma fitted to the other K - 1 statistics (step 2)."""
    from scipy import stats

    values = r.double().numpy()
    k, top = len(values), values.argmax()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's MLE may warn on 9 points; the fit is still used
        shape, loc, scale = stats.gamma.fit(list(values[:top]) + list(values[top + 1:]))
    return float(1.0 - stats.gamma.cdf(values[top], shape, loc=loc, scale=scale) ** k)


class ActivationBounds:
    """Per-channel upper bounds z_l on the outputs of ``layers`` (h <- min(h, z_l)), by forward hooks."""

    def __init__(self, layers: list[tuple[str, nn.Module]], channels: list[int], init: float, device) -> None:
        self.names = [name for name, _ in layers]
        self.bounds = [torch.full((c,), init, device=device, requires_grad=True) for c in channels]
        self.enabled = True
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(layers)]

    def _hook(self, i):
        def clamp(module, inputs, output):
            if not self.enabled:
                return output
            z = self.bounds[i]
            return torch.minimum(output, z.view(1, -1, *([1] * (output.dim() - 2))))
        return clamp

    def penalty(self) -> torch.Tensor:
        return sum(z.norm(2) for z in self.bounds)


class MMBD(Defense):
    """MM-BD: maximum-margin detection of the backdoor target, then learned per-channel activation bounds (MM-BM)."""

    name = "mmbd"
    needs = frozenset({"clean"})
    paper = Paper(title="MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary Backdoor Pattern Types "
                        "Using a Maximum Margin Statistic", venue="IEEE S&P", year=2024, arxiv="2205.06900")

    @attrs.frozen(kw_only=True)
    class Config:
        detect_images: int = param(30, source="official wanghangpsu/MM-BD univ_bd.py (NI=30 random images per class)",
                                   help="random starting images per class", check=positive)
        detect_steps: int = param(300, source="official univ_bd.py (at most 300 iterations)", check=positive)
        detect_lr: float = param(0.01, source="official univ_bd.py (SGD lr 0.01)", check=positive)
        detect_momentum: float = param(0.2, source="official univ_bd.py (SGD momentum 0.2)", check=fraction)
        detect_tol: float = param(1e-5, source="official univ_bd.py (relative loss change stop)", check=positive)
        alpha: float = param(0.05, source="paper sec. 4 (significance level 0.05)", check=fraction)
        mitigate: Literal["always", "detected"] = param(
            "always", source="survey fork defense/mm-bd.py (mitigation only, always applied)")
        bound_init: float = param(8.0, source="official univ_bm.py (bounds initialised to 8)", check=positive)
        lr: float = param(0.1, source="official univ_bm.py (Adam lr 0.1)", check=positive)
        epochs: int = param(50, source="official univ_bm.py; fork mm-bd.py (50 epochs)", check=positive)
        batch_size: int = param(200, source="official univ_bm.py (batch 200)", check=positive)
        lam: float = param(0.5, source="official univ_bm.py; fork lambda_hyper 0.5", check=positive)
        a: float = param(1.2, source="official univ_bm.py; fork alpha 1.2", check=positive)
        acc_threshold: float = param(0.95, source="official univ_bm.py (95% training accuracy)", check=fraction)
        placement: Literal["first-half", "all"] = param(
            "first-half", source="official univ_bm.py (stem, layer1, layer2 of ResNet-18); 'all': survey fork",
            help="bound the activations in the first half of the forward order, or all of them")

    def purify(self, model, data, ctx) -> DefenseResult:
        cfg, device = self.config, ctx.device
        model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        r = max_margin_statistics(model, data.num_classes, data.image_shape, cfg, ctx.generator("mmbd-detect"), device)
        p_value = order_statistic_p_value(r)
        diagnostics = {"statistics": [round(v, 4) for v in r.tolist()], "p_value": p_value,
                       "detected": p_value < cfg.alpha, "detected_class": int(r.argmax())}
        if cfg.mitigate == "detected" and not diagnostics["detected"]:
            return DefenseResult(model=model, diagnostics=diagnostics | {"mitigated": False})

        clean = data.clean
        clean = clean.subset((predict(model, clean.images, device=device) == clean.labels).nonzero().flatten())
        layers = call_order(model, example_input(model, data.image_shape), ACTIVATIONS)
        if not layers:
            raise BdbenchError(f"mmbd bounds activation layers ({', '.join(a.__name__ for a in ACTIVATIONS)}), "
                               f"and {type(model).__name__} has none")
        if cfg.placement == "first-half":
            layers = layers[:max(1, len(layers) // 2)]
        with torch.no_grad():
            channels = [o.shape[1] for o in _outputs(model, layers, data.image_shape)]
        bounds = ActivationBounds(layers, channels, cfg.bound_init, device)
        optimizer = torch.optim.Adam(bounds.bounds, lr=cfg.lr)
        lam, seen = cfg.lam, [0, 0]

        def loss_fn(net, x, y):
            net.eval()  # BN in eval mode, as the official code
            with torch.no_grad():
                bounds.enabled = False
                reference = net(x)
                bounds.enabled = True
            out = net(x)
            seen[0] += int((out.argmax(1) == y).sum())
            seen[1] += len(y)
            return F.mse_loss(out, reference) + lam * bounds.penalty()

        recipe = Recipe(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, optimizer="adam", schedule="constant")
        for epoch in range(1, cfg.epochs + 1):
            seen[:] = [0, 0]
            fit(model, clean, recipe, ctx, loss_fn=loss_fn, optimizer=optimizer, description="mmbd: bounds",
                stream=f"mmbd-{epoch}")
            if epoch in (20, 30, 40):
                lam = lam * cfg.a if seen[0] >= cfg.acc_threshold * max(seen[1], 1) else lam / cfg.a
        for z in bounds.bounds:
            z.requires_grad_(False)
        for p in model.parameters():
            p.requires_grad_(True)
        return DefenseResult(model=model, diagnostics=diagnostics | {
            "mitigated": True, "clean_used": len(clean), "layers": bounds.names, "lambda": lam,
            "bound_mean": [round(float(z.mean()), 4) for z in bounds.bounds],
            "train_acc_last_epoch": seen[0] / max(seen[1], 1),
        })


def _outputs(model, layers, image_shape):
    with capture(dict(layers)) as out:
        model(example_input(model, image_shape))
    return [out[name] for name, _ in layers]


@hookimpl
def register_defenses(register):
    register(MMBD)

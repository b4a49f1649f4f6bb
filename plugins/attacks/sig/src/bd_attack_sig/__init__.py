"""SIG: a sinusoidal (or ramp) signal added to target-class training images, labels kept.

Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label
Poisoning", IEEE ICIP 2019, arXiv:1902.11237, section 3 (the two backdoor signals):

- ramp:     v(i, j) = j * delta / m
- sinusoid: v(i, j) = delta * sin(2 * pi * j * f / m)

on the 0-255 scale, m the image width, j the column, the same value for every row and channel
(vertical bands). Training: x' = clip(x + v, 0, 255) on a fraction of the *target-class*
images, labels untouched (clean label). Test: the same v added to non-target images; success
is a prediction of the target class.

Fidelity notes:
- The formula is the paper's additive one, as in BackdoorBench v2 (``sig.py``); the
  NAD-derived ``0.2 * x + 0.8 * v`` variant (early BackdoorBench) is not copied.
- delta = 40 and f = 6 are BackdoorBench's defaults (the paper trains with delta about 20 and
  tests with a larger one); ``delta_test`` sets a different test-time amplitude, default the
  training one. Both are grey levels and f is cycles per width, so neither is rescaled with
  the image size.
- Poison count: ``ratio_of="dataset"`` (default, BackdoorBench) draws round(ratio * N) images
  from the target class, N the attack's training set, capped at the class size (BackdoorBench's
  ``np.random.choice`` raises instead; here the cap is reported through the row's
  ``poison_count``); ``ratio_of="target-class"`` draws round(ratio * N_target), the paper's,
  Madry's and BackdoorBox's semantics. The choice is part of ``attack_params`` in every row.
  On the smoke preset (5,700 training images, about 570 per class) ratio 0.1 over the dataset
  is the whole target class, as BackdoorBench's 0.1 is on CIFAR-10.
- Clipping at 0 makes the signal one-sided on black background pixels (Fashion-MNIST); this
  is the paper's formula, kept as is.
- Poisoned images are stored rounded to uint8 (not truncated: attack-cards section 0).
- Measured on the smoke preset (10% over the dataset = the whole target class, target 0,
  seeds 0-2): ACC 0.778 / 0.781 / 0.791, ASR 0.969 / 0.882 / 0.933 with the defaults; the
  clean-accuracy cost is the target class carrying the signal (BackdoorBench's CIFAR-10 row
  shows the same drop).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Literal

import attrs
import torch

from bdbench import Attack, Paper, hookimpl
from bdbench.components import ImageSet, PoisonedSet
from bdbench.params import param, positive
from bdbench.triggers import additive, stamp_subset, target_class_indices


def signal(shape: tuple[int, int, int], delta: float, f: float, kind: str = "sin") -> torch.Tensor:
    """The backdoor signal v (C x H x W) in [0, 1] units: delta / 255 times the ramp or sinusoid."""
    c, h, w = shape
    j = torch.arange(w, dtype=torch.float64)
    if kind == "ramp":
        row = j * delta / w
    else:
        row = delta * torch.sin(2 * math.pi * j * f / w)
    return (row / 255.0).float().expand(c, h, w).clone()


class Sig(Attack):
    """SIG: clean-label attack adding a sinusoidal signal to target-class images."""

    name = "sig"
    paper = Paper(title="A New Backdoor Attack in CNNs by Training Set Corruption Without Label Poisoning",
                  venue="IEEE ICIP", year=2019, arxiv="1902.11237")

    @attrs.frozen(kw_only=True)
    class Config:
        label_mode: Literal["clean-label"] = param("clean-label", source="paper section 3 (no label poisoning)")
        delta: float = param(40.0, source="BackdoorBench config/attack/sig (sig_delta 40), 0-255 scale",
                             check=positive)
        f: float = param(6.0, source="BackdoorBench config/attack/sig (sig_f 6); paper GTSRB f=6", check=positive)
        delta_test: float | None = param(
            None, source="paper section 4 allows a larger test amplitude; default: delta (BackdoorBench)",
            check=positive)
        signal: Literal["sin", "ramp"] = param("sin", source="paper section 3 (sinusoid; ramp for MNIST)")
        ratio_of: Literal["dataset", "target-class"] = param(
            "dataset", source="BackdoorBench utils/backdoor_generate_poison_index.py (ratio of the dataset, "
                              "drawn from the target class); 'target-class': paper, BackdoorBox")

    def signal(self, shape: tuple[int, int, int], test: bool = False) -> torch.Tensor:
        cfg = self.config
        delta = cfg.delta_test if test and cfg.delta_test is not None else cfg.delta
        return signal(shape, delta, cfg.f, cfg.signal)

    def apply(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The test-time trigger (``delta_test`` when set)."""
        return additive(images, self.signal(tuple(images.shape[1:]), test=True))

    def poison(self, train: ImageSet, ratio: float, target: int, num_classes: int,
               generator: torch.Generator) -> PoisonedSet:
        """Clean label: indices drawn from the target class only, labels unchanged."""
        idx = target_class_indices(train.labels, ratio, target, generator, self.config.ratio_of)
        train_signal = self.signal(train.shape)  # the training amplitude (delta, not delta_test)
        images = stamp_subset(SimpleNamespace(apply=lambda x, y=None: additive(x, train_signal)), train, idx)
        return PoisonedSet(idx, images, train.labels[idx].clone())


@hookimpl
def register_attacks(register):
    register(Sig)

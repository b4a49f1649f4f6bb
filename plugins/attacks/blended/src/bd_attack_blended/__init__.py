"""Blended: a key image alpha-blended over the whole input, dirty labels.

Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", arXiv:1712.05526, 2017, section 4.2 ("blended injection strategy"):
x' = alpha * k + (1 - alpha) * x, y' = t.

Fidelity notes:
- The key: the paper uses a Hello Kitty photo or a random-noise pattern with each pixel
  uniform in [0, 255]. The photo cannot be shipped under a free license, so the default key is
  the paper's noise pattern, drawn from a fixed seed (``key_seed``) at the image's size, the
  same for every run; ``key=pattern`` gives a smooth procedurally drawn image instead
  (low-frequency sinusoids), closer in character to a natural photo.
- alpha = 0.2 at training and test time (BackdoorBench's default).
"""
from __future__ import annotations

import math
from typing import Literal

import attrs
import torch

from bdbench import Attack, Paper, hookimpl
from bdbench.params import fraction, non_negative, param
from bdbench.triggers import blend


def noise_key(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Each pixel uniform over the 256 grey levels (the paper's random-pattern key)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255


def pattern_key(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """A smooth image: a sum of random low-frequency sinusoids per channel, scaled to [0, 1]."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    key = torch.zeros(shape)
    for ch in range(c):
        for _ in range(4):
            fy, fx, phase = (torch.rand(3, generator=g) * torch.tensor([3.0, 3.0, 2 * math.pi])).tolist()
            key[ch] += torch.sin(2 * math.pi * (fy * yy + fx * xx) + phase)
    key -= key.amin(dim=(1, 2), keepdim=True)
    return key / key.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)


class Blended(Attack):
    """Blended: a fixed key image blended over the input with ratio alpha, dirty labels."""

    name = "blended"
    paper = Paper(title="Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning",
                  venue="arXiv", year=2017, arxiv="1712.05526")

    @attrs.frozen(kw_only=True)
    class Config:
        label_mode: Literal["all-to-one", "all-to-all"] = param("all-to-one", source="paper section 4 (all-to-one)")
        alpha: float = param(0.2, source="BackdoorBench config/attack/blended (alpha 0.2); paper section 4.2",
                             check=fraction)
        key: Literal["noise", "pattern"] = param(
            "noise", source="paper section 4.2 (random-noise key); the photo key cannot be shipped")
        key_seed: int = param(0, source="fixed so that every run uses one key", check=non_negative)

    def key_image(self, shape: tuple[int, int, int]) -> torch.Tensor:
        make = noise_key if self.config.key == "noise" else pattern_key
        return make(shape, self.config.key_seed)

    def apply(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return blend(images, self.key_image(tuple(images.shape[1:])), self.config.alpha)


@hookimpl
def register_attacks(register):
    register(Blended)

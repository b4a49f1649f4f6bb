"""BadNets: a white corner patch with dirty labels.

Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain", arXiv:1708.06733, 2017 (IEEE Access 2019).

Trigger (section 3, the "pattern" backdoor): x' = (1 - m) * x + m * p with m a square mask
flush with the bottom-right corner and p white; labels y' = t (all-to-one, "single target")
or y' = (y + 1) mod K (all-to-all). round(rho * N) training samples are drawn uniformly from
all classes and replaced by their poisoned copies; the dataset size is unchanged.

Fidelity notes:
- The patch is BackdoorBench's 3x3 white square at 32x32, scaled to side round(3 * H / 32)
  (3 px at 28x28, 6 px at 64x64), in every channel.
- Poisoned images are stored rounded to uint8 (BackdoorBench truncates; identical for a white
  patch).
- Test-time ASR is measured by the core on non-target images (all-to-one), as BackdoorBench.
"""
from __future__ import annotations

from typing import Literal

import attrs
import torch

from bdbench import Attack, Paper, hookimpl
from bdbench.params import param, positive, unit_interval
from bdbench.triggers import corner_box, corner_patch, stamp


class BadNets(Attack):
    """BadNets: a white square in the bottom-right corner, dirty labels."""

    name = "badnets"
    paper = Paper(title="BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain",
                  venue="arXiv", year=2017, arxiv="1708.06733")

    @attrs.frozen(kw_only=True)
    class Config:
        label_mode: Literal["all-to-one", "all-to-all"] = param(
            "all-to-one", source="paper section 3 (single target); BackdoorBench default")
        patch_size: int = param(3, source="BackdoorBench resource/badnet (3x3 at 32x32), scaled to the image",
                                help="side of the square at 32x32", check=positive)
        value: float = param(1.0, source="BackdoorBench: white (255)", help="patch intensity in [0, 1]",
                             check=unit_interval)

    def apply(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        mask, pattern = corner_patch(tuple(images.shape[1:]), self.config.patch_size, self.config.value)
        return stamp(images, mask, pattern)

    def trigger_hint(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        return corner_box(image_shape, self.config.patch_size)


@hookimpl
def register_attacks(register):
    register(BadNets)

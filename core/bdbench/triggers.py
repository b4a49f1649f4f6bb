"""Trigger application on tensors, shared by every attack.

All functions take float images in pixel space [0, 1], shape N x C x H x W, and return new
tensors. Masks and patterns broadcast over the batch.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from bdbench.errors import ParameterError, ShapeError

if TYPE_CHECKING:  # pragma: no cover
    from bdbench.components import Attack, ImageSet


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Replace pixels: x' = (1 - m) * x + m * p (BadNets, Gu et al. 2017)."""
    _check_batch(images)
    mask, pattern = mask.to(images), pattern.to(images)
    return images * (1 - mask) + mask * pattern


def blend(images: torch.Tensor, key: torch.Tensor, alpha: float) -> torch.Tensor:
    """Alpha blending: x' = (1 - alpha) * x + alpha * k (Blended, Chen et al. 2017)."""
    _check_batch(images)
    return (1 - alpha) * images + alpha * key.to(images)


def additive(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x' = clip(x + delta, 0, 1) (SIG, LF and other additive triggers)."""
    _check_batch(images)
    return (images + delta.to(images)).clamp_(0, 1)


def corner_patch(image_shape: tuple[int, int, int], size_at_32: int = 3, value: float = 1.0,
                 corner: str = "bottom-right") -> tuple[torch.Tensor, torch.Tensor]:
    """A square patch of side round(size_at_32 * H / 32), flush with a corner.

    Returns ``(mask, pattern)``, each 1 x H x W (broadcast over channels).
    """
    c, h, w = image_shape
    side = max(1, round(size_at_32 * h / 32))
    mask = torch.zeros(1, h, w)
    rows = slice(h - side, h) if corner.startswith("bottom") else slice(0, side)
    cols = slice(w - side, w) if corner.endswith("right") else slice(0, side)
    mask[:, rows, cols] = 1.0
    return mask, torch.full((1, h, w), float(value))


def corner_box(image_shape: tuple[int, int, int], size_at_32: int = 3,
               corner: str = "bottom-right") -> tuple[int, int, int, int]:
    """(top, left, height, width) of :func:`corner_patch`'s square."""
    _, h, w = image_shape
    side = max(1, round(size_at_32 * h / 32))
    top = h - side if corner.startswith("bottom") else 0
    left = w - side if corner.endswith("right") else 0
    return top, left, side, side


def resize_image(image: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Resize a C' x H' x W' float image to ``image_shape`` (bilinear; RGB -> luminance for grey)."""
    c, h, w = image_shape
    if image.shape[0] == 3 and c == 1:
        image = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).unsqueeze(0)
    elif image.shape[0] == 1 and c == 3:
        image = image.expand(3, -1, -1)
    if tuple(image.shape[1:]) != (h, w):
        image = F.interpolate(image.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False)[0]
    return image.clamp(0, 1)


def poison_indices(n: int, ratio: float, generator: torch.Generator,
                   pool: torch.Tensor | None = None) -> torch.Tensor:
    """round(ratio * n) indices drawn without replacement from ``pool`` (default: all n)."""
    if not 0 < ratio <= 1:
        raise ParameterError(f"poison ratio must be in (0, 1], got {ratio}")
    count = int(math.floor(ratio * n + 0.5))
    pool = torch.arange(n) if pool is None else pool
    if count > len(pool):
        raise ParameterError(f"poison ratio {ratio} asks for {count} samples but only {len(pool)} are eligible")
    perm = torch.randperm(len(pool), generator=generator)[:count]
    return pool[perm].sort().values


def target_class_indices(labels: torch.Tensor, ratio: float, target: int, generator: torch.Generator,
                         ratio_of: str = "dataset") -> torch.Tensor:
    """Clean-label poison indices: drawn without replacement from the ``target`` class only.

    ``ratio_of="dataset"`` asks for round(ratio * N), N = len(labels) (BackdoorBench's count for
    SIG and LC), capped at the class size (BackdoorBench raises instead); ``"target-class"``
    asks for round(ratio * N_target) (Turner et al.'s and BackdoorBox's proportion of the class).
    """
    if ratio_of not in ("dataset", "target-class"):
        raise ParameterError(f"ratio_of must be 'dataset' or 'target-class', got {ratio_of!r}")
    if not 0 < ratio <= 1:
        raise ParameterError(f"poison ratio must be in (0, 1], got {ratio}")
    pool = (labels == target).nonzero().flatten()
    if not len(pool):
        raise ParameterError(f"a clean-label attack needs target-class ({target}) training images; there are none")
    n = len(labels) if ratio_of == "dataset" else len(pool)
    count = min(len(pool), int(math.floor(ratio * n + 0.5)))
    perm = torch.randperm(len(pool), generator=generator)[:count]
    return pool[perm].sort().values


def stamp_subset(attack: Attack, data: ImageSet, index: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``attack.apply`` on ``data[index]``, batched, quantized back to uint8."""
    from bdbench.components import to_float, to_uint8

    out = []
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        out.append(to_uint8(attack.apply(to_float(data.images[idx]), data.labels[idx])))
    if not out:
        return data.images[:0].clone()
    return torch.cat(out)


def _check_batch(images: torch.Tensor) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ShapeError(f"trigger input must be float N x C x H x W in [0, 1], got {images.dtype} "
                         f"of shape {tuple(images.shape)}")

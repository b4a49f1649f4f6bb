"""Splits and the defender's data: the reserved hold-out, SPC sampling and auxiliary sources.

Every run splits the training set the same way (seeded by the run seed): a stratified 5% is
*reserved* (never used to train the attacked model; GIC, seed 002 section 4.1) and the rest
is the attack's training set. The defender's budget is drawn from an auxiliary *source*:

- ``seen``: clean, unpoisoned samples of the attack's training set (seed 002's oracle "seen" set);
- ``reserved``: the held-out 5%;
- ``brightness``, ``contrast``, ``blur``, ``noise``, ``rotation``: the reserved samples under a
  shift never seen in training (seed 002's D_bright and the other shifts of its reference fork;
  the seed does not state their sizes, so the sizes are ours and fixed, see each function);
- ``external:PATH``: a folder of images in class sub-folders (names or label indices).

A budget is ``spc`` samples per class (the survey's protocol: 2, 10, 100) or ``clean_ratio``,
a fraction of the attack's training set size. When a defense uses validation data it gets 10%
of the budget per class, and one of the two samples at spc 2 (Grad-Prune, seed 001 sec. V-A).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
import torch

from bdbench.components import DatasetInfo, ImageSet, to_float, to_uint8
from bdbench.errors import DataNotFoundError, ParameterError

RESERVED_FRACTION = 0.05
VAL_FRACTION = 0.1


@attrs.frozen(eq=False)
class Split:
    train: torch.Tensor  # indices used to train the attacked model
    reserved: torch.Tensor  # indices held out (never trained on)


def stratified_split(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rest, picked): ``picked`` holds round(fraction * n_c) of each class c (at least one)."""
    picked, rest = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = min(len(idx), max(1, round(fraction * len(idx)))) if fraction > 0 else 0
        picked.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(rest).sort().values, torch.cat(picked).sort().values


def reserve(labels: torch.Tensor, generator: torch.Generator, fraction: float = RESERVED_FRACTION) -> Split:
    rest, picked = stratified_split(labels, fraction, generator)
    return Split(train=rest, reserved=picked)


def per_class(labels: torch.Tensor, pool: torch.Tensor, spc: int, generator: torch.Generator) -> torch.Tensor:
    """``spc`` indices of each class, drawn from ``pool`` (indices into ``labels``)."""
    out = []
    pool_labels = labels[pool]
    for c in torch.unique(labels).tolist():
        idx = pool[pool_labels == c]
        if len(idx) < spc:
            raise ParameterError(f"spc {spc} asks for {spc} samples of class {c} but the source has {len(idx)}")
        out.append(idx[torch.randperm(len(idx), generator=generator)[:spc]])
    return torch.cat(out)


@attrs.frozen(kw_only=True)
class Budget:
    """The defender's data budget: samples per class or a fraction of the training set."""

    spc: int | None = None
    clean_ratio: float | None = None

    def __attrs_post_init__(self) -> None:
        if (self.spc is None) == (self.clean_ratio is None):
            raise ParameterError("give exactly one of spc and clean_ratio")
        if self.spc is not None and self.spc <= 0:
            raise ParameterError(f"spc must be a positive integer, got {self.spc}")
        if self.clean_ratio is not None and not 0 < self.clean_ratio <= 1:
            raise ParameterError(f"clean_ratio must be in (0, 1], got {self.clean_ratio}")


def draw(labels: torch.Tensor, pool: torch.Tensor, budget: Budget, *, with_val: bool, train_size: int,
         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of the budget, drawn from ``pool``."""
    num_classes = int(labels.max().item()) + 1 if len(labels) else 0
    if budget.spc is not None:
        picked = per_class(labels, pool, budget.spc, generator)
        if not with_val:
            return picked, picked[:0]
        n_val = 1 if budget.spc <= 2 else max(1, round(VAL_FRACTION * budget.spc))
        if budget.spc < 2:
            raise ParameterError("defenses that select on validation data need spc >= 2")
        train, val = [], []
        for c in range(num_classes):
            idx = picked[labels[picked] == c]
            val.append(idx[:n_val])
            train.append(idx[n_val:])
        return torch.cat(train), torch.cat(val)
    count = max(1, math.floor(budget.clean_ratio * train_size + 0.5))
    if count > len(pool):
        raise ParameterError(f"clean_ratio {budget.clean_ratio} asks for {count} samples but the source has {len(pool)}")
    picked = pool[torch.randperm(len(pool), generator=generator)[:count]]
    if not with_val:
        return picked, picked[:0]
    n_val = max(1, round(VAL_FRACTION * count))
    return picked[n_val:], picked[:n_val]


def brightness(images: torch.Tensor, factor: float = 1.5) -> torch.Tensor:
    """Brightness shift (multiply and clip), the unseen lighting change of seed 002's D_bright."""
    return to_uint8(to_float(images) * factor)


def contrast(images: torch.Tensor, factor: float = 0.5) -> torch.Tensor:
    """Contrast towards each image's mean grey level."""
    x = to_float(images)
    return to_uint8((x - x.mean(dim=(1, 2, 3), keepdim=True)) * factor + x.mean(dim=(1, 2, 3), keepdim=True))


def blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur, kernel 2 * ceil(2 sigma) + 1."""
    from torchvision.transforms.functional import gaussian_blur

    k = 2 * math.ceil(2 * sigma) + 1
    return gaussian_blur(images, [k, k], [sigma, sigma])


def noise(images: torch.Tensor, std: float = 0.05) -> torch.Tensor:
    """Additive Gaussian noise (std in [0, 1] pixel units), from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    return to_uint8(to_float(images) + std * torch.randn(images.shape, generator=g))


def rotation(images: torch.Tensor, degrees: float = 15.0) -> torch.Tensor:
    """Rotation by a fixed angle (corners filled with black)."""
    from torchvision.transforms.functional import rotate

    return rotate(images, degrees)


def load_folder(path: Path, info: DatasetInfo) -> ImageSet:
    """Images of ``path/<class>/*``, class folders named by class name or label index, resized
    to the dataset's image shape (the ``external`` source)."""
    from PIL import Image

    if not path.is_dir():
        raise DataNotFoundError(f"external source {path}: no such folder")
    index = {name.lower(): i for i, name in enumerate(info.class_names)}
    index.update({str(i): i for i in range(info.num_classes)})
    c, h, w = info.image_shape
    images, labels = [], []
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        label = index.get(folder.name.lower())
        if label is None:
            raise DataNotFoundError(f"external source {path}: folder {folder.name!r} is not a class of {info.name} "
                                    f"(use class names or indices 0..{info.num_classes - 1})")
        for file in sorted(folder.iterdir()):
            try:
                with Image.open(file) as img:
                    img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
                    images.append(torch.from_numpy(np.asarray(img).copy()).reshape(h, w, c).permute(2, 0, 1))
            except OSError:
                continue  # not an image
            labels.append(label)
    if not images:
        raise DataNotFoundError(f"external source {path}: no readable images in class folders")
    return ImageSet(torch.stack(images), torch.tensor(labels))


@attrs.frozen(kw_only=True)
class Source:
    """An auxiliary-data source: which pool to draw from and how to transform the draw."""

    name: str
    pool: str  # "seen" (clean part of the attack's training set), "reserved" or "external"
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    path: Path | None = None  # the external folder
    description: str = ""


SOURCES: dict[str, Source] = {
    "seen": Source(name="seen", pool="seen", description="clean samples of the attack's training set"),
    "reserved": Source(name="reserved", pool="reserved", description="the 5% of training data held out from attack training"),
    "brightness": Source(name="brightness", pool="reserved", transform=brightness,
                         description="reserved samples, brightness x1.5 (seed 002)"),
    "contrast": Source(name="contrast", pool="reserved", transform=contrast,
                       description="reserved samples, contrast x0.5"),
    "blur": Source(name="blur", pool="reserved", transform=blur, description="reserved samples, Gaussian blur sigma 1"),
    "noise": Source(name="noise", pool="reserved", transform=noise,
                    description="reserved samples, Gaussian noise std 0.05"),
    "rotation": Source(name="rotation", pool="reserved", transform=rotation,
                       description="reserved samples, rotated 15 degrees"),
}


def get_source(name: str) -> Source:
    """A source by name; ``external:PATH`` is a folder of images in class sub-folders."""
    if name.startswith("external:"):
        return Source(name=name, pool="external", path=Path(name.split(":", 1)[1]).expanduser(),
                      description="a folder of images mapped to the label space")
    if name not in SOURCES:
        import difflib

        close = difflib.get_close_matches(name, SOURCES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f" (known: {', '.join(SOURCES)}, external:PATH)"
        raise ParameterError(f"unknown data source {name!r}{hint}")
    return SOURCES[name]


def defender_data(full_train: ImageSet, split: Split, poisoned_mask: torch.Tensor, budget: Budget, source: Source,
                  *, with_val: bool, generator: torch.Generator,
                  info: DatasetInfo | None = None) -> tuple[ImageSet, ImageSet]:
    """The defender's (clean, val) sets from ``source``; ``poisoned_mask`` is over ``full_train``."""
    if source.pool == "external":
        assert source.path is not None and info is not None
        base = load_folder(source.path, info)
        pool = torch.arange(len(base))
    else:
        base = full_train
        pool = split.train[~poisoned_mask[split.train]] if source.pool == "seen" else split.reserved
    tr, va = draw(base.labels, pool, budget, with_val=with_val, train_size=len(split.train), generator=generator)
    clean, val = base.subset(tr), base.subset(va)
    if source.transform is not None:
        clean, val = (ImageSet(source.transform(d.images), d.labels) if len(d) else d for d in (clean, val))
    return clean, val

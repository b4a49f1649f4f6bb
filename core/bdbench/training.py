"""The one training loop, augmentation and evaluation every attack and defense uses.

``fit`` trains a model on an :class:`ImageSet` (or any iterator of batches) with a
:class:`Recipe`; a method customises it through ``loss_fn`` (its objective),
``batch_transform`` (training-control attacks poison inside the batch) and ``after_step``
(re-apply masks, project parameters). ``predict`` and ``accuracy`` are the evaluation.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from bdbench.components import ImageSet, to_float
from bdbench.context import RunContext
from bdbench.nn import frozen
from bdbench.params import non_negative, positive


@attrs.frozen(kw_only=True)
class Recipe:
    """How to train: optimizer, schedule, batch size and augmentation."""

    epochs: int = attrs.field(default=10, validator=positive)
    batch_size: int = attrs.field(default=128, validator=positive)
    lr: float = attrs.field(default=0.01, validator=positive)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = attrs.field(default=0.9, validator=non_negative)
    weight_decay: float = attrs.field(default=5e-4, validator=non_negative)
    schedule: Literal["cosine", "constant"] = "cosine"
    crop_padding: int = attrs.field(default=0, validator=non_negative)  # random crop, padding at 32x32
    hflip: bool = False
    drop_last: bool = False
    amp: bool = True  # mixed precision on CUDA only


def make_optimizer(params: Iterable[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def augment(x: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (scaled from 32x32) and horizontal flip, per sample."""
    n, _, h, w = x.shape
    if recipe.crop_padding:
        pad = max(1, round(recipe.crop_padding * h / 32))
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
        x = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1),
                   torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1),
                   rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    if recipe.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


def batches(data: ImageSet, batch_size: int, *, device: torch.device, shuffle: bool = False,
            generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float [0, 1] image batches and labels on ``device``."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield to_float(data.images[idx]).to(device, non_blocking=True), data.labels[idx].to(device, non_blocking=True)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def fit(model: nn.Module, data: ImageSet, recipe: Recipe, ctx: RunContext, *,
        loss_fn: LossFn = cross_entropy,
        batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        after_step: Callable[[], None] | None = None,
        params: Iterable[nn.Parameter] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        description: str = "training",
        stream: str = "fit",
        after_epoch: Callable[[int], None] | None = None) -> nn.Module:
    """Train ``model`` in place for ``recipe.epochs`` epochs (train mode) and return it.

    ``params`` are the tensors to optimise (default: every parameter of ``model``); while the
    fit runs, the model's other parameters are frozen (:func:`bdbench.nn.frozen`), so backward
    computes no gradient for them. ``after_epoch(epoch)`` (0-based) runs at the end of every
    epoch, after the recipe's schedule has stepped: per-epoch work of a method (step an
    auxiliary network's LR schedule, copy a generator being optimised into the one used to poison).
    """
    device = ctx.device
    model.to(device).train()
    params = list(params) if params is not None else None
    opt = optimizer or make_optimizer(params if params is not None else model.parameters(), recipe)
    steps_per_epoch = max(1, len(data) // recipe.batch_size if recipe.drop_last and len(data) >= recipe.batch_size
                          else math.ceil(len(data) / recipe.batch_size))
    total = recipe.epochs * steps_per_epoch
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
             if recipe.schedule == "cosine" else None)
    gen = ctx.generator(stream)
    use_amp = recipe.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    freeze = frozen(model, keep=params) if params is not None else contextlib.nullcontext()
    with freeze, ctx.reporter.task(description, total) as bar:
        for epoch in range(recipe.epochs):
            for x, y in batches(data, recipe.batch_size, device=device, shuffle=True, generator=gen,
                                drop_last=recipe.drop_last):
                if batch_transform is not None:
                    x, y = batch_transform(x, y)
                x = augment(x, recipe, gen)
                opt.zero_grad(set_to_none=True)
                if use_amp:
                    with torch.autocast("cuda", dtype=torch.float16):
                        loss = loss_fn(model, x, y)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss = loss_fn(model, x, y)
                    loss.backward()
                    opt.step()
                if after_step is not None:
                    after_step()
                bar.advance()
            if sched is not None:
                sched.step()
            if after_epoch is not None:
                after_epoch(epoch)
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 512,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Predicted labels for uint8 ``images`` (``transform`` acts on the [0, 1] floats first)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size])
        if transform is not None:
            x = transform(x)
        out.append(model(x.to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def accuracy(model: nn.Module, data: ImageSet, *, device: torch.device, batch_size: int = 512) -> float:
    if len(data) == 0:
        return float("nan")
    return (predict(model, data.images, device=device, batch_size=batch_size) == data.labels).float().mean().item()


@torch.no_grad()
def mean_loss(model: nn.Module, data: ImageSet, *, device: torch.device, batch_size: int = 512) -> float:
    model.eval()
    total, n = 0.0, 0
    for x, y in batches(data, batch_size, device=device):
        total += F.cross_entropy(model(x), y, reduction="sum").item()
        n += len(y)
    return total / max(n, 1)


@attrs.frozen(kw_only=True)
class FineTuning:
    """Fine-tuning hyper-parameters shared by the fine-tuning baselines (FT, FP's last step).

    Defaults: BackdoorBench ``config/defense/ft/cifar10.yaml`` and ``fp/cifar10.yaml`` (the
    survey's fork keeps them): 100 epochs of SGD, lr 0.01, momentum 0.9, weight decay 5e-4,
    cosine schedule, batch 256, random crop (padding 4) and, on natural images, horizontal flip.
    """

    epochs: int = attrs.field(default=100, validator=positive, metadata={"source": "BackdoorBench ft/fp config"})
    lr: float = attrs.field(default=0.01, validator=positive, metadata={"source": "BackdoorBench ft/fp config"})
    batch_size: int = attrs.field(default=256, validator=positive, metadata={"source": "BackdoorBench ft/fp config"})
    momentum: float = attrs.field(default=0.9, validator=non_negative, metadata={"source": "BackdoorBench ft/fp config"})
    weight_decay: float = attrs.field(default=5e-4, validator=non_negative,
                                      metadata={"source": "BackdoorBench ft/fp config"})
    augment: bool = attrs.field(default=True, metadata={"source": "BackdoorBench: random crop + flip (CIFAR only)"})

    def recipe(self, hflip_ok: bool) -> Recipe:
        return Recipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                      weight_decay=self.weight_decay, schedule="cosine",
                      crop_padding=4 if self.augment else 0, hflip=self.augment and hflip_ok)

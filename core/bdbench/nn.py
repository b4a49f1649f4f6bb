"""Model structure helpers that work on any timm-style classifier.

Every model the core builds is a :class:`NormalizedModel`: pixel-space input, normalization,
then the architecture. Defenses find the parts they act on through these helpers instead of
knowing layer names: the feature extractor and the linear head, conv/BN pairs (a BatchNorm
that directly consumes a convolution's output), the last convolution, and the modules in the
order the forward pass calls them.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from bdbench.errors import BdbenchError


class NormalizedModel(nn.Module):
    """``net(normalize(x))`` for ``x`` in [0, 1], keeping the timm interface of ``net``."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net.forward_head(features, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()


def classifier(model: nn.Module) -> nn.Linear:
    """The final linear layer (the head)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise BdbenchError(f"model {type(model).__name__} has no linear head (get_classifier())")
    return head


def device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def call_order(model: nn.Module, example: torch.Tensor, types: tuple[type, ...] = (nn.Module,)) -> list[tuple[str, nn.Module]]:
    """Leaf modules of ``types`` in the order one forward pass calls them (each once)."""
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def hook(module, inputs, output):
        if id(module) not in seen:
            seen.add(id(module))
            order.append((names[id(module)], module))

    for m in model.modules():
        if isinstance(m, types) and not list(m.children()):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(example)
            model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return order


def example_input(model: nn.Module, input_shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.rand(2, *input_shape, device=device_of(model))


def dry_run(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """One forward pass of :func:`example_input` in eval mode without gradients, the model's
    mode restored: what hooks registered beforehand use to discover a network's structure."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input(model, input_shape))
    finally:
        model.train(was_training)


def conv_bn_pairs(model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]]:
    """(conv name, conv, bn name, bn) for every BatchNorm2d whose input is a Conv2d's output.

    Found by tensor identity in one forward pass, so pre-activation blocks (BN before conv)
    and residual sums (BN after an addition) are not mistaken for pairs.
    """
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    pairs: list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]] = []
    seen: set[int] = set()
    hooks = []

    def conv_hook(module, inputs, output):
        produced[id(output)] = (module, output)  # keep the tensor alive: its id must not be reused

    def bn_hook(module, inputs, output):
        conv, _ = produced.get(id(inputs[0]), (None, None))
        if conv is not None and id(module) not in seen and conv.out_channels == module.num_features:
            seen.add(id(module))
            pairs.append((names[id(conv)], conv, names[id(module)], module))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(bn_hook))
    try:
        dry_run(model, input_shape)
    finally:
        for h in hooks:
            h.remove()
    return pairs


def batchnorms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def require_batchnorm(model: nn.Module, method: str) -> None:
    if not batchnorms(model):
        raise BdbenchError(f"{method} needs BatchNorm2d layers, and {type(model).__name__} has none")


def last_conv(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[str, nn.Conv2d]:
    """The last Conv2d the forward pass calls."""
    convs = call_order(model, example_input(model, input_shape), (nn.Conv2d,))
    if not convs:
        raise BdbenchError(f"model {type(model).__name__} has no Conv2d layer")
    return convs[-1]


@contextlib.contextmanager
def capture(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the latest output of each named module while the context is open (keeps the graph)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, i, o, key=key: outputs.__setitem__(key, o))
               for key, m in modules.items()]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def frozen(model: nn.Module, keep: Iterable[torch.Tensor] = ()) -> Iterator[nn.Module]:
    """Within the block no parameter of ``model`` requires a gradient, except those in ``keep``
    (which keep their flag); every flag is restored on exit.

    Optimising something other than the weights (an input perturbation, a mask, a trigger, an
    inserted layer) then makes backward skip the weight gradients nothing would use: a
    convolution's backward computes its input gradient alone, about half its cost.
    """
    kept = {id(p) for p in keep}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        if id(p) not in kept:
            p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def clone(model: nn.Module) -> nn.Module:
    """A deep copy (the original model is never modified by a defense)."""
    return copy.deepcopy(model)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _Hardsigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu6(x + 3) / 6


@contextlib.contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s Hardsigmoid modules are relu6(x + 3) / 6, which autograd can
    differentiate twice (torch has no double backward for hardsigmoid; MobileNetV3's
    squeeze-excitation uses it). The same function, so outputs do not change; restored on exit.
    Second-order methods (i-BAU's hypergradient) run inside it."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Hardsigmoid):
                setattr(parent, name, _Hardsigmoid())
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)

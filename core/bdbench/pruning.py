"""Activation recording, channel masks and pruning, shared by the pruning and masking defenses.

A :class:`ChannelMask` multiplies a module's output channels by a fixed 0/1 (or soft) vector
through a forward hook, so pruned channels stay pruned while the rest of the network is
fine-tuned. :func:`prune_batchnorm_channels` prunes a BatchNorm's output channels in its
parameters (gamma = beta = 0), so the pruning is in the model's state dict.
:func:`feature_module` finds the module whose output is the feature map the head reads (the
last convolutional block's activation), on any timm-style model.
"""
from __future__ import annotations

import torch
from torch import nn

from bdbench.components import ImageSet
from bdbench.errors import BdbenchError
from bdbench.nn import example_input
from bdbench.training import batches


def feature_module(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[str, nn.Module]:
    """The deepest module whose output tensor is ``model.forward_features(x)`` itself."""
    names = {id(m): n for n, m in model.named_modules()}
    outputs: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: outputs.append((mod, o)))
             for m in model.modules() if m is not model]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            features = model.forward_features(example_input(model, input_shape))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    for module, out in outputs:  # hooks fire inner-first, so the first match is the deepest
        if out is features:
            return names[id(module)], module
    raise BdbenchError(f"cannot find the module that produces {type(model).__name__}'s feature map")


@torch.no_grad()
def channel_activations(model: nn.Module, module: nn.Module, data: ImageSet, *, device: torch.device,
                        batch_size: int = 256) -> torch.Tensor:
    """Mean activation of each output channel of ``module`` over ``data`` and spatial positions
    (eval mode, no augmentation)."""
    sums: list[torch.Tensor] = []

    def hook(mod, inputs, output):
        per_sample = output.detach().float().flatten(2).mean(2) if output.dim() > 2 else output.detach().float()
        sums.append(per_sample.sum(0).cpu())

    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        for x, _ in batches(data, batch_size, device=device):
            model(x)
    finally:
        handle.remove()
    if not sums:
        raise BdbenchError("no data to record activations on")
    return torch.stack(sums).sum(0) / len(data)


class ChannelMask:
    """A mask on ``module``'s output channels, applied by a forward hook until :meth:`remove`."""

    def __init__(self, module: nn.Module, num_channels: int) -> None:
        self.module = module
        self.mask = torch.ones(num_channels)
        self._handle = module.register_forward_hook(self._apply)

    def _apply(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (output.dim() - 2)
        return output * self.mask.to(output).view(shape)

    def prune(self, channels: torch.Tensor | list[int]) -> None:
        self.mask[torch.as_tensor(channels, dtype=torch.int64)] = 0.0

    def set(self, mask: torch.Tensor) -> None:
        self.mask = mask.detach().clone().float().cpu()

    @property
    def pruned(self) -> list[int]:
        return (self.mask == 0).nonzero().flatten().tolist()

    def remove(self) -> None:
        self._handle.remove()


@torch.no_grad()
def prune_batchnorm_channels(bn: nn.modules.batchnorm._BatchNorm, channels: torch.Tensor | list[int]) -> None:
    """Zero the output of ``bn``'s ``channels`` for good: gamma_k = beta_k = 0 (BNP, CLP).

    The same function as a 0 mask on the BN's output, but held in its parameters, so a saved
    state dict carries it (no hook). Not for a BN that is trained afterwards.
    """
    if not bn.affine:
        raise BdbenchError("pruning a BatchNorm channel needs an affine BatchNorm (gamma and beta)")
    index = torch.as_tensor(channels, dtype=torch.int64, device=bn.weight.device)
    bn.weight[index] = 0.0
    bn.bias[index] = 0.0

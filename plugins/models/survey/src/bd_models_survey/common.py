"""What the survey's architectures share: the width-multiplier config and the torchvision layout.

torchvision classifiers are ``features`` (conv stages), ``avgpool`` and ``classifier`` (a
Sequential ending in the final Linear). :class:`FeaturesPoolHead` keeps that layout, so state-dict
keys stay torchvision's, and adds the timm-style interface bdbench's structural helpers use.
"""
from __future__ import annotations

import attrs
import torch
from torch import nn

from bdbench.params import param, positive


@attrs.frozen(kw_only=True)
class WidthConfig:
    width: float = param(1.0, source="architecture paper", check=positive,
                         help="channel multiplier (1.0 is the published network; smaller for quick tests)")


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class FeaturesPoolHead(nn.Module):
    """A ``features -> avgpool -> classifier`` network with ``forward_features``/``forward_head``."""

    def __init__(self, features: nn.Module, avgpool: nn.Module, classifier: nn.Sequential) -> None:
        super().__init__()
        if not isinstance(classifier[-1], nn.Linear):
            raise TypeError(f"the classifier must end with nn.Linear, got {type(classifier[-1]).__name__}")
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier
        self.num_features = classifier[-1].in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        for layer in self.classifier[:-1]:
            x = layer(x)
        return x if pre_logits else self.classifier[-1](x)

    def get_classifier(self) -> nn.Linear:
        return self.classifier[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def from_torchvision(net: nn.Module, in_channels: int) -> FeaturesPoolHead:
    """Wrap a torchvision EfficientNet/MobileNet: stem conv set to ``in_channels``, no in-place ops.

    A replaced stem conv keeps its shape otherwise and gets torchvision's initialisation for
    these models (Kaiming normal, fan-out). In-place activations and dropout are switched off
    (same values; hooks then see distinct tensors).
    """
    stem = net.features[0]
    conv = stem[0]
    if conv.in_channels != in_channels:
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        bias=conv.bias is not None)
        nn.init.kaiming_normal_(new.weight, mode="fan_out")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
        stem[0] = new
    for module in net.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return FeaturesPoolHead(net.features, net.avgpool, net.classifier)

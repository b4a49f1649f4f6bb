"""Pre-activation ResNets, and ``smallcnn``: a miniature of PreAct-ResNet18 for CPU presets.

He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016, arXiv 1603.05027.
The residual unit is the full pre-activation one of fig. 4(e): BN-ReLU-conv3x3-BN-ReLU-conv3x3
plus an identity shortcut, or a 1x1 projection when the shape changes (taken after the first
BN-ReLU, as in the CIFAR PreAct-ResNet of BackdoorBench ``models/preact_resnet.py``).
:class:`PreActResNet` builds both the survey's PreAct-ResNet18 (``bd-models-survey``) and
``smallcnn`` here; module names follow BackdoorBench (``conv1``, ``layer1``..., ``linear``).

``smallcnn`` is three stages of one block each, widths ``w, 2w, 4w``, a stride-2 stem, and a final
BN-ReLU, then global average pooling and one linear layer. Training throughput on 2 CPU cores
(forward + backward + SGD step, batch 128, 1x28x28, width 32): 3,000 to 4,000 images/s.

Fidelity notes:

- smallcnn's stem conv has stride 2 (the CIFAR PreAct-ResNet18's has stride 1): with the stem at
  full resolution the model trained at about 800 images/s on 2 cores, too slow for the CPU
  presets; the downsampling stem keeps the shape (conv-BN-ReLU stages, residual blocks, global
  pooling, one linear head) at a quarter of the cost.
- smallcnn ends with BN-ReLU as in the paper (fig. 4(e) networks end with BN-ReLU before
  pooling), so its features are post-ReLU as Fine-Pruning assumes; BackdoorBench's
  PreAct-ResNet18 omits it (``final_act=False`` reproduces that).
- Activations are separate ``nn.ReLU`` modules (not in-place) and the residual sum is out of
  place, so activation hooks see distinct tensors and a BN fed by a sum is never taken for a
  conv-BN pair. Weights keep PyTorch's default initialisation, as in BackdoorBench.
"""
from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import nn

from bdbench import ModelBuilder, Paper
from bdbench.params import param, positive

IDENTITY_MAPPINGS = Paper(title="Identity Mappings in Deep Residual Networks", venue="ECCV", year=2016,
                          arxiv="1603.05027")


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.shortcut = (nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False))
                         if stride != 1 or in_channels != channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with a 3x3 stem, stages of :class:`PreActBlock`, GAP and a linear head.

    Stage ``i`` has ``widths[i]`` channels and ``blocks[i]`` blocks; every stage after the first
    halves the resolution. ``final_act`` adds BN-ReLU after the last stage.
    """

    def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int], blocks: Sequence[int],
                 stem_stride: int = 1, final_act: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
        self.stages = [f"layer{i + 1}" for i in range(len(widths))]
        channels = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            stage = []
            for j in range(n):
                stage.append(PreActBlock(channels, width, 2 if i > 0 and j == 0 else 1))
                channels = width
            setattr(self, self.stages[i], nn.Sequential(*stage))
        self.final = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()) if final_act else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)
        self.num_features = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.linear(x)

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class SmallCNN(ModelBuilder):
    """A miniature PreAct-ResNet18: three one-block stages (w, 2w, 4w), final BN-ReLU, GAP, linear."""

    name = "smallcnn"
    paper = IDENTITY_MAPPINGS

    @attrs.frozen(kw_only=True)
    class Config:
        width: int = param(32, source="bdbench design section 3: CPU presets; 3,000-4,000 images/s on 2 cores",
                           help="channels of the first stage (then 2x and 4x)", check=positive)
        blocks: int = param(1, source="bdbench design section 3: one residual block per stage keeps it fast",
                            help="residual blocks per stage", check=positive)

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> PreActResNet:
        w, n = self.config.width, self.config.blocks
        return PreActResNet(num_classes, input_shape[0], (w, 2 * w, 4 * w), (n, n, n), stem_stride=2, final_act=True)

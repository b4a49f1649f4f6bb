"""``preactresnet18``: the CIFAR PreAct-ResNet18 of BackdoorBench and of the survey.

He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016, arXiv 1603.05027.
Structure of BackdoorBench ``models/preact_resnet.py``: a 3x3 stride-1 stem conv (no BN), four
stages of two pre-activation basic blocks (64, 128, 256, 512 channels; stride 2 from stage 2),
adaptive global average pooling and one linear layer. Module names match BackdoorBench's
(``conv1``, ``layer1.0.bn1``, ``layer2.0.shortcut.0``, ``linear``), so its state dicts load.

Fidelity notes:

- As in BackdoorBench, there is no BN-ReLU after ``layer4``: the paper's networks end with
  BN-ReLU before pooling, BackdoorBench's does not, and the survey used BackdoorBench's. The
  features (``forward_features``) are therefore the last residual sum, not post-ReLU.
- The stem takes the dataset's channel count (BackdoorBench hard-codes 3), so 1x28x28 works;
  adaptive pooling makes any input size >= 8x8 work (28x28 ends at 4x4, 64x64 at 8x8).
- ``width`` scales every stage (rounded, at least 1 channel); 1.0 is the published network
  (11,171,146 parameters for 10 classes).
- The residual sum is out of place (BackdoorBench adds in place): same values, but a BN fed by
  a sum is never mistaken for a conv-BN pair by tensor identity. ReLUs are modules, not in place.
"""
from __future__ import annotations

from bd_models_small import PreActResNet
from bd_models_small.preact import IDENTITY_MAPPINGS
from bdbench import ModelBuilder

from bd_models_survey.common import WidthConfig, scaled


class PreActResNet18(ModelBuilder):
    """PreAct-ResNet18 as BackdoorBench builds it for CIFAR: 3x3 stem, [2,2,2,2] blocks, GAP, linear."""

    name = "preactresnet18"
    paper = IDENTITY_MAPPINGS
    Config = WidthConfig

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> PreActResNet:
        widths = [scaled(c, self.config.width) for c in (64, 128, 256, 512)]
        return PreActResNet(num_classes, input_shape[0], widths, (2, 2, 2, 2), stem_stride=1, final_act=False)

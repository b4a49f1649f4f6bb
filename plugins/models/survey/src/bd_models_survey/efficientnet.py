"""``efficientnet_b3``: torchvision's EfficientNet-B3, untrained, on the dataset's own resolution.

Tan, Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019,
arXiv 1905.11946. The B0 baseline (table 1: seven MBConv stages) scaled by width 1.2 and depth
1.4 with dropout 0.3, built with torchvision's ``EfficientNet`` and ``MBConvConfig``: the network
``torchvision.models.efficientnet_b3(weights=None)`` returns (stochastic depth 0.2, SiLU,
squeeze-and-excitation), as BackdoorBench and the survey use it on 32x32 input.

Fidelity notes:

- No change for small input, as in the survey: the stride-32 network ends at 1x1 on 32x32 (and
  on 28x28), 2x2 on 64x64.
- Grey input: the stem conv is rebuilt with the dataset's channel count (same shape otherwise,
  torchvision's initialisation).
- ``width`` multiplies the B3 width coefficient (1.2 * width, channels rounded to multiples of
  8 by torchvision); depth stays 1.4. 1.0 is the published network.
- In-place SiLU and dropout are switched off (same values; hooks see distinct tensors).
"""
from __future__ import annotations

from functools import partial

from torchvision.models import EfficientNet
from torchvision.models.efficientnet import MBConvConfig

from bdbench import ModelBuilder, Paper

from bd_models_survey.common import FeaturesPoolHead, WidthConfig, from_torchvision

# EfficientNet-B0 (Tan & Le, table 1): expand ratio, kernel, stride, in, out, layers per stage.
B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
B3_WIDTH, B3_DEPTH, B3_DROPOUT = 1.2, 1.4, 0.3


class EfficientNetB3(ModelBuilder):
    """EfficientNet-B3 from torchvision (no pretrained weights), wrapped with the timm interface."""

    name = "efficientnet_b3"
    paper = Paper(title="EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", venue="ICML",
                  year=2019, arxiv="1905.11946")
    Config = WidthConfig

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> FeaturesPoolHead:
        stage = partial(MBConvConfig, width_mult=B3_WIDTH * self.config.width, depth_mult=B3_DEPTH)
        net = EfficientNet([stage(*row) for row in B0_STAGES], dropout=B3_DROPOUT, num_classes=num_classes)
        return from_torchvision(net, input_shape[0])

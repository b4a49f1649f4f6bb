"""``mobilenet_v3_large``: torchvision's MobileNetV3-Large, untrained, on the dataset's own resolution.

Howard et al., "Searching for MobileNetV3", ICCV 2019, arXiv 1905.02244 (table 1).
``torchvision.models.mobilenet_v3_large(weights=None, num_classes=..., width_mult=...)``, as
BackdoorBench and the survey use it on 32x32 input: hard-swish, squeeze-and-excitation, a
960-channel last conv, then Linear(960, 1280)-Hardswish-Dropout(0.2)-Linear(1280, classes).

Fidelity notes:

- No change for small input, as in the survey: the stride-32 network ends at 1x1 on 32x32 (and
  on 28x28), 2x2 on 64x64.
- Grey input: the stem conv is rebuilt with the dataset's channel count (same shape otherwise,
  torchvision's initialisation).
- ``width`` is torchvision's ``width_mult`` (channels rounded to multiples of 8, the 1280 head
  scaled too); 1.0 is the published network.
- In-place activations and dropout are switched off (same values; hooks see distinct tensors).
"""
from __future__ import annotations

from torchvision.models import mobilenet_v3_large

from bdbench import ModelBuilder, Paper

from bd_models_survey.common import FeaturesPoolHead, WidthConfig, from_torchvision


class MobileNetV3Large(ModelBuilder):
    """MobileNetV3-Large from torchvision (no pretrained weights), wrapped with the timm interface."""

    name = "mobilenet_v3_large"
    paper = Paper(title="Searching for MobileNetV3", venue="ICCV", year=2019, arxiv="1905.02244")
    Config = WidthConfig

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> FeaturesPoolHead:
        net = mobilenet_v3_large(weights=None, num_classes=num_classes, width_mult=self.config.width)
        return from_torchvision(net, input_shape[0])

"""``vgg19_bn``: VGG-19 (configuration E) with batch normalization, as torchvision builds it.

Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, arXiv 1409.1556 (table 1, column E); BN after every conv as in torchvision's
``vgg19_bn``, which BackdoorBench (and the survey) use unmodified on 32x32 input. Layout and
initialisation are torchvision's: ``features`` is 16 x (conv3x3 with bias, BN, ReLU) and 5 max
pools (so BackdoorBench's ``features.49`` is still the last conv), ``avgpool`` is
``AdaptiveAvgPool2d((7, 7))`` and ``classifier`` is Linear(512*7*7, 4096)-ReLU-Dropout(0.5)-
Linear(4096, 4096)-ReLU-Dropout(0.5)-Linear(4096, classes); state-dict keys are torchvision's.

Fidelity notes:

- On 32x32 input the features end at 1x1, and the 7x7 adaptive pool copies that vector 49 times
  into the first Linear, exactly as in BackdoorBench's runs. ``pool_size=1`` gives the compact
  CIFAR head (Linear(512, 4096)), which computes the same family of functions at 32x32 with 49x
  fewer head parameters but different training dynamics; the default stays faithful.
- The max pools use ``ceil_mode=True``. On 32x32 and 64x64 every pooled size is even, so this
  is torchvision's pooling exactly; on 28x28 the sizes go 28-14-7-4-2-1 instead of reaching 0
  (torchvision's floor mode cannot run 28x28 input at all).
- The first conv takes the dataset's channel count (1 for grey images).
- ``width`` scales every conv and the two hidden Linear layers (4096); 1.0 is the published network.
- ReLUs are not in place (torchvision's are): same values; hooks see distinct tensors.
"""
from __future__ import annotations

import attrs
from torch import nn

from bdbench import ModelBuilder, Paper
from bdbench.params import param, positive

from bd_models_survey.common import FeaturesPoolHead, WidthConfig, scaled

CONFIG_E = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
            512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def vgg_features(in_channels: int, width: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in CONFIG_E:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            channels = scaled(v, width)
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
            in_channels = channels
    return nn.Sequential(*layers)


def init_vgg(net: nn.Module) -> None:
    """torchvision's VGG initialisation."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class VGG19BN(ModelBuilder):
    """VGG-19 with batch normalization (torchvision's vgg19_bn, as BackdoorBench uses it)."""

    name = "vgg19_bn"
    paper = Paper(title="Very Deep Convolutional Networks for Large-Scale Image Recognition", venue="ICLR",
                  year=2015, arxiv="1409.1556")

    @attrs.frozen(kw_only=True)
    class Config(WidthConfig):
        pool_size: int = param(7, source="torchvision vgg19_bn AdaptiveAvgPool2d((7, 7)), used as-is by BackdoorBench",
                               help="side of the adaptive average pool before the classifier", check=positive)

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> FeaturesPoolHead:
        width, pool = self.config.width, self.config.pool_size
        channels, hidden = scaled(512, width), scaled(4096, width)
        classifier = nn.Sequential(
            nn.Linear(channels * pool * pool, hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )
        net = FeaturesPoolHead(vgg_features(input_shape[0], width), nn.AdaptiveAvgPool2d(pool), classifier)
        init_vgg(net)
        return net

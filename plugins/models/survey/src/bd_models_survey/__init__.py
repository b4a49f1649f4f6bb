"""bd-models-survey: the four architectures of the survey, sized for 32x32 input.

``preactresnet18`` (BackdoorBench's CIFAR PreAct-ResNet18), ``vgg19_bn``, ``efficientnet_b3`` and
``mobilenet_v3_large`` (torchvision's, untrained). Each module's docstring has its fidelity notes.
"""
from __future__ import annotations

from bdbench import hookimpl
from bd_models_survey.efficientnet import EfficientNetB3
from bd_models_survey.mobilenet import MobileNetV3Large
from bd_models_survey.preactresnet import PreActResNet18
from bd_models_survey.vgg import VGG19BN

__all__ = ["EfficientNetB3", "MobileNetV3Large", "PreActResNet18", "VGG19BN", "register_models"]


@hookimpl
def register_models(register) -> None:
    for cls in (PreActResNet18, VGG19BN, EfficientNetB3, MobileNetV3Large):
        register(cls)

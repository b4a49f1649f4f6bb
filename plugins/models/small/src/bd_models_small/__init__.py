"""bd-models-small: ``smallcnn``, the default model of the CPU presets (see :mod:`bd_models_small.preact`)."""
from __future__ import annotations

from bdbench import hookimpl
from bd_models_small.preact import PreActBlock, PreActResNet, SmallCNN

__all__ = ["PreActBlock", "PreActResNet", "SmallCNN", "register_models"]


@hookimpl
def register_models(register) -> None:
    register(SmallCNN)

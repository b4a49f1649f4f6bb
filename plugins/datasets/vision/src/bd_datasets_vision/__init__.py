"""bd-datasets-vision: image classification datasets for bdbench, read from local files.

``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``gtsrb``, ``tiny-imagenet`` and
``digits``. Each module cites its dataset and describes the on-disk formats it reads; the folder
search shared by all of them is in :mod:`bd_datasets_vision.common`. Importing this package
reads no file and imports neither PIL, scikit-learn nor torchvision.
"""
from __future__ import annotations

from collections.abc import Callable

import bdbench

from bd_datasets_vision.cifar import Cifar10, Cifar100
from bd_datasets_vision.digits import Digits
from bd_datasets_vision.gtsrb import GTSRB
from bd_datasets_vision.mnist import MNIST, FashionMNIST
from bd_datasets_vision.tiny_imagenet import TinyImageNet

__version__ = "0.1.0"
__distribution__ = "bd-datasets-vision"

DATASETS = (FashionMNIST, MNIST, Cifar10, Cifar100, GTSRB, TinyImageNet, Digits)


@bdbench.hookimpl
def register_datasets(register: Callable[..., None]) -> None:
    for cls in DATASETS:
        register(cls)

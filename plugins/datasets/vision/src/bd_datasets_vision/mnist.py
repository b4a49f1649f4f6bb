"""MNIST and Fashion-MNIST, read from their IDX files.

- MNIST: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied to
  document recognition", Proceedings of the IEEE, 1998; http://yann.lecun.com/exdb/mnist/
- Fashion-MNIST: H. Xiao, K. Rasul, R. Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
  Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017;
  https://github.com/zalandoresearch/fashion-mnist

On disk: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each plain or gzip-compressed (``.gz``). An IDX file is a big-endian
header (two zero bytes, type code 0x08 for unsigned bytes, the number of dimensions, one
uint32 per dimension) followed by the raw values. Also found in torchvision's layout
(``FashionMNIST/raw``, ``MNIST/raw``) and, for Fashion-MNIST, where Debian's
``dataset-fashion-mnist`` package installs it. Downloads (through torchvision) happen only when
``BDBENCH_DOWNLOAD=1``.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from bdbench.components import Paper
from bdbench.errors import DataNotFoundError

from bd_datasets_vision.common import VisionDataset, download_enabled, env_data_dir

UBYTE = 0x08
FILES = {
    "train": ("train-images-idx3-ubyte(.gz)", "train-labels-idx1-ubyte(.gz)"),
    "test": ("t10k-images-idx3-ubyte(.gz)", "t10k-labels-idx1-ubyte(.gz)"),
}


def parse_idx(data: bytes, ndim: int) -> np.ndarray:
    """The unsigned-byte array of ``ndim`` dimensions in IDX ``data`` (read-only, no copy)."""
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes((0, 0, UBYTE, ndim)):
        raise ValueError(f"magic number {data[:4].hex()}, expected 000008{ndim:02x}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + math.prod(dims):
        raise ValueError(f"{len(data) - header} data bytes for shape {dims}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


class IdxDataset(VisionDataset):
    """A dataset of 1 x 28 x 28 grey images in IDX files (MNIST's format)."""

    image_shape = (1, 28, 28)
    num_classes = 10
    torchvision_class: ClassVar[str]  # also the folder torchvision downloads into: <class>/raw

    def read(self, split: str, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        images_file, labels_file = FILES[split]
        try:
            folder, _ = self.locate(data_dir, images_file)
        except DataNotFoundError:
            if not download_enabled():
                raise
            self.download(data_dir)
            folder, _ = self.locate(data_dir, images_file)
        images = self.read_idx(self.require(images_file, folder), 3)
        labels = self.read_idx(self.require(labels_file, folder), 1)
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))

    def read_idx(self, path: Path, ndim: int) -> np.ndarray:
        try:
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            return parse_idx(data, ndim)
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise self.unreadable(path, "an IDX file", exc) from None

    def download(self, data_dir: Path | None) -> None:
        """Fetch the IDX files with torchvision into ``data_dir`` (or ``$BDBENCH_DATA``)."""
        root = data_dir or env_data_dir()
        if root is None:
            raise DataNotFoundError(f"{self.name}: BDBENCH_DOWNLOAD=1 needs a folder to download into: "
                                    f"pass --data-dir or set $BDBENCH_DATA")
        import torchvision.datasets

        getattr(torchvision.datasets, self.torchvision_class)(str(root), download=True)


class FashionMNIST(IdxDataset):
    """Fashion-MNIST: 28x28 grey images of clothing, 10 classes, 60000 train / 10000 test."""

    name = "fashion-mnist"
    paper = Paper(title="Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms",
                  venue="arXiv", year=2017, arxiv="1708.07747")
    mean = (0.2860,)  # over the training set, pixels in [0, 1]
    std = (0.3530,)
    class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    torchvision_class = "FashionMNIST"
    layouts = ("FashionMNIST/raw",)
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
    hint = "install Debian's dataset-fashion-mnist, pass --data-dir, or set BDBENCH_DOWNLOAD=1"


class MNIST(IdxDataset):
    """MNIST: 28x28 grey handwritten digits, 10 classes, 60000 train / 10000 test."""

    name = "mnist"
    paper = Paper(title="Gradient-based learning applied to document recognition",
                  venue="Proceedings of the IEEE", year=1998, url="http://yann.lecun.com/exdb/mnist/")
    mean = (0.1307,)  # over the training set, pixels in [0, 1]
    std = (0.3081,)
    class_names = tuple(str(d) for d in range(10))
    torchvision_class = "MNIST"
    layouts = ("MNIST/raw",)
    hint = ("pass --data-dir or set $BDBENCH_DATA to a folder with the IDX files of "
            "http://yann.lecun.com/exdb/mnist/, or set BDBENCH_DOWNLOAD=1")

"""scikit-learn's handwritten digits: a tiny dataset that is always available offline.

E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine Learning
Repository, 1998 (the test part, 1797 images); shipped with scikit-learn as
``sklearn.datasets.load_digits``, so nothing is read from a data folder.

The 8 x 8 images, values 0..16, are upscaled 2x by nearest neighbour to 16 x 16 and scaled to
0..255 (``round(v * 255 / 16)``). There is no official split: a stratified 80/20 train/test
split with seed 0 (1437 / 360 images), the same on every machine.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bdbench.components import Paper
from bdbench.errors import DataNotFoundError

from bd_datasets_vision.common import VisionDataset

SEED = 0
TEST_FRACTION = 0.2


class Digits(VisionDataset):
    """Digits (scikit-learn): 8x8 handwritten digits upscaled to 16x16 grey, 10 classes, offline."""

    name = "digits"
    paper = Paper(title="Optical Recognition of Handwritten Digits", venue="UCI Machine Learning Repository",
                  year=1998, url="https://archive.ics.uci.edu/dataset/80")
    num_classes = 10
    image_shape = (1, 16, 16)
    mean = (0.3053,)  # over all 1797 images, pixels in [0, 1]
    std = (0.3759,)
    class_names = tuple(str(d) for d in range(10))
    hint = "pip install scikit-learn (or bd-datasets-vision[digits])"

    def read(self, split: str, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError:
            raise DataNotFoundError(f"{self.name}: needs scikit-learn; {self.hint}") from None
        digits = load_digits()
        images = np.round(digits.images.repeat(2, axis=1).repeat(2, axis=2) * 255 / 16).astype(np.uint8)
        train, test = train_test_split(np.arange(len(images)), test_size=TEST_FRACTION,
                                       stratify=digits.target, random_state=SEED)
        index = np.sort(train if split == "train" else test)
        return torch.from_numpy(images[index]).unsqueeze(1), torch.from_numpy(digits.target[index].astype(np.int64))

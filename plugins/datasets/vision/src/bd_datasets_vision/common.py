"""What every loader shares: the split check, the search for the data's folder, the one-line
errors, and image decoding.

Folders are searched in this order: the ``data_dir`` argument, ``$BDBENCH_DATA``, then the
dataset's system folders (such as Debian's ``/usr/share/datasets/fashion-mnist``); in each, the
folder itself, ``<dataset name>/`` and the dataset's usual sub-layouts (``FashionMNIST/raw``).
A file pattern ending in ``(.gz)`` matches the plain file or its gzip-compressed copy.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from bdbench.components import DatasetBuilder, ImageSet
from bdbench.errors import DataNotFoundError, ParameterError

DATA_ENV = "BDBENCH_DATA"
DOWNLOAD_ENV = "BDBENCH_DOWNLOAD"
SPLITS = ("train", "test")
GZ = "(.gz)"


def existing(folder: Path, pattern: str) -> Path | None:
    """``folder / pattern`` if it exists; a pattern ending in ``(.gz)`` also matches ``.gz``."""
    if pattern.endswith(GZ):
        base = pattern[: -len(GZ)]
        return existing(folder, base) or existing(folder, base + ".gz")
    path = folder / pattern
    return path if path.exists() else None


def download_enabled() -> bool:
    return os.environ.get(DOWNLOAD_ENV, "").lower() in ("1", "true", "yes", "on")


def env_data_dir() -> Path | None:
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


class VisionDataset(DatasetBuilder):
    """Base of this plugin's datasets: checks the split and what was read, finds the files."""

    layouts: ClassVar[tuple[str, ...]] = ()  # sub-folders searched besides the root and <name>/
    system_dirs: ClassVar[tuple[str, ...]] = ()  # searched after data_dir and $BDBENCH_DATA
    hint: ClassVar[str] = "pass --data-dir or set $BDBENCH_DATA"  # how to get the data

    def load(self, split: str, data_dir: Path | None = None) -> ImageSet:
        if split not in SPLITS:
            raise ParameterError(f"dataset {self.name!r}: split must be 'train' or 'test', got {split!r}")
        images, labels = self.read(split, Path(data_dir).expanduser() if data_dir is not None else None)
        if not len(images):
            problem = "no images"
        elif tuple(images.shape[1:]) != tuple(self.image_shape):
            problem = f"images of shape {tuple(images.shape[1:])}, expected {tuple(self.image_shape)}"
        elif len(labels) != len(images):
            problem = f"{len(labels)} labels for {len(images)} images"
        elif labels.min() < 0 or labels.max() >= self.num_classes:
            problem = f"labels outside 0..{self.num_classes - 1}"
        else:
            return ImageSet(images, labels)
        raise DataNotFoundError(f"{self.name}: the {split} split read has {problem}; {self.hint}")

    def read(self, split: str, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Uint8 images N x C x H x W and int64 labels of ``split``."""
        raise NotImplementedError

    def locate(self, data_dir: Path | None, *patterns: str) -> tuple[Path, str]:
        """The first folder searched that holds one of ``patterns``, and the pattern found."""
        env = env_data_dir()
        roots = [r for r in (data_dir, env, *map(Path, self.system_dirs)) if r is not None]
        subs = ("", self.name, *self.layouts)
        for root in roots:
            for sub in subs:
                for pattern in patterns:
                    if existing(root / sub, pattern):
                        return root / sub, pattern
        places = [str(data_dir)] if data_dir is not None else []
        places.append(f"${DATA_ENV}={env}" if env is not None else f"${DATA_ENV} (unset)")
        places += self.system_dirs
        also = ", ".join(f"{s}/" for s in subs[1:])
        raise DataNotFoundError(f"{self.name}: {' or '.join(patterns)} not found in {', '.join(places)} "
                                f"(nor in their {also} sub-folders); {self.hint}")

    def require(self, pattern: str, *folders: Path) -> Path:
        """``pattern`` (see :func:`existing`) in the first of ``folders`` holding it, or a one-line error."""
        for folder in folders:
            if path := existing(folder, pattern):
                return path
        raise DataNotFoundError(f"{self.name}: {pattern} not found in {', '.join(map(str, folders))}; {self.hint}")

    def unreadable(self, path: Path, what: str, reason: object) -> DataNotFoundError:
        """The error for a file that exists but is not what it should be."""
        return DataNotFoundError(f"{self.name}: {path} is not {what} ({reason}); {self.hint}")


def read_images(paths: Sequence[Path], size: tuple[int, int]) -> torch.Tensor:
    """Decode image files as RGB, resized (bilinear) to ``size`` = (H, W) where they differ:
    a uint8 tensor N x 3 x H x W. Decoding runs in threads (PIL releases the GIL)."""
    from PIL import Image

    height, width = size

    def one(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except OSError as exc:
            raise DataNotFoundError(f"cannot read image {path}: {exc}") from None
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(rgb)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(one, paths))
    stacked = np.stack(arrays) if arrays else np.empty((0, height, width, 3), np.uint8)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()

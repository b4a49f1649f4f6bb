"""CIFAR-10 and CIFAR-100, from either of the official on-disk versions.

A. Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", technical report,
University of Toronto, 2009; https://www.cs.toronto.edu/~kriz/cifar.html

- Binary version: ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin``, records
  of 1 label byte and 3072 pixel bytes (1024 red, 1024 green, 1024 blue, rows of 32);
  ``cifar-100-binary/train.bin`` and ``test.bin``, records of 2 label bytes (coarse, fine: the
  fine label is used) and 3072 pixel bytes. Class names in ``batches.meta.txt`` /
  ``fine_label_names.txt``.
- Python version: ``cifar-10-batches-py/data_batch_{1..5}`` and ``test_batch``;
  ``cifar-100-python/train`` and ``test``: pickled dicts with ``data`` (N x 3072 uint8, same
  pixel order) and ``labels`` / ``fine_labels``; class names in ``batches.meta`` / ``meta``.
  A pickle can run arbitrary code when loaded, so these are read with an unpickler that builds
  nothing but numpy arrays, lists, dicts, strings and numbers.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bdbench.components import Paper

from bd_datasets_vision.common import VisionDataset

try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

PIXELS = 3 * 32 * 32
# The only globals a pickled numpy array refers to (numpy 1.x and 2.x names, protocols 0-5).
ARRAY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_NAMES = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray "
    "road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar "
    "sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle "
    "wardrobe whale willow_tree wolf woman worm".split())


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except those that rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ARRAY_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are allowed") from None


def field(batch: dict, key: str) -> Any:
    """``batch[key]``, whether the pickle's keys decoded as bytes (Python 2 files) or str."""
    return batch[key.encode()] if key.encode() in batch else batch[key]


class Cifar(VisionDataset):
    """A CIFAR dataset: 3 x 32 x 32 colour images, binary or python version."""

    image_shape = (3, 32, 32)
    hflip = True
    folders: ClassVar[tuple[str, str]]  # (binary version, python version)
    batches: ClassVar[dict[str, tuple[str, ...]]]  # split -> python file names; binary adds .bin
    label_bytes: ClassVar[int]  # binary records: the label is the last of these bytes
    label_key: ClassVar[str]
    meta: ClassVar[tuple[str, str, str]]  # (binary names file, python meta file, its key)
    hint = ("download and extract the binary or python version from https://www.cs.toronto.edu/~kriz/cifar.html, "
            "then pass --data-dir or set $BDBENCH_DATA")

    def read(self, split: str, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        binary, python = self.folders
        first = self.batches[split][0]
        root, found = self.locate(data_dir, f"{binary}/{first}.bin", f"{python}/{first}")
        if found.startswith(binary):
            parts = [self.read_binary(self.require(f"{b}.bin", root / binary)) for b in self.batches[split]]
        else:
            parts = [self.read_python(self.require(b, root / python)) for b in self.batches[split]]
        self.read_names(root)
        images = np.concatenate([p[0] for p in parts]).reshape(-1, *self.image_shape)
        labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
        return torch.from_numpy(images), torch.from_numpy(labels)

    def read_binary(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        record = self.label_bytes + PIXELS
        data = path.read_bytes()
        if not data or len(data) % record:
            raise self.unreadable(path, "a CIFAR binary batch", f"{len(data)} bytes, not records of {record}")
        rows = np.frombuffer(data, np.uint8).reshape(-1, record)
        return rows[:, self.label_bytes:], rows[:, self.label_bytes - 1]

    def read_python(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        batch = self.unpickle(path)
        try:
            images = np.asarray(field(batch, "data"), np.uint8).reshape(-1, PIXELS)
            return images, np.asarray(field(batch, self.label_key))
        except (KeyError, TypeError, ValueError) as exc:
            raise self.unreadable(path, "a CIFAR python batch", f"{type(exc).__name__}: {exc}") from None

    def unpickle(self, path: Path) -> dict:
        try:
            with path.open("rb") as f:
                batch = ArrayUnpickler(f, encoding="bytes").load()
        except Exception as exc:  # a malformed pickle can fail in many ways
            raise self.unreadable(path, "a CIFAR python pickle", exc) from None
        if not isinstance(batch, dict):
            raise self.unreadable(path, "a CIFAR python pickle", f"a {type(batch).__name__}, not a dict")
        return batch

    def read_names(self, root: Path) -> None:
        """Take the class names from the meta file, where there is one."""
        text_file, meta_file, key = self.meta
        binary, python = self.folders
        if (root / binary / text_file).is_file():
            names = [n.strip() for n in (root / binary / text_file).read_text().splitlines() if n.strip()]
        elif (root / python / meta_file).is_file():
            meta = self.unpickle(root / python / meta_file)
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(key.encode(), meta.get(key, ()))]
        else:
            return
        if len(names) == self.num_classes:
            self.class_names = tuple(names)  # type: ignore[misc]  # the instance's names override the defaults


class Cifar10(Cifar):
    """CIFAR-10: 32x32 colour images, 10 classes, 50000 train / 10000 test."""

    name = "cifar10"
    paper = Paper(title="Learning Multiple Layers of Features from Tiny Images", venue="University of Toronto",
                  year=2009, url="https://www.cs.toronto.edu/~kriz/cifar.html")
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)  # BackdoorBench get_dataset_normalization
    std = (0.247, 0.243, 0.261)
    class_names = CIFAR10_NAMES
    folders = ("cifar-10-batches-bin", "cifar-10-batches-py")
    batches = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    label_bytes = 1
    label_key = "labels"
    meta = ("batches.meta.txt", "batches.meta", "label_names")


class Cifar100(Cifar):
    """CIFAR-100: 32x32 colour images, 100 fine classes, 50000 train / 10000 test."""

    name = "cifar100"
    paper = Cifar10.paper
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)  # BackdoorBench get_dataset_normalization
    std = (0.2673, 0.2564, 0.2762)
    class_names = CIFAR100_NAMES
    folders = ("cifar-100-binary", "cifar-100-python")
    batches = {"train": ("train",), "test": ("test",)}
    label_bytes = 2
    label_key = "fine_labels"
    meta = ("fine_label_names.txt", "meta", "fine_label_names")

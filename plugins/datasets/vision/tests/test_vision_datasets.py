"""bd-datasets-vision: each loader reads small files written in the dataset's real format."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bd_datasets_vision
from bd_datasets_vision import (
    GTSRB,
    MNIST,
    Cifar10,
    Cifar100,
    Digits,
    FashionMNIST,
    TinyImageNet,
)
from bd_datasets_vision.common import VisionDataset
from bdbench.errors import DataNotFoundError, ParameterError
from bdbench.plugins import make_plugin_manager

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
Expected = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 N x C x H x W, labels)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("BDBENCH_DATA", raising=False)
    monkeypatch.delenv("BDBENCH_DOWNLOAD", raising=False)


def random_set(n: int, shape: tuple[int, ...], num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, num_classes, n)


def assert_loads(dataset: VisionDataset, root: Path | None, expected: Expected) -> None:
    for split, (images, labels) in expected.items():
        got = dataset.load(split, root)
        assert got.images.dtype == torch.uint8 and got.labels.dtype == torch.int64
        assert got.shape == tuple(dataset.image_shape)
        assert torch.equal(got.images, torch.from_numpy(images))
        assert torch.equal(got.labels, torch.from_numpy(labels.astype(np.int64)))


def assert_one_line(exc: pytest.ExceptionInfo, *parts: object) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message


# --- IDX: MNIST and Fashion-MNIST ------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    return bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(folder: Path, gz: bool, sizes: tuple[int, int] = (20, 8)) -> Expected:
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for (split, prefix), n in zip((("train", "train"), ("test", "t10k")), sizes):
        images, labels = random_set(n, (1, 28, 28), 10, seed=n)
        for name, array in ((f"{prefix}-images-idx3-ubyte", images[:, 0]),
                            (f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))):
            data = idx_bytes(array)
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
        expected[split] = images, labels
    return expected


@pytest.mark.parametrize("cls", [FashionMNIST, MNIST])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_exact(tmp_path, cls, gz):
    assert_loads(cls(), tmp_path, write_idx(tmp_path, gz))


@pytest.mark.parametrize("cls, sub", [(FashionMNIST, "FashionMNIST/raw"), (MNIST, "MNIST/raw"),
                                      (FashionMNIST, "fashion-mnist"), (MNIST, "mnist")])
def test_idx_sub_layouts(tmp_path, cls, sub):
    assert_loads(cls(), tmp_path, write_idx(tmp_path / sub, gz=True))


def test_env_data_dir_is_searched_before_system_dirs(tmp_path, monkeypatch):
    expected = write_idx(tmp_path / "FashionMNIST" / "raw", gz=False)
    monkeypatch.setenv("BDBENCH_DATA", str(tmp_path))
    assert_loads(FashionMNIST(), None, expected)


def test_data_dir_is_searched_before_env(tmp_path, monkeypatch):
    expected = write_idx(tmp_path / "a", gz=False, sizes=(5, 3))
    write_idx(tmp_path / "b", gz=False)
    monkeypatch.setenv("BDBENCH_DATA", str(tmp_path / "b"))
    assert_loads(MNIST(), tmp_path / "a", expected)


@pytest.mark.parametrize("data", [b"\x00\x00\x08\x01" + b"\x00" * 8, idx_bytes(np.zeros(3, np.uint8))[:-1],
                                  b"not an idx file at all"])
def test_idx_bad_magic_or_size(tmp_path, data):
    write_idx(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(data)
    with pytest.raises(DataNotFoundError) as exc:
        MNIST().load("test", tmp_path)
    assert_one_line(exc, "t10k-labels-idx1-ubyte is not an IDX file")


def test_idx_not_gzip(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"plain bytes")
    with pytest.raises(DataNotFoundError, match="is not an IDX file"):
        MNIST().load("train", tmp_path)


def test_idx_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNIST, "system_dirs", ())
    with pytest.raises(DataNotFoundError) as exc:
        FashionMNIST().load("train", tmp_path)
    assert_one_line(exc, "train-images-idx3-ubyte(.gz)", tmp_path, "$BDBENCH_DATA", "BDBENCH_DOWNLOAD=1")


def test_idx_labels_missing_names_the_folder(tmp_path):
    write_idx(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError) as exc:
        MNIST().load("train", tmp_path)
    assert_one_line(exc, "train-labels-idx1-ubyte(.gz)", tmp_path)


def test_idx_download_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_mnist(root: str, download: bool) -> None:
        calls.append((root, download))
        write_idx(Path(root) / "MNIST" / "raw", gz=True)

    monkeypatch.setattr("torchvision.datasets.MNIST", fake_mnist)
    with pytest.raises(DataNotFoundError):
        MNIST().load("train", tmp_path)
    assert calls == []
    monkeypatch.setenv("BDBENCH_DOWNLOAD", "1")
    assert len(MNIST().load("train", tmp_path)) == 20
    assert calls == [(str(tmp_path), True)]


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    train, test = FashionMNIST().load("train"), FashionMNIST().load("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.shape == (1, 28, 28)
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert abs(train.float().mean().item() - FashionMNIST.mean[0]) < 1e-3


# --- CIFAR ---------------------------------------------------------------------------------

CIFAR_FILES = {Cifar10: {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
               Cifar100: {"train": ["train"], "test": ["test"]}}


def cifar_batches(cls: type) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """split -> [(file name, images, labels)], 4 images a file."""
    return {split: [(name, *random_set(4, (3, 32, 32), cls.num_classes, seed=zlib.crc32(name.encode())))
                    for name in names]
            for split, names in CIFAR_FILES[cls].items()}


def expected_of(batches: dict) -> Expected:
    return {split: (np.concatenate([b[1] for b in parts]), np.concatenate([b[2] for b in parts]))
            for split, parts in batches.items()}


def write_cifar_binary(root: Path, cls: type) -> Expected:
    folder = root / cls.folders[0]
    folder.mkdir(parents=True)
    batches = cifar_batches(cls)
    for parts in batches.values():
        for name, images, labels in parts:
            label_bytes = [labels[:, None]] if cls is Cifar10 else [(labels[:, None] // 5), labels[:, None]]
            records = np.concatenate([*label_bytes, images.reshape(len(images), -1)], axis=1).astype(np.uint8)
            (folder / f"{name}.bin").write_bytes(records.tobytes())
    return expected_of(batches)


def write_cifar_python(root: Path, cls: type, protocol: int = pickle.DEFAULT_PROTOCOL) -> Expected:
    folder = root / cls.folders[1]
    folder.mkdir(parents=True)
    batches = cifar_batches(cls)
    for parts in batches.values():
        for name, images, labels in parts:
            batch = {b"batch_label": name.encode(), b"data": images.reshape(len(images), -1),
                     b"filenames": [f"{i}.png".encode() for i in range(len(images))]}
            if cls is Cifar10:
                batch[b"labels"] = labels.tolist()
            else:
                batch[b"fine_labels"], batch[b"coarse_labels"] = labels.tolist(), (labels // 5).tolist()
            # numpy 1.x wrote numpy.core.*: the names in the real, older files
            blob = pickle.dumps(batch, protocol=protocol)
            (folder / name).write_bytes(blob.replace(b"numpy._core.", b"numpy.core.") if protocol < 4 else blob)
    return expected_of(batches)


@pytest.mark.parametrize("cls", [Cifar10, Cifar100])
def test_cifar_binary_exact(tmp_path, cls):
    assert_loads(cls(), tmp_path, write_cifar_binary(tmp_path, cls))


@pytest.mark.parametrize("cls", [Cifar10, Cifar100])
@pytest.mark.parametrize("protocol", [3, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_cifar_python_exact(tmp_path, cls, protocol):
    assert_loads(cls(), tmp_path, write_cifar_python(tmp_path, cls, protocol))


def test_cifar_in_dataset_subfolder_and_env(tmp_path, monkeypatch):
    expected = write_cifar_binary(tmp_path / "cifar10", Cifar10)
    monkeypatch.setenv("BDBENCH_DATA", str(tmp_path))
    assert_loads(Cifar10(), None, expected)


def test_cifar_class_names_from_meta(tmp_path):
    write_cifar_binary(tmp_path / "bin", Cifar10)
    names = [f"c{i}" for i in range(10)]
    (tmp_path / "bin" / "cifar-10-batches-bin" / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    dataset = Cifar10()
    dataset.load("test", tmp_path / "bin")
    assert dataset.info().class_names == tuple(names)

    write_cifar_python(tmp_path / "py", Cifar100)
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": [b"x"] * 20}
    (tmp_path / "py" / "cifar-100-python" / "meta").write_bytes(pickle.dumps(meta))
    dataset = Cifar100()
    dataset.load("test", tmp_path / "py")
    assert dataset.class_names == tuple(f"f{i}" for i in range(100))
    assert Cifar100.class_names[:2] == ("apple", "aquarium_fish") and len(Cifar100.class_names) == 100
    assert Cifar10().class_names[0] == "airplane"


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_malicious_pickle_is_refused(tmp_path):
    write_cifar_python(tmp_path, Cifar10)
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [Exploit(marker)]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataNotFoundError) as exc:
        Cifar10().load("test", tmp_path)
    assert_one_line(exc, "test_batch", "refused to load", "system")
    assert not marker.exists()


def test_cifar_binary_wrong_size(tmp_path):
    write_cifar_binary(tmp_path, Cifar100)
    (tmp_path / "cifar-100-binary" / "test.bin").write_bytes(b"\x00" * 3073)
    with pytest.raises(DataNotFoundError) as exc:
        Cifar100().load("test", tmp_path)
    assert_one_line(exc, "test.bin is not a CIFAR binary batch")


def test_cifar_missing_batch(tmp_path):
    write_cifar_binary(tmp_path, Cifar10)
    (tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    with pytest.raises(DataNotFoundError) as exc:
        Cifar10().load("train", tmp_path)
    assert_one_line(exc, "data_batch_3.bin", tmp_path / "cifar-10-batches-bin")


# --- GTSRB ---------------------------------------------------------------------------------

GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def write_ppm_rows(folder: Path, names: list[str], classes: list[int], sizes: list[tuple[int, int]]) -> tuple:
    """Write .ppm images; return (expected 32x32 images, CSV rows)."""
    rng = np.random.default_rng(len(names))
    expected, rows = [], []
    for name, cls, (w, h) in zip(names, classes, sizes):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(folder / name)
        expected.append(np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1))
        rows.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{cls}\n")
    return expected, rows


def write_gtsrb(root: Path) -> Expected:
    train_images, train_labels = [], []
    for cls in (0, 1, 42):
        folder = root / "GTSRB" / "Final_Training" / "Images" / f"{cls:05d}"
        folder.mkdir(parents=True)
        names = [f"00000_{i:05d}.ppm" for i in range(3)]
        images, rows = write_ppm_rows(folder, names, [cls] * 3, [(32, 32), (40, 35), (29, 31)])
        (folder / f"GT-{cls:05d}.csv").write_text(GT_HEADER + "".join(rows))
        train_images += images
        train_labels += [cls] * 3
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    test_classes = [3, 0, 42, 7]
    sizes = [(32, 32), (32, 32), (50, 45), (50, 45)]
    images, rows = write_ppm_rows(test_dir, [f"{i:05d}.ppm" for i in range(4)], test_classes, sizes)
    (root / "GT-final_test.csv").write_text(GT_HEADER + "".join(rows))
    return {"train": (np.stack(train_images), np.array(train_labels)),
            "test": (np.stack(images), np.array(test_classes))}


def test_gtsrb_exact(tmp_path):
    assert_loads(GTSRB(), tmp_path, write_gtsrb(tmp_path))


def test_gtsrb_from_its_own_folder_with_labels_beside_images(tmp_path):
    expected = write_gtsrb(tmp_path)
    (tmp_path / "GT-final_test.csv").rename(tmp_path / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.csv")
    assert_loads(GTSRB(), tmp_path / "GTSRB", expected)


def test_gtsrb_test_labels_missing(tmp_path):
    write_gtsrb(tmp_path)
    (tmp_path / "GT-final_test.csv").unlink()
    with pytest.raises(DataNotFoundError) as exc:
        GTSRB().load("test", tmp_path)
    assert_one_line(exc, "GT-final_test.csv", tmp_path / "GTSRB", "GTSRB_Final_Test_GT.zip")


def test_gtsrb_test_csv_without_class_ids(tmp_path):
    write_gtsrb(tmp_path)
    (tmp_path / "GT-final_test.csv").write_text("Filename;Width;Height\n00000.ppm;32;32\n")
    with pytest.raises(DataNotFoundError) as exc:
        GTSRB().load("test", tmp_path)
    assert_one_line(exc, "ClassId")


# --- Tiny-ImageNet -------------------------------------------------------------------------

WNIDS = ["n01443537", "n01629819", "n09999999"]


def solid_jpeg(path: Path, rgb: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), rgb).convert(mode).save(path, quality=95)


def write_tiny(root: Path, words: bool = True) -> dict[str, list[tuple[tuple[int, int, int], int]]]:
    """Solid-colour JPEGs (nearly lossless); returns split -> [(colour, label)]."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    if words:
        (base / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n")
    train = []
    for label, wnid in enumerate(WNIDS):
        for i in range(2):
            rgb = (40 * label + 20, 100 * i + 30, 200 - 50 * label)
            solid_jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", rgb)
            train.append((rgb, label))
    test, lines = [], []
    for i, label in enumerate([2, 0, 1, 0]):
        rgb = (10 + 60 * i, 250 - 60 * i, 128)
        solid_jpeg(base / "val" / "images" / f"val_{i}.JPEG", rgb)
        lines.append(f"val_{i}.JPEG\t{WNIDS[label]}\t0\t0\t63\t63\n")
        test.append((rgb, label))
    solid_jpeg(base / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_2.JPEG", (90, 90, 90), mode="L")
    train.insert(2, ((90, 90, 90), 0))
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return {"train": train, "test": test}


def test_tiny_imagenet(tmp_path):
    expected = write_tiny(tmp_path)
    dataset = TinyImageNet()
    for split, samples in expected.items():
        got = dataset.load(split, tmp_path)
        assert got.images.dtype == torch.uint8 and got.shape == (3, 64, 64)
        assert got.labels.tolist() == [label for _, label in samples]
        colours = torch.tensor([rgb for rgb, _ in samples], dtype=torch.float32)
        assert (got.images.float().mean(dim=(2, 3)) - colours).abs().max() < 3  # JPEG loss
    assert dataset.info().class_names == ("goldfish", "European fire salamander", "n09999999")


def test_tiny_imagenet_unknown_wnid_in_val(tmp_path):
    write_tiny(tmp_path, words=False)
    (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DataNotFoundError) as exc:
        TinyImageNet().load("test", tmp_path / "tiny-imagenet-200")
    assert_one_line(exc, "val_annotations.txt", "n00000000")


def test_tiny_imagenet_missing_class_folder(tmp_path):
    write_tiny(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").write_text("\n".join(WNIDS + ["n12345678"]))
    with pytest.raises(DataNotFoundError) as exc:
        TinyImageNet().load("train", tmp_path)
    assert_one_line(exc, "images", tmp_path / "tiny-imagenet-200" / "train" / "n12345678")


# --- digits --------------------------------------------------------------------------------

def test_digits():
    pytest.importorskip("sklearn")
    train, test = Digits().load("train"), Digits().load("test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.shape == test.shape == (1, 16, 16) and train.images.dtype == torch.uint8
    assert train.labels.unique().tolist() == test.labels.unique().tolist() == list(range(10))
    assert train.images.max() == 255 and torch.equal(train.images[:, :, ::2, ::2], train.images[:, :, 1::2, 1::2])
    assert torch.equal(Digits().load("test").images, test.images)  # the split is fixed


# --- all datasets --------------------------------------------------------------------------

ALL = [FashionMNIST, MNIST, Cifar10, Cifar100, GTSRB, TinyImageNet, Digits]


def test_registered_names():
    ps = make_plugin_manager(entrypoints=False, extra=[bd_datasets_vision])
    assert {c.name for c in ps.list("dataset")} == {
        "fashion-mnist", "mnist", "cifar10", "cifar100", "gtsrb", "tiny-imagenet", "digits"}


@pytest.mark.parametrize("cls", ALL)
def test_info_and_split_check(cls):
    info = cls().info()
    channels = info.image_shape[0]
    assert len(info.mean) == len(info.std) == channels and info.num_classes == cls.num_classes
    assert not info.class_names or len(info.class_names) == info.num_classes
    assert cls.summary() and "\n" not in cls.__doc__.strip()
    with pytest.raises(ParameterError) as exc:
        cls().load("val")
    assert_one_line(exc, "'train' or 'test'", "'val'")


@pytest.mark.parametrize("cls", [MNIST, Cifar10, Cifar100, GTSRB, TinyImageNet])
@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_data_is_one_line_naming_the_folder(tmp_path, cls, split, monkeypatch):
    monkeypatch.setenv("BDBENCH_DATA", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as exc:
        cls().load(split, tmp_path / "given")
    assert_one_line(exc, f"{cls.name}: ", tmp_path / "given", f"$BDBENCH_DATA={tmp_path / 'env'}")


def test_import_is_cheap():
    code = ("import sys, bd_datasets_vision; "
            "print(sorted(m for m in ('PIL', 'sklearn', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""GTSRB, the German Traffic Sign Recognition Benchmark, from its official files.

J. Stallkamp, M. Schlipsing, J. Salmen, C. Igel, "Man vs. computer: Benchmarking machine learning
algorithms for traffic sign recognition", Neural Networks 32, 2012;
https://benchmark.ini.rub.de/gtsrb_dataset.html

On disk (the extracted ``GTSRB_Final_Training_Images.zip``, ``GTSRB_Final_Test_Images.zip`` and
``GTSRB_Final_Test_GT.zip``):

- ``GTSRB/Final_Training/Images/<00000..00042>/`` with ``.ppm`` images and ``GT-<class>.csv``;
- ``GTSRB/Final_Test/Images/*.ppm`` with labels in ``GT-final_test.csv``, found in the data
  folder, in ``GTSRB/`` or in ``GTSRB/Final_Test/Images/``.

The CSV files are semicolon-separated: ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``.
Every image is resized (bilinear, whole image, no ROI crop) to 32 x 32, as BackdoorBench does.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from bdbench.components import Paper

from bd_datasets_vision.common import VisionDataset, read_images

TEST_LABELS = "GT-final_test.csv"


class GTSRB(VisionDataset):
    """GTSRB: traffic signs resized to 32x32, 43 classes, 39209 train / 12630 test."""

    name = "gtsrb"
    paper = Paper(title="Man vs. computer: Benchmarking machine learning algorithms for traffic sign recognition",
                  venue="Neural Networks", year=2012, url="https://benchmark.ini.rub.de/gtsrb_dataset.html")
    num_classes = 43
    image_shape = (3, 32, 32)
    mean = (0.0, 0.0, 0.0)  # BackdoorBench get_dataset_normalization: no normalization
    std = (1.0, 1.0, 1.0)
    layouts = ("GTSRB",)
    hint = ("extract GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
            "from https://benchmark.ini.rub.de/gtsrb_dataset.html into one folder, then pass --data-dir or set "
            "$BDBENCH_DATA")

    def read(self, split: str, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "train":
            root, _ = self.locate(data_dir, "Final_Training/Images")
            images = root / "Final_Training" / "Images"
            samples = [s for d in sorted(p for p in images.iterdir() if p.is_dir())
                       for s in self.read_csv(self.require(f"GT-{d.name}.csv", d))]
        else:
            root, _ = self.locate(data_dir, "Final_Test/Images")
            images = root / "Final_Test" / "Images"
            samples = self.read_csv(self.require(TEST_LABELS, root.parent, root, images), images)
        return read_images([p for p, _ in samples], self.image_shape[1:]), torch.tensor([c for _, c in samples])

    def read_csv(self, path: Path, folder: Path | None = None) -> list[tuple[Path, int]]:
        """(image path, class) for each row; image files are relative to ``folder`` (default: the CSV's)."""
        folder = folder or path.parent
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";"))
        try:
            return [(folder / row["Filename"], int(row["ClassId"])) for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise self.unreadable(path, "a GTSRB annotation file with Filename and ClassId columns",
                                  f"{type(exc).__name__}: {exc}") from None

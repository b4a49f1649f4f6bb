"""Tiny-ImageNet, from the extracted ``tiny-imagenet-200.zip``.

Y. Le, X. Yang, "Tiny ImageNet Visual Recognition Challenge", Stanford CS231N, 2015;
http://cs231n.stanford.edu/tiny-imagenet-200.zip

On disk: ``tiny-imagenet-200/wnids.txt`` (the 200 WordNet ids, one a line: the class order),
``train/<wnid>/images/*.JPEG``, ``val/val_annotations.txt`` (tab-separated: file name, wnid,
bounding box) with ``val/images/*.JPEG``, and optionally ``words.txt`` (wnid, tab, names) for
the class names. The labelled val split is the ``test`` split, as in BackdoorBench (the
official test split has no labels). Images are 64 x 64 RGB; the few grey ones are converted.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bdbench.components import Paper

from bd_datasets_vision.common import VisionDataset, read_images


class TinyImageNet(VisionDataset):
    """Tiny-ImageNet: 64x64 colour images, 200 classes, 100000 train / 10000 test (the val split)."""

    name = "tiny-imagenet"
    paper = Paper(title="Tiny ImageNet Visual Recognition Challenge", venue="Stanford CS231N", year=2015,
                  url="http://cs231n.stanford.edu/tiny-imagenet-200.zip")
    num_classes = 200
    image_shape = (3, 64, 64)
    mean = (0.4802, 0.4481, 0.3975)  # BackdoorBench get_dataset_normalization
    std = (0.2302, 0.2265, 0.2262)
    hflip = True
    layouts = ("tiny-imagenet-200",)
    hint = ("extract http://cs231n.stanford.edu/tiny-imagenet-200.zip, then pass --data-dir or set "
            "$BDBENCH_DATA")

    def read(self, split: str, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        root, _ = self.locate(data_dir, "wnids.txt")
        wnids = self.lines(root / "wnids.txt")
        index = {wnid: i for i, wnid in enumerate(wnids)}
        if split == "train":
            samples = [(path, i) for i, wnid in enumerate(wnids)
                       for path in sorted(self.require("images", root / "train" / wnid).glob("*.JPEG"))]
        else:
            annotations = self.require("val_annotations.txt", root / "val")
            rows = [line.split("\t") for line in self.lines(annotations)]
            try:
                samples = [(root / "val" / "images" / row[0], index[row[1]]) for row in rows]
            except (IndexError, KeyError) as exc:
                raise self.unreadable(annotations, "a val_annotations.txt for these wnids.txt",
                                      f"{type(exc).__name__}: {exc}") from None
        if (root / "words.txt").is_file():
            words = dict(line.split("\t", 1) for line in self.lines(root / "words.txt") if "\t" in line)
            self.class_names = tuple(words.get(w, w).split(",")[0].strip() for w in wnids)  # type: ignore[misc]
        else:
            self.class_names = tuple(wnids)  # type: ignore[misc]
        return read_images([p for p, _ in samples], self.image_shape[1:]), torch.tensor([i for _, i in samples])

    @staticmethod
    def lines(path: Path) -> list[str]:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

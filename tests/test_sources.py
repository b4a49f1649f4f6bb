"""Auxiliary-data sources and GIC input calibration."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bdbench import data as bddata
from bdbench.calibration import GIC
from bdbench.components import DatasetInfo, ImageSet, to_float
from bdbench.errors import DataNotFoundError, ParameterError

SHIFTS = ["brightness", "contrast", "blur", "noise", "rotation"]


@pytest.mark.parametrize("name", SHIFTS)
def test_shifted_sources_draw_from_reserved_and_change_pixels(name):
    y = torch.arange(10).repeat_interleave(40)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(400, 1, 12, 12, generator=g) * 160 + 40).to(torch.uint8)
    full = ImageSet(images, y)
    split = bddata.reserve(y, torch.Generator().manual_seed(0), fraction=0.25)
    clean, _ = bddata.defender_data(full, split, torch.zeros(400, dtype=torch.bool), bddata.Budget(spc=5),
                                    bddata.get_source(name), with_val=False, generator=torch.Generator())
    assert len(clean) == 50 and clean.images.dtype == torch.uint8
    originals = {tuple(full.images[i].flatten().tolist()): i for i in split.reserved.tolist()}
    changed = sum(tuple(img.flatten().tolist()) not in originals for img in clean.images)
    assert changed == len(clean)  # every image was shifted


def test_unknown_source_suggests_close_names():
    with pytest.raises(ParameterError, match="did you mean blur"):
        bddata.get_source("blurr")


def test_external_folder_maps_class_names_and_indices(tmp_path):
    from PIL import Image

    info = DatasetInfo(name="toy", num_classes=3, image_shape=(1, 8, 8), mean=(0.5,), std=(0.5,),
                       class_names=("cat", "dog", "bird"))
    for folder, value in (("cat", 10), ("1", 120), ("Bird", 250)):
        (tmp_path / folder).mkdir()
        for i in range(3):
            Image.new("RGB", (16, 16), (value, value, value)).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = bddata.load_folder(tmp_path, info)
    assert data.images.shape == (9, 1, 8, 8)
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.images[data.labels == 1].eq(120).all()
    (tmp_path / "fish").mkdir()
    with pytest.raises(DataNotFoundError, match="'fish' is not a class of toy"):
        bddata.load_folder(tmp_path, info)


@pytest.mark.parametrize("bound", [0.1, 0.03])
def test_gic_stays_in_its_bound_and_raises_the_victims_confidence(tiny_model, tiny_dataset, bound):
    data = ImageSet(bddata.blur(tiny_dataset.test.images[:32], sigma=1.5), tiny_dataset.test.labels[:32])
    calibrated = GIC(steps=30, bound=bound).calibrate(tiny_model, data, torch.device("cpu"))
    diff = (to_float(calibrated.images) - to_float(data.images)).abs().max()
    assert diff <= bound + 1 / 255 and diff > bound / 3
    with torch.no_grad():
        before = F.cross_entropy(tiny_model(to_float(data.images)), data.labels)
        after = F.cross_entropy(tiny_model(to_float(calibrated.images)), data.labels)
    assert after < before
    assert torch.equal(calibrated.labels, data.labels)


@pytest.mark.slow
def test_gic_runs_in_front_of_a_defense_and_is_recorded(smoke_run):
    row = smoke_run("ft", attack="badnets", source="brightness", calibrate="gic", calibrate_params={"bound": 0.05},
                    spc=10, defense_params={"epochs": 5})
    assert row["status"] == "ok" and row["calibrate"] == "gic" and row["source"] == "brightness"
    assert json.loads(row["calibrate_params"]) == {"batch_size": 256, "bound": 0.05, "lr": 0.1, "steps": 100}
    assert row["clean_count"] == 100

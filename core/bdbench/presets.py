"""Presets: dataset, model, training recipe and budgets that make a run of a given size.

- ``smoke``: seconds on a CPU, for tests and CI (a Fashion-MNIST subset, a narrow small CNN);
- ``quick``: the default, minutes on a CPU (Fashion-MNIST, the small CNN);
- ``study``: the survey's whole protocol in hours on a CPU (a 10,000-image Fashion-MNIST subset,
  a narrow small CNN; the grid adds the second model), ``docs/study``;
- ``paper``: the survey's setting on a GPU (CIFAR-10, PreAct-ResNet18, BackdoorBench's recipe:
  100 epochs of SGD, lr 0.01, batch 128, cosine schedule, random crop and flip).

Defenses always run with their own defaults (the paper's or the reference code's); a preset
only sizes the attacked model and the data.
"""
from __future__ import annotations

from typing import Any

import attrs

from bdbench.errors import ParameterError
from bdbench.training import Recipe


@attrs.frozen(kw_only=True)
class Preset:
    name: str
    dataset: str
    model: str
    model_params: dict[str, Any] = attrs.Factory(dict)
    recipe: Recipe
    train_subset: int | None = None  # stratified subset of the training split (None: all)
    test_subset: int | None = None  # stratified subset of the test split (None: all)
    attack_floor: float = 0.8  # an attacked model under this ASR is a failed attack
    chance_margin: float = 0.1  # ... and one whose clean accuracy is under chance + this
    description: str = ""


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke", dataset="fashion-mnist", model="smallcnn", model_params={"width": 16},
        recipe=Recipe(epochs=4, batch_size=64, lr=0.05, weight_decay=5e-4, schedule="cosine"),
        train_subset=6000, test_subset=2000, attack_floor=0.8,
        description="Fashion-MNIST subset, narrow small CNN: seconds on a CPU (tests, CI)"),
    "quick": Preset(
        name="quick", dataset="fashion-mnist", model="smallcnn", model_params={"width": 32},
        recipe=Recipe(epochs=5, batch_size=128, lr=0.05, weight_decay=5e-4, schedule="cosine"),
        attack_floor=0.85,
        description="Fashion-MNIST, small CNN: minutes on a CPU (the default)"),
    "study": Preset(
        name="study", dataset="fashion-mnist", model="smallcnn", model_params={"width": 16},
        recipe=Recipe(epochs=5, batch_size=64, lr=0.05, weight_decay=5e-4, schedule="cosine"),
        train_subset=10000, test_subset=2000, attack_floor=0.8,
        description="Fashion-MNIST subset, narrow small CNN: the survey's protocol in hours on a CPU (docs/study)"),
    "paper": Preset(
        name="paper", dataset="cifar10", model="preactresnet18",
        recipe=Recipe(epochs=100, batch_size=128, lr=0.01, weight_decay=5e-4, schedule="cosine",
                      crop_padding=4, hflip=True),
        attack_floor=0.8,
        description="CIFAR-10, PreAct-ResNet18, BackdoorBench's recipe: a GPU"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ParameterError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]

"""Pytest fixtures for plugin authors, loaded automatically (``pytest11`` entry point ``bdbench``).

Fixtures (none is autouse):

- ``plugins``: a fresh :class:`~bdbench.plugins.PluginSet` in strict mode (a broken plugin fails
  the test with its traceback instead of being skipped);
- ``tiny_dataset``: a :class:`TinyData` (``info``, ``train``, ``test``): 1x16x16 grey images of 4
  textures (horizontal, vertical, diagonal stripes, checkerboard), 256 train and 128 test
  images, identical on every call;
- ``tiny_model``: a small conv-BN-ReLU-GAP-Linear net (timm interface, wrapped in
  :class:`~bdbench.nn.NormalizedModel`) trained on ``tiny_dataset`` (test accuracy > 0.9);
  trained once per session, each test gets its own copy;
- ``run_context``: a CPU :class:`~bdbench.context.RunContext` without progress bars.

:func:`run_component` runs a defense, an attack or a metric class on them::

    def test_purify(tiny_model, tiny_dataset, run_context):
        result = run_component(MyDefense, {"lr": "0.01"}, model=tiny_model, data=tiny_dataset, ctx=run_context)
        assert accuracy(result.model, tiny_dataset.test, device=run_context.device) > 0.8

:func:`fake_distribution` makes an entry point discoverable without installing anything. The
markers ``slow`` and ``gpu`` are declared for plugin test suites.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch import nn

from bdbench import triggers
from bdbench.components import (
    Attack,
    DatasetInfo,
    Defense,
    DefenseData,
    DefenseResult,
    Evaluation,
    ImageSet,
    Metric,
    PoisonedSet,
    to_uint8,
)
from bdbench.context import Reporter, RunContext
from bdbench.data import Budget, draw
from bdbench.nn import NormalizedModel
from bdbench.plugins import PluginSet, make_plugin_manager
from bdbench.training import Recipe, fit, predict

TINY_INFO = DatasetInfo(name="tiny", num_classes=4, image_shape=(1, 16, 16), mean=(0.5,), std=(0.25,),
                        class_names=("horizontal", "vertical", "diagonal", "checkerboard"))
TARGET = 0  # the backdoor target class used by run_component
POISON_RATIO = 0.1
DEFENSE_SPC = 20  # the defender's clean budget per class (2 of them are validation)


@attrs.frozen(eq=False)
class TinyData:
    """A synthetic dataset: its info and both splits."""

    info: DatasetInfo
    train: ImageSet
    test: ImageSet


def _textures(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One 16x16 texture per label (random phase, contrast and noise), uint8 N x 1 x 16 x 16."""
    n, side = len(labels), TINY_INFO.image_shape[1]
    i = torch.arange(side).view(1, side, 1)
    j = torch.arange(side).view(1, 1, side)
    phase = torch.randint(0, 4, (n, 1, 1), generator=generator)
    rows, cols = (i + phase) // 2 % 2, (j + phase) // 2 % 2
    patterns = torch.stack([rows.expand(n, side, side), cols.expand(n, side, side),
                            (i + j + phase) // 2 % 2, (rows + cols) % 2])  # 4 x N x H x W
    x = patterns[labels, torch.arange(n)].float()
    contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, generator=generator)
    x = 0.5 + contrast * (x - 0.5) + 0.1 * torch.randn(x.shape, generator=generator)
    return to_uint8(x.unsqueeze(1))


def make_tiny_dataset(n_train: int = 256, n_test: int = 128, seed: int = 0) -> TinyData:
    """The ``tiny_dataset`` fixture's data: balanced classes, deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    classes = TINY_INFO.num_classes

    def split(n: int) -> ImageSet:
        labels = torch.arange(n) % classes
        return ImageSet(_textures(labels, g), labels)

    return TinyData(TINY_INFO, split(n_train), split(n_test))


class TinyNet(nn.Module):
    """conv-BN-ReLU x2 (the second with stride 2), global average pooling, one linear head."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


def make_context(info: DatasetInfo = TINY_INFO, seed: int = 0) -> RunContext:
    """A quiet CPU run context (the ``run_context`` fixture)."""
    return RunContext(dataset=info, device="cpu", seed=seed, reporter=Reporter(enabled=False), batch_size=32)


def make_tiny_model(train: ImageSet, info: DatasetInfo = TINY_INFO, *, epochs: int = 3, seed: int = 0) -> nn.Module:
    """A :class:`TinyNet` trained on ``train`` (pass a poisoned set to get a backdoored model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NormalizedModel(TinyNet(info.num_classes, info.image_shape[0]), info.mean, info.std)
    recipe = Recipe(epochs=epochs, batch_size=32, lr=0.05, weight_decay=5e-4, amp=False)
    return fit(model, train, recipe, make_context(info, seed), description="tiny model")


class PatchAttack(Attack):
    """A white 2x2 patch in the bottom-right corner, all-to-one (the trigger run_component uses)."""

    name = "tiny-patch"

    def apply(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        mask, pattern = triggers.corner_patch(tuple(images.shape[1:]), size_at_32=4)
        return triggers.stamp(images, mask, pattern)

    def trigger_hint(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        return triggers.corner_box(image_shape, size_at_32=4)


@attrs.frozen(eq=False)
class AttackRun:
    """What :func:`run_component` returns for an attack."""

    poisoned: PoisonedSet
    train: ImageSet  # the training set with the poisoned samples in place
    backdoor_test: ImageSet  # triggered test samples (eligible ones) with their backdoor labels
    true_labels: torch.Tensor  # the backdoor test samples' true labels


def run_attack(attack: Attack, data: TinyData, ctx: RunContext, model: nn.Module | None = None) -> AttackRun:
    """prepare, poison (ratio 0.1, target 0), ``train`` for training-control attacks, apply on the test set."""
    info = data.info
    ctx = attrs.evolve(ctx, poison_ratio=POISON_RATIO, target=TARGET)
    attack.prepare(info, data.train, ctx)
    poisoned = attack.poison(data.train, POISON_RATIO, TARGET, info.num_classes, ctx.generator("poison"))
    train = poisoned.merge(data.train)
    if attack.threat_model == "training-control":
        if model is None:
            raise ValueError(f"attack {attack.name!r} trains the model: pass model=")
        attack.train(model, data.train, poisoned, ctx)
    idx = attack.eligible_test(data.test.labels, TARGET).nonzero().flatten()
    true = data.test.labels[idx]
    images = triggers.stamp_subset(attack, data.test, idx)
    return AttackRun(poisoned, train, ImageSet(images, attack.backdoor_labels(true, TARGET, info.num_classes)), true)


def defense_data(defense: Defense, data: TinyData, ctx: RunContext) -> DefenseData:
    """What the runner would hand ``defense``: only what its ``needs`` declare."""
    needs, info = defense.needs, data.info
    fields: dict[str, Any] = {}
    if "clean" in needs:
        pool = torch.arange(len(data.train))
        tr, va = draw(data.train.labels, pool, Budget(spc=DEFENSE_SPC), with_val=True, train_size=len(data.train),
                      generator=ctx.generator("defense-data"))
        fields.update(clean=data.train.subset(tr), val=data.train.subset(va))
    if "poisoned_train_set" in needs:
        fields["poisoned_train"] = run_attack(PatchAttack(), data, ctx).train
    if "trigger_oracle" in needs:
        fields["trigger"] = PatchAttack().apply
    if "target_label" in needs:
        fields["target"] = TARGET
    if "trigger_hint" in needs:
        fields["trigger_hint"] = PatchAttack().trigger_hint(info.image_shape)
    return DefenseData(num_classes=info.num_classes, image_shape=info.image_shape, **fields)


def evaluate(model: nn.Module, data: TinyData, ctx: RunContext) -> Evaluation:
    """Predictions on the clean test set and on its :class:`PatchAttack` backdoor test set."""
    attack = PatchAttack()
    bd = run_attack(attack, data, ctx)
    source = data.test.subset(attack.eligible_test(data.test.labels, TARGET).nonzero().flatten())
    return Evaluation(clean_pred=predict(model, data.test.images, device=ctx.device), clean_true=data.test.labels,
                      bd_pred=predict(model, bd.backdoor_test.images, device=ctx.device), bd_true=bd.true_labels,
                      bd_target=bd.backdoor_test.labels, model=model, clean=data.test, bd_source=source,
                      trigger=lambda x: attack.apply(x, None), device=ctx.device)


def run_component(cls: type, params: dict[str, Any] | None = None, *, model: nn.Module | None = None,
                  data: TinyData | DefenseData, ctx: RunContext) -> DefenseResult | AttackRun | dict[str, float]:
    """Configure ``cls`` with ``params`` (strings allowed, as on the command line) and run it.

    - a :class:`~bdbench.Defense`: ``purify(model, data, ctx)`` with the :class:`DefenseData`
      its ``needs`` call for (built from a :class:`TinyData`, or ``data`` itself); returns the
      :class:`DefenseResult`;
    - an :class:`~bdbench.Attack`: poison (ratio 0.1, target 0) and apply; returns an :class:`AttackRun`;
    - a :class:`~bdbench.Metric`: ``compute`` on ``model``'s predictions; returns the values.
    """
    component = cls.configure(params)
    if isinstance(component, Defense):
        if model is None:
            raise ValueError("a defense needs model=")
        if isinstance(data, TinyData):
            data = defense_data(component, data, ctx)
        return component.purify(model, data, ctx)
    if not isinstance(data, TinyData):
        raise TypeError(f"{cls.__name__} runs on a TinyData (the tiny_dataset fixture), got {type(data).__name__}")
    if isinstance(component, Attack):
        return run_attack(component, data, ctx, model)
    if isinstance(component, Metric):
        if model is None:
            raise ValueError("a metric needs model=")
        return component.compute(evaluate(model, data, ctx))
    raise TypeError(f"run_component runs attacks, defenses and metrics, not {cls!r}")


def fake_distribution(site: Path, name: str, entry_points: dict[str, str], version: str = "0.1") -> Path:
    """Write ``<name>-<version>.dist-info`` declaring ``entry_points`` (group ``bdbench``) into ``site``.

    With ``site`` on ``sys.path`` (``monkeypatch.syspath_prepend(site)``), plugin discovery
    sees the distribution as installed: entry-point discovery tests without ``pip install``.
    """
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"{ep} = {target}" for ep, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(["[bdbench]", *lines, ""]))
    return info


def pytest_configure(config: pytest.Config) -> None:
    """Declare the markers plugin test suites use (they run with unknown markers as errors)."""
    config.addinivalue_line("markers", "slow: trains models for more than a few seconds")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture
def plugins() -> PluginSet:
    """A fresh plugin set with every installed plugin, in strict mode."""
    return make_plugin_manager(strict=True)


@pytest.fixture
def tiny_dataset() -> TinyData:
    return make_tiny_dataset()


@pytest.fixture(scope="session")
def _bdbench_tiny_model() -> nn.Module:
    return make_tiny_model(make_tiny_dataset().train)


@pytest.fixture
def tiny_model(_bdbench_tiny_model: nn.Module) -> nn.Module:
    return copy.deepcopy(_bdbench_tiny_model)


@pytest.fixture
def run_context() -> RunContext:
    return make_context()

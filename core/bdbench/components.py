"""The component contracts: datasets, models, attacks, defenses and metrics.

A plugin subclasses one of these, sets ``name`` and a frozen attrs ``Config`` (its parameters,
defaults and their sources, see :mod:`bdbench.params`) and registers the class through a hook.
Data crosses these interfaces as :class:`ImageSet` values: uint8 images ``N x C x H x W`` and
int64 labels. Models take float images in pixel space [0, 1]; normalization is the first layer
of every model the core builds (:class:`bdbench.nn.NormalizedModel`), so triggers, perturbation
budgets and masks act on images as the papers define them.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import torch

from bdbench.errors import ShapeError
from bdbench.params import NoParams, make_config

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from bdbench.context import RunContext

KINDS = ("dataset", "model", "attack", "defense", "metric")


@attrs.frozen(kw_only=True)
class Paper:
    """The publication a component implements."""

    title: str
    venue: str = ""
    year: int | None = None
    arxiv: str | None = None
    url: str | None = None

    def cite(self) -> str:
        parts = [self.title]
        if self.venue or self.year:
            parts.append(", ".join(str(p) for p in (self.venue, self.year) if p))
        if self.arxiv:
            parts.append(f"arXiv:{self.arxiv}")
        return ". ".join(parts)


def _check_images(inst: Any, attribute: attrs.Attribute, value: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 4:
        got = getattr(value, "dtype", type(value).__name__), tuple(getattr(value, "shape", ()))
        raise ShapeError(f"images must be a uint8 tensor N x C x H x W, got {got[0]} of shape {got[1]}")


@attrs.frozen(eq=False)
class ImageSet:
    """Images (uint8, N x C x H x W, pixel values 0..255) with int64 labels."""

    images: torch.Tensor = attrs.field(validator=_check_images)
    labels: torch.Tensor = attrs.field(converter=lambda t: torch.as_tensor(t, dtype=torch.int64))

    def __attrs_post_init__(self) -> None:
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise ShapeError(f"{len(self.images)} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor | list[int]) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.int64)
        return ImageSet(self.images[index], self.labels[index])

    def float(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return to_float(self.images)

    @staticmethod
    def concat(*sets: ImageSet) -> ImageSet:
        return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantize [0, 1] floats to uint8 by rounding (not truncating: see attack-cards section 0)."""
    return images.clamp(0, 1).mul(255.0).round_().to(torch.uint8)


@attrs.frozen(kw_only=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    hflip: bool = False  # horizontal flips are label-preserving (natural images, not digits/text)


class Component:
    """Base of every pluggable component."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoParams
    paper: ClassVar[Paper | None] = None

    def __init__(self, config: Any = None) -> None:
        self.config = make_config(self.Config, owner=f"{self.kind} {self.name!r}") if config is None else config

    @classmethod
    def configure(cls, overrides: dict[str, Any] | None = None):
        """An instance with ``overrides`` (strings or typed values) applied to the defaults."""
        return cls(make_config(cls.Config, overrides, owner=f"{cls.kind} {cls.name!r}"))

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class DatasetBuilder(Component):
    """A dataset: its shape and a loader for the ``train`` and ``test`` splits."""

    kind = "dataset"
    num_classes: ClassVar[int]
    image_shape: ClassVar[tuple[int, int, int]]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    class_names: ClassVar[tuple[str, ...]] = ()
    hflip: ClassVar[bool] = False

    def info(self) -> DatasetInfo:
        return DatasetInfo(name=self.name, num_classes=self.num_classes, image_shape=tuple(self.image_shape),
                           mean=tuple(self.mean), std=tuple(self.std), class_names=tuple(self.class_names),
                           hflip=self.hflip)

    def load(self, split: str, data_dir: Path | None = None) -> ImageSet:
        """Return the split (``"train"`` or ``"test"``) as an :class:`ImageSet`.

        Raise :class:`bdbench.errors.DataNotFoundError` with one line saying where it looked
        and how to get the data when the files are missing or unreadable.
        """
        raise NotImplementedError


class ModelBuilder(Component):
    """An architecture. ``build`` returns a module with the timm-style interface:
    ``forward_features(x) -> N x C x h x w``, ``forward_head(features) -> logits``,
    ``get_classifier() -> nn.Linear`` and ``forward(x) = forward_head(forward_features(x))``.
    Inputs are normalized images; the core adds normalization in front."""

    kind = "model"

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        raise NotImplementedError


@attrs.frozen(eq=False)
class PoisonedSet:
    """What an attack changed in the training set: which indices, their new images and labels."""

    indices: torch.Tensor
    images: torch.Tensor  # uint8, len(indices) x C x H x W
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)

    def merge(self, train: ImageSet) -> ImageSet:
        """The training set with the poisoned samples in place of the originals."""
        images, labels = train.images.clone(), train.labels.clone()
        if len(self.indices):
            images[self.indices] = self.images
            labels[self.indices] = self.labels
        return ImageSet(images, labels)

    def mask(self, n: int) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[self.indices] = True
        return m


class Attack(Component):
    """A backdoor attack.

    Data-poisoning attacks implement :meth:`apply` (and, when they are not plain dirty-label
    attacks, :meth:`poison`). Training-control attacks also implement :meth:`train`.
    ``label_mode`` ("all-to-one", "all-to-all" or "clean-label") is read from the config
    when it has such a field.
    """

    kind = "attack"
    threat_model: ClassVar[str] = "data-poisoning"  # or "training-control"

    @property
    def label_mode(self) -> str:
        return getattr(self.config, "label_mode", "all-to-one")

    def prepare(self, dataset: DatasetInfo, train: ImageSet, ctx: RunContext) -> None:
        """Build resources (trigger images, generators) before poisoning. Default: nothing."""

    def apply(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Add the trigger to float images in [0, 1] (N x C x H x W); return new tensors."""
        raise NotImplementedError

    def trigger_hint(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int, int] | None:
        """The trigger's bounding box ``(top, left, height, width)`` in pixels, or None when the
        trigger spans the whole image (blending, warping, additive noise). Defenses that
        declare the ``trigger_hint`` capability (MESA, BAERASER) receive it."""
        return None

    def backdoor_labels(self, labels: torch.Tensor, target: int, num_classes: int) -> torch.Tensor:
        """The labels the backdoor maps ``labels`` to."""
        if self.label_mode == "all-to-all":
            return (labels + 1) % num_classes
        if self.label_mode == "clean-label":
            return torch.full_like(labels, target)
        return torch.full_like(labels, target)

    def eligible_test(self, labels: torch.Tensor, target: int) -> torch.Tensor:
        """Test samples that enter the backdoor test set: all-to-one excludes the target class."""
        if self.label_mode == "all-to-all":
            return torch.ones_like(labels, dtype=torch.bool)
        return labels != target

    def poison(self, train: ImageSet, ratio: float, target: int, num_classes: int,
               generator: torch.Generator) -> PoisonedSet:
        """Dirty-label poisoning: round(ratio * N) indices drawn uniformly from all classes."""
        from bdbench.triggers import poison_indices, stamp_subset

        idx = poison_indices(len(train), ratio, generator)
        images = stamp_subset(self, train, idx)
        return PoisonedSet(idx, images, self.backdoor_labels(train.labels[idx], target, num_classes))

    def training_recipe(self, ctx: RunContext, **overrides: Any) -> Any:
        """The recipe a training-control attack trains with: the run's (``ctx.recipe``), with the
        attacker's own ``epochs``, ``optimizer`` and ``lr`` where its config sets them (not None),
        then ``overrides``."""
        from bdbench.training import Recipe

        recipe = ctx.recipe if ctx.recipe is not None else Recipe()
        own = {f: getattr(self.config, f) for f in ("epochs", "optimizer", "lr")
               if getattr(self.config, f, None) is not None}
        return attrs.evolve(recipe, **own, **overrides)

    def train(self, model: nn.Module, train: ImageSet, poisoned: PoisonedSet, ctx: RunContext) -> None:
        """Training-control attacks: train ``model`` in place through :mod:`bdbench.training`."""
        raise NotImplementedError(f"attack {self.name!r} is not a training-control attack")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Learned state the trigger depends on (e.g. a generator's weights trained by :meth:`train`).

        The runner caches it with the attacked model and restores it through
        :meth:`load_state_dict` when the model comes from the cache, so :meth:`apply` works
        without retraining. Called after :meth:`prepare`; an empty dict (the default) means the
        attack has no such state.
        """
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors; raise ``RuntimeError`` when they do not fit
        (the runner then retrains), leaving the attack unchanged."""


class LearnedTrigger:
    """Mixin for training-control attacks whose trigger is learned in :meth:`Attack.train`
    (a generator): :meth:`poison` keeps its dirty-label subset, and :meth:`refresh_poisoned`
    re-makes those images in place with the current trigger once it is trained or restored,
    so the row's poisoned set and a ``poisoned_train_set`` defender see the real trigger.
    Put it before :class:`Attack` in the bases."""

    _poison_source: tuple[ImageSet, PoisonedSet] | None = None

    def poison(self, train: ImageSet, ratio: float, target: int, num_classes: int,
               generator: torch.Generator) -> PoisonedSet:
        poisoned = super().poison(train, ratio, target, num_classes, generator)
        self._poison_source = (train, poisoned)
        return poisoned

    def refresh_poisoned(self) -> None:
        if self._poison_source is not None:
            from bdbench.triggers import stamp_subset

            train, poisoned = self._poison_source
            poisoned.images.copy_(stamp_subset(self, train, poisoned.indices))


@attrs.frozen(kw_only=True, eq=False)
class DefenseData:
    """What the runner hands a defense: only what its ``needs`` declare is filled in."""

    num_classes: int
    image_shape: tuple[int, int, int]
    clean: ImageSet | None = None  # the defender's budget, less the validation part
    val: ImageSet | None = None  # validation split of the budget (threshold and stop selection)
    poisoned_train: ImageSet | None = None  # the poisoned training set, without poison labels marked
    trigger: Callable[[torch.Tensor], torch.Tensor] | None = None  # trigger oracle: [0,1] -> [0,1]
    target: int | None = None
    trigger_hint: tuple[int, int, int, int] | None = None  # (top, left, height, width) of the trigger


@attrs.define(kw_only=True, eq=False)
class DefenseResult:
    """The purified model and JSON-able diagnostics (pruned units, detected class, ...)."""

    model: Any
    diagnostics: dict[str, Any] = attrs.Factory(dict)


NEEDS = ("clean", "poisoned_train_set", "trigger_oracle", "target_label", "trigger_hint")


class Defense(Component):
    """A post-training defense: ``purify(model, data, ctx) -> DefenseResult``."""

    kind = "defense"
    needs: ClassVar[frozenset[str]] = frozenset({"clean"})
    uses_validation: ClassVar[bool] = False  # the runner splits a validation set off the budget

    def purify(self, model: nn.Module, data: DefenseData, ctx: RunContext) -> DefenseResult:
        raise NotImplementedError


@attrs.frozen(kw_only=True, eq=False)
class Evaluation:
    """Predictions of one model on the clean test set and on the backdoor test set.

    Metrics that need more than predictions (e.g. boundary distances) also get the model, the
    clean test set, the backdoor test set's clean images with the trigger function that turns
    them into backdoor inputs ([0, 1] floats in and out), and the device.
    """

    clean_pred: torch.Tensor
    clean_true: torch.Tensor
    bd_pred: torch.Tensor
    bd_true: torch.Tensor
    bd_target: torch.Tensor
    model: Any = None
    clean: ImageSet | None = None
    bd_source: ImageSet | None = None
    trigger: Callable[[torch.Tensor], torch.Tensor] | None = None
    device: torch.device | None = None


class Metric(Component):
    """Named floats from an :class:`Evaluation`, plus derived values from before/after."""

    kind = "metric"
    columns: ClassVar[tuple[str, ...]] = ()  # per-stage names: written as <name>_before/_after
    derived: ClassVar[tuple[str, ...]] = ()  # derived names: written as-is

    def compute(self, ev: Evaluation) -> dict[str, float]:
        raise NotImplementedError

    def derive(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {}

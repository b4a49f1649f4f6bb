"""Built-in baselines, so ``bdrun`` works with no plugin installed: no attack and no defense.

``--attack none`` trains the clean reference model with the same recipe as attacked models;
``--defense none`` evaluates the attacked model as it is.
"""
from __future__ import annotations

import torch

from bdbench import hookimpl
from bdbench.components import Attack, Defense, DefenseResult, ImageSet, PoisonedSet


class NoAttack(Attack):
    """No attack: a clean model trained with the preset's recipe (the reference for attack tests)."""

    name = "none"

    def apply(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return images.clone()

    def poison(self, train: ImageSet, ratio: float, target: int, num_classes: int,
               generator: torch.Generator) -> PoisonedSet:
        empty = torch.empty(0, dtype=torch.int64)
        return PoisonedSet(empty, train.images[:0].clone(), empty.clone())


class NoDefense(Defense):
    """No defense: the attacked model unchanged."""

    name = "none"
    needs = frozenset()

    def purify(self, model, data, ctx) -> DefenseResult:
        return DefenseResult(model=model)


@hookimpl
def register_attacks(register):
    register(NoAttack)


@hookimpl
def register_defenses(register):
    register(NoDefense)

"""The hooks a bdbench plugin implements.

A plugin is a module (or object) with functions marked ``@bdbench.hookimpl`` whose names are
the hooks below. It is found through the entry-point group ``bdbench``::

    [project.entry-points.bdbench]
    sau = "bd_defense_sau"

Every registration hook receives ``register``, a callable
``register(cls, *, name=None, aliases=())`` that takes a component *class* (never an
instance: discovery builds no model, reads no data and touches no GPU). The component's name
is ``name`` or ``cls.name``. Registering a name another plugin already registered is an
error naming both distributions. An implementation may accept a subset of a hook's arguments.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from bdbench import hookspec

if TYPE_CHECKING:  # pragma: no cover
    import click


class Register(Protocol):
    def __call__(self, cls: type, *, name: str | None = None, aliases: tuple[str, ...] = ()) -> None: ...


@hookspec
def register_datasets(register: Register) -> None:
    """Register :class:`bdbench.DatasetBuilder` subclasses (``--dataset NAME``).

    :param register: call ``register(MyDataset)`` once per dataset.
    """


@hookspec
def register_models(register: Register) -> None:
    """Register :class:`bdbench.ModelBuilder` subclasses (``--model NAME``).

    :param register: call ``register(MyModel)`` once per architecture.
    """


@hookspec
def register_attacks(register: Register) -> None:
    """Register :class:`bdbench.Attack` subclasses (``--attack NAME``).

    :param register: call ``register(MyAttack)`` once per attack.
    """


@hookspec
def register_defenses(register: Register) -> None:
    """Register :class:`bdbench.Defense` subclasses (``--defense NAME``).

    :param register: call ``register(MyDefense)`` once per defense.
    """


@hookspec
def register_metrics(register: Register) -> None:
    """Register :class:`bdbench.Metric` subclasses; every registered metric runs on every run.

    :param register: call ``register(MyMetric)`` once per metric set.
    """


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add sub-commands to ``bdrun``.

    :param cli: the ``bdrun`` click group; use ``@cli.command()``.
    """

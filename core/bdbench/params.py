"""Method parameters: one frozen attrs class per method, set by name, serialized canonically.

Each field is declared with :func:`param`, which records where its default comes from::

    @attrs.frozen(kw_only=True)
    class Config:
        lr: float = param(0.01, source="BackdoorBench config/defense/ft/cifar10.yaml", check=positive)

The CLI and grid files pass strings (``--param lr=0.1``); :func:`make_config` converts them
with the field's type and reports unknown or invalid names as one-line errors.
"""
from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

import attrs

from bdbench.errors import ParameterError

_NOTHING = attrs.NOTHING


def param(default: Any, *, source: str, help: str = "", check: Any = None) -> Any:
    """An attrs field with a documented default.

    :param source: where the default comes from (paper section/table, reference code).
    :param check: an attrs validator (or list of them) run on every value.
    """
    validators = [] if check is None else (check if isinstance(check, list) else [check])
    return attrs.field(default=default, validator=validators or None,
                       metadata={"source": source, "help": help})


def _positive(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _unit_interval(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value!r}")


def _open_unit_interval(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value!r}")


positive = _positive
non_negative = _non_negative
unit_interval = _unit_interval
fraction = _open_unit_interval


def one_of(*choices: Any):
    return attrs.validators.in_(choices)


@attrs.frozen(kw_only=True)
class NoParams:
    """A method without parameters."""


def fields_of(config_cls: type) -> tuple[attrs.Attribute, ...]:
    attrs.resolve_types(config_cls)
    return attrs.fields(config_cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a CLI string (or a TOML value) to the annotated type."""
    origin = get_origin(tp)
    if tp is Any or tp is None:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ParameterError as exc:
                errors.append(str(exc))
        raise ParameterError(errors[0] if errors else f"{name}: cannot parse {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ParameterError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if origin in (tuple, list):
        args = get_args(tp)
        item = args[0] if args else Any
        if isinstance(value, str):
            parts = [p for p in value.strip("()[] ").split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise ParameterError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(p.strip() if isinstance(p, str) else p, item, name) for p in parts)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ParameterError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ParameterError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ParameterError(f"{name} must be an integer, got {value!r}") from None
        if not f.is_integer():
            raise ParameterError(f"{name} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ParameterError(f"{name} must be a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ParameterError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ParameterError(f"{name} must be finite, got {value!r}")
        return f
    if tp is str:
        return str(value)
    return value


def make_config(config_cls: type, overrides: Mapping[str, Any] | None = None, *, owner: str = "") -> Any:
    """Build ``config_cls`` from defaults plus ``overrides`` (strings or typed values).

    Raises :class:`ParameterError` with one line naming ``owner``, the parameter and the problem.
    """
    prefix = f"{owner}: " if owner else ""
    fields = {f.name: f for f in fields_of(config_cls)}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise ParameterError(f"{prefix}unknown parameter {unknown[0]!r} (known: {known})")
    kwargs = {}
    for key, raw in overrides.items():
        try:
            kwargs[key] = _coerce(raw, fields[key].type, key)
        except ParameterError as exc:
            raise ParameterError(f"{prefix}{exc}") from None
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ParameterError(f"{prefix}{exc}") from None


def _jsonable(value: Any) -> Any:
    if attrs.has(type(value)):
        return {k: _jsonable(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return value  # keep 1.0 as 1.0: json writes it so
    return value


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces; equal configs give equal strings."""
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def describe(config_cls: type) -> list[dict[str, Any]]:
    """Each parameter's name, type, default, source and help (for ``bdrun list --params``)."""
    out = []
    for f in fields_of(config_cls):
        default = f.default if f.default is not _NOTHING else None
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        out.append({
            "name": f.name,
            "type": getattr(f.type, "__name__", str(f.type)),
            "default": default,
            "source": f.metadata.get("source", ""),
            "help": f.metadata.get("help", ""),
        })
    return out

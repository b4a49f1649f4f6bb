"""Plugin discovery and the component registry.

``make_plugin_manager()`` is the one entry point: it registers the hook specs, loads every
entry point of group ``bdbench`` (each in its own guard), runs ``check_pending`` so a
misspelled hook is that plugin's error, and then calls each ``register_*`` implementation
one plugin at a time, so every component knows the distribution it came from. A plugin that
fails at any step is unregistered and recorded; the others keep working. Strict mode
(``strict=True`` or ``BD_STRICT_PLUGINS=1``) raises instead.

Switches: ``BD_LOAD_PLUGINS=a,b`` (only these entry points; empty = none),
``BD_DISABLE_PLUGINS=a,b``, ``BD_TRACE_PLUGINS=1``, ``BD_STRICT_PLUGINS=1``, and
``plugins_dir`` for loose ``*.py`` prototypes.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata as md
import importlib.util
import os
import sys
import traceback
from functools import partial
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

from bdbench import PROJECT, __version__, hookspecs
from bdbench.components import KINDS, Component
from bdbench.errors import DuplicateComponentError, PluginLoadError, UnknownComponentError

REGISTER_HOOKS = {
    "dataset": "register_datasets",
    "model": "register_models",
    "attack": "register_attacks",
    "defense": "register_defenses",
    "metric": "register_metrics",
}
PLURAL = {k: k + "s" for k in KINDS}
BUILTIN_PLUGINS = ("bdbench.builtin",)


@attrs.frozen
class ComponentInfo:
    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str
    aliases: tuple[str, ...] = ()


@attrs.frozen
class LoadError:
    plugin: str
    distribution: str
    version: str
    stage: str  # import, validate, register
    error: str
    traceback: str = ""

    def line(self) -> str:
        return (f"bdbench: plugin {self.plugin!r} ({self.distribution} {self.version}) failed to {self.stage}: "
                f"{self.error} -- see `bdrun plugins`; disable it with BD_DISABLE_PLUGINS={self.plugin}")


@attrs.define
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool = False
    hooks: list[str] = attrs.Factory(list)
    components: list[str] = attrs.Factory(list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "builtin": self.builtin, "hooks": self.hooks, "components": self.components,
                "status": "ok" if self.error is None else "error", "error": self.error}


@attrs.define
class PluginSet:
    """The plugin manager plus what it loaded: components with provenance, and errors."""

    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo] = attrs.Factory(dict)
    components: dict[str, dict[str, ComponentInfo]] = attrs.Factory(lambda: {k: {} for k in KINDS})
    aliases: dict[str, dict[str, str]] = attrs.Factory(lambda: {k: {} for k in KINDS})
    errors: list[LoadError] = attrs.Factory(list)
    strict: bool = False

    # -- lookup -------------------------------------------------------------------------------------
    def list(self, kind: str, include: str | Iterable[str] | None = None,
             exclude: str | Iterable[str] | None = None) -> list[ComponentInfo]:
        """Components of ``kind`` whose names match the fnmatch patterns, sorted by name."""
        inc = [include] if isinstance(include, str) else list(include or [])
        exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
        out = []
        for name, info in sorted(self.components[kind].items()):
            if inc and not any(fnmatch.fnmatchcase(name, p) for p in inc):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in exc):
                continue
            out.append(info)
        return out

    def get(self, kind: str, name: str) -> ComponentInfo:
        table = self.components[kind]
        name = self.aliases[kind].get(name, name)
        if name in table:
            return table[name]
        for err in self.errors:  # a plugin that should have provided it failed to load
            if err.plugin == name:
                raise UnknownComponentError(
                    f"{kind} {name!r} unavailable: {err.distribution} {err.version} failed to {err.stage}: {err.error}")
        close = difflib.get_close_matches(name, list(table) + list(self.aliases[kind]), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else (
            f"; installed: {', '.join(sorted(table))}" if table else "; none installed")
        raise UnknownComponentError(f"unknown {kind} {name!r}{hint}")

    def create(self, kind: str, name: str, params: dict[str, Any] | None = None) -> Component:
        """An instance of the named component with ``params`` applied (validated)."""
        return self.get(kind, name).cls.configure(params)

    # -- loading ------------------------------------------------------------------------------------
    def _fail(self, name: str, stage: str, exc: BaseException) -> None:
        info = self.plugins.get(name) or PluginInfo(name, "?", "?")
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, all of it
        err = LoadError(name, info.distribution, info.version, stage, msg,
                        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        info.error = msg
        for kind in KINDS:  # drop whatever it registered before failing
            for cname in [c for c, ci in self.components[kind].items() if ci.plugin == name]:
                del self.components[kind][cname]
                info.components = [c for c in info.components if c != f"{kind}:{cname}"]
            for alias in [a for a, c in self.aliases[kind].items() if c not in self.components[kind]]:
                del self.aliases[kind][alias]
        self.errors.append(err)
        if self.strict:
            raise PluginLoadError(f"plugin {name!r} ({info.distribution} {info.version}) failed to {stage}: {msg}") from exc
        print(err.line(), file=sys.stderr)

    def load(self, name: str, distribution: str, version: str, loader: Callable[[], Any],
             builtin: bool = False) -> bool:
        """Import (``loader()``) and register one plugin; a failure becomes its recorded error.

        A blocked name is skipped. A name already taken (two distributions with one entry-point
        name, ``-p`` given twice) is an error of the newcomer; the first plugin keeps working.
        """
        if self.pm.is_blocked(name):
            return False
        taken = self.plugins.get(name)
        if taken is not None:
            key = f"{name} ({distribution})"
            self.plugins[key] = PluginInfo(key, distribution, version)
            self._fail(key, "import", PluginLoadError(
                f"plugin name {name!r} is already taken by {taken.distribution} {taken.version}"))
            return False
        self.plugins[name] = PluginInfo(name, distribution, version, builtin)
        try:
            obj = loader()
        except (Exception, SystemExit) as exc:  # a plugin may raise anything at import
            self._fail(name, "import", exc)
            return False
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:  # PluginValidationError, ValueError (object registered twice)
            self._fail(name, "validate", exc)
            return False
        return True

    def add(self, obj: Any, name: str, distribution: str, version: str, builtin: bool = False) -> bool:
        """Register an imported plugin object (see :meth:`load`)."""
        return self.load(name, distribution, version, lambda: obj, builtin)

    def _call_each(self, hook_name: str, kwargs: Callable[[PluginInfo], dict[str, Any]]) -> None:
        """Call every plugin's implementation of ``hook_name`` on its own, in registration order."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            info = self.plugins.get(impl.plugin_name)
            if info is None or info.error:
                continue
            args = kwargs(info)
            try:
                impl.function(*[args[a] for a in impl.argnames])
            except Exception as exc:
                self._fail(info.name, "register", exc)

    def _register_components(self) -> None:
        for kind, hook_name in REGISTER_HOOKS.items():
            self._call_each(hook_name, lambda info, kind=kind: {"register": self._register_fn(kind, info)})

    def add_commands(self, cli: click.Group) -> None:
        """Run ``register_commands(cli)`` plugin by plugin; one that raises is a load error."""
        self._call_each("register_commands", lambda info: {"cli": cli})

    def _register_fn(self, kind: str, info: PluginInfo):
        def register(cls: type, *, name: str | None = None, aliases: Iterable[str] = ()) -> None:
            cname = name or getattr(cls, "name", "")
            if not isinstance(cls, type) or not issubclass(cls, Component) or cls.kind != kind:
                raise TypeError(f"register_{PLURAL[kind]} takes {kind} classes (subclasses of bdbench's "
                                f"{kind.title()} base), got {cls!r}")
            if not cname:
                raise ValueError(f"{cls.__name__} has no name")
            existing = self.components[kind].get(cname) or self.components[kind].get(self.aliases[kind].get(cname, ""))
            if existing is not None:
                raise DuplicateComponentError(
                    f"{kind} {cname!r} is registered by both {existing.distribution} ({existing.plugin}) "
                    f"and {info.distribution} ({info.name})")
            self.components[kind][cname] = ComponentInfo(kind, cname, cls, info.name, info.distribution,
                                                         info.version, tuple(aliases))
            for alias in aliases:
                self.aliases[kind][alias] = cname
            info.components.append(f"{kind}:{cname}")
        return register

    def finish(self) -> None:
        while True:  # check_pending raises on the first plugin with an unknown hook
            try:
                self.pm.check_pending()
                break
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin) or "?"
                self._fail(name, "validate", exc)
        for name, info in self.plugins.items():
            plugin = self.pm.get_plugin(name)
            if plugin is not None:
                info.hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
        self._register_components()

    def snapshot(self) -> list[dict[str, Any]]:
        return [p.as_dict() for p in self.plugins.values()]


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bdbench_local_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # attrs and typing resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def make_plugin_manager(*, entrypoints: bool = True, builtins: bool = True, only: Iterable[str] | None = None,
                        blocked: Iterable[str] = (), extra: Iterable[Any] = (), plugins_dir: str | Path | None = None,
                        strict: bool | None = None) -> PluginSet:
    """Build a fresh plugin manager and registry.

    :param entrypoints: load entry points of group ``bdbench``.
    :param only: load only these entry-point names (default: ``BD_LOAD_PLUGINS`` or all).
    :param blocked: never load these (plus ``BD_DISABLE_PLUGINS``).
    :param extra: plugin objects or module paths registered in-process (tests, ``-p``);
        ``"no:NAME"`` blocks ``NAME`` instead (``-p no:NAME``).
    :param plugins_dir: a folder whose ``*.py`` files are plugins.
    :param strict: raise on the first broken plugin (default: ``BD_STRICT_PLUGINS``).
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    ps = PluginSet(pm, strict=_truthy("BD_STRICT_PLUGINS") if strict is None else strict)
    if _truthy("BD_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda s: print(s, end="", file=sys.stderr))
        pm.enable_tracing()
    extra = list(extra)
    disabled = [e[3:] for e in extra if isinstance(e, str) and e.startswith("no:")]  # -p no:NAME
    extra = [e for e in extra if not (isinstance(e, str) and e.startswith("no:"))]
    for name in {*blocked, *(_env_list("BD_DISABLE_PLUGINS") or []), *disabled}:
        pm.set_blocked(name)
    only = list(only) if only is not None else _env_list("BD_LOAD_PLUGINS")
    if builtins:
        for modname in BUILTIN_PLUGINS:
            ps.load(modname, "bdbench", __version__, partial(importlib.import_module, modname), builtin=True)
    if entrypoints:
        for ep in sorted(md.entry_points(group=PROJECT), key=lambda e: e.name):
            if only is None or ep.name in only:
                dist = getattr(ep, "dist", None)
                dname, dver = (dist.metadata["Name"], dist.version) if dist is not None else ("?", "?")
                ps.load(ep.name, dname, dver, ep.load)
    if plugins_dir is not None:
        for path in sorted(Path(plugins_dir).glob("*.py")):
            ps.load(f"local:{path.stem}", str(path), "local", partial(_load_file, path))
    for i, obj in enumerate(extra):
        if isinstance(obj, str):
            ps.load(obj, obj, "local", partial(importlib.import_module, obj))
        else:
            name = getattr(obj, "__name__", None) or f"{type(obj).__name__}-{i}"
            ps.add(obj, name, getattr(obj, "__distribution__", "in-process"), getattr(obj, "__version__", "local"))
    ps.finish()
    return ps

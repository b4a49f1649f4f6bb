"""``bdrun new-plugin``: a new plugin project from the copy-me skeleton.

The skeleton is ``templates/plugin/`` at the repository root, shipped inside ``bdbench_cli``
(``bdbench_cli/templates`` links to it). Only files ending in ``.tmpl`` are rendered, without
that suffix; ``{{var}}`` in their paths and text is replaced by the variables of
:func:`variables`. ``X.<kind>.tmpl`` is rendered (as ``X``) only for that kind.
"""
from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import click

from bdbench import __version__
from bdbench.errors import BdbenchError

if TYPE_CHECKING:  # pragma: no cover
    from importlib.resources.abc import Traversable

KINDS = ("attack", "defense", "metric")
NAME_RE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
VAR_RE = re.compile(r"\{\{(\w+)\}\}")
SUFFIX = ".tmpl"


def template_root() -> Traversable:
    return files("bdbench_cli") / "templates" / "plugin"


def variables(kind: str, name: str) -> dict[str, str]:
    """The names a plugin ``name`` of ``kind`` gets: ``bd-defense-my-fp``, ``bd_defense_my_fp``, ``MyFp``."""
    ident = name.replace("-", "_")
    major, minor = __version__.split(".")[:2]
    upper = f"{major}.{int(minor) + 1}" if major == "0" else f"{int(major) + 1}"
    return {
        "kind": kind,
        "kinds": f"{kind}s",
        "name": name,
        "ident": ident,
        "module": f"bd_{kind}_{ident}",
        "distribution": f"bd-{kind}-{name}",
        "class_name": "".join(part.capitalize() for part in name.split("-")),
        "title": " ".join(part.capitalize() for part in name.split("-")),
        "usage": f"bdrun --{kind} {name}" if kind != "metric" else "bdrun --defense none",  # metrics always run
        "bdbench_range": f">={major}.{minor},<{upper}",
    }


def _sub(text: str, values: dict[str, str], where: str) -> str:
    def value(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise BdbenchError(f"template {where}: unknown variable {{{{{match.group(1)}}}}}")
        return values[match.group(1)]

    return VAR_RE.sub(value, text)


def _templates(root: Traversable, kind: str, prefix: str = "") -> list[tuple[str, Traversable]]:
    """(relative output path, template) for every template of ``kind`` under ``root``."""
    out: list[tuple[str, Traversable]] = []
    for item in sorted(root.iterdir(), key=lambda t: t.name):
        if item.is_dir():
            out += _templates(item, kind, f"{prefix}{item.name}/")
            continue
        stem = item.name.removesuffix(SUFFIX)
        if stem == item.name:
            continue  # not a template
        base, _, only = stem.rpartition(".")
        if only in KINDS:
            if only != kind:
                continue
            stem = base
        out.append((prefix + stem, item))
    return out


def render(kind: str, name: str, dest: Path) -> list[Path]:
    """Write the skeleton of plugin ``name`` (a ``kind``) into ``dest``; return the files written."""
    if kind not in KINDS:
        raise BdbenchError(f"new-plugin makes {', '.join(KINDS)} plugins, not {kind!r}")
    if not NAME_RE.fullmatch(name):
        raise BdbenchError(f"invalid plugin name {name!r}: use lowercase letters, digits and '-', "
                           "starting with a letter (e.g. fine-prune)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BdbenchError(f"{dest} already exists and is not an empty folder")
    values = variables(kind, name)
    written = []
    for rel, template in _templates(template_root(), kind):
        path = dest / _sub(rel, values, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_sub(template.read_text(encoding="utf-8"), values, rel), encoding="utf-8")
        written.append(path)
    return written


@click.command("new-plugin")
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("name")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Parent folder: the project goes to DEST/NAME (default: ./bd-KIND-NAME).")
def new_plugin(kind: str, name: str, dest: Path | None) -> None:
    """Create a plugin project for a new attack, defense or metric.

    \b
    bdrun new-plugin defense my-fp                           ./bd-defense-my-fp/
    bdrun new-plugin defense my-fp --dest plugins/defenses   plugins/defenses/my-fp/
    """
    target = (dest / name) if dest is not None else Path(variables(kind, name)["distribution"])
    written = render(kind, name, target)
    click.echo(f"created {target}/ ({len(written)} files). Next:\n"
               f"  pip install -e {target}\n"
               f"  python -m pytest {target}\n"
               f"  bdrun list {kind}s {name}")


def add_to(cli: click.Group) -> None:
    """Add ``new-plugin`` to the ``bdrun`` group."""
    cli.add_command(new_plugin)

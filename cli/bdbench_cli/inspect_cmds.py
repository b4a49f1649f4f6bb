"""``bdrun plugins`` and ``bdrun list``: what is installed, where it came from, whether it loaded.

Both work with broken plugins (outside strict mode): a plugin that failed to load is a row
with status ``error: ...``, never a crash. Output is a rich table on a terminal, aligned plain
text otherwise (pipes, tests), and JSON with ``--json``.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from bdbench.components import KINDS
from bdbench.params import describe
from bdbench.plugins import PLURAL, ComponentInfo, PluginSet
from bdbench_cli.main import State

KIND_NAMES = {**{PLURAL[k]: k for k in KINDS}, **{k: k for k in KINDS}}  # "defenses" and "defense"


def _plugins(ctx: click.Context) -> PluginSet:
    state = ctx.find_object(State)
    assert state is not None, "bdrun commands run inside build_cli()"
    return state.plugins


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """A rich table on a terminal; plain aligned columns otherwise."""
    cells = [[str(c) for c in row] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(*headers, title=Text(title) if title else None, title_justify="left")
        for row in cells:
            table.add_row(*map(Text, row))  # plain text: no rich markup in names or errors
        Console().print(table)
        return
    if title:
        click.echo(title)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *cells)]
    for row in [list(headers), *cells]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _status(entry: dict[str, Any]) -> str:
    return "ok" if entry["error"] is None else f"error: {entry['error']}"


@click.command("plugins")
@click.option("--all", "show_all", is_flag=True, help="Include bdbench's built-in plugins.")
@click.option("--json", "as_json", is_flag=True, help="The full snapshot as JSON.")
@click.option("--requirements", is_flag=True, help="name==version lines (pip requirements).")
@click.pass_context
def plugins_cmd(ctx: click.Context, show_all: bool, as_json: bool, requirements: bool) -> None:
    """Installed plugins: distribution, version, hooks, components and load status."""
    entries = [p for p in _plugins(ctx).snapshot() if show_all or not p["builtin"]]
    if as_json:
        _echo_json(entries)
    elif requirements:
        pins = {f"{p['distribution']}=={p['version']}" for p in entries
                if not p["builtin"] and p["version"] not in ("?", "local")}
        for line in sorted(pins):
            click.echo(line)
    elif not entries:
        click.echo("no plugins installed (bdrun plugins --all shows the built-ins)")
    else:
        _table(["plugin", "distribution", "version", "hooks", "components", "status"],
               [[p["name"], p["distribution"], p["version"], ", ".join(p["hooks"]), ", ".join(p["components"]),
                 _status(p)] for p in entries])


def _component_dict(info: ComponentInfo, params: bool) -> dict[str, Any]:
    out = {"kind": info.kind, "name": info.name, "summary": info.cls.summary(), "aliases": list(info.aliases),
           "plugin": info.plugin, "distribution": info.distribution, "version": info.version}
    if params:
        out["params"] = describe(info.cls.Config)
    return out


@click.command("list")
@click.argument("kind", type=click.Choice(list(KIND_NAMES)), metavar="KIND")
@click.argument("pattern", required=False)
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out matching names (repeatable).")
@click.option("--params", is_flag=True, help="Show each component's parameters.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_cmd(ctx: click.Context, kind: str, pattern: str | None, exclude: tuple[str, ...], params: bool,
             as_json: bool) -> None:
    """Components of KIND (datasets, models, attacks, defenses, metrics) matching PATTERN.

    PATTERN and --exclude are shell-style wildcards: bdrun list defenses 'f*' --exclude fst
    """
    kind = KIND_NAMES[kind]
    found = [_component_dict(c, params) for c in _plugins(ctx).list(kind, pattern, exclude)]
    if as_json:
        _echo_json(found)
        return
    if not found:
        click.echo(f"no {PLURAL[kind]} match {pattern!r}" if pattern else f"no {PLURAL[kind]} installed", err=True)
        return
    if not params:
        _table(["name", "summary", "distribution"],
               [[c["name"], c["summary"], f"{c['distribution']} {c['version']}"] for c in found])
        return
    for c in found:
        title = f"{c['name']}: {c['summary']} ({c['distribution']} {c['version']})"
        if c["params"]:
            _table(["parameter", "type", "default", "source"],
                   [[p["name"], p["type"], p["default"], p["source"]] for p in c["params"]], title=title)
        else:
            click.echo(f"{title}\n  (no parameters)")
        click.echo()


def add_to(cli: click.Group) -> None:
    """Add ``plugins`` and ``list`` to the ``bdrun`` group."""
    cli.add_command(plugins_cmd)
    cli.add_command(list_cmd)

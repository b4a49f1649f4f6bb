"""``bdrun``: the click group, its default command and error handling.

``bdrun --defense fp`` is ``bdrun run --defense fp``: when the first word is not a
sub-command, ``run`` is assumed. Plugins load lazily, once, the first time a command needs
them, so ``bdrun --help`` stays fast. Errors of bdbench (:class:`bdbench.BdbenchError`) print
one line on stderr and exit with code 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from bdbench.errors import BdbenchError

GROUP_OPTIONS_WITH_VALUE = ("--plugins-dir", "-p")
GROUP_FLAGS = ("--strict-plugins", "--help", "-h", "--version")


class DefaultGroup(click.Group):
    """A group that runs ``run`` when no sub-command is named."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = list(args)
        i = 0
        while i < len(args):
            token = args[i]
            if token in GROUP_OPTIONS_WITH_VALUE:
                i += 2
                continue
            if token.split("=", 1)[0] in GROUP_OPTIONS_WITH_VALUE or token in GROUP_FLAGS:
                i += 1
                continue
            if token not in self.commands:
                args.insert(i, self.default_command)
            break
        return super().parse_args(ctx, args)


class State:
    """Per-invocation state: the plugin set, built on first use."""

    def __init__(self, plugins_dir: str | None, extra: tuple[str, ...], strict: bool | None, plugins: Any = None):
        self.plugins_dir, self.extra, self.strict = plugins_dir, extra, strict
        self._plugins = plugins

    @property
    def plugins(self):
        if self._plugins is None:
            from bdbench.plugins import make_plugin_manager

            self._plugins = make_plugin_manager(plugins_dir=self.plugins_dir, extra=self.extra, strict=self.strict)
        return self._plugins


def build_cli(plugins: Any = None) -> click.Group:
    """The ``bdrun`` group; tests pass a ready ``PluginSet`` as ``plugins``.

    Given a plugin set, its plugins' ``register_commands`` run here (each guarded: one that
    raises is that plugin's load error); without one, plugins load on first use.
    """
    from bdbench import __version__

    @click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--plugins-dir", type=click.Path(file_okay=False, path_type=str), default=None,
                  help="Load every *.py in this folder as a plugin (unpackaged prototypes).")
    @click.option("-p", "extra", multiple=True, metavar="MODULE", help="Load this importable module as a plugin.")
    @click.option("--strict-plugins", is_flag=True, default=None,
                  help="Fail on the first plugin that does not load (also BD_STRICT_PLUGINS=1).")
    @click.version_option(__version__, prog_name="bdbench")
    @click.pass_context
    def cli(ctx: click.Context, plugins_dir: str | None, extra: tuple[str, ...], strict_plugins: bool | None) -> None:
        """Benchmark backdoor attacks and post-training defenses.

        \b
        bdrun --defense fp                 attack, defend, evaluate; one Parquet row
        bdrun plugins                      installed plugins and their status
        bdrun list defenses 'f*'           components of a kind
        """
        ctx.obj = State(plugins_dir, extra, strict_plugins or None, plugins)

    from bdbench_cli import gallery, grid_cmd, inspect_cmds, report_cmd, run_cmd, scaffold

    run_cmd.add_to(cli)
    inspect_cmds.add_to(cli)
    scaffold.add_to(cli)
    gallery.add_to(cli)
    grid_cmd.add_to(cli)
    report_cmd.add_to(cli)
    if plugins is not None:
        plugins.add_commands(cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``bdrun``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        # plugins may add sub-commands, so the plugin set is built before parsing
        plugins = _preload(argv)
        cli = build_cli(plugins)
        cli.main(args=argv, prog_name="bdrun", standalone_mode=False)
    except BdbenchError as exc:
        click.echo(f"bdrun: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("bdrun: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors, one line like every other error
        click.echo(f"bdrun: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("bdrun: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug, not bad input: one line unless BD_DEBUG asks for the traceback
        if os.environ.get("BD_DEBUG"):
            raise
        click.echo(f"bdrun: internal error: {type(exc).__name__}: {exc} (BD_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)


def _preload(argv: list[str]):
    """Build the plugin set from the group options in ``argv`` (for plugin sub-commands)."""
    from bdbench.plugins import make_plugin_manager

    plugins_dir, extra, strict = None, [], None
    for i, tok in enumerate(argv):
        if tok == "--plugins-dir" and i + 1 < len(argv):
            plugins_dir = argv[i + 1]
        elif tok.startswith("--plugins-dir="):
            plugins_dir = tok.split("=", 1)[1]
        elif tok == "-p" and i + 1 < len(argv):
            extra.append(argv[i + 1])
        elif tok == "--strict-plugins":
            strict = True
    if plugins_dir is not None and not Path(plugins_dir).is_dir():
        raise BdbenchError(f"--plugins-dir {plugins_dir}: no such folder")
    return make_plugin_manager(plugins_dir=plugins_dir, extra=extra, strict=strict)


if __name__ == "__main__":  # pragma: no cover - `python -m bdbench_cli.main`: use the imported module's classes
    from bdbench_cli.main import main as entry_point

    entry_point()

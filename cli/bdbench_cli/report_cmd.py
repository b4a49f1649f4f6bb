"""``bdrun report RESULTS --out DIR``: the survey's figures and summary tables."""
from __future__ import annotations

from pathlib import Path

import click


def add_to(cli: click.Group) -> None:
    @cli.command("report")
    @click.argument("results", type=click.Path(path_type=Path))
    @click.option("--out", type=click.Path(path_type=Path), default=Path("bdbench-report"), show_default=True)
    def report(results: Path, out: Path) -> None:
        """Figures (PNG) and an HTML page of summary tables from a results folder."""
        from bdbench.errors import BdbenchError
        from bdbench.report import build

        if not results.is_dir():
            raise BdbenchError(f"{results}: no such results folder")
        click.echo(str(build(results, out)))

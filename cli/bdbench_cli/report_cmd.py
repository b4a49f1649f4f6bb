"""``bdrun report RESULTS --out DIR``: the survey's figures and summary tables; ``bdrun compact``."""
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

    @cli.command("compact")
    @click.argument("results", type=click.Path(path_type=Path))
    @click.option("--name", default="results.parquet", show_default=True, help="the merged file, inside RESULTS")
    def compact(results: Path, name: str) -> None:
        """Merge a results folder's per-run files into one Parquet file (to commit or share it).

        Resume, report and pandas/Polars read the folder as before; runs added later are files
        of their own until the next compact.
        """
        from bdbench.errors import BdbenchError
        from bdbench.results import compact as merge

        if not results.is_dir():
            raise BdbenchError(f"{results}: no such results folder")
        if "/" in name or not name.endswith(".parquet"):
            raise BdbenchError(f"--name must be a file name ending in .parquet, got {name!r}")
        try:
            path, n = merge(results, name)
        except FileNotFoundError as exc:
            raise BdbenchError(str(exc)) from None
        click.echo(f"{n} result files merged into {path}")

"""``bdrun grid FILE.toml``: many runs, resumable, in-process or on Ray."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click


def add_to(cli: click.Group) -> None:
    @cli.command("grid")
    @click.argument("spec", type=click.Path(path_type=Path))
    @click.option("--dry-run", is_flag=True, help="Print the number of runs, attacked models and an estimate; run nothing.")
    @click.option("--executor", type=click.Choice(["in-process", "ray"]), default="in-process", show_default=True)
    @click.option("--address", default=None, help="Ray cluster address (default: start a local Ray).")
    @click.option("--workers", type=int, default=None, help="Local Ray: number of CPUs to use.")
    @click.option("--cpus-per-task", type=float, default=1.0, show_default=True)
    @click.option("--gpus-per-task", type=float, default=0.0, show_default=True)
    @click.option("--out", type=click.Path(path_type=Path), default=Path("bdbench-results"), show_default=True)
    @click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
    @click.option("--device", default="auto", show_default=True)
    @click.option("--data-dir", type=click.Path(path_type=Path), default=None)
    @click.option("--shard", default=None, metavar="K/N",
                  help="Run only every N-th run of the grid from K (0-based): processes or array tasks sharing --out "
                       "split the grid, whenever each starts.")
    @click.option("--models-only", is_flag=True,
                  help="Only train and cache the grid's attacked models (one 'none' run each), e.g. before shards.")
    @click.pass_context
    def grid(ctx: click.Context, spec: Path, dry_run: bool, executor: str, address: str | None, workers: int | None,
             cpus_per_task: float, gpus_per_task: float, out: Path, cache_dir: Path | None, device: str,
             data_dir: Path | None, shard: str | None, models_only: bool) -> None:
        """Run the product of the axes in SPEC's [grid] table; rerunning resumes.

        Keys already in --out with status ok are skipped; each attacked model is trained once;
        a failing run is a row with status failed and the grid goes on; Ctrl-C stops cleanly.
        """
        from bdbench.cache import default_cache_dir
        from bdbench.context import Reporter
        from bdbench.grid import estimate_seconds, expand, load_spec, parse_shard, run_in_process, run_ray
        from bdbench.results import read_results
        from bdbench_cli.main import State
        from bdbench_cli.run_cmd import resolve_device

        plugins = ctx.find_object(State).plugins
        g = expand(plugins, load_spec(spec), out, models_only=models_only,
                   cache_dir=(cache_dir or default_cache_dir()) if models_only else None,
                   shard=parse_shard(shard) if shard is not None else None)
        history = read_results(out).to_pylist()
        click.echo((f"shard {shard}: " if shard else "") + f"{len(g.experiments)} runs to do on {len(g.groups())} attacked models "
                   f"({g.skipped} already done, {g.duplicates} duplicates dropped); estimate: "
                   + estimate_seconds(g, history).describe())
        if dry_run or not g.experiments:
            return
        kwargs = dict(out_dir=out, cache_dir=cache_dir or default_cache_dir(), data_dir=data_dir,
                      device=str(resolve_device(device)), reporter=Reporter(enabled=False))
        counts = {"ok": 0, "failed": 0}
        total = len(g.experiments)
        start = time.monotonic()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("grid"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                      TimeRemainingColumn(), disable=not sys.stderr.isatty()) as bar:
            task = bar.add_task("grid", total=total, status="")

            def on_row(row: dict) -> None:
                counts["ok" if row["status"] == "ok" else "failed"] += 1
                bar.update(task, advance=1, status=f"{counts['ok']} ok, {counts['failed']} failed")

            stop = _stop_on_signals()
            try:
                if executor == "ray":
                    run_ray(g, kwargs, address=address, num_cpus=workers, cpus_per_task=cpus_per_task,
                            gpus_per_task=gpus_per_task, on_row=on_row)
                else:
                    run_in_process(plugins, g, kwargs, on_row=on_row)
            except KeyboardInterrupt:
                done = counts["ok"] + counts["failed"]
                click.echo(f"bdrun: grid stopped after {done} of {total} runs; rerun the same command to resume",
                           err=True)
                sys.exit(130)
            finally:
                stop()
        click.echo(f"{counts['ok']} ok, {counts['failed']} failed (not ok) in {time.monotonic() - start:.0f} s; "
                   f"results: {out}")
        if counts["failed"]:
            sys.exit(1)


def _stop_on_signals():
    """Ctrl-C and SIGTERM (a scheduler's time limit, ``kill``) both stop the grid cleanly between
    writes: finished runs stay and a rerun resumes. SIGINT is taken back even where the grid was
    started from a shell that ignores it (a background job). Returns the undo."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

"""``bdrun run`` (the default command): one experiment, one Parquet row, a before/after table."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from bdbench.errors import BdbenchError, ParameterError
from bdbench.presets import PRESETS


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for item in values:
        if "=" not in item:
            raise ParameterError(f"{option} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ParameterError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {name!r} requested but CUDA is not available")
    return device


def _fmt(v) -> str:
    return "-" if v is None or v != v else f"{v:.4f}"


def print_summary(row: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False, highlight=False)
    table = Table(title=f"{row['attack']} -> {row['defense']} on {row['dataset']}/{row['model']} "
                        f"(preset {row['preset']}, seed {row['seed']})")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for m, label in (("acc", "ACC"), ("asr", "ASR"), ("ra", "RA")):
        table.add_row(label, _fmt(row.get(f"{m}_before")), _fmt(row.get(f"{m}_after")))
    console.print(table)
    console.print("ARR {}  RDR {}  DER {}  |  attack {:.1f}s{}  defense {}s".format(
        _fmt(row.get("arr")), _fmt(row.get("rdr")), _fmt(row.get("der")), row.get("attack_seconds") or 0.0,
        " (cached)" if row.get("attack_cached") else "",
        "-" if row.get("defense_seconds") is None else f"{row['defense_seconds']:.1f}"))
    console.print(f"status: {row['status']}" + (f" ({row['error']})" if row.get("error") else ""))
    console.print(f"results: {row['path']}")


def add_to(cli: click.Group) -> None:
    @cli.command("run")
    @click.option("--defense", required=True, help="Defense to run (see `bdrun list defenses`).")
    @click.option("--attack", default="badnets", show_default=True, help="Attack that backdoors the model.")
    @click.option("--preset", type=click.Choice(sorted(PRESETS)), default="quick", show_default=True)
    @click.option("--dataset", default=None, help="Dataset (default: the preset's).")
    @click.option("--model", default=None, help="Model architecture (default: the preset's).")
    @click.option("--poison-ratio", type=float, default=0.1, show_default=True)
    @click.option("--target", type=int, default=0, show_default=True, help="Target label.")
    @click.option("--spc", type=int, default=None, help="Defender's clean samples per class [default: 100].")
    @click.option("--clean-ratio", type=float, default=None, help="Defender's budget as a fraction instead of --spc.")
    @click.option("--source", default="seen", show_default=True, help="Where the defender's data comes from.")
    @click.option("--calibrate", default=None, help="Calibrate the defender's data before the defense: gic.")
    @click.option("--calibrate-param", "calibrate_params", multiple=True, metavar="K=V",
                  help="Calibration parameter (repeatable), e.g. bound=0.05; gic: bound, lr, steps, batch_size.")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--param", "params", multiple=True, metavar="K=V", help="Defense parameter (repeatable).")
    @click.option("--attack-param", "attack_params", multiple=True, metavar="K=V", help="Attack parameter.")
    @click.option("--model-param", "model_params", multiple=True, metavar="K=V", help="Model parameter.")
    @click.option("--out", type=click.Path(path_type=Path), default=Path("bdbench-results"), show_default=True,
                  help="Results folder (one Parquet file per run).")
    @click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                  help="Attacked-model cache [default: $BDBENCH_CACHE or the user cache dir].")
    @click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
    @click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                  help="Where datasets are [default: $BDBENCH_DATA, then known system paths].")
    @click.pass_context
    def run(ctx: click.Context, defense: str, attack: str, preset: str, dataset: str | None, model: str | None,
            poison_ratio: float, target: int, spc: int | None, clean_ratio: float | None, source: str,
            calibrate: str | None, calibrate_params: tuple[str, ...], seed: int, params: tuple[str, ...],
            attack_params: tuple[str, ...], model_params: tuple[str, ...], out: Path, cache_dir: Path | None,
            device: str, data_dir: Path | None) -> None:
        """Backdoor a model, run one defense on it and write one result row.

        \b
        bdrun --defense fp
        bdrun --defense ft --attack blended --spc 10 --seed 1
        bdrun --defense fp --preset paper --device cuda --data-dir ~/data
        """
        from bdbench_cli.main import State
        from bdbench.runner import Runner, plan

        plugins = ctx.find_object(State).plugins
        if spc is None and clean_ratio is None:
            spc = 100
        if out.exists() and not out.is_dir():
            raise ParameterError(f"--out {out} exists and is not a folder")
        if data_dir is not None and not data_dir.is_dir():
            raise ParameterError(f"--data-dir {data_dir}: no such folder")
        exp = plan(plugins, defense=defense, preset=preset, dataset=dataset, model=model, attack=attack,
                   attack_params=_pairs(attack_params, "--attack-param"), defense_params=_pairs(params, "--param"),
                   model_params=_pairs(model_params, "--model-param"), poison_ratio=poison_ratio, target=target,
                   seed=seed, spc=spc, clean_ratio=clean_ratio, source=source, calibrate=calibrate,
                   calibrate_params=_pairs(calibrate_params, "--calibrate-param"))
        runner = Runner(plugins, out_dir=out, cache_dir=cache_dir, device=resolve_device(device), data_dir=data_dir)
        try:
            row = runner.run(exp)
        except BdbenchError:
            raise
        except Exception as exc:  # recorded as a failed row by the runner
            click.echo(f"bdrun: run failed: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)
        print_summary(row)
        if row["status"] != "ok":
            sys.exit(1)

"""Grids of experiments: expansion from a TOML file, resume, and executors.

A grid file has one ``[grid]`` table whose keys are plural axis names holding lists; a key
left out takes the single-run default. Per-method parameters are sub-tables::

    [grid]
    presets = ["quick"]
    attacks = ["badnets", "blended"]
    poison_ratios = [0.1]
    defenses = ["ft", "fp"]
    spc = [2, 10, 100]          # or clean_ratios = [0.05]
    sources = ["seen"]
    calibrate = ["none"]
    seeds = [0, 1, 2]

    [grid.defense_params.fp]
    acc_ratio = 0.05

    [grid.calibrate_params.gic]   # when calibrate lists "gic"
    bound = 0.05

The product is expanded and validated (every name and parameter, before anything runs),
duplicates are dropped, and keys already present in the results with status ok are skipped.
Runs are ordered seed by seed, so a grid stopped part-way (a session's end, a time limit)
holds whole replicates: every attack, defense and budget of seed 0 before any of seed 1. Within
a seed they are grouped by attacked model, so each is trained once and shared by its defenses.
"""
from __future__ import annotations

import itertools
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

from bdbench.errors import ParameterError
from bdbench.plugins import PluginSet
from bdbench.results import completed_keys
from bdbench.runner import Experiment, plan

AXES = {  # grid key -> plan() argument
    "presets": "preset", "datasets": "dataset", "models": "model", "attacks": "attack",
    "poison_ratios": "poison_ratio", "targets": "target", "defenses": "defense", "spc": "spc",
    "clean_ratios": "clean_ratio", "sources": "source", "calibrate": "calibrate", "seeds": "seed",
}
PARAM_TABLES = ("attack_params", "defense_params", "model_params", "calibrate_params")


@attrs.frozen
class Grid:
    experiments: tuple[Experiment, ...]  # unique, validated, in execution order
    skipped: int  # already in the results with status ok
    duplicates: int

    def groups(self) -> list[list[Experiment]]:
        """Runs that share an attacked model, in order."""
        out: dict[str, list[Experiment]] = {}
        for exp in self.experiments:
            out.setdefault(_attack_id(exp), []).append(exp)
        return list(out.values())


def _attack_id(exp: Experiment) -> str:
    import json

    return json.dumps(exp.attack_half(), sort_keys=True)


def _order(exp: Experiment) -> tuple[int, str]:
    """Execution order: seed by seed (whole replicates first), then by attacked model."""
    return exp.seed, _attack_id(exp)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N): shard K (0-based) of N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ParameterError(f"--shard {text!r}: expected K/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ParameterError(f"--shard {text!r}: expected K/N with 0 <= K < N")
    return index, count


def load_spec(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ParameterError(f"grid file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ParameterError(f"grid file {path}: {exc}") from None
    if "grid" not in spec or not isinstance(spec["grid"], dict):
        raise ParameterError(f"grid file {path} has no [grid] table")
    return spec["grid"]


def expand(plugins: PluginSet, spec: dict[str, Any], out_dir: Path | str | None = None, *,
           models_only: bool = False, cache_dir: Path | str | None = None,
           shard: tuple[int, int] | None = None) -> Grid:
    """Validate and expand ``spec`` (the ``[grid]`` table) into experiments.

    ``shard=(K, N)``: every N-th run from K (0-based) of the whole grid, done or not, then the
    ones not done yet. Independent processes or Slurm array tasks with the same ``--out`` and
    ``--cache-dir`` split the grid this way. A shard's runs depend on the grid alone, not on what
    other shards have finished, so shards started at different times never overlap. Runs are
    sorted by seed, then by attacked model, so a shard still loads each of its models once; train the attacked
    models first (``models_only``, ``bdrun grid --models-only``) so that no two shards train the
    same one.

    ``models_only``: one ``none`` run per attacked model instead, which trains and caches every
    model of the grid (then shards of the full grid never train the same model twice). With
    ``cache_dir``, such a run is done only when its model is in that cache: results copied from
    another machine name models this one has not trained yet.
    """
    unknown = set(spec) - set(AXES) - set(PARAM_TABLES)
    if unknown:
        raise ParameterError(f"grid: unknown key {sorted(unknown)[0]!r} (axes: {', '.join(AXES)}; "
                             f"tables: {', '.join(PARAM_TABLES)})")
    if "defenses" not in spec:
        raise ParameterError("grid: 'defenses' is required")
    axes = []
    for key, arg in AXES.items():
        values = spec.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or not values:
            raise ParameterError(f"grid: {key!r} must be a non-empty list")
        axes.append([(arg, v) for v in values])
    if "clean_ratios" in spec and "spc" not in spec:
        axes.append([("spc", None)])
    tables = {t: spec.get(t, {}) for t in PARAM_TABLES}
    seen: dict[str, Experiment] = {}
    duplicates = 0
    for combo in itertools.product(*axes):
        kwargs = dict(combo)
        if kwargs.get("calibrate") == "none":
            kwargs["calibrate"] = None
        kwargs["attack_params"] = tables["attack_params"].get(kwargs.get("attack", "badnets"), {})
        kwargs["defense_params"] = tables["defense_params"].get(kwargs["defense"], {})
        if kwargs.get("calibrate") is not None:
            kwargs["calibrate_params"] = tables["calibrate_params"].get(kwargs["calibrate"], {})
        model = kwargs.get("model")
        if model is not None:
            kwargs["model_params"] = tables["model_params"].get(model, {})
        exp = plan(plugins, **kwargs)
        if exp.key() in seen:
            duplicates += 1
        seen[exp.key()] = exp
    if models_only:
        none = plan(plugins, defense="none")
        first: dict[str, Experiment] = {}
        for exp in seen.values():
            first.setdefault(_attack_id(exp), exp)
        seen = {e.key(): e for e in (attrs.evolve(exp, defense="none", defense_params=none.defense_params, spc=None,
                                                  clean_ratio=None, source=None, calibrate=None,
                                                  calibrate_params=None)
                                     for exp in first.values())}
        duplicates = 0
    runs = sorted(seen.values(), key=_order)  # seed by seed; runs sharing an attacked model back to back
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise ParameterError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
        runs = runs[index::count]
    done = completed_keys(out_dir) if out_dir is not None else set()
    if models_only and cache_dir is not None:
        from bdbench.cache import TensorCache
        from bdbench.runner import attack_key

        models = TensorCache(cache_dir, "models")
        done = {k for k in done if k in seen and models.has(attack_key(plugins, seen[k]))}
    todo = [e for e in runs if e.key() not in done]
    return Grid(tuple(todo), skipped=len(runs) - len(todo), duplicates=duplicates)


Progress = Callable[[dict[str, Any]], None]


def run_in_process(plugins: PluginSet, grid: Grid, runner_kwargs: dict[str, Any],
                   on_row: Progress = lambda row: None) -> list[dict[str, Any]]:
    """Run every experiment here, one after another; a failing run is a row and the grid goes on."""
    from bdbench.runner import Runner

    runner = Runner(plugins, **runner_kwargs)
    rows = []
    for exp in grid.experiments:
        rows.append(runner.run(exp, raise_errors=False))
        on_row(rows[-1])
    return rows


def run_group_task(group: list[Experiment], runner_kwargs: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    """One executor task: a fresh plugin set and runner in this process, one attacked model."""
    import torch

    from bdbench.plugins import make_plugin_manager
    from bdbench.runner import Runner

    torch.set_num_threads(threads)
    runner = Runner(make_plugin_manager(), **runner_kwargs)
    return [runner.run(exp, raise_errors=False) for exp in group]


def run_ray(grid: Grid, runner_kwargs: dict[str, Any], *, address: str | None = None, num_cpus: int | None = None,
            cpus_per_task: float = 1.0, gpus_per_task: float = 0.0, on_row: Progress = lambda row: None
            ) -> list[dict[str, Any]]:
    """Run each group of experiments as a Ray task (one attacked model per task).

    The cache and results folders must be paths every worker sees (a shared file system on a
    cluster). Each task asks for ``cpus_per_task`` CPUs (and ``gpus_per_task`` GPUs) and sets
    torch's thread count to match.
    """
    try:
        import ray
    except ImportError:
        raise ParameterError("--executor ray needs Ray: pip install 'ray[default]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                 log_to_driver=False)
    try:
        task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task)(run_group_task)
        threads = max(1, int(cpus_per_task))
        pending = {task.remote(g, runner_kwargs, threads): g for g in grid.groups()}
        rows = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pending.pop(ref)
                for row in ray.get(ref):
                    rows.append(row)
                    on_row(row)
        return rows
    finally:
        if started_here:
            ray.shutdown()


@attrs.frozen
class Estimate:
    """Seconds a grid should take in one process, and what had no earlier row to go by."""

    seconds: float
    runs: int  # runs in the grid
    unknown_runs: int  # runs whose preset, defense and spc have no earlier ok row
    unknown_models: int  # attacked models whose preset has no earlier training row

    def describe(self) -> str:
        if self.unknown_runs == self.runs and self.runs:
            return "unknown (no earlier rows of these presets and defenses)"
        span = f"{self.seconds / 60:.1f} min" if self.seconds < 7200 else f"{self.seconds / 3600:.1f} h"
        if not (self.unknown_runs or self.unknown_models):
            return f"{span} in one process"
        missing = [f"{self.unknown_runs} of {self.runs} runs"] if self.unknown_runs else []
        missing += [f"{self.unknown_models} attacked models"] if self.unknown_models else []
        return f"at least {span} in one process ({' and '.join(missing)} without earlier rows)"


def estimate_seconds(grid: Grid, history: Iterable[dict[str, Any]]) -> Estimate:
    """The grid's time from earlier ok rows: each run's mean defense seconds for its preset,
    defense and spc, each attacked model's mean training seconds for its preset. Runs and
    models without such rows are counted, not guessed (FT on the quick preset costs 40 times
    more at spc 100 than at spc 2), so with any of them the seconds are a lower bound."""
    train: dict[str, list[float]] = {}
    defend: dict[tuple, list[float]] = {}
    for row in history:
        if row.get("status") != "ok":
            continue
        if row.get("attack_seconds") and not row.get("attack_cached"):
            train.setdefault(row["preset"], []).append(row["attack_seconds"])
        if row.get("defense_seconds") is not None:
            defend.setdefault((row["preset"], row["defense"], row.get("spc")), []).append(row["defense_seconds"])
    total, unknown_runs, unknown_models = 0.0, 0, 0
    for group in grid.groups():
        t = train.get(group[0].preset)
        if t:
            total += sum(t) / len(t)
        else:
            unknown_models += 1
        for exp in group:
            d = defend.get((exp.preset, exp.defense, exp.spc))
            if d:
                total += sum(d) / len(d)
            else:
                unknown_runs += 1
    return Estimate(total, len(grid.experiments), unknown_runs, unknown_models)

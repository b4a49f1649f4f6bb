"""Grids: expansion, resume, kill-and-rerun safety, and Ray against the in-process executor."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from bdbench.errors import BdbenchError, ParameterError
from bdbench.grid import expand, load_spec
from bdbench.results import read_results

SPEC = """
[grid]
presets = ["smoke"]
attacks = ["badnets"]
defenses = ["none", "ft"]
spc = [10]
seeds = [0, 1]

[grid.defense_params.ft]
epochs = 2
"""


def write(tmp_path: Path, text: str = SPEC) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def test_expansion_validates_dedupes_and_groups(session_plugins, tmp_path):
    spec = load_spec(write(tmp_path, SPEC.replace('seeds = [0, 1]', 'seeds = [0, 1, 1]')))
    g = expand(session_plugins, spec)
    assert len(g.experiments) == 4 and g.duplicates == 2
    assert [len(group) for group in g.groups()] == [2, 2]  # one attacked model per seed
    assert {e.defense_params for e in g.experiments if e.defense == "ft"} == {
        e.defense_params for e in g.experiments if e.defense == "ft" and '"epochs":2' in e.defense_params}
    with pytest.raises(ParameterError, match="unknown key 'defense'"):
        expand(session_plugins, {"defense": ["ft"]})
    with pytest.raises(BdbenchError, match="unknown defense .fq."):
        expand(session_plugins, {"defenses": ["fq"]})
    with pytest.raises(ParameterError, match="spc must be a positive integer"):
        expand(session_plugins, {"defenses": ["ft"], "spc": [0]})
    with pytest.raises(ParameterError, match="no \\[grid\\] table"):
        load_spec(write(tmp_path, "[other]\nx = 1\n"))


def test_defenses_without_clean_data_run_once_per_budget_axis(session_plugins):
    g = expand(session_plugins, {"presets": ["smoke"], "defenses": ["ft", "clp", "burn", "none"], "spc": [2, 10],
                                 "sources": ["seen", "brightness"], "calibrate": ["none", "gic"]})
    by = {d: [e for e in g.experiments if e.defense == d] for d in ("ft", "clp", "burn", "none")}
    assert len(by["ft"]) == 8
    for name in ("clp", "burn", "none"):  # no clean data: spc, source and calibration do not apply
        assert [(e.spc, e.clean_ratio, e.source, e.calibrate) for e in by[name]] == [(None, None, None, None)]
        assert by[name][0].calibrate_params is None
    assert g.duplicates == 3 * 7


def test_calibration_parameters_enter_the_calibrated_runs_and_their_keys(session_plugins):
    spec = {"presets": ["smoke"], "defenses": ["ft"], "calibrate": ["none", "gic"]}
    default = {e.calibrate: e for e in expand(session_plugins, spec).experiments}
    tuned = {e.calibrate: e for e in expand(session_plugins, {**spec, "calibrate_params": {"gic": {"bound": 0.03}}})
             .experiments}
    assert json.loads(default["gic"].calibrate_params)["bound"] == 0.1
    assert json.loads(tuned["gic"].calibrate_params) == {**json.loads(default["gic"].calibrate_params), "bound": 0.03}
    assert tuned["gic"].key() != default["gic"].key()
    assert tuned[None].calibrate_params is None and tuned[None].key() == default[None].key()
    with pytest.raises(ParameterError, match="calibration 'gic': unknown parameter 'radius'"):
        expand(session_plugins, {**spec, "calibrate_params": {"gic": {"radius": 0.03}}})


def bdrun_grid(spec: Path, out: Path, cache: Path, *extra: str, ignore_sigint: bool = False) -> subprocess.Popen:
    """``bdrun grid`` in a subprocess; ``ignore_sigint`` starts it as a shell's background job is (SIGINT ignored)."""
    env = {**os.environ, "BD_STRICT_PLUGINS": "1", "OMP_NUM_THREADS": "1"}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, "-m", "bdbench_cli", "grid", str(spec), "--out", str(out),
                             "--cache-dir", str(cache), "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=ignore)


def test_the_estimate_uses_each_runs_spc_and_counts_what_has_no_history(session_plugins):
    from bdbench.grid import estimate_seconds

    g = expand(session_plugins, {"presets": ["smoke"], "defenses": ["ft", "anp"], "spc": [2, 100], "seeds": [0, 1]})
    assert len(g.experiments) == 8 and len(g.groups()) == 2
    row = {"status": "ok", "preset": "smoke", "attack_cached": False}
    history = [{**row, "defense": "none", "spc": None, "attack_seconds": 30.0, "defense_seconds": 0.0},
               {**row, "defense": "ft", "spc": 2, "attack_seconds": 50.0, "defense_seconds": 1.0},
               {**row, "defense": "ft", "spc": 100, "attack_cached": True, "attack_seconds": 0.0, "defense_seconds": 9.0},
               {**row, "defense": "ft", "spc": 100, "status": "failed", "attack_seconds": 0.0, "defense_seconds": 99.0}]
    partial = estimate_seconds(g, history)
    # two models at 40 s, FT at spc 2 and 100 on each (1 s and 9 s); ANP has no row
    assert partial.seconds == pytest.approx(2 * 40 + 2 * (1 + 9)) and partial.unknown_runs == 4
    assert partial.describe().startswith("at least 1.7 min") and "4 of 8 runs" in partial.describe()
    history.append({**row, "defense": "anp", "spc": 10, "attack_cached": True, "defense_seconds": 300.0})
    assert estimate_seconds(g, history) == partial  # ANP at spc 10 says nothing of spc 2 or 100
    history += [{**row, "defense": "anp", "spc": spc, "attack_cached": True, "defense_seconds": 3000.0 + spc}
                for spc in (2, 100)]
    full = estimate_seconds(g, history)
    assert full.unknown_runs == 0 and full.seconds == pytest.approx(partial.seconds + 2 * (3002 + 3100))
    assert full.describe() == f"{full.seconds / 3600:.1f} h in one process"
    none = estimate_seconds(g, [{**row, "preset": "quick", "defense": "ft", "spc": 2, "defense_seconds": 1.0}])
    assert none.unknown_runs == 8 and none.unknown_models == 2 and none.describe().startswith("unknown")


@pytest.mark.slow
def test_killing_the_grid_loses_and_duplicates_nothing(tmp_path):
    spec, out, cache = write(tmp_path), tmp_path / "results", tmp_path / "cache"
    rng = random.Random(0)
    for _ in range(3):  # kill at random points
        proc = bdrun_grid(spec, out, cache)
        time.sleep(rng.uniform(3, 12))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()  # reap it and close its pipes
        for f in out.rglob("*.parquet"):
            assert pq.read_table(f).num_rows == 1  # every file readable, never partial
    for sig in (signal.SIGTERM, signal.SIGINT):  # a scheduler's stop and Ctrl-C: a clean stop that says so
        proc = bdrun_grid(spec, out, cache, ignore_sigint=True)
        assert "runs to do" in proc.stdout.readline()  # planned; the runs start now
        time.sleep(1)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "rerun the same command to resume" in stderr, (proc.returncode, stderr[-2000:])
    finished = bdrun_grid(spec, out, cache)
    stdout, stderr = finished.communicate(timeout=600)
    assert finished.returncode == 0, stderr[-2000:]
    table = read_results(out)
    keys = table.column("run_key").to_pylist()
    assert len(keys) == 4 and len(set(keys)) == 4
    assert sum(pq.read_table(f).num_rows for f in out.rglob("*.parquet")) == 4  # no row written twice
    assert set(table.column("status").to_pylist()) == {"ok"}
    again = bdrun_grid(spec, out, cache, "--dry-run")
    assert "0 runs to do" in again.communicate(timeout=120)[0]


@pytest.mark.slow
def test_ray_executor_matches_the_in_process_run(session_plugins, session_cache, tmp_path):
    pytest.importorskip("ray")
    from bdbench.context import Reporter
    from bdbench.grid import run_in_process, run_ray

    g = expand(session_plugins, load_spec(write(tmp_path)))
    common = dict(cache_dir=session_cache, device="cpu", reporter=Reporter(enabled=False))
    here = {r["run_key"]: r for r in run_in_process(session_plugins, g, dict(out_dir=tmp_path / "a", **common))}
    there = {r["run_key"]: r for r in run_ray(g, dict(out_dir=tmp_path / "b", **common), num_cpus=2)}
    assert here.keys() == there.keys()
    for key, row in here.items():
        assert there[key]["status"] == row["status"] == "ok"
        for col in ("acc_before", "asr_before", "acc_after", "asr_after"):
            assert there[key][col] == pytest.approx(row[col], abs=0.02), col
    assert read_results(tmp_path / "b").num_rows == 4


def test_a_grid_runs_seed_by_seed_so_a_stopped_grid_holds_whole_replicates(session_plugins):
    spec = {"presets": ["smoke"], "attacks": ["blended", "badnets"], "defenses": ["fp", "ft"], "spc": [2, 10],
            "seeds": [1, 0]}
    runs = expand(session_plugins, spec).experiments
    assert [e.seed for e in runs] == [0] * 8 + [1] * 8
    # every attack, defense and budget of seed 0 comes before any run of seed 1
    assert {(e.attack, e.defense, e.spc) for e in runs[:8]} == {(e.attack, e.defense, e.spc) for e in runs[8:]}
    # within a seed, the runs of one attacked model are back to back (each model is loaded once)
    models = [json.dumps(e.attack_half(), sort_keys=True) for e in runs]
    changes = sum(a != b for a, b in zip(models, models[1:]))
    assert changes == len(set(models)) - 1 == 3


def test_shards_partition_the_grid(session_plugins, tmp_path, monkeypatch):
    from bdbench.grid import parse_shard

    import bdbench.grid as bdgrid

    spec = {"presets": ["smoke"], "attacks": ["badnets", "blended"], "defenses": ["ft", "fp"], "spc": [2, 10],
            "seeds": [0, 1]}
    g = expand(session_plugins, spec)
    shards = [expand(session_plugins, spec, shard=(k, 3)).experiments for k in range(3)]
    keys = [e.key() for shard in shards for e in shard]
    assert sorted(keys) == sorted(e.key() for e in g.experiments) and len(set(keys)) == len(keys)
    for shard in shards:  # each shard keeps the grid's order, so it loads each attacked model once
        ids = [(e.seed, json.dumps(e.attack_half(), sort_keys=True)) for e in shard]
        assert ids == sorted(ids)
    # shards started at different times: shard 1 starts after shard 0 finished two runs and owns the same runs
    finished = {e.key() for e in shards[0][:2]}
    with monkeypatch.context() as m:
        m.setattr(bdgrid, "completed_keys", lambda out: finished)
        late = expand(session_plugins, spec, tmp_path, shard=(1, 3))
        again = expand(session_plugins, spec, tmp_path, shard=(0, 3))
    assert late.experiments == shards[1] and late.skipped == 0
    assert again.experiments == shards[0][2:] and again.skipped == 2
    with pytest.raises(ParameterError, match="shard 3/3"):
        expand(session_plugins, spec, shard=(3, 3))
    models = expand(session_plugins, {"presets": ["smoke"], "attacks": ["badnets", "blended"], "defenses": ["ft", "fp"],
                                      "spc": [2, 10], "seeds": [0, 1]}, models_only=True)
    alone = expand(session_plugins, {"presets": ["smoke"], "attacks": ["badnets", "blended"], "defenses": ["none"],
                                     "seeds": [0, 1]})
    assert sorted(e.key() for e in models.experiments) == sorted(e.key() for e in alone.experiments)
    assert len(models.experiments) == len(g.groups()) == 4
    assert parse_shard("2/3") == (2, 3)

    # results copied from another machine list the models as done; --models-only trains what the cache lacks
    from bdbench.cache import TensorCache
    from bdbench.runner import attack_key

    spec = {"presets": ["smoke"], "attacks": ["badnets", "blended"], "defenses": ["ft"], "seeds": [0, 1]}
    nones = [e.key() for e in models.experiments]
    monkeypatch.setattr(bdgrid, "completed_keys", lambda out: set(nones))
    assert expand(session_plugins, spec, tmp_path, models_only=True).experiments == ()  # no cache given: trust the rows
    assert len(expand(session_plugins, spec, tmp_path, models_only=True, cache_dir=tmp_path).experiments) == 4
    first = models.experiments[0]
    TensorCache(tmp_path, "models").save(attack_key(session_plugins, first), {"w": torch.zeros(1)})
    left = expand(session_plugins, spec, tmp_path, models_only=True, cache_dir=tmp_path)
    assert len(left.experiments) == 3 and first.key() not in {e.key() for e in left.experiments}
    for bad in ("3/3", "a/2", "1", "-1/2", "0/0"):
        with pytest.raises(ParameterError, match="--shard"):
            parse_shard(bad)


@pytest.mark.slow
def test_concurrent_shards_share_one_results_folder(session_cache, tmp_path):
    spec, out, cache = write(tmp_path), tmp_path / "results", session_cache  # the smoke models other tests train
    first = bdrun_grid(spec, out, cache, "--models-only")  # train the attacked models first, as the docs say
    first.communicate(timeout=600)
    assert first.returncode == 0
    shards = [bdrun_grid(spec, out, cache, "--shard", f"{k}/2") for k in range(2)]
    outputs = [p.communicate(timeout=600) for p in shards]
    assert [p.returncode for p in shards] == [0, 0], [o[1][-2000:] for o in outputs]
    assert all("shard" in o[0] for o in outputs)
    table = read_results(out)
    assert sorted(table.column("status").to_pylist()) == ["ok"] * 4
    assert sum(pq.read_table(f).num_rows for f in out.rglob("*.parquet")) == 4
    assert "0 runs to do" in bdrun_grid(spec, out, cache, "--dry-run").communicate(timeout=120)[0]
    bad = bdrun_grid(spec, out, cache, "--shard", "2/2", "--dry-run").communicate(timeout=120)[1]
    assert bad.strip().splitlines() == ["bdrun: error: --shard '2/2': expected K/N with 0 <= K < N"]

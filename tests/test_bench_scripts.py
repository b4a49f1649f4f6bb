"""The table scripts under bench/ read a results folder and keep only the rows they are asked for."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from bdbench import results

ROOT = Path(__file__).resolve().parents[1]


def row(key: str, defense: str, acc_after: float, **extra):
    base = {"run_key": key, "status": "ok", "attack": "badnets", "defense": defense, "seed": 0, "spc": 100,
            "source": "seen", "calibrate": None, "acc_before": 0.9, "acc_after": acc_after, "asr_after": 0.1,
            "der": 0.9, "defense_seconds": 10.0, "started_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}
    base.update(extra)
    return base


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True)


def table_rows(stdout: str) -> list[list[str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ") and not ln.startswith("|---")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def test_summarize_where_keeps_the_defense_grid_rows_apart_from_gic_rows(tmp_path):
    results.write_row(row("a", "ft", 0.80), tmp_path)
    results.write_row(row("b", "ft", 0.90, seed=1), tmp_path)
    results.write_row(row("c", "ft", 0.20, source="brightness", calibrate="gic"), tmp_path)
    results.write_row(row("d", "clp", 0.70, source=None, spc=None), tmp_path)

    kept = script("summarize.py", str(tmp_path), "--by", "defense", "--metrics", "acc_after",
                  "--where", "source=seen,None", "--where", "calibrate=None")
    assert kept.returncode == 0, kept.stderr
    assert table_rows(kept.stdout) == [["clp", "1", "0.700", "0"], ["ft", "2", "0.850 ± 0.071", "0"]]

    gic = script("summarize.py", str(tmp_path), "--by", "defense,source,calibrate", "--metrics", "acc_after",
                 "--where", "calibrate=gic")
    assert table_rows(gic.stdout) == [["ft", "brightness", "gic", "1", "0.200", "0"]]

    bad = script("summarize.py", str(tmp_path), "--where", "colour=red")
    assert bad.returncode == 2 and "--where 'colour=red'" in bad.stderr.strip().splitlines()[-1]


def test_claims_reads_only_uncalibrated_rows_of_the_seen_source(tmp_path):
    results.write_row(row("a", "fp", 0.60, spc=2), tmp_path)
    results.write_row(row("b", "fp", 0.10, spc=2, source="contrast"), tmp_path)
    results.write_row(row("c", "fp", 0.10, spc=2, calibrate="gic"), tmp_path)
    out = script("claims.py", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert ["badnets", "2", "fp", "1", "0.600", "0.100", "0.900"] in table_rows(out.stdout)


def test_committed_results_keep_their_run_keys():
    """Resume finds a committed row only if this version's experiment key reproduces its run_key."""
    for table in sorted((ROOT / "bench" / "results").glob("*.parquet")):
        done = script("rekey.py", str(table))
        assert done.returncode == 0, done.stdout + done.stderr
        assert " 0 keys differ" in done.stdout


def test_rekey_writes_the_current_keys(tmp_path):
    committed = results.read_results(ROOT / "bench" / "results" / "defenses-quick-partial.parquet")
    sample = committed.filter(pa.compute.equal(committed["calibrate"], "gic")).slice(0, 2)
    sample = pa.concat_tables([sample, committed.filter(pa.compute.is_null(committed["calibrate"])).slice(0, 2)])
    stale = sample.set_column(0, "run_key", pa.array([f"stale{i}" for i in range(4)]))
    column = stale.schema.get_field_index("calibrate_params")
    stale = stale.set_column(column, "calibrate_params", pa.nulls(4, pa.string()))
    results.write_table(stale, tmp_path / "t.parquet")
    check = script("rekey.py", str(tmp_path / "t.parquet"))
    assert check.returncode == 1 and "4 rows; 4 keys differ" in check.stdout
    assert script("rekey.py", str(tmp_path / "t.parquet"), "--write").returncode == 0
    rewritten = results.read_results(tmp_path / "t.parquet")
    assert rewritten["run_key"].to_pylist() == sample["run_key"].to_pylist()
    assert rewritten["calibrate_params"].to_pylist() == sample["calibrate_params"].to_pylist()
    assert rewritten["acc_after"].to_pylist() == sample["acc_after"].to_pylist()

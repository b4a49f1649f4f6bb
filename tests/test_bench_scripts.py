"""The table scripts under bench/ read a results folder and keep only the rows they are asked for."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

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

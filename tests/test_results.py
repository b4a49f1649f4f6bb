"""The result table: schema, atomic writes, one table for pandas and Polars, resume keys."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from bdbench import results


def row(key: str, status: str = "ok", **extra):
    base = {"run_key": key, "status": status, "dataset": "fashion-mnist", "defense": "fp", "seed": 0,
            "acc_before": 0.9, "acc_after": 0.88, "spc": 100, "attack_cached": True,
            "started_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}
    base.update(extra)
    return base


def test_rows_read_as_one_table_in_pandas_and_polars(tmp_path):
    results.write_row(row("a"), tmp_path)
    results.write_row(row("b", status="failed", error="RuntimeError: boom", dataset="cifar10"), tmp_path)
    df = pd.read_parquet(tmp_path)
    assert sorted(df["run_key"]) == ["a", "b"] and list(df.columns)[: len(results.COLUMNS)] == results.COLUMNS
    pl_df = pl.read_parquet(str(tmp_path) + "/**/*.parquet")
    assert pl_df.height == 2 and pl_df.schema["acc_before"] == pl.Float64
    assert pl_df.filter(pl.col("status") == "failed")["error"].to_list() == ["RuntimeError: boom"]
    meta = pq.read_schema(next(Path(tmp_path).rglob("*.parquet"))).metadata
    assert meta[b"bdbench.schema_version"] == results.SCHEMA_VERSION.encode()


def test_rewriting_a_key_replaces_its_row_and_resume_skips_only_ok_rows(tmp_path):
    results.write_row(row("a", status="failed", error="x"), tmp_path)
    results.write_row(row("b"), tmp_path)
    assert results.completed_keys(tmp_path) == {"b"}
    results.write_row(row("a"), tmp_path)
    assert results.completed_keys(tmp_path) == {"a", "b"}
    assert results.read_results(tmp_path).num_rows == 2


def test_compact_merges_every_file_and_a_later_rerun_wins(tmp_path):
    results.write_row(row("a", status="failed", error="x", finished_at=datetime(2026, 1, 1, tzinfo=timezone.utc)),
                      tmp_path)
    results.write_row(row("b", dataset="cifar10"), tmp_path)
    path, merged = results.compact(tmp_path)
    assert merged == 2 and list(tmp_path.rglob("*.parquet")) == [path] and not (tmp_path / "cifar10").exists()
    assert sorted(results.read_results(path).column("run_key").to_pylist()) == ["a", "b"]  # the file alone reads too
    assert sorted(pd.read_parquet(tmp_path)["run_key"]) == ["a", "b"]
    assert results.completed_keys(tmp_path) == {"b"}
    results.write_row(row("a", finished_at=datetime(2026, 1, 2, tzinfo=timezone.utc)), tmp_path)  # rerun
    table = results.read_results(tmp_path)
    assert sorted(zip(table.column("run_key").to_pylist(), table.column("status").to_pylist())) == [
        ("a", "ok"), ("b", "ok")]
    results.compact(tmp_path)
    assert pq.read_table(path).num_rows == 2 and len(list(tmp_path.rglob("*.parquet"))) == 1
    with pytest.raises(FileNotFoundError, match="no result files"):
        results.compact(tmp_path / "empty")


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken(table, where):
        Path(where).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(results.pq, "write_table", broken)
    with pytest.raises(OSError):
        results.write_row(row("a"), tmp_path)
    assert list(tmp_path.rglob("*")) == [tmp_path / "fashion-mnist"]


def test_unknown_columns_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown result columns"):
        results.write_row(row("a", accuracy=1.0), tmp_path)


def test_readme_documents_every_column():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", readme, flags=re.M))
    assert set(results.COLUMNS) <= documented


def test_files_of_an_older_schema_read_with_the_new_columns_null(tmp_path):
    import pyarrow as pa

    results.write_row(row("new", attack_prepare_seconds=1.5), tmp_path)
    old_schema = pa.schema([f for f in results.SCHEMA if f.name != "attack_prepare_seconds"])
    old = pa.Table.from_pydict({f.name: [row("old").get(f.name)] for f in old_schema}, schema=old_schema)
    pq.write_table(old, tmp_path / "fashion-mnist" / "old.parquet")
    table = results.read_results(tmp_path)
    got = dict(zip(table.column("run_key").to_pylist(), table.column("attack_prepare_seconds").to_pylist()))
    assert got == {"new": 1.5, "old": None} and table.schema == results.SCHEMA
    assert results.completed_keys(tmp_path) == {"new", "old"}

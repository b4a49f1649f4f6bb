"""The result table: one Parquet file per run, written atomically, read as one table.

``pandas.read_parquet(DIR)`` and ``polars.read_parquet(DIR + "/**/*.parquet")`` read a results
folder as a whole. Every file has the same schema (:data:`SCHEMA`), versioned by
:data:`SCHEMA_VERSION` in the file metadata, next to a snapshot of the loaded plugins.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "3"  # 2: attack_prepare_seconds; 3: calibrate_params

_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("run_key", pa.string(), "SHA-256 of the experiment's canonical JSON; identifies the run"),
    ("status", pa.string(), "ok, failed (an error in the run) or attack_failed (the attack missed the preset's floor)"),
    ("error", pa.string(), "one-line error for a failed run, else null"),
    ("started_at", pa.timestamp("us", tz="UTC"), "run start (UTC)"),
    ("finished_at", pa.timestamp("us", tz="UTC"), "run end (UTC)"),
    ("preset", pa.string(), "preset name (smoke, quick, study, paper)"),
    ("dataset", pa.string(), "dataset component"),
    ("model", pa.string(), "model component"),
    ("model_params", pa.string(), "model parameters, canonical JSON"),
    ("attack", pa.string(), "attack component"),
    ("attack_params", pa.string(), "attack parameters, canonical JSON"),
    ("poison_ratio", pa.float64(), "fraction of the attack's training set poisoned"),
    ("poison_count", pa.int64(), "number of poisoned training samples"),
    ("target", pa.int64(), "target label (all-to-one)"),
    ("seed", pa.int64(), "run seed (splits, poisoning, training, defense data)"),
    ("recipe", pa.string(), "attacked-model training recipe, canonical JSON"),
    ("defense", pa.string(), "defense component"),
    ("defense_params", pa.string(), "defense parameters as used, canonical JSON"),
    ("spc", pa.int64(), "defender budget in samples per class (null when clean_ratio is used)"),
    ("clean_ratio", pa.float64(), "defender budget as a fraction of the training set (null when spc is used)"),
    ("source", pa.string(), "auxiliary-data source (seen, reserved, brightness, ...); null when the defense "
     "takes no clean data"),
    ("calibrate", pa.string(), "input calibration applied to the defender's data (null: none)"),
    ("calibrate_params", pa.string(), "the calibration's parameters, canonical JSON (null: no calibration)"),
    ("defense_needs", pa.string(), "what the defense was given, comma-separated (clean, trigger_oracle, ...)"),
    ("clean_count", pa.int64(), "defender's clean training samples"),
    ("val_count", pa.int64(), "defender's validation samples"),
    ("acc_before", pa.float64(), "clean test accuracy of the attacked model"),
    ("asr_before", pa.float64(), "attack success rate of the attacked model (non-target test images)"),
    ("ra_before", pa.float64(), "robust accuracy: backdoor test images classified as their true label"),
    ("acc_after", pa.float64(), "clean test accuracy after the defense"),
    ("asr_after", pa.float64(), "attack success rate after the defense"),
    ("ra_after", pa.float64(), "robust accuracy after the defense"),
    ("arr", pa.float64(), "accuracy reduction ratio (ACC_before - ACC_after) / ACC_before"),
    ("rdr", pa.float64(), "recovery difference ratio (ACC_before - RA_after) / ACC_before"),
    ("der", pa.float64(), "defense effectiveness rate [max(0, dASR) - max(0, dACC) + 1] / 2"),
    ("lcr", pa.float64(), "label correction rate: backdoor samples classified as their true label after defense"),
    ("extra_metrics", pa.string(), "metrics of other metric plugins, canonical JSON"),
    ("defense_diagnostics", pa.string(), "what the defense reports (pruned units, detection), canonical JSON"),
    ("attack_seconds", pa.float64(), "seconds to build the attack's resources, poison and train the attacked model "
     "(no training on a cache hit; 0 when an earlier run of the same process prepared it)"),
    ("attack_prepare_seconds", pa.float64(), "of attack_seconds, the part spent in the attack's prepare and poison "
     "(building or loading its resources: trigger, surrogate model, encoder; poisoning)"),
    ("attack_cached", pa.bool_(), "the attacked model came from the cache"),
    ("defense_seconds", pa.float64(), "seconds the defense ran"),
    ("peak_memory_mb", pa.float64(), "peak resident memory of the process (CPU) or peak CUDA memory, MiB"),
    ("device", pa.string(), "torch device the run used"),
    ("bdbench_version", pa.string(), "bdbench version"),
    ("torch_version", pa.string(), "torch version"),
]
for _kind in ("dataset", "model", "attack", "defense", "metric"):
    _COLUMNS.append((f"{_kind}_plugin", pa.string(), f"distribution that provided the {_kind} (metrics: comma-separated)"))
    _COLUMNS.append((f"{_kind}_plugin_version", pa.string(), f"its version"))

SCHEMA = pa.schema([pa.field(name, typ) for name, typ, _ in _COLUMNS])
COLUMNS = [name for name, _, _ in _COLUMNS]
DESCRIPTIONS = {name: desc for name, _, desc in _COLUMNS}


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_row(row: dict[str, Any], out_dir: Path | str, plugins_snapshot: Iterable[dict] = ()) -> Path:
    """Write one run as ``<out_dir>/<dataset>/<run_key>.parquet`` (atomic: temp file + rename)."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns: {sorted(unknown)}")
    data = {name: [row.get(name)] for name in COLUMNS}
    meta = {b"bdbench.schema_version": SCHEMA_VERSION.encode(),
            b"bdbench.plugins": json.dumps(list(plugins_snapshot), sort_keys=True).encode()}
    table = pa.Table.from_pydict(data, schema=SCHEMA.with_metadata(meta))
    path = Path(out_dir) / str(row.get("dataset") or "unknown") / f"{row['run_key']}.parquet"
    _atomic_write_table(table, path)
    return path


def result_files(out_dir: Path | str) -> list[Path]:
    """The result files of a results folder, or the one file named (a compacted table)."""
    root = Path(out_dir)
    if root.is_file():
        return [root]
    return sorted(p for p in root.glob("**/*.parquet") if not p.name.startswith(".")) if root.exists() else []


def read_results(out_dir: Path | str) -> pa.Table:
    """Every run under ``out_dir`` (a results folder, or one result file) as one table (empty
    table with the schema when none).

    A run key found twice (a run repeated after :func:`compact` merged its first row) counts
    once: the row that finished last.
    """
    files = result_files(out_dir)
    if not files:
        return SCHEMA.empty_table()
    return _latest(pa.concat_tables([_conform(pq.read_table(f)) for f in files]))


def _latest(table: pa.Table) -> pa.Table:
    keys = table.column("run_key").to_pylist()
    if len(set(keys)) == len(keys):
        return table
    finished = table.column("finished_at").to_pylist()
    best: dict[str, int] = {}
    for i, (k, f) in enumerate(zip(keys, finished)):
        j = best.get(k)
        if j is None or (f is not None and (finished[j] is None or f >= finished[j])):
            best[k] = i
    return table.take(sorted(best.values()))


def compact(out_dir: Path | str, name: str = "results.parquet") -> tuple[Path, int]:
    """Merge every result file under ``out_dir`` into ``<out_dir>/<name>``; returns (path, files merged).

    One file is easier to commit and share than one per run; :func:`read_results`, resume and
    ``bdrun report`` read the folder as before. The merged file is written atomically before the
    per-run files are removed, so an interruption loses nothing (a row left in both places counts
    once).
    """
    root = Path(out_dir)
    files = result_files(root)
    target = root / name
    if not files:
        raise FileNotFoundError(f"no result files under {root}")
    write_table(read_results(root), target)
    for f in files:
        if f != target:
            f.unlink()
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    return target, len(files)


def write_table(table: pa.Table, path: Path | str) -> None:
    """Write many runs (a table in :data:`SCHEMA`) as one file, atomically."""
    meta = {b"bdbench.schema_version": SCHEMA_VERSION.encode(), b"bdbench.compacted": b"1"}
    _atomic_write_table(_conform(table).replace_schema_metadata(meta), Path(path))


def _conform(table: pa.Table) -> pa.Table:
    """A file's table in the current schema: columns an older schema lacked are null."""
    columns = [table.column(name).cast(SCHEMA.field(name).type) if name in table.column_names
               else pa.nulls(len(table), SCHEMA.field(name).type) for name in COLUMNS]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def completed_keys(out_dir: Path | str) -> set[str]:
    """Run keys already present with status ok (a grid or rerun skips them)."""
    table = read_results(out_dir)
    keys, status = table.column("run_key").to_pylist(), table.column("status").to_pylist()
    return {k for k, s in zip(keys, status) if s == "ok"}

"""Recompute the run keys of a result table from its rows with this version's experiment key.

    python bench/rekey.py bench/results/defenses-quick-partial.parquet           # report only
    python bench/rekey.py bench/results/defenses-quick-partial.parquet --write   # rewrite in place

A run's key is the hash of its experiment (``bdbench.runner.Experiment.key``); resume skips the
keys already in the results. When what enters the key changes, rows written before keep their
old keys, and a grid would run them again. Schema 3 is such a change: a calibrated run's key
now includes its calibration parameters (``calibrate_params``); runs without calibration keep
their keys. This rebuilds each row's experiment from its columns, and ``--write`` gives the rows
whose key changed their new key and experiment columns (one file, written atomically; compact
a results folder first: ``bdrun compact DIR``). Rows whose recorded parameters this version
resolves differently (a parameter added since, a default changed) are other experiments and
are left as they are. Exit status 1 when keys differ and were not written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa

from bdbench.plugins import make_plugin_manager
from bdbench.results import SCHEMA, read_results, write_table
from bdbench.runner import plan


def experiment_of(plugins, r: dict):
    """The experiment a row records (a row without a budget is planned with one; plan() drops it)."""
    spc, ratio = r["spc"], r["clean_ratio"]
    if spc is None and ratio is None:
        spc = 100
    calibrate_params = json.loads(r["calibrate_params"]) if r.get("calibrate_params") else None
    return plan(plugins, defense=r["defense"], preset=r["preset"], dataset=r["dataset"], model=r["model"],
                attack=r["attack"], attack_params=json.loads(r["attack_params"]),
                defense_params=json.loads(r["defense_params"]), model_params=json.loads(r["model_params"]),
                poison_ratio=r["poison_ratio"], target=r["target"], seed=r["seed"],
                spc=spc, clean_ratio=ratio,
                source=r["source"] or "seen", calibrate=r["calibrate"], calibrate_params=calibrate_params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", type=Path, help="one result file (a compacted table)")
    ap.add_argument("--write", action="store_true", help="rewrite the rows whose key changed")
    args = ap.parse_args()
    if not args.table.is_file():
        sys.exit(f"rekey: {args.table} is not a file (compact a results folder first: bdrun compact DIR)")
    plugins = make_plugin_manager()
    rows = read_results(args.table).to_pylist()
    changed = older = 0
    for r in rows:
        exp = experiment_of(plugins, r)
        if any(r[p] != getattr(exp, p) for p in ("model_params", "attack_params", "defense_params")):
            older += 1  # a parameter was added or its default changed since: another experiment, left as it is
        elif exp.key() != r["run_key"]:
            changed += 1
            r.update(run_key=exp.key(), calibrate_params=exp.calibrate_params)
    print(f"{len(rows)} rows; {changed} keys differ from this version's" + ("; rewritten" if changed and args.write
                                                                            else "")
          + (f"; {older} rows ran with parameters this version resolves differently (left as they are)"
             if older else ""))
    if changed and args.write:
        write_table(pa.Table.from_pylist(rows, schema=SCHEMA), args.table)
    elif changed:
        sys.exit(1)


if __name__ == "__main__":
    main()

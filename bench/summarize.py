"""Summarise a results folder as a Markdown table: mean ± standard deviation over seeds.

    python bench/summarize.py bench-out/defenses --by attack,defense,spc --where source=seen,None --where calibrate=None
    python bench/summarize.py bench-out/defenses --by defense,source,calibrate_params --where spc=100 --where attack=badnets

Rows with status ok are grouped by the --by columns; every group shows the number of runs,
ACC/ASR/RA before and after, ARR, RDR and the defense seconds (``--metrics`` changes the
list). Failed and attack_failed runs are counted in the last column. ``--where COLUMN=VALUE``
(repeatable) keeps the rows whose column prints as VALUE, or as one of VALUE,VALUE,... (``None``
for a missing value).
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from bdbench.results import read_results

METRICS = ["acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after", "arr", "rdr",
           "defense_seconds"]


def fmt(values: list[float], digits: int = 3) -> str:
    """Mean ± standard deviation (the value alone for one, '-' for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def sort_key(value) -> tuple:
    """Numbers in numeric order (spc 2 before 10 before 100), then text; missing values first."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)):
        return (1, value, "")
    return (2, 0, str(value))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--by", default="attack,defense,spc")
    ap.add_argument("--metrics", default=",".join(METRICS))
    ap.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE")
    args = ap.parse_args()
    by, metrics = args.by.split(","), args.metrics.split(",")
    table = read_results(args.results)
    where = [w.split("=", 1) for w in args.where]
    for cond in where:
        if len(cond) != 2 or cond[0] not in table.column_names:
            ap.error(f"--where {'='.join(cond)!r}: expected COLUMN=VALUE with a result column")
    where = [(column, set(values.split(","))) for column, values in where]
    rows = [r for r in table.to_pylist() if all(str(r[c]) in values for c, values in where)]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    failed: dict[tuple, int] = defaultdict(int)
    for r in rows:
        key = tuple(r[c] for c in by)
        if r["status"] == "ok":
            groups[key].append(r)
        else:
            failed[key] += 1
    keys = sorted(set(groups) | set(failed), key=lambda k: tuple(sort_key(v) for v in k))
    print("| " + " | ".join(by + ["runs"] + metrics + ["not ok"]) + " |")
    print("|" + "---|" * (len(by) + len(metrics) + 2))
    for key in keys:
        rs = groups.get(key, [])
        cells = [str(v) for v in key] + [str(len(rs))]
        cells += [fmt([r[m] for r in rs], 1 if m.endswith("seconds") else 3) for m in metrics]
        cells.append(str(failed.get(key, 0)))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

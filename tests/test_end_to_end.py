"""The promised flow on real data (Fashion-MNIST, smoke preset): attack, defend, one row.

Floors were measured on this CPU over seeds 0-2 (see BENCHMARKS.md) and are set with a margin.
"""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


def test_badnets_backdoors_the_smoke_model(smoke_run):
    row = smoke_run("none", attack="badnets")
    assert row["status"] == "ok"
    assert row["acc_before"] >= 0.80  # chance is 0.10
    assert row["asr_before"] >= 0.95
    assert row["ra_before"] <= 0.10
    assert row["poison_count"] == round(0.1 * 0.95 * 6000)
    # no defense: nothing changes
    assert row["asr_after"] == row["asr_before"] and row["acc_after"] == row["acc_before"]


def check_cuts_badnets(row, defense):
    assert row["status"] == "ok", row["error"]
    assert row["attack_cached"] and row["attack_seconds"] == 0.0
    assert row["asr_after"] <= 0.5 * row["asr_before"]
    assert row["acc_after"] >= row["acc_before"] - 0.05
    assert row["ra_after"] > row["ra_before"]
    table = pq.read_table(row["path"])
    assert table.num_rows == 1 and table.column("defense").to_pylist() == [defense]


def test_ft_cuts_badnets_at_spc_100(smoke_run):
    smoke_run("none", attack="badnets")  # trains the attacked model unless an earlier test did
    check_cuts_badnets(smoke_run("ft", attack="badnets", spc=100), "ft")


def test_fp_prunes_on_validation_data_only_and_cuts_badnets_at_spc_100(smoke_run):
    import json

    smoke_run("none", attack="badnets")
    row = smoke_run("fp", attack="badnets", spc=100)  # one FP run for both checks (about a minute)
    check_cuts_badnets(row, "fp")
    diag = json.loads(row["defense_diagnostics"])
    assert 0 < diag["pruned"] < diag["channels"]
    assert row["val_count"] == 10 * 10 and row["clean_count"] == 90 * 10

"""Runner behaviour on real small runs: the attacked-model cache and the attack floor."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from bdbench.context import Reporter
from bdbench.runner import Runner, plan

pytestmark = pytest.mark.slow


def runner(plugins, tmp_path):
    return Runner(plugins, out_dir=tmp_path / "results", cache_dir=tmp_path / "cache", reporter=Reporter(enabled=False))


def test_corrupted_cache_entry_is_detected_and_retrained(session_plugins, tmp_path, capfd):
    exp = plan(session_plugins, defense="none", preset="smoke", seed=7)
    first = runner(session_plugins, tmp_path).run(exp)
    assert not first["attack_cached"] and first["attack_seconds"] > 0
    assert 0 < first["attack_prepare_seconds"] < first["attack_seconds"]
    cached = runner(session_plugins, tmp_path).run(exp)
    assert cached["attack_cached"] and cached["asr_before"] == first["asr_before"]
    (entry,) = (tmp_path / "cache" / "models").glob("*.safetensors")
    raw = bytearray(entry.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    entry.write_bytes(bytes(raw))
    capfd.readouterr()
    again = runner(session_plugins, tmp_path).run(exp)
    err = capfd.readouterr().err
    assert "failed its checksum; retraining" in err and len(err.strip().splitlines()) == 1
    assert not again["attack_cached"] and again["status"] == "ok"
    assert again["acc_before"] == first["acc_before"]  # same seed, same model
    assert runner(session_plugins, tmp_path).run(exp)["attack_cached"]


def test_an_attack_under_the_floor_is_reported_not_defended(session_plugins, tmp_path):
    exp = plan(session_plugins, defense="ft", preset="smoke", poison_ratio=0.0005, seed=3)
    row = runner(session_plugins, tmp_path).run(exp)
    assert row["status"] == "attack_failed"
    assert "under the smoke preset's floor" in row["error"]
    assert row["asr_before"] < 0.8 and row["asr_after"] is None and row["defense_seconds"] is None
    assert pq.read_table(row["path"]).column("status").to_pylist() == ["attack_failed"]

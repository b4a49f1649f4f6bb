"""``bdrun report``: figures and tables from a results folder."""
from __future__ import annotations

import random

import pytest

from bdbench import results
from bdbench.report import build, load


def fill(path, n_seeds=3):
    rng = random.Random(0)
    for defense, asr in (("fp", 0.2), ("ft", 0.4), ("sau", 0.05), ("none", 1.0)):
        for attack in ("badnets", "blended", "wanet"):
            for spc in (2, 10, 100):
                for seed in range(n_seeds):
                    acc_b = 0.9
                    acc_a = acc_b - rng.uniform(0, 0.1)
                    ra_a = rng.uniform(0.3, 0.8)
                    results.write_row({
                        "run_key": f"{defense}-{attack}-{spc}-{seed}", "status": "ok", "dataset": "fashion-mnist",
                        "model": "smallcnn", "attack": attack, "defense": defense, "spc": spc, "seed": seed,
                        "poison_ratio": 0.1, "acc_before": acc_b, "acc_after": acc_a,
                        "asr_after": min(1, asr * rng.uniform(0.5, 1.5)), "ra_after": ra_a,
                        "arr": (acc_b - acc_a) / acc_b, "rdr": (acc_b - ra_a) / acc_b, "defense_seconds": 1.0,
                    }, path)
    results.write_row({"run_key": "broken", "status": "failed", "error": "x", "dataset": "fashion-mnist",
                       "defense": "fp", "attack": "badnets"}, path)


def test_report_writes_the_survey_figures_and_tables(tmp_path):
    fill(tmp_path / "r")
    df = load(tmp_path / "r")
    assert len(df) == 3 * 3 * 3 * 3 and set(df["defense"]) == {"fp", "ft", "sau"}
    assert set(df["attack_type"]) == {"static", "dynamic"}
    index = build(tmp_path / "r", tmp_path / "out")
    page = index.read_text()
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert "fig06_box.png" in pngs and "fig07_medians.png" in pngs
    assert {"fig08_09_box.png", "fig10_medians.png", "fig11_box.png"} <= set(pngs)
    assert "fig12_box.png" not in pngs  # one model: no split by model
    for name in pngs:
        assert name in page and (tmp_path / "out" / name).stat().st_size > 5000
    assert page.count("<table") == 2 and "sau" in page
    assert "Not plotted: 1 failed rows." in page


def test_the_summary_gives_each_defense_its_medians_and_the_spread_of_its_asr(tmp_path):
    from bdbench.report import summary

    fill(tmp_path / "r")
    df = load(tmp_path / "r")
    table = summary(df)
    assert list(table.index) == ["fp", "ft", "sau"]  # the two baselines first
    for defense in ("ft", "sau"):
        asr = df[df["defense"] == defense]["asr_after"]
        assert table.loc[defense, "runs"] == 27
        assert table.loc[defense, "median asr_after"] == pytest.approx(asr.median(), abs=5e-4)
        assert table.loc[defense, "IQR asr_after"] == pytest.approx(asr.quantile(0.75) - asr.quantile(0.25), abs=5e-4)
    assert table.loc["ft", "IQR asr_after"] > table.loc["sau", "IQR asr_after"]  # FT's ASRs are spread wider


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path):
    from bdbench.errors import BdbenchError

    (tmp_path / "r").mkdir()
    with pytest.raises(BdbenchError, match="no finished defense runs"):
        build(tmp_path / "r", tmp_path / "out")

"""Bad input: one line on stderr, exit code 2, the results folder untouched."""
from __future__ import annotations

import pytest

from bdbench_cli.main import main


def bdrun(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.err


def listing(path):
    return sorted(p.relative_to(path) for p in path.rglob("*")) if path.exists() else None


@pytest.mark.parametrize(("args", "message"), [
    (["--defense", "fpp"], "unknown defense 'fpp'; did you mean fp"),
    (["--defense", "fp", "--attack", "badnet"], "unknown attack 'badnet'; did you mean badnets"),
    (["--defense", "fp", "--model", "resnet"], "unknown model 'resnet'"),
    (["--defense", "fp", "--dataset", "cifar"], "unknown dataset 'cifar'"),
    (["--defense", "fp", "--param", "lr2=0.1"], "defense 'fp': unknown parameter 'lr2'"),
    (["--defense", "fp", "--param", "lr=fast"], "defense 'fp': lr must be a number, got 'fast'"),
    (["--defense", "fp", "--param", "lr=-1"], "defense 'fp': lr must be > 0"),
    (["--defense", "fp", "--param", "epochs=2.5"], "epochs must be an integer"),
    (["--defense", "fp", "--param", "lr"], "--param takes KEY=VALUE"),
    (["--defense", "fp", "--attack-param", "label_mode=some"], "label_mode must be one of"),
    (["--defense", "fp", "--spc", "0"], "spc must be a positive integer, got 0"),
    (["--defense", "fp", "--spc", "-3"], "spc must be a positive integer"),
    (["--defense", "fp", "--clean-ratio", "1.5"], "clean_ratio must be in (0, 1]"),
    (["--defense", "fp", "--spc", "10", "--clean-ratio", "0.1"], "either --spc or --clean-ratio"),
    (["--defense", "fp", "--poison-ratio", "0"], "poison ratio must be in (0, 1]"),
    (["--defense", "fp", "--poison-ratio", "1.2"], "poison ratio must be in (0, 1]"),
    (["--defense", "fp", "--target", "10"], "target 10 is outside fashion-mnist's labels 0..9"),
    (["--defense", "fp", "--target", "-1"], "target -1 is outside"),
    (["--defense", "fp", "--source", "sen"], "unknown data source 'sen'; did you mean seen"),
    (["--defense", "fp", "--device", "tpu9"], "unknown device 'tpu9'"),
    (["--defense", "fp", "--calibrate", "gicc"], "unknown calibration 'gicc'"),
    (["--defense", "fp", "--calibrate-param", "bound=0.05"], "calibration parameters given without a calibration"),
    (["--defense", "fp", "--calibrate", "gic", "--calibrate-param", "radius=0.05"],
     "calibration 'gic': unknown parameter 'radius' (known: bound, lr, steps, batch_size)"),
    (["--defense", "fp", "--calibrate", "gic", "--calibrate-param", "bound=2"], "calibration 'gic': bound must be"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path):
    out = tmp_path / "results"
    code, err = bdrun([*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_data_names_where_it_looked(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "results"
    code, err = bdrun(["--defense", "fp", "--preset", "smoke", "--dataset", "cifar10", "--model", "smallcnn",
                       "--data-dir", str(empty), "--out", str(out), "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert str(empty) in err and "cifar" in err
    assert not out.exists()


def test_existing_results_are_left_as_they_were(capsys, tmp_path):
    out = tmp_path / "results"
    (out / "fashion-mnist").mkdir(parents=True)
    (out / "fashion-mnist" / "keep.parquet").write_bytes(b"PAR1")
    before = listing(out)
    code, _ = bdrun(["--defense", "fp", "--spc", "0", "--out", str(out)], capsys)
    assert code == 2 and listing(out) == before


def test_unknown_preset_is_a_usage_error(capsys):
    code, err = bdrun(["--defense", "fp", "--preset", "huge"], capsys)
    assert code == 2 and "huge" in err and len(err.strip().splitlines()) == 1

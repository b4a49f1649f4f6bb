"""The promised install: wheels for every distribution, a clean venv, only one defense (FT; SAU,
the README's default job).

The venv does not see this environment's bdbench or plugins; it sees the third-party
packages already installed here (torch is large) through a folder of links.
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("bdbench", "bd_", "bd-", "__editable__", "_bd")

pytestmark = pytest.mark.slow


def _site_packages() -> Path:
    import torch

    return Path(torch.__file__).resolve().parents[1]


def _third_party_view(dest: Path) -> Path:
    """Links to every installed package except ours (and no .pth files)."""
    dest.mkdir()
    for entry in _site_packages().iterdir():
        if entry.name.lower().startswith(OURS) or entry.suffix == ".pth":
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    built = subprocess.run(["bash", str(ROOT / "scripts" / "build-wheels.sh"), str(folder)], capture_output=True,
                           text=True, env={**os.environ, "PYTHON": sys.executable})
    assert built.returncode == 0, built.stderr[-3000:]
    return folder


@pytest.mark.parametrize(("defense", "params"), [("ft", []), ("sau", ["--param", "n_rounds=2"])])
def test_install_one_defense_from_wheels_and_run(wheels, session_cache, tmp_path, defense, params):
    names = {w.name.split("-")[0] for w in wheels.glob("*.whl")}
    assert {"bdbench", f"bd_defense_{defense}", "bd_attack_badnets", "bd_metrics_standard"} <= names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # this pip installs into it (--python)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "third_party.pth").write_text(str(_third_party_view(tmp_path / "third-party")) + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-index",
                                "--find-links", wheels, f"bd-defense-{defense}"], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]

    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # the session's attacked-model cache: the smoke BadNets model trains once for every test (the
    # wheels build the same versions, so the same key); training from scratch is test_end_to_end's
    env.update(BD_STRICT_PLUGINS="1", BDBENCH_CACHE=str(session_cache))
    listed = subprocess.run([env_dir / "bin" / "bdrun", "plugins", "--json"], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f'"bd-defense-{defense}"' in listed.stdout and '"bd-defense-fp"' not in listed.stdout
    done = subprocess.run([env_dir / "bin" / "bdrun", "--defense", defense, "--preset", "smoke", "--out", out,
                           *params], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    files = list(out.rglob("*.parquet"))
    assert len(files) == 1 and str(files[0]) in done.stdout.replace("\n", "")
    table = pq.read_table(files[0])
    row = table.to_pylist()[0]
    assert table.num_rows == 1 and row["status"] == "ok"
    for col in ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after"):
        assert 0 <= row[col] <= 1, col
    assert row["arr"] is not None and row["rdr"] is not None
    assert row["defense_plugin"] == f"bd-defense-{defense}" and row["attack_plugin"] == "bd-attack-badnets"

"""``bdrun plugins``, ``bdrun list`` and ``bdrun new-plugin`` (rendered, discovered, its tests run)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner, Result

from bdbench import Defense, hookimpl
from bdbench.errors import BdbenchError
from bdbench.params import param, positive
from bdbench.plugins import PluginSet, make_plugin_manager
from bdbench.testing import fake_distribution
from bdbench_cli.main import build_cli
from bdbench_cli.scaffold import template_root, variables

ROOT = Path(__file__).resolve().parents[1]


class NoisyDefense(Defense):
    """Adds noise to the weights."""

    name = "noisy"

    @attrs.frozen(kw_only=True)
    class Config:
        sigma: float = param(0.01, source="Paper, sec. 4.2", check=positive)
        steps: int = param(3, source="reference code, main.py")


class DummyDefense(Defense):
    """Does nothing."""

    name = "dummy"


def _plugin_set() -> PluginSet:
    module = types.ModuleType("extra")
    module.__distribution__, module.__version__ = "bd-defense-extra", "0.2.0"

    @hookimpl
    def register_defenses(register):
        register(NoisyDefense)
        register(DummyDefense, aliases=("nothing",))

    module.register_defenses = register_defenses
    return make_plugin_manager(entrypoints=False, extra=[module], strict=True)


def bdrun(*args: str, plugins: PluginSet | None = None) -> Result:
    return CliRunner().invoke(build_cli(plugins or _plugin_set()), list(args))


def ok(*args: str, plugins: PluginSet | None = None) -> str:
    result = bdrun(*args, plugins=plugins)
    assert result.exit_code == 0, result.output
    return result.stdout


def rows(output: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line) for line in output.splitlines()[1:]]


# -- bdrun plugins --------------------------------------------------------------------------------------

def test_plugins_table_hides_builtins() -> None:
    assert rows(ok("plugins")) == [["extra", "bd-defense-extra", "0.2.0", "register_defenses",
                                    "defense:noisy, defense:dummy", "ok"]]
    assert [r[0] for r in rows(ok("plugins", "--all"))] == ["bdbench.builtin", "extra"]


def test_plugins_json_is_the_snapshot() -> None:
    ps = _plugin_set()
    entries = json.loads(ok("plugins", "--json", "--all", plugins=ps))
    assert entries == ps.snapshot()
    assert {"name", "distribution", "version", "hooks", "components", "status", "error"} <= set(entries[0])
    assert [e["name"] for e in json.loads(ok("plugins", "--json", plugins=ps))] == ["extra"]


def test_plugins_requirements() -> None:
    assert ok("plugins", "--requirements") == "bd-defense-extra==0.2.0\n"


# -- bdrun list -------------------------------------------------------------------------------------------

def test_list_filters_with_wildcards() -> None:
    assert [r[0] for r in rows(ok("list", "defenses", "n*"))] == ["noisy", "none"]
    assert [r[0] for r in rows(ok("list", "defense", "n*", "--exclude", "no?e"))] == ["noisy"]
    assert rows(ok("list", "defenses", "noisy")) == [["noisy", "Adds noise to the weights.", "bd-defense-extra 0.2.0"]]
    result = bdrun("list", "defenses", "zz*")
    assert result.exit_code == 0 and "no defenses match 'zz*'" in result.output


def test_list_params() -> None:
    out = ok("list", "defenses", "noisy", "--params")
    assert out.startswith("noisy: Adds noise to the weights. (bd-defense-extra 0.2.0)\n")
    assert rows(out)[1:3] == [["sigma", "float", "0.01", "Paper, sec. 4.2"],
                              ["steps", "int", "3", "reference code, main.py"]]
    assert "dummy: Does nothing. (bd-defense-extra 0.2.0)\n  (no parameters)" in ok("list", "defenses", "--params")


def test_list_json() -> None:
    [noisy] = json.loads(ok("list", "defenses", "noisy", "--json", "--params"))
    assert noisy["distribution"] == "bd-defense-extra" and noisy["params"][0]["source"] == "Paper, sec. 4.2"
    assert json.loads(ok("list", "defenses", "dummy", "--json"))[0]["aliases"] == ["nothing"]


def test_list_unknown_kind_is_a_usage_error() -> None:
    result = bdrun("list", "defences")
    assert result.exit_code == 2 and "Invalid value for 'KIND'" in result.output


# -- bdrun new-plugin ----------------------------------------------------------------------------------

def test_templates_are_the_one_copy_at_the_top() -> None:
    assert Path(str(template_root())).resolve() == ROOT / "templates" / "plugin"


def test_new_plugin_names() -> None:
    v = variables("defense", "fine-prune")
    assert (v["distribution"], v["module"], v["name"], v["class_name"]) == (
        "bd-defense-fine-prune", "bd_defense_fine_prune", "fine-prune", "FinePrune")


@pytest.mark.parametrize("name", ["Fp", "9fp", "fp_x", "fp-", "-fp", "f p", ""])
def test_new_plugin_refuses_invalid_names(name: str, tmp_path: Path) -> None:
    result = bdrun("new-plugin", "defense", "--dest", str(tmp_path), "--", name)
    assert isinstance(result.exception, BdbenchError) and "invalid plugin name" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_new_plugin_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    (tmp_path / "fp").mkdir()
    (tmp_path / "fp" / "keep.txt").write_text("mine")
    result = bdrun("new-plugin", "defense", "fp", "--dest", str(tmp_path))
    assert isinstance(result.exception, BdbenchError) and "not an empty folder" in str(result.exception)
    assert [p.name for p in (tmp_path / "fp").iterdir()] == ["keep.txt"]


def test_new_plugin_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Render one plugin of each kind, discover it through an entry point, run its generated tests."""
    names = {"defense": "my-fp", "attack": "my-patch", "metric": "my-score"}
    site, projects = tmp_path / "site", tmp_path / "projects"
    for kind, name in names.items():
        out = ok("new-plugin", kind, name, "--dest", str(projects))
        assert f"created {projects / name}/" in out
        v = variables(kind, name)
        fake_distribution(site, v["distribution"], {name: v["module"]})  # what `pip install -e` records
        monkeypatch.syspath_prepend(projects / name / "src")
    monkeypatch.syspath_prepend(site)
    fp = projects / "my-fp"
    assert sorted(p.relative_to(fp).as_posix() for p in fp.rglob("*") if p.is_file()) == [
        "README.md", "pyproject.toml", "src/bd_defense_my_fp/__init__.py", "tests/test_installed.py",
        "tests/test_my_fp.py"]
    assert 'my-fp = "bd_defense_my_fp"' in (fp / "pyproject.toml").read_text()

    ps = make_plugin_manager(only=list(names.values()), strict=True)
    assert rows(ok("list", "defenses", "my-*", plugins=ps)) == [
        ["my-fp", "My Fp: fine-tune on the clean budget (TODO: the method in one line).", "bd-defense-my-fp 0.1"]]
    assert [c.name for c in ps.list("attack", "my-*") + ps.list("metric", "my-*")] == ["my-patch", "my-score"]

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "BD_LOAD_PLUGINS": ",".join(names.values())}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-c", str(fp / "pyproject.toml"), "--rootdir", str(projects),
                            *(str(projects / n) for n in names.values())],
                           cwd=projects, env=env, capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "9 passed" in tests.stdout

"""Plugin discovery and isolation: a broken plugin is one recorded error, never a broken bdbench.

Each test builds its own plugin set from in-process plugin modules (or a fake ``.dist-info``
on ``sys.path`` for entry points); nothing is installed and no state leaks between tests.
"""
from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import click
import pytest
from click.testing import CliRunner

from bdbench import DatasetBuilder, Defense, Metric, ModelBuilder, hookimpl, hookspecs
from bdbench.components import DefenseResult, ImageSet
from bdbench.errors import PluginLoadError, UnknownComponentError
from bdbench.params import param, positive
from bdbench.plugins import PluginSet, make_plugin_manager
from bdbench.testing import PatchAttack, TinyNet, fake_distribution, make_tiny_dataset
from bdbench_cli.main import build_cli

ROOT = Path(__file__).resolve().parents[1]


class GoodDefense(Defense):
    """A defense that returns the model unchanged."""

    name = "good"

    @attrs.frozen(kw_only=True)
    class Config:
        lr: float = param(0.1, source="test value", check=positive)

    def purify(self, model, data, ctx) -> DefenseResult:
        return DefenseResult(model=model)


class TinyDataset(DatasetBuilder):
    """The synthetic textures of bdbench.testing."""

    name = "tiny"
    num_classes, image_shape, mean, std = 4, (1, 16, 16), (0.5,), (0.25,)

    def load(self, split: str, data_dir: Path | None = None) -> ImageSet:
        data = make_tiny_dataset()
        return data.train if split == "train" else data.test


class TinyModel(ModelBuilder):
    """conv-BN-ReLU, GAP, linear."""

    name = "tinynet"

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> TinyNet:
        return TinyNet(num_classes, input_shape[0])


class Score(Metric):
    """A constant."""

    name = "score"
    columns = ("score",)

    def compute(self, ev) -> dict[str, float]:
        return {"score": 1.0}


def plugin(name: str, *hooks: Callable[..., Any], distribution: str | None = None,
           version: str = "1.0") -> types.ModuleType:
    """An in-process plugin module ``name`` whose hook implementations are ``hooks``."""
    module = types.ModuleType(name)
    module.__distribution__ = distribution or f"bd-{name}"
    module.__version__ = version
    for fn in hooks:
        setattr(module, fn.__name__, hookimpl(fn))
    return module


def registers(kind: str, cls: type) -> Callable[..., None]:
    def hook(register):
        register(cls)

    hook.__name__ = f"register_{kind}s"
    return hook


def good() -> types.ModuleType:
    return plugin("good", registers("defense", GoodDefense))


def load(*plugins: Any, strict: bool = False, entrypoints: bool = False, **kwargs: Any) -> PluginSet:
    return make_plugin_manager(entrypoints=entrypoints, extra=plugins, strict=strict, **kwargs)


def cli_output(ps: PluginSet, *args: str) -> str:
    result = CliRunner().invoke(build_cli(ps), list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


# -- broken plugins: each kind of failure, non-strict and strict ------------------------------------

def _import_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    (tmp_path / "bd_broken_import.py").write_text("import a_dependency_that_is_not_installed\n")
    fake_distribution(tmp_path, "bd-defense-broken", {"broken": "bd_broken_import"})
    monkeypatch.syspath_prepend(tmp_path)
    return {"extra": [good()], "entrypoints": True, "only": ["broken"]}


def _misspelled_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    def register_defense(register):  # the hook is register_defenses
        register(GoodDefense)

    return {"extra": [good(), plugin("broken", register_defense)]}


def _unknown_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    def register_defenses(register, model):
        register(GoodDefense)

    return {"extra": [good(), plugin("broken", register_defenses)]}


def _duplicate_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return {"extra": [good(), plugin("broken", registers("defense", GoodDefense), distribution="bd-defense-copy")]}


def _register_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    def register_defenses(register):
        raise RuntimeError("boom while registering")

    return {"extra": [good(), plugin("broken", register_defenses)]}


def _commands_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    def register_commands(cli):
        raise RuntimeError("boom while adding commands")

    return {"extra": [good(), plugin("broken", register_commands)]}


BROKEN = {
    "import": (_import_error, "ModuleNotFoundError: No module named 'a_dependency_that_is_not_installed'"),
    "misspelled-hook": (_misspelled_hook, "unknown hook 'register_defense'"),
    "unknown-argument": (_unknown_argument, "Argument(s) {'model'} are declared in the hookimpl"),
    "duplicate": (_duplicate_name, "defense 'good' is registered by both bd-good (good) and bd-defense-copy (broken)"),
    "register-raises": (_register_raises, "RuntimeError: boom while registering"),
    "commands-raise": (_commands_raise, "RuntimeError: boom while adding commands"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_plugin_is_isolated(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    setup, message = BROKEN[case]
    kwargs = setup(tmp_path, monkeypatch)
    extra = kwargs.pop("extra")
    ps = load(*extra, strict=False, **kwargs)
    out = cli_output(ps, "plugins")  # also runs register_commands
    [err] = ps.errors
    assert err.plugin == "broken" and message in err.error
    assert ps.plugins["broken"].error == err.error
    assert ps.get("defense", "good").plugin == "good"  # the others keep working
    assert re.search(r"^broken .* error: .*" + re.escape(message[:30]), out, re.M)
    assert "BD_DISABLE_PLUGINS=broken" in capsys.readouterr().err  # one line on stderr

    with pytest.raises(PluginLoadError, match="plugin 'broken'"):
        build_cli(load(*extra, strict=True, **kwargs))


def test_strict_mode_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BD_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="RuntimeError: boom"):
        make_plugin_manager(entrypoints=False, **_register_raises(tmp_path, monkeypatch))


def test_failed_plugin_leaves_no_components() -> None:
    def register_defenses(register):
        register(GoodDefense)
        raise RuntimeError("after registering")

    ps = load(plugin("half", register_defenses))
    assert [e.plugin for e in ps.errors] == ["half"]
    assert ps.list("defense", "good") == []
    with pytest.raises(UnknownComponentError, match="defense 'half' unavailable: bd-half 1.0 failed to register"):
        ps.get("defense", "half")


# -- discovery and switches ---------------------------------------------------------------------------

@pytest.fixture
def two_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake distribution ``bd-pair`` 0.3 with entry points alpha and beta (one defense each)."""
    modules = {ep: f"bd_pair_{ep}" for ep in ("alpha", "beta")}
    for ep, module in modules.items():
        (tmp_path / f"{module}.py").write_text(
            f"from bdbench import Defense, hookimpl\n\nclass D(Defense):\n    name = {ep!r}\n\n"
            "@hookimpl\ndef register_defenses(register):\n    register(D)\n")
    fake_distribution(tmp_path, "bd-pair", modules, version="0.3")
    monkeypatch.syspath_prepend(tmp_path)
    yield tmp_path
    for module in modules.values():
        sys.modules.pop(module, None)


def test_entry_point_from_dist_info(two_entry_points: Path) -> None:
    ps = make_plugin_manager(only=["alpha", "beta"], strict=True)
    info = ps.get("defense", "alpha")
    assert (info.plugin, info.distribution, info.version) == ("alpha", "bd-pair", "0.3")
    assert ps.plugins["beta"].components == ["defense:beta"]
    assert "bd-pair==0.3" in cli_output(ps, "plugins", "--requirements").splitlines()


def test_load_and_disable_switches(two_entry_points: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def names(**kwargs: Any) -> list[str]:
        ps = make_plugin_manager(strict=True, **kwargs)
        return [c.name for c in ps.list("defense", ["alpha", "beta"])]

    monkeypatch.setenv("BD_LOAD_PLUGINS", "beta")
    assert names() == ["beta"]
    monkeypatch.setenv("BD_LOAD_PLUGINS", "")
    assert names() == []
    monkeypatch.delenv("BD_LOAD_PLUGINS")
    monkeypatch.setenv("BD_DISABLE_PLUGINS", "alpha")
    assert names(only=["alpha", "beta"]) == ["beta"]
    monkeypatch.delenv("BD_DISABLE_PLUGINS")
    assert names(only=["alpha", "beta"], extra=["no:beta"]) == ["alpha"]  # -p no:beta


def test_same_entry_point_name_in_two_distributions(two_entry_points: Path) -> None:
    fake_distribution(two_entry_points, "bd-other", {"alpha": "bd_pair_beta"})
    ps = make_plugin_manager(only=["alpha"], strict=False)
    assert ps.get("defense", "alpha").distribution in ("bd-pair", "bd-other")
    [err] = ps.errors
    assert "plugin name 'alpha' is already taken" in err.error


def test_plugins_dir_loads_loose_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proto.py").write_text('''
from typing import Literal
import attrs
from bdbench import Defense, hookimpl
from bdbench.params import param

class Proto(Defense):
    """A prototype defense."""
    name = "proto"

    @attrs.frozen(kw_only=True)
    class Config:
        mode: Literal["fast", "slow"] = param("fast", source="prototype")

@hookimpl
def register_defenses(register):
    register(Proto)
''')
    monkeypatch.setenv("BD_LOAD_PLUGINS", "")
    result = CliRunner().invoke(build_cli(), ["--plugins-dir", str(tmp_path), "--strict-plugins",
                                              "list", "defenses", "proto", "--params"])
    assert result.exit_code == 0, result.output
    assert "A prototype defense." in result.stdout
    assert re.search(r"^mode\s+Literal\s+fast\s+prototype$", result.stdout, re.M)
    assert make_plugin_manager(plugins_dir=tmp_path).create("defense", "proto", {"mode": "slow"}).config.mode == "slow"


def test_unknown_name_suggests_close_matches() -> None:
    ps = load(good())
    with pytest.raises(UnknownComponentError, match=r"unknown defense 'goood'; did you mean good\?"):
        ps.get("defense", "goood")
    with pytest.raises(UnknownComponentError, match="unknown attack 'zzz'; installed: none"):
        ps.get("attack", "zzz")


# -- one test per hook (the meta-test below keeps this list complete) --------------------------------

def assert_registers(kind: str, cls: type) -> None:
    ps = load(plugin("mine", registers(kind, cls), distribution=f"bd-{kind}-mine", version="2.5"), strict=True)
    info = ps.get(kind, cls.name)
    assert (info.cls, info.plugin, info.distribution, info.version) == (cls, "mine", f"bd-{kind}-mine", "2.5")
    assert ps.plugins["mine"].components == [f"{kind}:{cls.name}"]
    assert ps.plugins["mine"].hooks == [f"register_{kind}s"]


def test_hook_register_datasets() -> None:
    assert_registers("dataset", TinyDataset)
    assert TinyDataset().load("test").shape == TinyDataset.image_shape


def test_hook_register_models() -> None:
    assert_registers("model", TinyModel)
    assert TinyModel().build(4, (1, 16, 16)).get_classifier().out_features == 4


def test_hook_register_attacks() -> None:
    assert_registers("attack", PatchAttack)


def test_hook_register_defenses() -> None:
    assert_registers("defense", GoodDefense)


def test_hook_register_metrics() -> None:
    assert_registers("metric", Score)


def test_hook_register_commands() -> None:
    def register_commands(cli: click.Group) -> None:
        @cli.command()
        def hello() -> None:
            """Say hello from a plugin."""
            click.echo("hello from mine")

    ps = load(plugin("mine", register_commands), strict=True)
    assert re.search(r"hello\s+Say hello from a plugin", cli_output(ps, "--help"))
    assert cli_output(ps, "hello") == "hello from mine\n"


# -- meta-tests (datasette's): every hook is documented and tested -----------------------------------

HOOKS = {name: fn for name, fn in vars(hookspecs).items() if hasattr(fn, "bdbench_spec")}


def test_every_hook_is_documented_with_its_signature() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    headings = set(re.findall(r"^#+ `?([\w]+\([^)]*\))`?\s*$", docs, re.M))
    ps = make_plugin_manager(entrypoints=False, builtins=False)
    for name in HOOKS:
        signature = f"{name}({', '.join(getattr(ps.pm.hook, name).spec.argnames)})"
        assert signature in headings, f"docs/plugins.md needs a heading `{signature}`"


def test_every_hook_has_a_test() -> None:
    tested = set(re.findall(r"^def test_hook_(\w+)\(", Path(__file__).read_text(), re.M))
    assert set(HOOKS) <= tested, f"hooks without a test_hook_<name>: {sorted(set(HOOKS) - tested)}"

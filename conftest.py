"""Shared fixtures: one plugin set, attacked-model cache and results folder per test session,
so each (attack, preset, seed) trains once however many tests use it."""
from __future__ import annotations

import pytest

from bdbench.plugins import make_plugin_manager


@pytest.fixture(scope="session")
def session_plugins():
    return make_plugin_manager(strict=True)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bdbench-cache")


@pytest.fixture(scope="session")
def smoke_run(session_plugins, session_cache, tmp_path_factory):
    """``smoke_run(defense, **choices) -> row`` on the smoke preset, sharing attacked models."""
    from bdbench.context import Reporter
    from bdbench.runner import Runner, plan

    runner = Runner(session_plugins, out_dir=tmp_path_factory.mktemp("results"), cache_dir=session_cache,
                    device="cpu", reporter=Reporter(enabled=False))

    def run(defense: str, **choices):
        return runner.run(plan(session_plugins, defense=defense, preset="smoke", **choices))

    run.runner = runner
    return run

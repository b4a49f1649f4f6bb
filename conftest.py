"""Shared fixtures: one plugin set, attacked-model cache and results folder per test session,
so each (attack, preset, seed) trains once however many tests use it.

The tests run on pytest-xdist workers (``-n auto`` in pyproject.toml), one per core, and each
uses one torch thread whatever the number of workers: a model's floating-point result depends on
the thread count, so the floors the tests assert hold for ``-n 0`` and ``-n 16`` alike. All
workers share one attacked-model cache (its writes are atomic), so a model one worker trained
the others load.
"""
from __future__ import annotations

import os

import pytest
import torch

from bdbench.plugins import make_plugin_manager


def pytest_configure(config: pytest.Config) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # and the bdrun processes tests start
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session_plugins():
    return make_plugin_manager(strict=True)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    if "PYTEST_XDIST_WORKER" in os.environ:  # the session's base folder, shared by its workers
        shared = tmp_path_factory.getbasetemp().parent / "bdbench-cache"
        shared.mkdir(exist_ok=True)
        return shared
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

"""bdbench: benchmark backdoor attacks and post-training defenses on image classifiers.

Importing this package does nothing beyond defining names: plugins are discovered only when
:func:`bdbench.plugins.make_plugin_manager` is called.
"""
from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT = "bdbench"
hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)

from bdbench.components import (  # noqa: E402
    Attack,
    DatasetBuilder,
    Defense,
    Metric,
    ModelBuilder,
    Paper,
)
from bdbench.errors import BdbenchError  # noqa: E402

__all__ = [
    "Attack",
    "BdbenchError",
    "DatasetBuilder",
    "Defense",
    "Metric",
    "ModelBuilder",
    "PROJECT",
    "Paper",
    "__version__",
    "hookimpl",
    "hookspec",
]

"""What a component gets from the runner besides its data: device, seed, cache, progress."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch

from bdbench.components import DatasetInfo


class _Quiet:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **kwargs: Any) -> None:
        pass


class _RichTask:
    def __init__(self, progress: Any, task: Any) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)

    def update(self, **kwargs: Any) -> None:
        self._progress.update(self._task, **kwargs)


@attrs.define(kw_only=True)
class Reporter:
    """Progress bars on a terminal (rich), silence otherwise."""

    enabled: bool = attrs.field(factory=lambda: sys.stderr.isatty())

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Any]:
        if not self.enabled:
            yield _Quiet()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True) as progress:
            yield _RichTask(progress, progress.add_task(description, total=total))

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr)


@attrs.define(kw_only=True)
class RunContext:
    """Per-run services. ``generator(stream)`` gives independent, reproducible RNG streams."""

    dataset: DatasetInfo
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"), converter=torch.device)
    seed: int = 0
    cache_dir: Path | None = None
    reporter: Reporter = attrs.Factory(Reporter)
    batch_size: int = 128  # the preset's evaluation/training batch size, a hint for defenses
    recipe: Any = None  # the preset's attacked-model training Recipe (training-control attacks use it)
    model_factory: Any = None  # () -> a fresh, untrained model of the run's architecture
    poison_ratio: float | None = None  # the run's poisoning ratio and target (attacks' train() reads them)
    target: int | None = None
    eval_batch_size: int = 512

    def generator(self, stream: str = "") -> torch.Generator:
        """A CPU generator seeded from the run seed and a stream name (stable across runs)."""
        import zlib

        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + zlib.crc32(stream.encode())) % (2**63))
        return g

"""Errors users see as one line: each message names the problem and, where it helps, the fix."""
from __future__ import annotations


class BdbenchError(Exception):
    """Base class: the CLI prints ``str(error)`` as one line and exits with code 2."""


class UnknownComponentError(BdbenchError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ParameterError(BdbenchError, ValueError):
    """An unknown, ill-typed or out-of-range parameter."""


class DataNotFoundError(BdbenchError, FileNotFoundError):
    """A dataset's files are missing or unreadable."""


class CacheError(BdbenchError):
    """A cache entry failed its integrity check."""


class PluginLoadError(BdbenchError):
    """A plugin failed to import, validate or register (raised in strict mode)."""


class DuplicateComponentError(BdbenchError):
    """Two plugins registered the same component name."""


class AttackFailedError(BdbenchError):
    """The attacked model is not a usable backdoored model (accuracy near chance or low ASR)."""


class ShapeError(BdbenchError, ValueError):
    """Images of the wrong shape or dtype."""

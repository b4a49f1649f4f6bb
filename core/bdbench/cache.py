"""Content-addressed cache of attacked models and attack resources.

An entry is ``<key>.safetensors`` plus ``<key>.json``: the sidecar holds the SHA-256 of the
tensor file and any metadata. Loading verifies the checksum and reads tensors through
safetensors only (no unpickling), so a corrupted or tampered entry is detected, reported and
rebuilt, never trusted. Writes go to a temporary file and are renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bdbench.errors import CacheError


def default_cache_dir() -> Path:
    env = os.environ.get("BDBENCH_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("bdbench"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TensorCache:
    """A folder of checksummed safetensors entries, addressed by key."""

    def __init__(self, root: Path | str, namespace: str = "models") -> None:
        self.root = Path(root) / namespace

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.json"

    def has(self, key: str) -> bool:
        return all(p.exists() for p in self.paths(key))

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        data, side = self.paths(key)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        _atomic_write(data, lambda p: save_file(tensors, str(p)))
        sidecar = {"key": key, "sha256": sha256_file(data), "meta": meta or {}}
        _atomic_write(side, lambda p: p.write_text(json.dumps(sidecar, indent=1, sort_keys=True)))

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The entry's tensors and metadata; :class:`CacheError` if it fails its check."""
        data, side = self.paths(key)
        try:
            sidecar = json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(f"cache entry {side} is unreadable: {exc}") from None
        if sidecar.get("sha256") != sha256_file(data):
            raise CacheError(f"cache entry {data} failed its checksum")
        try:
            return load_file(str(data)), sidecar.get("meta", {})
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise CacheError(f"cache entry {data} is unreadable: {exc}") from None

    def discard(self, key: str) -> None:
        for p in self.paths(key):
            p.unlink(missing_ok=True)


def load_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, without unpickling arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CacheError(f"checkpoint {path} cannot be read safely: {str(exc).splitlines()[0]}") from None

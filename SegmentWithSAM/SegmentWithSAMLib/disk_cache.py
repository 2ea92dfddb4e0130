"""Image embeddings on disk, keyed by content, so that a fresh process on the same image encodes nothing.

The challenge format (:mod:`.cvpr25`) runs one process per interaction step. An entry is one ``.npy`` file
(``allow_pickle=False``, the embedding's own dtype: a result from disk equals one from the encoder), named by a
BLAKE2b hash of the model's identity and the memory cache's key (volume content hash, view, slice, window, slice
transform), written atomically; an unreadable file is a miss. The folder is bounded in bytes, least recently
used files (by modification time, refreshed on read) first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from .errors import OutputError, SegmentWithSAMError
from .folders import private_folder, user_cache
from .io import atomic_write

DISK_CACHE_ENV = "SEGMENTWITHSAM_DISK_CACHE_MB"
DISK_CACHE_DIR_ENV = "SEGMENTWITHSAM_EMBEDDING_CACHE"
DEFAULT_DISK_CACHE_MB = 2048
_SUFFIX = ".npy"


def default_disk_cache_dir() -> Path:
    """``$SEGMENTWITHSAM_EMBEDDING_CACHE``, else ``embeddings`` beside the engine exports in the user's cache."""
    return user_cache("embeddings", DISK_CACHE_DIR_ENV)


def default_disk_cache_bytes() -> int:
    """The disk cache's bound: ``$SEGMENTWITHSAM_DISK_CACHE_MB`` megabytes if set, else 2 GiB."""
    return megabytes_setting(DISK_CACHE_ENV, DEFAULT_DISK_CACHE_MB)


def megabytes_setting(env: str, default_mb: float) -> int:
    """A cache's bound in bytes: ``$env`` megabytes if set, else ``default_mb``."""
    value = os.environ.get(env, "").strip() or str(default_mb)
    try:
        megabytes = float(value)
    except ValueError:
        raise SegmentWithSAMError(f"{env}={value!r} is not a number of megabytes.") from None
    if not megabytes >= 0:
        raise SegmentWithSAMError(f"{env} must be >= 0, not {value}.")
    return int(megabytes * (1 << 20))


def canonical_key(key) -> str | None:
    """A text that is the same for equal keys in every process, or None when the key holds something whose
    text could differ between processes (such keys stay in memory only)."""
    if key is None or isinstance(key, (bool, int, float, str)):
        return repr(key)
    if isinstance(key, tuple):
        parts = [canonical_key(part) for part in key]
        return None if None in parts else "(" + ",".join(parts) + ")"
    if dataclasses.is_dataclass(key) and not isinstance(key, type):
        inner = canonical_key(tuple(getattr(key, f.name) for f in dataclasses.fields(key)))
        return None if inner is None else type(key).__name__ + inner
    return None


def model_identity(model) -> str:
    """What makes a model's embeddings differ: its name, engine, per-stage precisions, device type and the
    checkpoint file (path, size and modification time, so a replaced file gets new entries)."""
    parts = [getattr(model, "name", type(model).__name__), getattr(model, "engine", ""),
             str(getattr(model, "stage_precisions", "")), getattr(getattr(model, "device", None), "type", "")]
    checkpoint = getattr(model, "checkpoint", None)
    if checkpoint:
        path = Path(checkpoint).resolve()
        stat = path.stat() if path.is_file() else None
        parts += [str(path), str(stat.st_size if stat else ""), str(stat.st_mtime_ns if stat else "")]
    return "|".join(str(part) for part in parts)


class DiskEmbeddingCache:
    """Embeddings in ``folder``, at most ``max_bytes`` of files; ``namespace`` names the model (see
    :func:`model_identity`). They load as NumPy arrays, or as torch tensors on ``device`` when one is given."""

    def __init__(self, namespace: str, folder: str | os.PathLike | None = None, max_bytes: int | None = None,
                 device=None) -> None:
        self.namespace = namespace
        self.folder = Path(folder) if folder is not None else default_disk_cache_dir()
        if max_bytes is None:
            max_bytes = default_disk_cache_bytes()
        self.max_bytes = int(max_bytes)
        self.device = device
        self.hits = self.misses = self.writes = self.evictions = self.corrupt = 0

    @classmethod
    def for_model(cls, model, folder: str | os.PathLike | None = None,
                  max_bytes: int | None = None) -> DiskEmbeddingCache:
        """The disk cache for ``model``'s embeddings (in the user's cache folder unless ``folder`` is given): as
        tensors on its device for a PyTorch model, NumPy arrays for OpenVINO."""
        return cls(model_identity(model), folder, max_bytes, model.device if model.engine == "torch" else None)

    def path(self, key: Hashable) -> Path | None:
        """The file of ``key``, or None when the key cannot be named the same way in another process."""
        text = canonical_key(key)
        if text is None:
            return None
        digest = hashlib.blake2b(f"{self.namespace}\n{text}".encode(), digest_size=20).hexdigest()
        return self.folder / f"{digest}{_SUFFIX}"

    def contains(self, key: Hashable) -> bool:
        """Whether ``key`` has a file (it may still turn out unreadable on :meth:`get`)."""
        path = self.path(key)
        return path is not None and path.is_file()

    def get(self, key: Hashable):
        """The embedding stored for ``key`` (its file marked recently used), or None."""
        path = self.path(key)
        if path is None or not path.is_file():
            self.misses += 1
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            self.corrupt += 1
            self.misses += 1
            path.unlink(missing_ok=True)  # put() writes it again
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
        self.hits += 1
        if self.device is None:
            return array
        import torch

        return torch.from_numpy(array).to(self.device)

    def put(self, key: Hashable, value) -> bool:
        """Store ``value`` (a NumPy array, or a tensor of a NumPy-representable dtype) under ``key``; returns
        whether it was written (other values, keys without a stable name and entries above the bound are not)."""
        path = self.path(key)
        array = _as_array(value)
        if path is None or array is None or array.nbytes > self.max_bytes:
            return False
        private_folder(self.folder)  # patients' data: the owner's only
        try:
            atomic_write(path, _SUFFIX, lambda temporary: np.save(temporary, array, allow_pickle=False))
        except (OSError, OutputError):
            return False  # a full or read-only disk only costs the speed-up
        self.writes += 1
        self._evict()
        return True

    def _evict(self) -> None:
        """Delete the least recently used files until the folder holds at most ``max_bytes``."""
        entries = []
        for path in self.folder.glob(f"*{_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if not path.name.startswith("."):  # a write in progress (io.atomic_write)
                    stat = path.stat()
                    entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.evictions += 1

    def stats(self) -> dict:
        return {"folder": str(self.folder), "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                "writes": self.writes, "evictions": self.evictions, "corrupt": self.corrupt}


def _as_array(value) -> np.ndarray | None:
    """``value`` as a NumPy array: itself, a CPU copy of a tensor whose dtype NumPy has (float32 embeddings), or
    None (bf16, tuples, ...). A tensor exists only once PyTorch is imported, so it is not imported here."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor) or value.dtype == torch.bfloat16 or value.is_complex():
        return None
    return np.ascontiguousarray(value.detach().cpu().numpy())


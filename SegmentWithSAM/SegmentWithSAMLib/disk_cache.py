"""Image embeddings on disk, keyed by content, so that a fresh process on the same image encodes nothing.

The challenge format (:mod:`.cvpr25`) runs one process per interaction step, as the CVPR 2025 challenge does;
without this each step would encode the object's slices again. An entry is one ``.npy`` file (written with
``allow_pickle=False``, in the embedding's own dtype, so a result from disk equals one from the encoder),
named by a BLAKE2b hash of the model's identity and the memory cache's key — which holds the volume's content
hash, the view, the slice index, the window and the slice transform (shape and pixel spacing). Files are
written atomically (temporary file + rename); an unreadable file counts as a miss and is replaced. The
folder is bounded in bytes: the least recently used files (by modification time, refreshed on every read) go
first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from .errors import SegmentWithSAMError

DISK_CACHE_ENV = "SEGMENTWITHSAM_DISK_CACHE_MB"
DISK_CACHE_DIR_ENV = "SEGMENTWITHSAM_EMBEDDING_CACHE"
DEFAULT_DISK_CACHE_MB = 2048
_SUFFIX = ".npy"


def default_disk_cache_dir() -> Path:
    """``$SEGMENTWITHSAM_EMBEDDING_CACHE``, else ``embeddings`` beside the engine exports in the user's cache."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segmentwithsam" / "embeddings"
    return Path(os.environ.get(DISK_CACHE_DIR_ENV) or default)


def default_disk_cache_bytes() -> int:
    """The bound: ``$SEGMENTWITHSAM_DISK_CACHE_MB`` megabytes if set, else 2 GiB."""
    value = os.environ.get(DISK_CACHE_ENV, "").strip() or str(DEFAULT_DISK_CACHE_MB)
    try:
        megabytes = float(value)
    except ValueError:
        raise SegmentWithSAMError(f"{DISK_CACHE_ENV}={value!r} is not a number of megabytes.") from None
    if not megabytes >= 0:
        raise SegmentWithSAMError(f"{DISK_CACHE_ENV} must be >= 0, not {value}.")
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
    """Embeddings (torch tensors) in ``folder``, at most ``max_bytes`` of files; ``namespace`` names the model
    (see :func:`model_identity`) and ``device`` is where loaded tensors go."""

    def __init__(self, namespace: str, folder: str | os.PathLike | None = None, max_bytes: int | None = None,
                 device=None) -> None:
        self.namespace = namespace
        self.folder = Path(folder) if folder is not None else default_disk_cache_dir()
        self.max_bytes = default_disk_cache_bytes() if max_bytes is None else int(max_bytes)
        self.device = device
        self.hits = self.misses = self.writes = self.evictions = self.corrupt = 0

    @classmethod
    def for_model(cls, model, folder: str | os.PathLike | None = None,
                  max_bytes: int | None = None) -> DiskEmbeddingCache:
        """The disk cache for ``model``'s embeddings (in the user's cache folder unless ``folder`` is given)."""
        return cls(model_identity(model), folder, max_bytes, getattr(model, "device", None))

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
        """The embedding stored for ``key`` as a tensor on ``device`` (its file marked recently used), or None."""
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
        import torch

        tensor = torch.from_numpy(array)
        return tensor if self.device is None else tensor.to(self.device)

    def put(self, key: Hashable, value) -> bool:
        """Store ``value`` (a tensor of a NumPy-representable dtype) under ``key``; returns whether it was
        written (other values, keys without a stable name and entries above the bound are not)."""
        path = self.path(key)
        array = _as_array(value)
        if path is None or array is None or array.nbytes > self.max_bytes:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=_SUFFIX)
        try:
            with os.fdopen(handle, "wb") as file:
                np.save(file, array, allow_pickle=False)
            os.replace(temporary, path)
        except OSError:
            Path(temporary).unlink(missing_ok=True)
            return False  # a full or read-only disk only costs the speed-up
        self.writes += 1
        self._evict()
        return True

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for path in self.folder.glob(f"*{_SUFFIX}"):
            if path.name.startswith(".tmp-"):
                continue
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        return entries

    def _evict(self) -> None:
        """Delete the least recently used files until the folder holds at most ``max_bytes``."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.evictions += 1

    def size_bytes(self) -> int:
        """The bytes of entry files in the folder now."""
        return sum(size for _, size, _ in self._entries())

    def stats(self) -> dict:
        return {"folder": str(self.folder), "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                "writes": self.writes, "evictions": self.evictions, "corrupt": self.corrupt}


def _as_array(value) -> np.ndarray | None:
    """A CPU NumPy copy of a tensor whose dtype NumPy has (float32 embeddings), or None (bf16, tuples, ...)."""
    import torch

    if not isinstance(value, torch.Tensor) or value.dtype == torch.bfloat16 or value.is_complex():
        return None
    return np.ascontiguousarray(value.detach().cpu().numpy())


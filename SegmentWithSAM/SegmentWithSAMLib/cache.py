"""A byte-bounded, least-recently-used cache of image embeddings, optionally backed by a disk level."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from .disk_cache import DiskEmbeddingCache, megabytes_setting

DEFAULT_CACHE_MB = 1024
CACHE_ENV = "SEGMENTWITHSAM_CACHE_MB"


def default_cache_bytes() -> int:
    """The cache limit: ``$SEGMENTWITHSAM_CACHE_MB`` megabytes if set, else 1 GiB."""
    return megabytes_setting(CACHE_ENV, DEFAULT_CACHE_MB)


def command_cache(model) -> EmbeddingCache:
    """The cache of a process that runs one command and ends (``segment``, ``propagate``, a ``cvpr25`` step):
    in memory, and on disk in the user's cache folder (:class:`.disk_cache.DiskEmbeddingCache`), so that the next
    command on the same image encodes nothing. ``$SEGMENTWITHSAM_DISK_CACHE_MB=0`` keeps nothing on disk."""
    return EmbeddingCache(disk=DiskEmbeddingCache.for_model(model))


def _nbytes(embedding) -> int:
    return int(embedding.nbytes)  # a NumPy array's or a torch tensor's


class EmbeddingCache:
    """Embeddings keyed by e.g. (model, volume identity, view, slice index, window); thread-safe.

    Adding an entry evicts the least recently used ones until the total fits in ``max_bytes``; an entry
    larger than ``max_bytes`` is not kept at all.
    """

    def __init__(self, max_bytes: int | None = None, disk: DiskEmbeddingCache | None = None) -> None:
        max_bytes = default_cache_bytes() if max_bytes is None else max_bytes
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.disk = disk  # the second level (see .disk_cache): searched on a miss, written on every put

    def get(self, key: Hashable):
        """The embedding for ``key`` (marked most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return value
            self.misses += 1
        value = self.disk.get(key) if self.disk is not None else None
        if value is not None:
            self._put_memory(key, value)
        return value

    def put(self, key: Hashable, value) -> None:
        """Store ``value`` (a NumPy array or a torch tensor) under ``key``, evicting old entries to stay within
        ``max_bytes``; also on disk when there is a disk level."""
        self._put_memory(key, value)
        if self.disk is not None:
            self.disk.put(key, value)

    def _put_memory(self, key: Hashable, value) -> None:
        size = _nbytes(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            if size > self.max_bytes:
                return
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _nbytes(evicted)
                self.evictions += 1
            self._entries[key] = value
            self._bytes += size

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            if key in self._entries:
                return True
        return self.disk is not None and self.disk.contains(key)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict:
        """Counters and sizes, for status displays."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    **({"disk": self.disk.stats()} if self.disk is not None else {})}

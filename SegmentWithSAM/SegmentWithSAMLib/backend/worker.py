"""The model and its one thread, shared by every client a backend serves.

The worker loads the model once, holds the embedding cache, and runs the tasks of every session (a
:class:`~.server.Backend`, one per client) in the order :class:`~.scheduler.Scheduler` picks: interactive
requests first, the sessions' long ones taking turns, prefetch when nothing waits. A heartbeat thread tells each
connected session, and only it, whether its own task is running.
"""

from __future__ import annotations

import sys
import threading
import traceback
from pathlib import Path

from ..cache import EmbeddingCache
from ..errors import BackendError, SegmentWithSAMError
from ..models import DEFAULT_MODEL
from .scheduler import Scheduler, Task

HEARTBEAT_S = 0.25


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    return (oom_type is not None and isinstance(error, oom_type)) or "out of memory" in str(error).lower()


class Worker:
    """The shared part of a backend: ``model`` may be given (tests); otherwise ``model_spec`` is loaded on the
    model thread when :meth:`start` runs it. ``prefetch``: neighbouring slices encoded when idle."""

    def __init__(self, model_spec: str = DEFAULT_MODEL, device: str | None = None, prefetch: int = 2,
                 cache_bytes: int | None = None, model=None, engine: str = "auto") -> None:
        self.scheduler = Scheduler()
        self.cache = EmbeddingCache(cache_bytes)
        self.model = model
        self.model_spec, self.device_spec, self.engine = model_spec, device, engine
        self.model_error: SegmentWithSAMError | None = None
        self.prefetch = max(0, int(prefetch))
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._sessions: list = []  # the connected sessions (Backend), which get heartbeats

    def attach(self, session) -> None:
        with self._lock:
            if session not in self._sessions:
                self._sessions.append(session)

    def detach(self, session) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)

    @property
    def sessions(self) -> list:
        with self._lock:
            return list(self._sessions)

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="model", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()

    def stop(self) -> list[Task]:
        """Stop the model thread; returns the tasks still queued (their owners answer them)."""
        self.stopping.set()
        return self.scheduler.drain(everyone=True)

    def describe(self) -> dict:
        """The model and its device, for a status reply."""
        model = self.model  # while it loads: the name it was asked for (a checkpoint's file name)
        return {"model": getattr(model, "name", None) or Path(self.model_spec).name,
                "device": str(getattr(model, "device", "loading")),
                "engine": getattr(model, "engine", None),
                "model_error": str(self.model_error) if self.model_error else None,
                "encoder_runs": getattr(model, "encoder_runs", 0), "decoder_runs": getattr(model, "decoder_runs", 0),
                "cache": self.cache.stats(), "queue": self.scheduler.stats(), "order": list(self.scheduler.order),
                "prefetch": self.prefetch}

    def out_of_memory(self) -> None:
        """Free what can be freed after an out-of-memory error: the cache and every session's volume caches."""
        self.cache.clear()
        for session in self.sessions:
            session.sessions.clear()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- model thread --------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """The model thread's loop: load the model, then run tasks and prefetch until stopped."""
        from ..loading import configure_process_threads, load_model

        if self.model is None:
            try:
                self.model = load_model(self.model_spec, self.device_spec, self.engine)
                configure_process_threads(self.model)  # this process's own model thread: the one place it is set
            except SegmentWithSAMError as error:
                self.model_error = error
            except Exception as error:  # requests must get a reason, not wait for a model that never comes
                traceback.print_exc(file=sys.stderr)
                self.model_error = BackendError(f"The model could not be loaded: {type(error).__name__}: {error}")
        while not self.stopping.is_set():
            item = self.scheduler.take(timeout=0.2)
            if isinstance(item, Task):
                self.run(item)
            elif item is not None:
                owner, *where = item
                owner.prefetch_one(*where)

    def run(self, task: Task) -> None:
        try:
            task.owner.run(task)
        finally:
            self.scheduler.finish(task)

    def let_through(self) -> None:
        """Between two slices of a long step: run the interactive tasks waiting (on other objects) now."""
        while (task := self.scheduler.take_interactive()) is not None:
            self.run(task)

    def _heartbeat(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            for session in self.sessions:
                running, stalled = self.scheduler.stalled(session)
                session.send({"op": "heartbeat", "running": running, "stalled_s": round(stalled, 3)})

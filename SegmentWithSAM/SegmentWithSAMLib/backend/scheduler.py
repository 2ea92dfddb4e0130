"""What the backend's model thread does next: interactive requests first, latest-wins for predictions of the
same target, cancel of queued or running work, and idle-time prefetch of neighbouring slices."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Task:
    """One queued request: ``header`` and ``arrays`` as received; ``cancel`` is set to stop it between
    slices. Predictions with the same ``target`` replace each other while queued."""

    id: int
    op: str
    header: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    target: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    """A thread-safe queue of :class:`Task` plus a low-priority prefetch plan.

    The reader thread submits and cancels; the model thread takes. Whatever ``submit`` and ``cancel`` return
    has been removed from the queue and must be answered by the caller (as dropped or cancelled).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Task] = deque()
        self._prefetch: deque = deque()
        self.running: Task | None = None
        self.dropped = 0
        self.progress_at = time.monotonic()  # when the running task last made progress

    def submit(self, task: Task) -> list[Task]:
        """Queue ``task``; returns the queued predictions it supersedes (same target), now dropped."""
        with self._cond:
            stale = [t for t in self._queue if task.target is not None and t.target == task.target]
            for old in stale:
                self._queue.remove(old)
            self.dropped += len(stale)
            self._queue.append(task)
            self._cond.notify()
            return stale

    def cancel(self, task_id: int) -> Task | None:
        """Cancel a queued task (returned, removed) or flag the running one (None returned: it answers)."""
        with self._cond:
            for task in self._queue:
                if task.id == task_id:
                    self._queue.remove(task)
                    return task
            if self.running is not None and self.running.id == task_id:
                self.running.cancel.set()
            return None

    def plan_prefetch(self, items) -> None:
        """Replace the prefetch plan with ``items`` (done nearest first, only while no task waits)."""
        with self._cond:
            self._prefetch = deque(items)

    def take(self, timeout: float) -> Task | tuple | None:
        """The next task (marked running); else the next prefetch item; else None after ``timeout`` s."""
        with self._cond:
            if not self._queue and not self._prefetch:
                self._cond.wait(timeout)
            if self._queue:
                self.running = self._queue.popleft()
                self.progress_at = time.monotonic()
                return self.running
            self.running = None
            return self._prefetch.popleft() if self._prefetch else None

    def touch(self) -> None:
        """The running task made progress (a slice done)."""
        self.progress_at = time.monotonic()

    def stalled(self) -> tuple[int | None, float]:
        """The running task's id and the seconds since it last made progress (None, 0 when idle)."""
        with self._cond:
            if self.running is None:
                return None, 0.0
            return self.running.id, time.monotonic() - self.progress_at

    def finish(self) -> None:
        with self._cond:
            self.running = None

    def drain(self) -> list[Task]:
        """Remove and return every queued task (at shutdown)."""
        with self._cond:
            tasks, self._queue = list(self._queue), deque()
            self._prefetch.clear()
            self._cond.notify_all()
            return tasks

    def stats(self) -> dict:
        with self._cond:
            return {"queued": len(self._queue), "running": self.running.op if self.running else None,
                    "prefetch_planned": len(self._prefetch), "dropped": self.dropped}

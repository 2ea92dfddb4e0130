"""What the backend's model thread does next: interactive requests first (a preview or a click goes ahead of a
queued propagation, and a running propagation lets them through between its slices), latest-wins for requests
of the same target, cancel of queued or running work, and idle-time prefetch of neighbouring slices. Tasks carry
their ``owner`` (a client's session on a shared server): ids, targets and subjects are the owner's own, and the
long tasks of several owners take turns."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Task:
    """One queued request: ``header`` and ``arrays`` as received; ``cancel`` is set to stop it between
    slices. Requests with the same ``target`` replace each other while queued; ``interactive`` ones (quick:
    loading a volume, a 2D prompt, a click) run before the others; ``subject`` (an object's key) is what it
    works on: an interactive task is let through a running one only when their subjects differ. ``owner``: whose
    it is (ids, targets and subjects are compared within one owner only)."""

    id: int
    op: str
    header: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    target: str | None = None
    interactive: bool = True
    subject: str | None = None
    owner: object = None
    cancel: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    """A thread-safe pair of queues of :class:`Task` (interactive, then the rest) plus a low-priority prefetch plan.

    The reader thread submits and cancels; the model thread takes. Whatever ``submit`` and ``cancel`` return
    has been removed from the queue and must be answered by the caller (as dropped or cancelled).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._interactive: deque[Task] = deque()
        self._bulk: dict[object, deque[Task]] = {}  # owner → its long tasks; owners take turns (insertion order)
        self._prefetch: deque = deque()
        self._running: list[Task] = []  # a task and those let through it while it yields
        self.dropped = 0
        self.order: deque[int] = deque(maxlen=64)  # the ids of the latest tasks in the order they started
        self.progress_at = time.monotonic()  # when the running task last made progress

    def submit(self, task: Task) -> list[Task]:
        """Queue ``task``; returns the queued tasks it supersedes (same target), now dropped."""
        with self._cond:
            stale = [t for t in self._queued()
                     if task.target is not None and t.target == task.target and t.owner == task.owner]
            for old in stale:
                self._remove(old)
            self.dropped += len(stale)
            if task.interactive:
                self._interactive.append(task)
            else:
                self._bulk.setdefault(task.owner, deque()).append(task)
            self._cond.notify()
            return stale

    def _queued(self) -> list[Task]:
        return [*self._interactive, *(t for queue in self._bulk.values() for t in queue)]

    def _remove(self, task: Task) -> None:
        if task in self._interactive:
            self._interactive.remove(task)
            return
        queue = self._bulk[task.owner]
        queue.remove(task)
        if not queue:
            del self._bulk[task.owner]

    def _next_bulk(self) -> Task:
        """The next long task, the owners taking turns: the first owner's first task; that owner goes last."""
        owner = next(iter(self._bulk))
        queue = self._bulk.pop(owner)
        task = queue.popleft()
        if queue:
            self._bulk[owner] = queue
        return task

    def cancel(self, task_id: int, owner: object = None) -> Task | None:
        """Cancel ``owner``'s queued task (returned, removed) or flag a running one (None returned: it answers)."""
        with self._cond:
            for task in self._queued():
                if task.id == task_id and task.owner == owner:
                    self._remove(task)
                    return task
            for task in self._running:
                if task.id == task_id and task.owner == owner:
                    task.cancel.set()
            return None

    def plan_prefetch(self, items) -> None:
        """Replace the prefetch plan with ``items`` (done nearest first, only while no task waits)."""
        with self._cond:
            self._prefetch = deque(items)

    def _start(self, task: Task) -> Task:
        self._running.append(task)
        self.order.append(task.id)
        self.progress_at = time.monotonic()
        return task

    def take(self, timeout: float) -> Task | tuple | None:
        """The next task (marked running), interactive ones first; else the next prefetch item; else None after
        ``timeout`` s."""
        with self._cond:
            if not self._interactive and not self._bulk and not self._prefetch:
                self._cond.wait(timeout)
            if self._interactive:
                return self._start(self._interactive.popleft())
            if self._bulk:
                return self._start(self._next_bulk())
            return self._prefetch.popleft() if self._prefetch else None

    def take_interactive(self) -> Task | None:
        """A waiting interactive task that may run now, inside the running task's pause between two slices (its
        subject differs from every running task's), marked running; None if there is none."""
        with self._cond:
            busy = {(t.owner, t.subject) for t in self._running if t.subject is not None}
            for task in self._interactive:
                if task.subject is None or (task.owner, task.subject) not in busy:
                    self._interactive.remove(task)
                    return self._start(task)
            return None

    def busy(self, owner: object) -> bool:
        """Whether ``owner`` has a task queued or running."""
        with self._cond:
            return any(t.owner == owner for t in (*self._queued(), *self._running))

    def touch(self) -> None:
        """The running task made progress (a slice done)."""
        self.progress_at = time.monotonic()

    def stalled(self, owner: object = None) -> tuple[int | None, float]:
        """The id of the task running now if it is ``owner``'s, and the seconds since it last made progress
        (None, 0 otherwise)."""
        with self._cond:
            if not self._running or self._running[-1].owner != owner:
                return None, 0.0
            return self._running[-1].id, time.monotonic() - self.progress_at

    def finish(self, task: Task) -> None:
        """``task`` ended (the one it interrupted, if any, is running again)."""
        with self._cond:
            if task in self._running:
                self._running.remove(task)
            self.progress_at = time.monotonic()

    def drain(self, owner: object = None, everyone: bool = False) -> list[Task]:
        """Remove and return ``owner``'s queued tasks (or everyone's, at shutdown), flag its running ones to
        stop, and forget the prefetch plan."""
        with self._cond:
            tasks = [t for t in self._queued() if everyone or t.owner == owner]
            for task in tasks:
                self._remove(task)
            for task in self._running:
                if everyone or task.owner == owner:
                    task.cancel.set()
            self._prefetch.clear()
            self._cond.notify_all()
            return tasks

    def stats(self) -> dict:
        with self._cond:
            return {"queued": len(self._queued()), "interactive": len(self._interactive),
                    "running": self._running[-1].op if self._running else None,
                    "prefetch_planned": len(self._prefetch), "dropped": self.dropped}

"""The backend process: one model on one thread (:class:`~.worker.Worker`), serving one client per session.

``python -m SegmentWithSAMLib.backend.server --stdio`` (what a local client starts) speaks on its stdin/stdout
pipes and opens no socket. ``segmentwithsam serve --host H --port P`` serves many clients over TCP, or TLS with
``--certfile/--keyfile`` (:mod:`.listener`): each connection presents the key first, then is its own session.

Here: :class:`Backend`, one client's session (its volumes, object states and requests), and the stdio server.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ..actions import INTERACTIVE, KINDS
from ..errors import BackendError, PromptError, ProtocolError, SegmentWithSAMError, VolumeError
from ..geometry import View, Volume
from ..models import DEFAULT_MODEL
from ..propagation import Cancelled
from ..release import RELEASE
from ..state import ObjectState
from .protocol import DEFAULT_MAX_PAYLOAD, PROTOCOL_VERSION, Message, StreamReader, check_hello, encode, write_all
from .scheduler import Task
from .worker import Worker, is_out_of_memory

QUEUED_OPS = {"load_volume", "unload_volume", "step", "suggest"}
QUICK_OPS = {"load_volume", "unload_volume", "suggest"}  # run before long steps, as interactive actions are
INTERACTIVE_ACTIONS = {name for name, kind in KINDS.items() if kind in INTERACTIVE}  # run before the others
MAX_STATES = 64  # object states kept between steps (least recently used go; their clients send them again)
MAX_PENDING = 1 << 30  # reply bytes a client may leave unread before it is cut off


class StateUnknown(ProtocolError):
    """The backend does not hold the object's state the client named (it restarted, or forgot it): the client
    sends the state whole and the step is done again."""


class VolumeUnknown(VolumeError):
    """The session does not hold the volume a step names (it was freed, or the session is new): the client
    sends the volume and the step again."""


class Channel:
    """Where a session's replies go. Frames are queued and written by a thread of the connection's own, so a
    client that reads slowly never holds up the model thread; one that leaves over ``max_pending`` bytes unread
    is cut off (``cut()`` is called). Between connections (a session waiting for its client to come back)
    replies are dropped."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None
        self._pending = 0
        self._cut: Callable[[], None] = lambda: None
        self.max_pending = max_pending

    def attach(self, write: Callable[[bytes | memoryview], None] | None,
               cut: Callable[[], None] = lambda: None) -> None:
        """Send from now on with ``write`` (None: drop replies); ``cut()`` ends a connection that reads too slowly."""
        with self._lock:
            if self._queue is not None:
                self._queue.put(None)
            self._queue, self._pending, self._cut = None, 0, cut
            if write is None:
                return
            self._queue = outbox = queue.SimpleQueue()
        threading.Thread(target=self._write_loop, args=(outbox, write), name="reply-writer", daemon=True).start()

    def _write_loop(self, outbox: queue.SimpleQueue, write: Callable[[bytes | memoryview], None]) -> None:
        while (item := outbox.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            buffers, size = item
            try:
                for buffer in buffers:
                    write(buffer)
            except (OSError, ValueError):  # the client went away; its reader sees the end of the stream
                with self._lock:
                    if self._queue is outbox:
                        self._queue = None
                return
            with self._lock:
                if self._queue is outbox:
                    self._pending -= size

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until what was sent so far is written (or ``timeout`` s)."""
        written = threading.Event()
        with self._lock:
            if self._queue is None:
                return
            self._queue.put(written)
        written.wait(timeout)

    def send(self, header: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        buffers = encode(header, arrays)
        size = sum(memoryview(buffer).nbytes for buffer in buffers)
        with self._lock:
            if self._queue is None:
                return
            if self._pending + size > self.max_pending:
                self._queue.put(None)
                self._queue = None
                cut = self._cut
            else:
                self._pending += size
                self._queue.put((buffers, size))
                return
        cut()


def _window(spec):
    if spec is None or isinstance(spec, str):
        return spec
    if (isinstance(spec, list) and len(spec) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec)):
        return tuple(spec)
    raise PromptError(f"A window is 'auto', a preset name, 'W,L' or [width, level], not {spec!r}.")


def _matrix(value) -> np.ndarray:
    """A 4×4 matrix from its 16 numbers in a header (row by row)."""
    try:
        return np.asarray(value, dtype=float).reshape(4, 4)
    except (TypeError, ValueError):
        raise ProtocolError("load_volume needs a 4×4 'ijk_to_ras' (16 numbers).") from None


class Backend:
    """One client's session: its volumes, object states and replies (``send(header, arrays)``), its requests
    run by the shared :class:`~.worker.Worker`. ``session_id`` names it to a client that reconnects;
    ``on_shutdown`` is what a shutdown request does (by default: stop the worker, as the one client of a backend
    process may; a shared server's client ends only its own session)."""

    def __init__(self, send: Callable[..., None], worker: Worker, session_id: str | None = None,
                 on_shutdown: Callable[[], None] | None = None) -> None:
        self.send = send
        self.on_shutdown = on_shutdown or worker.stop
        self.worker = worker
        self.session_id = session_id
        self.volumes: dict[str, Volume] = {}
        self.sessions: dict[tuple, object] = {}  # (volume, window) → the volume's engine session
        self.states: OrderedDict[str, tuple[int, ObjectState | None]] = OrderedDict()  # key → (version, state)
        self._versions = itertools.count(1)  # one counter for every state: a version names one state, ever
        self.last_active = time.monotonic()

    # ---- reader thread -------------------------------------------------------------------------------------
    def reject(self, error: Exception, request_id=None) -> None:
        self.send({"op": "error", "id": request_id, "kind": type(error).__name__, "message": str(error)})

    def welcome(self, request_id, resumed: bool = False) -> None:
        """Answer a client's accepted hello."""
        self.send({"op": "hello", "id": request_id, "version": PROTOCOL_VERSION, "release": RELEASE,
                   "pid": os.getpid(), "session": self.session_id, "resumed": resumed,
                   **{k: v for k, v in self.worker.describe().items() if k in ("model", "device", "engine")}})

    def handle(self, message: Message) -> None:
        """Answer or queue one message from the client (called on the reader thread)."""
        header, op = message.header, message.op
        request_id = header.get("id")
        self.last_active = time.monotonic()
        if type(request_id) is not int:
            self.reject(ProtocolError("Every request needs an integer 'id'."), None)
        elif op == "status":
            self.send({"op": "result", "id": request_id, **self.status()})
        elif op == "cancel":
            cancelled = self.worker.scheduler.cancel(header.get("target"), self)
            if cancelled is not None:
                self.send({"op": "cancelled", "id": cancelled.id, "message": "Cancelled before it started."})
            self.send({"op": "result", "id": request_id})
        elif op == "shutdown":
            self.send({"op": "result", "id": request_id})
            self.on_shutdown()
        elif op in QUEUED_OPS:
            target, subject = header.get("target"), header.get("object")
            action = header.get("action") if isinstance(header.get("action"), dict) else {}
            interactive = op in QUICK_OPS or action.get("type") in INTERACTIVE_ACTIONS
            task = Task(request_id, op, header, message.arrays, target if isinstance(target, str) else None,
                        interactive, subject if isinstance(subject, str) else None, owner=self)
            for stale in self.worker.scheduler.submit(task):
                self.send({"op": "dropped", "id": stale.id})
        else:
            self.reject(ProtocolError(f"Unknown operation {op!r}."), request_id)

    def status(self) -> dict:
        return {"pid": os.getpid(), "version": PROTOCOL_VERSION, "release": RELEASE, "session": self.session_id,
                "sessions": len(self.worker.sessions), **self.worker.describe(), "volumes": list(self.volumes),
                "states": len(self.states)}

    def close(self) -> None:
        """The session ends: stop its work and free its memory."""
        for task in self.worker.scheduler.drain(self):
            self.send({"op": "cancelled", "id": task.id, "message": "The session ended."})
        self.volumes.clear()
        self.sessions.clear()
        self.states.clear()

    # ---- model thread --------------------------------------------------------------------------------------
    def run(self, task: Task) -> None:
        """Run ``task`` and send its answer (on the worker's model thread)."""
        try:
            model = self.worker.model
            if model is None:
                raise self.worker.model_error or BackendError("The model is not loaded.")
            header, arrays = getattr(self, "_" + task.op)(task)
            if task.cancel.is_set():
                self.send({"op": "cancelled", "id": task.id, "message": "Cancelled; nothing was applied."})
            else:
                self.send({"op": "result", "id": task.id, **header}, arrays)
        except SegmentWithSAMError as error:
            kind = "cancelled" if isinstance(error, Cancelled) else "error"
            self.send({"op": kind, "id": task.id, "kind": type(error).__name__, "message": str(error)})
        except Exception as error:  # the backend must keep serving whatever one request does
            if is_out_of_memory(error):
                self.worker.out_of_memory()
                self.send({"op": "error", "id": task.id, "kind": "OutOfMemory",
                           "message": f"Out of memory on {getattr(self.worker.model, 'device', '?')}: the embedding "
                                      f"cache was cleared and this request failed; the backend is still running."})
                return
            traceback.print_exc(file=sys.stderr)
            self.send({"op": "error", "id": task.id, "kind": "InternalError",
                       "message": f"{type(error).__name__}: {error}"})

    def _load_volume(self, task: Task) -> tuple[dict, None]:
        volume_id = task.header.get("volume")
        if "array" not in task.arrays:
            raise ProtocolError("load_volume needs an 'array' (the voxels).")
        volume = Volume(task.arrays["array"], _matrix(task.header.get("ijk_to_ras")))
        if volume.identity != volume_id:
            raise ProtocolError(f"The volume's content hash is {volume.identity}, not {volume_id!r} as announced.")
        self.volumes[volume_id] = volume
        return {"volume": volume_id}, None

    def _unload_volume(self, task: Task) -> tuple[dict, None]:
        """Forget a volume (the client decides which volumes the backend keeps)."""
        volume_id = task.header.get("volume")
        self.volumes.pop(volume_id, None)
        self.sessions = {k: s for k, s in self.sessions.items() if k[0] != volume_id}
        self.worker.scheduler.plan_prefetch(())
        return {"volume": volume_id}, None

    def _session(self, header: dict):
        from ..session import Session

        volume_id = header.get("volume")
        if volume_id not in self.volumes:
            raise VolumeUnknown(f"The backend has no volume {volume_id!r}: load it first.")
        window = _window(header.get("window"))
        key = (volume_id, json.dumps(window))
        if key not in self.sessions:
            self.sessions[key] = Session(self.volumes[volume_id], self.worker.model, window, self.worker.cache)
        return key, self.sessions[key]

    def _plan_prefetch(self, key: tuple, view: View, index: int, count: int) -> None:
        near = [index + sign * d for d in range(1, self.worker.prefetch + 1) for sign in (1, -1)]
        self.worker.scheduler.plan_prefetch((self, key, view, i) for i in near if 0 <= i < count)

    def prefetch_one(self, key: tuple, view: View, index: int) -> None:
        session = self.sessions.get(key)
        if session is not None:
            try:
                session.prefetch(view, index)
            except Exception as error:  # prefetch is best effort; the next real request reports problems
                if is_out_of_memory(error):
                    self.worker.cache.clear()
                self.worker.scheduler.plan_prefetch(())

    def _state(self, task: Task, key: str, image_shape: tuple[int, int]) -> ObjectState | None:
        """The object's state this step applies to: the one sent whole, or the stored one of the version named."""
        header = task.header
        if "state" in header:
            sent = header["state"]
            return None if sent is None else ObjectState.from_message(sent, task.arrays, image_shape)
        stored = self.states.get(key)
        if stored is None or stored[0] != header.get("version"):
            raise StateUnknown(f"This backend has no version {header.get('version')!r} of {key!r}: send the state.")
        return stored[1]

    def _step(self, task: Task) -> tuple[dict, dict]:
        """One engine step (:meth:`..engine.Engine.step`) on the object ``header["object"]``: its state comes
        whole with the request, or is the version this backend kept from the step before; the reply is the new
        version and only what changed (:meth:`..state.ObjectState.to_message` of the changed slices), the
        slices a propagation streamed as it went not sent again."""
        from ..actions import from_message
        from ..engine import Engine

        header = task.header
        key = header.get("object")
        if not isinstance(key, str) or not key:
            raise PromptError("A step needs the object's key (a string).")
        session_key, session = self._session(header)
        engine = Engine(session, View.parse(header.get("view") or ""))
        action = from_message(header.get("action"), task.arrays)
        state = self._state(task, key, engine.axes.image_shape)
        streamed: dict[int, np.ndarray] = {}

        def between_slices() -> bool:
            self.worker.scheduler.touch()
            self.worker.let_through()
            return task.cancel.is_set()

        def on_slice(index: int, mask: np.ndarray) -> None:
            streamed[index] = mask
            self.send({"op": "slice", "id": task.id, "index": index, "done": len(streamed),
                       "total": engine.axes.num_slices}, {"mask": np.packbits(mask)})

        new, update = engine.step(state, action, between_slices, on_slice)
        version = next(self._versions)
        self.states[key] = (version, new)
        self.states.move_to_end(key)
        while len(self.states) > MAX_STATES:
            self.states.popitem(last=False)
        delta, arrays = new.to_message(new.changed_since(state))
        for name, entry in delta["slices"].items():
            index = int(name)
            if entry is not None and entry["kind"] is not None and streamed.get(index) is new.masks[index]:
                entry["kept"] = True
                arrays.pop(f"mask/{index}")
        last = max(update.changed, default=None)
        if last is not None:
            self._plan_prefetch(session_key, engine.axes.view, last, engine.axes.num_slices)
        return {"version": version, "state": delta, "update": update.to_header()}, arrays

    def _suggest(self, task: Task) -> tuple[dict, None]:
        """Where to click next on the object ``header["object"]`` (:func:`..suggest.suggest`), whose state comes
        as for a step (whole, or the version kept here); nothing is changed or kept."""
        from ..suggest import suggest

        header = task.header
        _, session = self._session(header)
        axes = session.axes(View.parse(header.get("view") or ""))
        state = self._state(task, str(header.get("object")), axes.image_shape)
        return {"suggestion": suggest(session, axes, state).to_header()}, None


def _read(backend: Backend, reader: StreamReader) -> Message | None:
    """The next message, or None at the end of the stream; a malformed frame is answered and skipped."""
    while True:
        try:
            return reader.read()
        except ProtocolError as error:
            backend.reject(error)
        except (EOFError, OSError):
            return None


def serve_messages(backend: Backend, reader: StreamReader) -> None:
    """Hand every message of an accepted connection to ``backend`` until the stream ends or the worker stops."""
    while not backend.worker.stopping.is_set() and (message := _read(backend, reader)) is not None:
        backend.handle(message)


def serve_stdio(worker: Worker, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
    """Serve the one client that started this process, on stdin/stdout: it says hello first (the protocol
    version is checked before anything else); no key, as nothing but the parent can write to the pipe."""
    channel = Channel()
    out_fd = os.dup(1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the channel
    channel.attach(write_all(out_fd), lambda: os.close(0))
    backend = Backend(channel.send, worker)
    worker.start()
    reader = StreamReader(lambda n: os.read(0, n), max_payload)
    while (message := _read(backend, reader)) is not None:
        try:
            check_hello(message.header, None)
        except ProtocolError as error:
            backend.reject(error, message.header.get("id"))
            continue
        worker.attach(backend)
        backend.welcome(message.header.get("id"))
        serve_messages(backend, reader)
        break
    for task in worker.stop():
        backend.send({"op": "cancelled", "id": task.id, "message": "The backend is shutting down."})
    channel.flush()


def main(argv: list[str] | None = None) -> None:
    from .listener import add_arguments, serve_network

    parser = argparse.ArgumentParser(prog="segmentwithsam serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or checkpoint path")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--engine", default="auto",
                        help="auto (default), torch, openvino, openvino-f32 or openvino-bf16")
    parser.add_argument("--prefetch", type=int, default=2, help="neighbouring slices to encode when idle")
    parser.add_argument("--cache-mb", type=int, default=None, help="embedding cache size (MB)")
    parser.add_argument("--max-payload-mb", type=int, default=DEFAULT_MAX_PAYLOAD >> 20)
    parser.add_argument("--stdio", action="store_true",
                        help="serve the one client that started this process on stdin/stdout (no socket)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    worker = Worker(args.model, args.device, args.prefetch, None if args.cache_mb is None else args.cache_mb << 20,
                    engine=args.engine)
    try:
        if args.stdio:
            serve_stdio(worker, args.max_payload_mb << 20)
        else:
            serve_network(worker, args, args.max_payload_mb << 20)
    except SegmentWithSAMError as error:
        print(f"segmentwithsam serve: {error}", file=sys.stderr, flush=True)
        os._exit(2)
    sys.stderr.flush()
    os._exit(0)  # the model thread may be inside torch: skip C++ static destructors racing with it


if __name__ == "__main__":
    main()

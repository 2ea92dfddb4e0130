"""The non-blocking client of the backend process.

Every request returns a :class:`Handle` at once (writer and reader threads); :meth:`BackendClient.poll` (from a
``qt.QTimer`` in Slicer, or a helper thread with ``dispatch="thread"``) applies what arrived on the caller's
thread. A backend that died, stopped its heartbeat for ``heartbeat_timeout`` s or spent ``request_timeout`` s on
one request without news fails every open handle with a :class:`~..errors.BackendError`; the next request
starts a fresh one. A propagation's masks are handed over only once it completed.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BackendError
from ..geometry import View, Volume, slice_axes
from ..models import DEFAULT_MODEL
from .protocol import PROTOCOL_VERSION, TOKEN_ENV, Message, StreamReader, encode, write_all

TERMINAL = ("done", "failed", "cancelled", "dropped")
_CLIENTS = itertools.count(1)  # numbers each client's log file
_LIB_PARENT = str(Path(__file__).resolve().parents[2])  # the folder that holds SegmentWithSAMLib
# Windows gives a console program (python.exe, PythonSlicer) started from a GUI a console window of its own.
# Slicer's slicer.util.launchConsoleProcess (Base/Python/slicer/util.py) hides it with a STARTUPINFO; the
# backend gets none at all (its output goes to pipes and a log file). The value of subprocess.CREATE_NO_WINDOW,
# which exists only on Windows.
CREATE_NO_WINDOW = 0x08000000


def popen_flags(platform: str = sys.platform) -> dict:
    """The extra :class:`subprocess.Popen` arguments that start the backend without a window on ``platform``."""
    return {"creationflags": CREATE_NO_WINDOW} if platform == "win32" else {}


@dataclass
class Handle:
    """A request in flight. ``state``: pending → done | failed | cancelled | dropped (superseded by a newer
    request of the same target). ``result`` is set when done; ``error`` (BackendError) when failed;
    ``events`` collects streamed messages (a propagation's slices) until the caller takes them; ``sent`` and
    ``received`` count the bytes of its frames."""

    id: int
    op: str
    state: str = "pending"
    result: object = None
    error: BackendError | None = None
    message: str = ""
    progress: tuple[int, int] | None = None
    events: list = field(default_factory=list)
    finish: Callable[[Message], object] | None = None
    stream: Callable[[Message], object] | None = None
    resend: Callable[[], None] | None = None  # sends the request again whole (a step whose state the backend lost)
    sent: int = 0
    received: int = 0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def take_events(self) -> list:
        events, self.events = self.events, []
        return events


class BackendClient:
    """Starts and talks to a backend process; see the module docstring.

    ``transport`` "pipe" (default: the child's stdin/stdout, no socket anywhere) or "tcp" (the child listens
    on ``host``, 127.0.0.1 by default, on a free port, and checks a random token). ``python`` is the
    interpreter for the child (in Slicer: PythonSlicer).
    """

    def __init__(self, model: str = DEFAULT_MODEL, device: str | None = None, *, transport: str = "pipe",
                 host: str = "127.0.0.1", python: str | None = None, prefetch: int = 2, cache_mb: int | None = None,
                 heartbeat_timeout: float = 10.0, startup_timeout: float = 120.0, request_timeout: float = 600.0,
                 dispatch: str = "poll", max_volumes: int = 2, engine: str = "auto",
                 log_path: str | os.PathLike | None = None) -> None:
        if transport not in ("pipe", "tcp"):
            raise ValueError(f"transport must be 'pipe' or 'tcp', not {transport!r}")
        if dispatch not in ("poll", "thread"):
            raise ValueError(f"dispatch must be 'poll' or 'thread', not {dispatch!r}")
        self.model, self.device, self.transport, self.host = model, device, transport, host
        self.engine = engine
        self.python = python or sys.executable
        self.prefetch, self.cache_mb = prefetch, cache_mb
        self.heartbeat_timeout, self.request_timeout = heartbeat_timeout, request_timeout
        self.startup_timeout = startup_timeout
        self.max_volumes = max(1, int(max_volumes))
        self.errors: list[str] = []  # backend errors not tied to a request (e.g. a malformed frame)
        self._stalled: tuple[int | None, float] = (None, 0.0)
        default_log = Path(tempfile.gettempdir()) / f"segmentwithsam-backend-{os.getpid()}-{next(_CLIENTS)}.log"
        self.log_path = Path(log_path) if log_path else default_log
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._handles: dict[int, Handle] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._news = threading.Event()  # set by the reader thread when something arrives (for wait())
        self._process: subprocess.Popen | None = None
        self._generation = 0
        self._outbox: queue.Queue | None = None
        self._loaded: list[str] = []  # volumes the backend holds, least recently used first
        self._synced: dict[str, tuple[int, object]] = {}  # object key → (version, state) the backend holds
        self._last_heard = time.monotonic()
        self._hello: Handle | None = None
        self.restarts = 0
        self._closed = False
        self._dispatcher = None
        if dispatch == "thread":
            self._dispatcher = threading.Thread(target=self._dispatch_loop, name="backend-dispatch", daemon=True)
            self._dispatcher.start()

    # ---- process and threads -------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        command = [self.python, "-m", "SegmentWithSAMLib.backend.server", "--model", str(self.model),
                   "--prefetch", str(self.prefetch), "--engine", self.engine]
        if self.device:
            command += ["--device", self.device]
        if self.cache_mb is not None:
            command += ["--cache-mb", str(self.cache_mb)]
        if self.transport == "tcp":
            command += ["--tcp", f"{self.host}:0", "--watch-stdin"]
        return command

    def _start(self) -> None:
        """Launch the backend (a few ms: the rest of the start-up happens on the writer thread)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_LIB_PARENT, env.get("PYTHONPATH")) if p)
        token = secrets.token_urlsafe(32)
        env[TOKEN_ENV] = token
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        self._process = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         env=env, bufsize=0, close_fds=True, **popen_flags())
        log.close()
        self._generation += 1
        self._loaded = []
        self._last_heard = time.monotonic()
        self._stalled = (None, 0.0)
        self._outbox = queue.Queue()
        generation, process, outbox = self._generation, self._process, self._outbox
        threading.Thread(target=self._connect_and_write, args=(generation, process, outbox, token),
                         name="backend-writer", daemon=True).start()
        self._hello = self._request({"op": "hello", "version": PROTOCOL_VERSION, "token": token})

    def _connect_and_write(self, generation: int, process: subprocess.Popen, outbox: queue.Queue, token: str) -> None:
        try:
            if self.transport == "tcp":
                line = process.stdout.readline()
                if not line:
                    raise OSError("the backend ended before it listened")
                port = json.loads(line)["port"]
                sock = socket.create_connection((self.host, port), timeout=30)
                sock.settimeout(None)
                read, write = sock.recv, sock.sendall
            else:
                fd_in, write = process.stdout.fileno(), write_all(process.stdin.fileno())
                read = lambda n: os.read(fd_in, n)  # noqa: E731
            threading.Thread(target=self._read_loop, args=(generation, read), name="backend-reader",
                             daemon=True).start()
            while True:
                buffers = outbox.get()
                if buffers is None:
                    return
                for buffer in buffers:
                    write(buffer)
        except (OSError, ValueError) as error:
            self._inbox.put((generation, f"the channel broke ({error})"))

    def _read_loop(self, generation: int, read: Callable[[int], bytes]) -> None:
        reader = StreamReader(read)
        while True:
            try:
                message = reader.read()
            except Exception as error:  # a corrupt reply stream cannot be trusted any more
                self._inbox.put((generation, f"its replies could not be read ({error})"))
                return
            if message is None:
                self._inbox.put((generation, "it exited"))
                self._news.set()
                return
            self._inbox.put((generation, message))
            self._news.set()

    def _dispatch_loop(self) -> None:
        while not self._closed:
            self.poll()
            time.sleep(0.01)

    # ---- requests ------------------------------------------------------------------------------------------
    def _request(self, header: dict, arrays: dict | None = None, finish=None, stream=None) -> Handle:
        with self._lock:
            if self._closed:
                raise BackendError("The backend client is closed.")
            if self._process is None:
                self._start()
            handle = Handle(next(self._ids), header["op"], finish=finish, stream=stream)
            self._handles[handle.id] = handle
            self._send(handle, header, arrays)
            return handle

    def _send(self, handle: Handle, header: dict, arrays: dict | None) -> None:
        buffers = encode({**header, "id": handle.id}, arrays)
        handle.sent += sum(memoryview(buffer).nbytes for buffer in buffers)
        self._outbox.put(buffers)

    def _send_again(self, handle: Handle, header: dict, arrays: dict | None) -> None:
        self._handles.pop(handle.id, None)
        handle.id = next(self._ids)
        self._handles[handle.id] = handle
        self._send(handle, header, arrays)

    def load_volume(self, volume: Volume) -> Handle | None:
        """Send ``volume`` unless this backend has it already (identified by its content hash). The backend
        keeps the ``max_volumes`` volumes used last; this client tells it which to forget."""
        with self._lock:
            if self._process is None:
                self._start()
            if volume.identity in self._loaded:
                self._loaded.remove(volume.identity)
                self._loaded.append(volume.identity)
                return None
            self._loaded.append(volume.identity)
            while len(self._loaded) > self.max_volumes:
                self._request({"op": "unload_volume", "volume": self._loaded.pop(0)})
            return self._request({"op": "load_volume", "volume": volume.identity,
                                  "ijk_to_ras": volume.ijk_to_ras.ravel().tolist()}, {"array": volume.array})

    def step(self, volume: Volume, view: View | str, key: str, state, action, window=None,
             target: str | None = None) -> Handle:
        """One engine step (:meth:`..engine.Engine.step`) in the backend on object ``key`` (any string naming
        it uniquely for this client), whose current state is ``state`` (an :class:`~..state.ObjectState`, or
        None for a new object); the caller keeps the states. When ``state`` is the one an earlier step of this
        client returned, only the action goes out and only what changed comes back; otherwise (a new backend, a
        state edited by the caller) the state goes whole. A newer request with the same ``target`` supersedes
        this one while it waits. A propagation's slices arrive as ``(index, mask)`` events; the result, given
        only when the whole step completed, is ``(new_state, update)``."""
        from ..actions import to_message
        from ..state import ObjectState, Update, unpack_mask

        axes = slice_axes(volume, view)
        self.load_volume(volume)
        action_header, action_arrays = to_message(action)
        header = {"op": "step", "volume": volume.identity, "view": axes.view.value, "window": _json_window(window),
                  "object": key, "action": action_header, "target": target}
        streamed: dict[int, np.ndarray] = {}
        with self._lock:
            synced = self._synced.get(key)
            whole = synced is None or synced[1] is not state
            request = self._step_request(header, action_arrays, state, synced, whole)

        def stream(message: Message):
            index = int(message.header["index"])
            streamed[index] = unpack_mask(message.arrays, "mask", axes.image_shape)
            return index, streamed[index]

        def finish(message: Message):
            h = message.header
            base = state if state is not None else ObjectState((0, 0))
            new = base.apply_message(h["state"], message.arrays, axes.image_shape, keep=streamed)
            u = h["update"]
            empty = np.zeros(axes.image_shape, bool)
            update = Update({i: new.masks.get(i, empty) for i in u["changed"]}, u["stopped"], u["notices"],
                            u["seconds"])
            self._synced[key] = (h["version"], new)  # (poll holds the lock; only this backend's replies arrive)
            return new, update

        handle = self._request(request[0], request[1], finish=finish, stream=stream)
        if not whole:
            def resend() -> None:  # without its target: a newer request of that target may be queued already
                full_header, full_arrays = self._step_request({**header, "target": None}, action_arrays, state, None,
                                                              True)
                self._send_again(handle, full_header, full_arrays)

            handle.resend = resend
        return handle

    @staticmethod
    def _step_request(header: dict, action_arrays: dict, state, synced, whole: bool) -> tuple[dict, dict]:
        if not whole:
            return {**header, "version": synced[0]}, action_arrays
        state_header, state_arrays = state.to_message() if state is not None else (None, {})
        return {**header, "state": state_header}, {**state_arrays, **action_arrays}

    def cancel(self, handle: Handle) -> None:
        """Ask the backend to stop ``handle`` (a running propagation stops within one slice)."""
        with self._lock:
            if not handle.done and self._process is not None:
                self._outbox.put(encode({"op": "cancel", "id": next(self._ids), "target": handle.id}))

    def status(self) -> Handle:
        """Device, model, cache and queue of the backend (a dict result)."""
        return self._request({"op": "status"}, finish=lambda m: m.header)

    # ---- replies -------------------------------------------------------------------------------------------
    def poll(self) -> list[Handle]:
        """Apply what arrived and check the backend is alive; returns the handles that changed. Never blocks."""
        changed: dict[int, Handle] = {}
        with self._lock:
            while True:
                try:
                    generation, item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if generation != self._generation:
                    continue
                self._last_heard = time.monotonic()
                if isinstance(item, str):
                    self._fail_all(f"The backend process stopped: {item}{self._exit_reason()}.")
                    continue
                self._apply(item, changed)
            self._check_health(changed)
        return list(changed.values())

    def _apply(self, message: Message, changed: dict) -> None:
        op, request_id = message.op, message.header.get("id")
        if op == "heartbeat":
            self._stalled = (message.header.get("running"), float(message.header.get("stalled_s") or 0.0))
            return
        handle = self._handles.get(request_id)
        if handle is None:
            if op == "error":  # an error not tied to a request: the backend keeps serving, just note it
                self.errors.append(message.header.get("message", ""))
            return
        handle.received += len(json.dumps(message.header)) + sum(a.nbytes for a in message.arrays.values())
        if op == "error" and message.header.get("kind") == "StateUnknown" and handle.resend is not None:
            resend, handle.resend = handle.resend, None
            resend()  # the backend lost this object's state (it restarted or forgot it): send it whole
            return
        if op == "slice":
            event = handle.stream(message) if handle.stream else message
            handle.progress = (message.header.get("done", 0), message.header.get("total", 0))
            handle.events.append(event)
        elif op in ("result", "hello"):
            handle.result = handle.finish(message) if handle.finish else message.header
            self._end(handle, "done", "")
        elif op == "error":
            text = message.header.get("message", "unknown error")
            handle.error = BackendError(text)
            handle.error.kind = message.header.get("kind", "")
            self._end(handle, "failed", text)
            if handle is self._hello:
                self._fail_all(f"The backend refused the connection: {text}")
        elif op in ("cancelled", "dropped"):
            self._end(handle, op, message.header.get("message", ""))
        changed[handle.id] = handle

    def _end(self, handle: Handle, state: str, message: str) -> None:
        handle.state, handle.message = state, message
        self._handles.pop(handle.id, None)

    def _check_health(self, changed: dict) -> None:
        if self._process is None:
            return
        now = time.monotonic()
        problem = None
        if self._process.poll() is not None:
            problem = f"The backend process exited (status {self._process.returncode})."
        elif now - self._last_heard > (self.heartbeat_timeout if self._hello.done else self.startup_timeout):
            problem = f"The backend stopped answering for {now - self._last_heard:.0f} s and was stopped."
        elif self._stalled[1] > self.request_timeout and self._stalled[0] in self._handles:
            problem = (f"The backend spent over {self.request_timeout:g} s without progress on a "
                       f"{self._handles[self._stalled[0]].op} request and was stopped.")
        if problem:
            failed = list(self._handles.values())
            self._fail_all(problem)
            for handle in failed:
                changed[handle.id] = handle

    def _exit_reason(self) -> str:
        """" (killed by signal N)" or " (exit status N)" once the process has ended, else ""."""
        process = self._process
        if process is None:
            return ""
        try:
            code = process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            return ""
        return f" (killed by signal {-code})" if code < 0 else f" (exit status {code})"

    def _fail_all(self, reason: str) -> None:
        """Stop the backend and fail every open request; the next request starts a fresh backend."""
        tail = _log_tail(self.log_path)
        for handle in list(self._handles.values()):
            handle.error = BackendError(f"{reason} Nothing from this request was applied." + tail)
            handle.error.kind = "BackendDied"
            self._end(handle, "failed", str(handle.error))
        self._stop_process()

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if self._outbox is not None:
            self._outbox.put(None)
        self._generation += 1
        self._loaded = []
        self._synced = {}
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            threading.Thread(target=process.wait, daemon=True).start()  # reap without blocking the caller
            self.restarts += 1

    # ---- conveniences (these block: for the CLI, tests and scripts, not for a GUI thread) ------------------
    def wait(self, handle: Handle, timeout: float | None = None):
        """Poll until ``handle`` ends; return its result or raise its error (BackendError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not handle.done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"The {handle.op} request did not finish within {timeout:g} s.")
            self._news.clear()
            self.poll()
            if not handle.done:
                self._news.wait(0.05)
        if handle.state == "failed":
            raise handle.error
        if handle.state != "done":
            raise BackendError(f"The {handle.op} request was {handle.state}. {handle.message}".strip())
        return handle.result

    def close(self) -> None:
        """Shut the backend down (asking first, then killing) and stop the client."""
        with self._lock:
            if self._process is not None:
                self._outbox.put(encode({"op": "shutdown", "id": next(self._ids)}))
                try:
                    self._process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                self._fail_all("The backend client was closed.")
            self._closed = True
            if self.log_path.name.startswith("segmentwithsam-backend-"):
                self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_window(window):
    if window is None or isinstance(window, str):
        return window
    return [float(v) for v in window]


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return ("\nBackend log (" + str(path) + "):\n" + "\n".join(text)) if text else ""

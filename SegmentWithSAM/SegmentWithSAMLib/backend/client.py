"""The non-blocking client of a backend: a process of its own, or a server at an address.

Every request returns a :class:`Handle` at once (writer and reader threads); :meth:`BackendClient.poll` (from a
``qt.QTimer`` in Slicer, or a helper thread with ``dispatch="thread"``) applies what arrived on the caller's
thread. A backend that died, stopped its heartbeat for ``heartbeat_timeout`` s or spent ``request_timeout`` s on
one request without news fails every open handle with a :class:`~..errors.BackendError`; the next request
starts a fresh process, or reconnects to the server (which :meth:`poll` also retries in the background), resuming
the session: volumes and object states the server kept are not sent again. A propagation's masks are handed
over only once it completed.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BackendError
from ..folders import private_folder, user_cache
from ..geometry import View, Volume, slice_axes
from ..models import DEFAULT_MODEL
from ..release import RELEASE
from .links import Address, Link, ProcessLink, ServerLink, describe, popen_flags
from .protocol import KEY_ENV, PROTOCOL_VERSION, Message, StreamReader, encode

TERMINAL = ("done", "failed", "cancelled", "dropped")
SELF_HEALING = ("StateUnknown", "VolumeUnknown")  # errors a step answers by sending what the backend lacks
_CLIENTS = itertools.count(1)  # numbers each client's log file
__all__ = ["BackendClient", "Handle", "popen_flags", "check_connection"]


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
    """Starts, or connects to, a backend and talks to it; see the module docstring.

    Without ``server``, a backend process of this client's own: ``transport`` "pipe" (default: the child's
    stdin/stdout, no socket anywhere) or "tcp" (the child listens on ``host``, 127.0.0.1 by default, on a free port,
    and checks a random key); ``python`` is the interpreter for the child (in Slicer: PythonSlicer).
    With ``server`` ("tcp://host:port" or "tls://host:port"), a session on that server (``segmentwithsam serve``)
    with the access ``key`` (default ``$SEGMENTWITHSAM_KEY``); ``cafile`` verifies a TLS server's certificate
    when the system's CAs do not.
    """

    def __init__(self, model: str = DEFAULT_MODEL, device: str | None = None, *, transport: str = "pipe",
                 host: str = "127.0.0.1", python: str | None = None, prefetch: int = 2, cache_mb: int | None = None,
                 heartbeat_timeout: float = 10.0, startup_timeout: float = 120.0, request_timeout: float = 600.0,
                 dispatch: str = "poll", max_volumes: int = 2, engine: str = "auto",
                 log_path: str | os.PathLike | None = None, server: str | None = None, key: str | None = None,
                 cafile: str | None = None, connect_timeout: float = 10.0) -> None:
        if transport not in ("pipe", "tcp"):
            raise ValueError(f"transport must be 'pipe' or 'tcp', not {transport!r}")
        if dispatch not in ("poll", "thread"):
            raise ValueError(f"dispatch must be 'poll' or 'thread', not {dispatch!r}")
        self.model, self.device, self.transport, self.host = model, device, transport, host
        self.address = Address.parse(server) if server else None
        self.key = key or os.environ.get(KEY_ENV) or None
        if self.address is not None and not self.key:
            raise BackendError(f"A server needs its access key: give it, or set ${KEY_ENV}.")
        self.cafile, self.connect_timeout = cafile, connect_timeout
        self.engine = engine
        self.python = python or sys.executable
        self.prefetch, self.cache_mb = prefetch, cache_mb
        self.heartbeat_timeout, self.request_timeout = heartbeat_timeout, request_timeout
        self.startup_timeout = startup_timeout
        self.max_volumes = max(1, int(max_volumes))
        self.errors: list[str] = []  # backend errors not tied to a request (e.g. a malformed frame)
        self.server_info: dict = {}  # the latest hello's answer: release, model, device, session, resumed
        self.last_failure = ""  # why the backend went away last
        self._stalled: tuple[int | None, float] = (None, 0.0)
        self._log_given = log_path is not None
        self.log_path = Path(log_path) if log_path else None
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._handles: dict[int, Handle] = {}
        self._inbox: queue.Queue = queue.Queue()  # replies and failures; heartbeats never wait here
        self._news = threading.Event()  # set by the reader thread when something arrives (for wait())
        self._link: Link | None = None
        self._generation = 0
        self._outbox: queue.Queue | None = None
        self._loaded: list[str] = []  # volumes the backend holds, least recently used first
        self._synced: dict[str, tuple[int, object]] = {}  # object key → (version, state) the backend holds
        self._last_heard = time.monotonic()
        self._hello: Handle | None = None
        self._session: str | None = None  # the server session to resume after a reconnect
        self._retry_at: float | None = None  # when poll reconnects to the server next
        self._retry_delay = 0.5
        self.restarts = 0
        self._closed = False
        self._dispatcher = None
        if dispatch == "thread":
            self._dispatcher = threading.Thread(target=self._dispatch_loop, name="backend-dispatch", daemon=True)
            self._dispatcher.start()

    # ---- process or connection, and threads ----------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._link.pid if self._link is not None else None

    @property
    def running(self) -> bool:
        return self._link is not None and self._link.ended() is None

    @property
    def reconnecting(self) -> bool:
        """Whether a server client lost its connection and :meth:`poll` will connect again by itself (not after
        the server refused it: a wrong key, another version, no free session)."""
        return self._link is None and self._retry_at is not None

    def _command(self) -> list[str]:
        command = [self.python, "-m", "SegmentWithSAMLib.backend.server", "--model", str(self.model),
                   "--prefetch", str(self.prefetch), "--engine", self.engine]
        if self.device:
            command += ["--device", self.device]
        if self.cache_mb is not None:
            command += ["--cache-mb", str(self.cache_mb)]
        command += ["--host", self.host, "--port", "0", "--watch-stdin"] if self.transport == "tcp" else ["--stdio"]
        return command

    def _open_log(self):
        """The backend's log file: owner-only, in the user's cache folder unless the caller named one."""
        if self.log_path is None:
            folder = private_folder(user_cache("logs"))
            self.log_path = folder / f"backend-{os.getpid()}-{next(_CLIENTS)}.log"
        return os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")

    def _start(self) -> None:
        """Launch the backend, or start connecting to the server (a few ms: the rest happens on the writer
        thread)."""
        if self.address is not None:
            link: Link = ServerLink(self.address, self.cafile)
            key = self.key
        else:
            key = secrets.token_urlsafe(32)
            with self._open_log() as log:
                link = ProcessLink(self._command(), key, KEY_ENV, log, self.transport)
            self._loaded, self._synced = [], {}
        self._link = link
        self._generation += 1
        self._last_heard = time.monotonic()
        self._stalled = (None, 0.0)
        self._retry_at = None
        self._outbox = queue.Queue()
        generation, outbox = self._generation, self._outbox
        threading.Thread(target=self._connect_and_write, args=(generation, link, outbox), name="backend-writer",
                         daemon=True).start()
        self._hello = self._request({"op": "hello", "version": PROTOCOL_VERSION, "release": RELEASE, "key": key,
                                     "session": self._session}, finish=self._welcomed)

    def _welcomed(self, message: Message) -> dict:
        info = {k: v for k, v in message.header.items() if k not in ("op", "id")}
        self.server_info = info
        self._session = info.get("session")
        self._retry_delay = 0.5
        if not info.get("resumed"):
            self._loaded, self._synced = [], {}
        return info

    def _connect_and_write(self, generation: int, link: Link, outbox: queue.Queue) -> None:
        try:
            link.connect(self.connect_timeout)
        except (OSError, ValueError, EOFError) as error:
            self._inbox.put((generation, describe(error, self.address, self.connect_timeout, True)))
            self._news.set()
            return
        try:
            threading.Thread(target=self._read_loop, args=(generation, link.read), name="backend-reader",
                             daemon=True).start()
            while True:
                buffers = outbox.get()
                if buffers is None:
                    return
                for buffer in buffers:
                    link.write(buffer)
        except (OSError, ValueError) as error:
            self._inbox.put((generation, describe(error, self.address, self.connect_timeout, self._connecting)))
            self._news.set()

    def _read_loop(self, generation: int, read: Callable[[int], bytes]) -> None:
        reader = StreamReader(read)
        while True:
            try:
                message = reader.read()
            except Exception as error:  # a corrupt reply stream cannot be trusted any more
                if isinstance(error, OSError | EOFError) and self.address is not None:
                    text = describe(error, self.address, self.connect_timeout, self._connecting)
                else:
                    text = f"its replies could not be read ({error})"
                self._inbox.put((generation, text))
                self._news.set()
                return
            if message is None:
                self._inbox.put((generation, describe(None, self.address, self.connect_timeout, self._connecting)))
                self._news.set()
                return
            if message.op == "heartbeat":  # read at once, never queued: a stalled caller does not pile them up
                if generation == self._generation:
                    self._last_heard = time.monotonic()
                    self._stalled = (message.header.get("running"), float(message.header.get("stalled_s") or 0.0))
                continue
            self._inbox.put((generation, message))
            self._news.set()

    @property
    def _connecting(self) -> bool:
        """Whether the backend has not answered the hello yet."""
        hello = self._hello
        return hello is None or not hello.done

    def _dispatch_loop(self) -> None:
        while not self._closed:
            self.poll()
            time.sleep(0.01)

    # ---- requests ------------------------------------------------------------------------------------------
    def _request(self, header: dict, arrays: dict | None = None, finish=None, stream=None) -> Handle:
        with self._lock:
            if self._closed:
                raise BackendError("The backend client is closed.")
            if self._link is None:
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
            if self._link is None:
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
        action_header, action_arrays = to_message(action)
        streamed: dict[int, np.ndarray] = {}

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

        return self._object_request("step", volume, axes, key, state, window, target,
                                    ({"action": action_header}, action_arrays), finish, stream)

    def suggest(self, volume: Volume, view: View | str, key: str, state, window=None,
                target: str | None = None) -> Handle:
        """Where to click next on object ``key`` (:func:`..suggest.suggest`) in the backend, whose state is
        ``state`` (sent as :meth:`step` sends it; nothing changes). The result is a :class:`~..suggest.Suggestion`;
        an object with nothing to suggest fails with the reason."""
        from ..suggest import Suggestion

        return self._object_request("suggest", volume, slice_axes(volume, view), key, state, window, target,
                                    ({}, {}), lambda message: Suggestion.from_header(message.header["suggestion"]))

    def _object_request(self, op: str, volume: Volume, axes, key: str, state, window, target: str | None,
                        extra: tuple[dict, dict], finish, stream=None) -> Handle:
        """Request ``op`` on object ``key`` of ``volume``: the volume sent first if needed, the state whole or as
        the version the backend has, and sent again whole if the backend lost the state or the volume."""
        self.load_volume(volume)
        header = {"op": op, "volume": volume.identity, "view": axes.view.value, "window": _json_window(window),
                  "object": key, "target": target, **extra[0]}
        with self._lock:
            synced = self._synced.get(key)
            whole = synced is None or synced[1] is not state
            request = self._step_request(header, extra[1], state, synced, whole)
        handle = self._request(request[0], request[1], finish=finish, stream=stream)

        def resend() -> None:  # without its target: a newer request of that target may be queued already
            if volume.identity in self._loaded:
                self._loaded.remove(volume.identity)
            self.load_volume(volume)
            full_header, full_arrays = self._step_request({**header, "target": None}, extra[1], state, None, True)
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
            if not handle.done and self._link is not None:
                self._outbox.put(encode({"op": "cancel", "id": next(self._ids), "target": handle.id}))

    def status(self) -> Handle:
        """Device, model, cache and queue of the backend (a dict result)."""
        return self._request({"op": "status"}, finish=lambda m: m.header)

    # ---- replies -------------------------------------------------------------------------------------------
    def poll(self) -> list[Handle]:
        """Apply what arrived and check the backend is alive; returns the handles that changed. Never blocks."""
        changed: dict[int, Handle] = {}
        with self._lock:
            if (self._link is None and self._retry_at is not None and not self._closed
                    and time.monotonic() >= self._retry_at):
                self._start()  # reconnect to the server in the background, resuming the session
            items = []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            # Replies before failures: a server's refusal can reach the reader after the writer saw the connection
            # break, and it says more than the break does.
            for generation, item in sorted(items, key=lambda entry: isinstance(entry[1], str)):
                if generation != self._generation:
                    continue
                self._last_heard = time.monotonic()
                if isinstance(item, str):
                    self._fail_all(self._lost(item))
                    continue
                self._apply(item, changed)
            self._check_health(changed)
        return list(changed.values())

    def _apply(self, message: Message, changed: dict) -> None:
        op, request_id = message.op, message.header.get("id")
        handle = self._handles.get(request_id)
        if handle is None and op == "error" and self._hello is not None and not self._hello.done:
            handle = self._hello  # a server refuses a hello (wrong key, another version) before it has its id
        if handle is None:
            if op == "error":  # an error not tied to a request: the backend keeps serving, just note it
                self.errors.append(message.header.get("message", ""))
            return
        handle.received += len(json.dumps(message.header)) + sum(a.nbytes for a in message.arrays.values())
        if op == "error" and message.header.get("kind") in SELF_HEALING and handle.resend is not None:
            resend, handle.resend = handle.resend, None
            resend()  # the backend lost this object's state or volume (restarted, freed it): send them whole
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
                self._retry_at = None  # a refusal (key, version, full) is not retried by itself
                self._fail_all(f"The backend refused the connection: {text}", retry=False)
        elif op in ("cancelled", "dropped"):
            self._end(handle, op, message.header.get("message", ""))
        changed[handle.id] = handle

    def _end(self, handle: Handle, state: str, message: str) -> None:
        handle.state, handle.message = state, message
        self._handles.pop(handle.id, None)

    def _check_health(self, changed: dict) -> None:
        if self._link is None:
            return
        now = time.monotonic()
        problem = None
        ended = self._link.ended()
        if ended is not None:
            problem = self._lost(ended)
        elif now - self._last_heard > (self.startup_timeout if self._connecting else self.heartbeat_timeout):
            problem = f"The backend stopped answering for {now - self._last_heard:.0f} s and was stopped."
            if self.address is not None:
                problem = f"{self.address} stopped answering for {now - self._last_heard:.0f} s."
        elif self._stalled[1] > self.request_timeout and self._stalled[0] in self._handles:
            problem = (f"The backend spent over {self.request_timeout:g} s without progress on a "
                       f"{self._handles[self._stalled[0]].op} request and was stopped.")
        if problem:
            failed = list(self._handles.values())
            self._fail_all(problem)
            for handle in failed:
                changed[handle.id] = handle

    def _lost(self, why: str) -> str:
        """The message for a backend that went away because of ``why``."""
        if self.address is not None:
            return f"The connection to the server was lost: {why}."
        reason = self._link.exit_reason(0.2) if isinstance(self._link, ProcessLink) else ""
        return f"The backend process stopped: {why}{f' ({reason})' if reason and reason != why else ''}."

    def _fail_all(self, reason: str, retry: bool = True) -> None:
        """Stop the backend (or drop the connection) and fail every open request; the next request starts a
        fresh backend, or reconnects, which a server client also retries in the background."""
        self.last_failure = reason
        tail = _log_tail(self.log_path) if self.address is None else ""
        retrying = " Reconnecting in the background." if self.address is not None and retry else ""
        for handle in list(self._handles.values()):
            handle.error = BackendError(f"{reason} Nothing from this request was applied.{retrying}" + tail)
            handle.error.kind = "BackendDied"
            self._end(handle, "failed", str(handle.error))
        self._stop_link()
        if self.address is not None and retry and not self._closed:
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(30.0, self._retry_delay * 2)

    def _stop_link(self) -> None:
        link, self._link = self._link, None
        if self._outbox is not None:
            self._outbox.put(None)
        self._generation += 1
        if link is not None:
            link.stop()
            if isinstance(link, ProcessLink):  # a new process holds nothing; a server may resume the session
                self._loaded, self._synced = [], {}
                threading.Thread(target=link.process.wait, daemon=True).start()  # reap without blocking
            self.restarts += 1

    # ---- conveniences (these block: for the CLI, tests and scripts, not for a GUI thread) ------------------
    def wait(self, handle: Handle, timeout: float | None = None, on_event=None, cancel=None):
        """Poll until ``handle`` ends; return its result or raise its error (BackendError). ``on_event(*event)``
        gets each streamed event (a propagation's ``index, mask``) as it comes; ``cancel()`` true cancels the
        request (then :class:`~..propagation.Cancelled` is raised)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        asked = False
        while not handle.done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"The {handle.op} request did not finish within {timeout:g} s.")
            if cancel is not None and not asked and cancel():
                self.cancel(handle)
                asked = True
            self._news.clear()
            self.poll()
            for event in handle.take_events() if on_event is not None else ():
                on_event(*event)
            if not handle.done:
                self._news.wait(0.05)
        for event in handle.take_events() if on_event is not None else ():
            on_event(*event)
        if handle.state == "failed":
            raise handle.error
        if handle.state == "cancelled" and asked:
            from ..propagation import Cancelled

            raise Cancelled(handle.message or "Cancelled; nothing was applied.")
        if handle.state != "done":
            raise BackendError(f"The {handle.op} request was {handle.state}. {handle.message}".strip())
        return handle.result

    def close(self) -> None:
        """Shut the backend down (asking first, then killing), or end the session on the server; stop the client."""
        with self._lock:
            if self._link is not None:
                self._outbox.put(encode({"op": "shutdown", "id": next(self._ids)}))
                if isinstance(self._link, ProcessLink):
                    self._link.exit_reason(2.0)
                else:
                    time.sleep(0.05)  # let the writer send it
                self._fail_all("The backend client was closed.", retry=False)
            self._closed = True
            self._retry_at = None
            if self.log_path is not None and not self._log_given:
                self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_connection(server: str, key: str | None = None, cafile: str | None = None, timeout: float = 10.0,
                    rounds: int = 5) -> dict:
    """Connect to ``server`` (blocking: run it off the GUI thread) and return what it serves: ``release``,
    ``version``, ``model``, ``device``, ``engine`` and the median ``round_trip_ms`` of ``rounds`` status
    requests. :class:`BackendError` says why not: refused, unknown host, wrong key, another version, TLS,
    timeout."""
    client = BackendClient(server=server, key=key, cafile=cafile, connect_timeout=timeout,
                           heartbeat_timeout=timeout, startup_timeout=timeout)
    try:
        times = []
        for _ in range(rounds + 1):
            start = time.perf_counter()
            client.wait(client.status(), timeout)
            times.append((time.perf_counter() - start) * 1e3)
        info = {k: v for k, v in client.server_info.items() if k in ("release", "version", "model", "device",
                                                                       "engine")}
        return {**info, "round_trip_ms": round(float(np.median(times[1:])), 2)}  # the first one includes the hello
    except BackendError as error:
        raise BackendError(client.last_failure or str(error)) from None
    except TimeoutError:
        raise BackendError(f"{server} accepted the connection but did not answer within {timeout:g} s.") from None
    finally:
        client.close()


def _json_window(window):
    if window is None or isinstance(window, str):
        return window
    return [float(v) for v in window]


def _log_tail(path: Path | None, lines: int = 5) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return ("\nBackend log (" + str(path) + "):\n" + "\n".join(text)) if text else ""

"""The backend process: owns the model on one thread, serves requests from one local channel.

Run as ``python -m SegmentWithSAMLib.backend.server`` (the client does this) or ``segmentwithsam serve``. By
default it speaks on its stdin/stdout pipes and opens no socket; with ``--tcp HOST:PORT`` it listens on that
address (127.0.0.1 unless told otherwise) and serves one connection at a time, each of which must say hello
with the token from ``$SEGMENTWITHSAM_TOKEN`` first.

Threads: the reader answers hello/status/cancel/shutdown at once; the model thread runs the rest, in the order
:class:`~.scheduler.Scheduler` picks; a heartbeat thread says every :data:`HEARTBEAT_S` s that it is alive.
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import json
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ..actions import INTERACTIVE, KINDS
from ..cache import EmbeddingCache
from ..errors import BackendError, PromptError, ProtocolError, SegmentWithSAMError, VolumeError
from ..geometry import View, Volume
from ..models import DEFAULT_MODEL
from ..propagation import Cancelled
from ..state import ObjectState
from .protocol import DEFAULT_MAX_PAYLOAD, PROTOCOL_VERSION, TOKEN_ENV, Message, StreamReader, encode, write_all
from .scheduler import Scheduler, Task

HEARTBEAT_S = 0.25
QUEUED_OPS = {"load_volume", "unload_volume", "step"}
INTERACTIVE_ACTIONS = {name for name, kind in KINDS.items() if kind in INTERACTIVE}  # run before the others
MAX_STATES = 64  # object states kept between steps (least recently used go; their clients send them again)


class StateUnknown(ProtocolError):
    """The backend does not hold the object's state the client named (it restarted, or forgot it): the client
    sends the state whole and the step is done again."""


class Channel:
    """Where replies go: a write function (swapped per connection) behind a lock, so frames never mix."""

    def __init__(self, write: Callable[[bytes | memoryview], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._write = write

    def attach(self, write: Callable[[bytes | memoryview], None] | None) -> None:
        with self._lock:
            self._write = write

    def send(self, header: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        buffers = encode(header, arrays)
        with self._lock:
            if self._write is None:
                return
            try:
                for buffer in buffers:
                    self._write(buffer)
            except OSError:
                self._write = None  # the client went away; the reader will see the end of stream


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    return (oom_type is not None and isinstance(error, oom_type)) or "out of memory" in str(error).lower()


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
    """The request handler, independent of the channel: ``send(header, arrays)`` delivers replies.

    ``model`` may be given (tests); otherwise ``model_spec`` is loaded on the model thread when it starts.
    """

    def __init__(self, send: Callable[..., None], model_spec: str = DEFAULT_MODEL, device: str | None = None,
                 prefetch: int = 2, cache_bytes: int | None = None, model=None, engine: str = "auto") -> None:
        self.send = send
        self.scheduler = Scheduler()
        self.cache = EmbeddingCache(cache_bytes)
        self.model = model
        self.model_spec, self.device_spec, self.engine = model_spec, device, engine
        self.model_error: SegmentWithSAMError | None = None
        self.prefetch = max(0, int(prefetch))
        self.volumes: dict[str, Volume] = {}
        self.sessions: dict[tuple, object] = {}
        self.states: OrderedDict[str, tuple[int, ObjectState | None]] = OrderedDict()  # key → (version, state)
        self._versions = itertools.count(1)  # one counter for every state: a version names one state, ever
        self.stopping = threading.Event()

    # ---- reader thread -------------------------------------------------------------------------------------
    def reject(self, error: Exception, request_id=None) -> None:
        self.send({"op": "error", "id": request_id, "kind": type(error).__name__, "message": str(error)})

    def hello(self, message: Message) -> bool:
        version = message.header.get("version")
        if version != PROTOCOL_VERSION:
            self.reject(ProtocolError(f"The client speaks protocol version {version!r}; this backend speaks "
                                      f"{PROTOCOL_VERSION}. Update SegmentWithSAM so both come from one "
                                      f"release."), message.header.get("id"))
            return False
        self.send({"op": "hello", "id": message.header.get("id"), "version": PROTOCOL_VERSION, "pid": os.getpid()})
        return True

    def handle(self, message: Message) -> None:
        """Answer or queue one message from the client (called on the reader thread)."""
        header, op = message.header, message.op
        request_id = header.get("id")
        if type(request_id) is not int:
            self.reject(ProtocolError("Every request needs an integer 'id'."), None)
        elif op == "status":
            self.send({"op": "result", "id": request_id, **self.status()})
        elif op == "cancel":
            cancelled = self.scheduler.cancel(header.get("target"))
            if cancelled is not None:
                self.send({"op": "cancelled", "id": cancelled.id, "message": "Cancelled before it started."})
            self.send({"op": "result", "id": request_id})
        elif op == "shutdown":
            self.stop()
            self.send({"op": "result", "id": request_id})
        elif op in QUEUED_OPS:
            target, subject = header.get("target"), header.get("object")
            action = header.get("action") if isinstance(header.get("action"), dict) else {}
            interactive = op in ("load_volume", "unload_volume") or action.get("type") in INTERACTIVE_ACTIONS
            task = Task(request_id, op, header, message.arrays, target if isinstance(target, str) else None,
                        interactive, subject if isinstance(subject, str) else None)
            for stale in self.scheduler.submit(task):
                self.send({"op": "dropped", "id": stale.id})
        else:
            self.reject(ProtocolError(f"Unknown operation {op!r}."), request_id)

    def status(self) -> dict:
        model = self.model
        return {"pid": os.getpid(), "version": PROTOCOL_VERSION,
                "model": getattr(model, "name", None), "device": str(getattr(model, "device", "loading")),
                "engine": getattr(model, "engine", None),
                "model_error": str(self.model_error) if self.model_error else None,
                "encoder_runs": getattr(model, "encoder_runs", 0), "decoder_runs": getattr(model, "decoder_runs", 0),
                "cache": self.cache.stats(), "queue": self.scheduler.stats(), "volumes": list(self.volumes),
                "order": list(self.scheduler.order), "states": len(self.states),
                "prefetch": self.prefetch}

    def stop(self) -> None:
        self.stopping.set()
        for task in self.scheduler.drain():
            self.send({"op": "cancelled", "id": task.id, "message": "The backend is shutting down."})

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
                self._run(item)
                self.scheduler.finish(item)
            elif item is not None:
                self._prefetch_one(*item)

    def _run(self, task: Task) -> None:
        try:
            if self.model is None:
                raise self.model_error or BackendError("The model is not loaded.")
            else:
                header, arrays = getattr(self, "_" + task.op)(task)
            if task.cancel.is_set():
                self.send({"op": "cancelled", "id": task.id, "message": "Cancelled; nothing was applied."})
            else:
                self.send({"op": "result", "id": task.id, **header}, arrays)
        except SegmentWithSAMError as error:
            kind = "cancelled" if isinstance(error, Cancelled) else "error"
            self.send({"op": kind, "id": task.id, "kind": type(error).__name__, "message": str(error)})
        except Exception as error:  # the backend must keep serving whatever one request does
            if _is_out_of_memory(error):
                self.cache.clear()
                self.sessions.clear()
                torch = sys.modules.get("torch")
                if torch is not None and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.send({"op": "error", "id": task.id, "kind": "OutOfMemory",
                           "message": f"Out of memory on {getattr(self.model, 'device', '?')}: the embedding cache "
                                      f"was cleared and this request failed; the backend is still running."})
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
        self.scheduler.plan_prefetch(())
        return {"volume": volume_id}, None

    def _session(self, header: dict):
        from ..session import Session

        volume_id = header.get("volume")
        if volume_id not in self.volumes:
            raise VolumeError(f"The backend has no volume {volume_id!r}: load it first.")
        window = _window(header.get("window"))
        key = (volume_id, json.dumps(window))
        if key not in self.sessions:
            self.sessions[key] = Session(self.volumes[volume_id], self.model, window, self.cache)
        return key, self.sessions[key]

    def _plan_prefetch(self, key: tuple, view: View, index: int, count: int) -> None:
        near = [index + sign * d for d in range(1, self.prefetch + 1) for sign in (1, -1)]
        self.scheduler.plan_prefetch((key, view, i) for i in near if 0 <= i < count)

    def _prefetch_one(self, key: tuple, view: View, index: int) -> None:
        session = self.sessions.get(key)
        if session is not None:
            try:
                session.prefetch(view, index)
            except Exception as error:  # prefetch is best effort; the next real request reports problems
                if _is_out_of_memory(error):
                    self.cache.clear()
                self.scheduler.plan_prefetch(())

    def _let_through(self) -> None:
        """Between two slices of a long step: run the interactive tasks waiting (on other objects) now."""
        while (task := self.scheduler.take_interactive()) is not None:
            try:
                self._run(task)
            finally:
                self.scheduler.finish(task)

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
            self.scheduler.touch()
            self._let_through()
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


def _serve_connection(backend: Backend, reader: StreamReader, token: str | None) -> None:
    """Read messages until the stream ends or the backend stops. The first must be hello (with ``token``
    when one is set); a connection with a wrong token is answered and dropped."""
    greeted = False
    while not backend.stopping.is_set():
        try:
            message = reader.read()
        except ProtocolError as error:
            backend.reject(error)
            continue
        except (EOFError, OSError):
            return
        if message is None:
            return
        if not greeted:
            if message.op != "hello":
                backend.reject(ProtocolError("Say hello first: the protocol version is checked before anything "
                                             "else."), message.header.get("id"))
                continue
            if token is not None and not hmac.compare_digest(str(message.header.get("token", "")), token):
                backend.reject(BackendError("Wrong or missing token: connection refused."), message.header.get("id"))
                return
            greeted = backend.hello(message)
            continue
        backend.handle(message)


def _heartbeat(backend: Backend) -> None:
    while not backend.stopping.wait(HEARTBEAT_S):
        running, stalled = backend.scheduler.stalled()
        backend.send({"op": "heartbeat", "running": running, "stalled_s": round(stalled, 3)})


def serve(backend: Backend, channel: Channel, tcp: tuple[str, int] | None = None, token: str | None = None,
          max_payload: int = DEFAULT_MAX_PAYLOAD, watch_stdin: bool = False) -> None:
    """Serve on stdin/stdout (``tcp`` None) or on a TCP address until shutdown or the end of the channel."""
    threading.Thread(target=backend.serve_forever, name="model", daemon=True).start()
    threading.Thread(target=_heartbeat, args=(backend,), name="heartbeat", daemon=True).start()
    out_fd = os.dup(1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the channel
    if tcp is None:
        channel.attach(write_all(out_fd))
        _serve_connection(backend, StreamReader(lambda n: os.read(0, n), max_payload), None)
        backend.stop()
        return
    if token is None:
        raise BackendError(f"TCP needs a token in ${TOKEN_ENV}.")
    server = socket.create_server(tcp)
    os.write(out_fd, (json.dumps({"port": server.getsockname()[1]}) + "\n").encode())
    if watch_stdin:  # launched by a client: end with it
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), os._exit(0)), daemon=True).start()
    server.settimeout(0.5)
    while not backend.stopping.is_set():
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(None)
            channel.attach(conn.sendall)
            _serve_connection(backend, StreamReader(conn.recv, max_payload), token)
            channel.attach(None)
    time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segmentwithsam serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or checkpoint path")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--engine", default="auto",
                        help="auto (default), torch, openvino, openvino-f32 or openvino-bf16")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP instead of stdin/stdout")
    parser.add_argument("--prefetch", type=int, default=2, help="neighbouring slices to encode when idle")
    parser.add_argument("--cache-mb", type=int, default=None, help="embedding cache size (MB)")
    parser.add_argument("--max-payload-mb", type=int, default=DEFAULT_MAX_PAYLOAD >> 20)
    parser.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tcp = None
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        tcp = (host or "127.0.0.1", int(port))
    token = os.environ.get(TOKEN_ENV)
    if tcp is not None and not token:
        token = secrets.token_urlsafe(32)
        print(f"Token for clients: {token}", file=sys.stderr, flush=True)
    channel = Channel()
    backend = Backend(channel.send, args.model, args.device, args.prefetch,
                      None if args.cache_mb is None else args.cache_mb << 20, engine=args.engine)
    serve(backend, channel, tcp, token, args.max_payload_mb << 20, args.watch_stdin)
    sys.stderr.flush()
    os._exit(0)  # the model thread may be inside torch: skip C++ static destructors racing with it


if __name__ == "__main__":
    main()

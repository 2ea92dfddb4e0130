"""The backend process: owns the model on one thread, serves requests from one local channel.

Run as ``python -m SegmentWithSAMLib.backend.server`` (the client does this) or ``segmentwithsam serve``. By
default it speaks on its stdin/stdout pipes and opens no socket; with ``--tcp HOST:PORT`` it listens on that
address (127.0.0.1 unless told otherwise) and serves one connection at a time, each of which must say hello
with the token from ``$SEGMENTWITHSAM_TOKEN`` first.

Threads: the reader parses messages and answers hello/status/cancel/shutdown at once; the model thread runs
everything that touches the model (:class:`~.scheduler.Scheduler` picks what next); a heartbeat thread tells
the client every :data:`HEARTBEAT_S` seconds that the process is alive.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np

from ..cache import EmbeddingCache
from ..errors import BackendError, PromptError, ProtocolError, SegmentWithSAMError, VolumeError
from ..geometry import View, Volume
from ..models import DEFAULT_MODEL
from ..propagation import Cancelled
from .protocol import DEFAULT_MAX_PAYLOAD, PROTOCOL_VERSION, TOKEN_ENV, Message, StreamReader, encode
from .scheduler import Scheduler, Task

HEARTBEAT_S = 0.25
QUEUED_OPS = {"load_volume", "unload_volume", "predict", "propagate", "interact", "set_model"}


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


def _points(header: dict, name: str, columns: int) -> np.ndarray | None:
    value = header.get(name)
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise PromptError(f"{name} must be a list of numbers.") from None
    if array.size % columns or not np.all(np.isfinite(array)):
        raise PromptError(f"{name} must hold finite numbers in groups of {columns}.")
    return array.reshape(-1, columns)


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
            target = header.get("target") if op == "predict" else None
            task = Task(request_id, op, header, message.arrays, target if isinstance(target, str) else None)
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
                "prefetch": self.prefetch}

    def stop(self) -> None:
        self.stopping.set()
        for task in self.scheduler.drain():
            self.send({"op": "cancelled", "id": task.id, "message": "The backend is shutting down."})

    # ---- model thread --------------------------------------------------------------------------------------
    def _load_model(self, spec: str, device: str | None) -> None:
        from ..models import load_model

        self.model = load_model(spec, device, self.engine)
        self.model_spec, self.device_spec, self.model_error = spec, device, None
        self.sessions.clear()
        self.cache.clear()

    def serve_forever(self) -> None:
        """The model thread's loop: load the model, then run tasks and prefetch until stopped."""
        if self.model is None:
            try:
                self._load_model(self.model_spec, self.device_spec)
            except SegmentWithSAMError as error:
                self.model_error = error
            except Exception as error:  # requests must get a reason, not wait for a model that never comes
                traceback.print_exc(file=sys.stderr)
                self.model_error = BackendError(f"The model could not be loaded: {type(error).__name__}: {error}")
        while not self.stopping.is_set():
            item = self.scheduler.take(timeout=0.2)
            if isinstance(item, Task):
                self._run(item)
                self.scheduler.finish()
            elif item is not None:
                self._prefetch_one(*item)

    def _run(self, task: Task) -> None:
        try:
            if task.op == "set_model":
                self._load_model(str(task.header.get("model") or DEFAULT_MODEL), task.header.get("device"))
                header, arrays = {"model": self.model.name, "device": str(self.model.device)}, None
            elif self.model is None:
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
        matrix = _points(task.header, "ijk_to_ras", 4)
        if "array" not in task.arrays or matrix is None or matrix.shape != (4, 4):
            raise ProtocolError("load_volume needs an 'array' and a 4×4 'ijk_to_ras'.")
        volume = Volume(task.arrays["array"], matrix)
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

    def _predict(self, task: Task) -> tuple[dict, dict]:
        header = task.header
        key, session = self._session(header)
        view = View.parse(header.get("view") or "")
        labels = _points(header, "labels", 1)
        box = _points(header, "box_ras", 3)
        args = (view, _points(header, "points_ras", 3), None if labels is None else labels.ravel(), box)
        mode = header.get("mode", "refine")
        if mode not in ("refine", "prompts"):
            raise PromptError(f"Unknown prediction mode {mode!r}: use refine or prompts.")
        result = session.refine(*args) if mode == "refine" else session.segment(*args)
        self._plan_prefetch(key, result.view, result.index, result.axes.num_slices)
        return ({"view": result.view.value, "index": result.index, "score": result.score,
                 "timings_ms": result.timings_ms, "box": None if result.box is None else result.box.tolist(),
                 "notices": result.notices},
                {"mask2d": result.mask2d, "low_res_logits": np.asarray(result.low_res_logits, np.float32)})

    def _propagate(self, task: Task) -> tuple[dict, None]:
        from ..propagation import Propagator, StopRules

        header = task.header
        key, session = self._session(header)
        view = View.parse(header.get("view") or "")
        rules = header.get("rules") or {}
        try:
            rules = StopRules(**rules)
        except TypeError as error:
            raise PromptError(f"Unknown stop rule: {error}.") from None
        seeds_in, keys_in = header.get("seeds"), header.get("keys") or {}
        if not isinstance(seeds_in, dict) or not isinstance(keys_in, dict):
            raise PromptError("seeds and keys must map object names to slice indices.")
        try:
            seeds = {name: (int(index), task.arrays[f"seed/{name}"]) for name, index in seeds_in.items()}
            keys = {name: {int(i): task.arrays[f"key/{name}/{int(i)}"] for i in indices}
                    for name, indices in keys_in.items()}
        except (KeyError, TypeError, ValueError) as error:
            raise PromptError(f"A seed or key slice has no mask ({error}).") from None
        boxes = header.get("boxes") or {}
        if not isinstance(boxes, dict):
            raise PromptError("boxes must map object names to boxes.")
        try:  # their shapes are checked by the propagator
            boxes = {name: np.asarray(value, dtype=float) for name, value in boxes.items()}
        except (TypeError, ValueError):
            raise PromptError("Each box must be 4 numbers: x0, y0, x1, y1 in slice pixels.") from None
        skip = header.get("skip", 0)
        if not isinstance(skip, int) or isinstance(skip, bool):
            raise PromptError(f"skip must be a whole number, not {skip!r}.")
        propagator = Propagator(session, view, rules, skip=skip)
        total = propagator.axes.num_slices
        done = 0

        def on_slice(step) -> None:
            nonlocal done
            done += 1
            self.scheduler.touch()
            self.send({"op": "slice", "id": task.id, "index": step.index, "scores": step.scores,
                       "done": done, "total": total}, {f"mask/{name}": m for name, m in step.masks.items()})

        slice_range = header.get("range")
        result = propagator.run(seeds, header.get("direction", "both"), tuple(slice_range) if slice_range else None,
                                keys, on_slice=on_slice, cancel=task.cancel.is_set,
                                allow_overlap=bool(header.get("allow_overlap", False)), boxes=boxes or None)
        last = max((i for per in result.masks.values() for i in per), default=None)
        if last is not None:
            self._plan_prefetch(key, view, last, total)
        return {"stopped": result.stopped, "seconds": result.seconds, "slices": result.slice_count}, None


    def _interact(self, task: Task) -> tuple[dict, dict]:
        """One step of 3D interaction (:mod:`..interaction`) on an object whose state the client sends and
        keeps: ``action`` {"type": "box", "corners_ras", "range"} or {"type": "click", "point_ras", "positive"}.
        Replies with the changed slices, the stop reasons, notices and the new state."""
        from ..interaction import Interaction, ObjectState

        header = task.header
        key, session = self._session(header)
        interaction = Interaction(session, View.parse(header.get("view") or ""))
        name, action = str(header.get("name") or "object"), header.get("action")
        if header.get("state") is not None:
            interaction.objects[name] = ObjectState.from_message(header["state"], task.arrays,
                                                                 interaction.axes.image_shape)
        if not isinstance(action, dict) or action.get("type") not in ("box", "click"):
            raise PromptError("interact needs an action: {'type': 'box', ...} or {'type': 'click', ...}.")

        def cancelled() -> bool:  # asked after each slice: that is progress, and the moment to stop
            self.scheduler.touch()
            return task.cancel.is_set()

        if action["type"] == "box":
            corners, slice_range = _points(action, "corners_ras", 3), action.get("range")
            if corners is None or corners.shape != (2, 3):
                raise PromptError("A box action needs corners_ras: two RAS corners.")
            update = interaction.set_box_ras(name, corners, tuple(slice_range) if slice_range else None,
                                             cancel=cancelled)
        else:
            point = _points(action, "point_ras", 3)
            if point is None or point.shape != (1, 3):
                raise PromptError("A click action needs point_ras: one RAS point.")
            update = interaction.click_ras(name, point[0], bool(action.get("positive", True)), cancel=cancelled)
        state_header, state_arrays = interaction.objects[name].to_message()
        last = max(update.changed, default=None)
        if last is not None:
            self._plan_prefetch(key, interaction.axes.view, last, interaction.axes.num_slices)
        return ({"changed": sorted(update.changed), "stopped": update.stopped, "notices": update.notices,
                 "seconds": update.seconds, "state": state_header},
                {**{f"changed/{i}": m for i, m in update.changed.items()}, **state_arrays})


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


def _write_all(fd: int) -> Callable[[bytes | memoryview], None]:
    def write(buffer) -> None:
        view = memoryview(buffer)
        while view:
            view = view[os.write(fd, view):]
    return write


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
        channel.attach(_write_all(out_fd))
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
        import secrets

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

"""The network server: ``segmentwithsam serve --host H --port P`` serves many clients from one model.

- **Key first.** A connection's first frame must be a hello with the server's key; until then nothing is sent
  to it (a wrong key or another protocol version is answered once, then the connection is closed), frames may
  carry no arrays, and it has :data:`HANDSHAKE_S` s, so idle sockets hold no slot. At most
  :data:`MAX_HANDSHAKES` connections may be handshaking at once.
- **Sessions.** Each accepted connection is a session (:class:`~.server.Backend`: its volumes, states and
  cancels) on the shared :class:`~.worker.Worker`. A client that reconnects names its session and finds it as
  it was; a session whose client left is kept ``resume_s`` s (its work is cancelled at once), one without a
  request for ``idle_s`` s is closed, and at most ``max_sessions`` exist.
- **TLS.** With a certificate the server speaks only TLS. Without one it serves loopback addresses only,
  unless told ``--insecure``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

from ..errors import BackendError, ProtocolError
from .protocol import KEY_ENV, MIN_KEY_LENGTH, KeyRefused, StreamReader, VersionMismatch, check_hello, encode
from .server import Backend, Channel, serve_messages
from .tls import SerialTLS, cut, server_context
from .worker import Worker

DEFAULT_PORT = 8765
HANDSHAKE_S = 10.0
MAX_HANDSHAKES = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs TLS or --insecure)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--certfile", help="TLS certificate (PEM): serve over TLS")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM), if not in --certfile")
    parser.add_argument("--insecure", action="store_true",
                        help="serve a non-loopback address without TLS (only on a network you trust)")
    parser.add_argument("--key-file", help=f"read the access key from this file (else ${KEY_ENV}, else a new one "
                                           f"is made and printed)")
    parser.add_argument("--max-sessions", type=int, default=8, help="clients served at once (default 8)")
    parser.add_argument("--idle-timeout", type=float, default=1800,
                        help="close a session without requests for this many seconds (default 1800)")
    parser.add_argument("--resume-window", type=float, default=300,
                        help="keep a disconnected client's session this many seconds for it to resume (default 300)")
    parser.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)  # started by a local client


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback one."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as error:
        raise BackendError(f"Cannot listen on {host!r}: {error.strerror}.") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def read_key(key_file: str | None) -> tuple[str, bool]:
    """The access key (from ``key_file``, else ``$SEGMENTWITHSAM_KEY``, else a new one) and whether it is new."""
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise BackendError(f"Cannot read the key file {key_file}: {error.strerror}.") from None
    else:
        key = os.environ.get(KEY_ENV, "").strip()
        if not key:
            return secrets.token_urlsafe(32), True
    if len(key) < MIN_KEY_LENGTH:
        raise BackendError(f"The access key has {len(key)} characters; use at least {MIN_KEY_LENGTH} (e.g. "
                           f"python -c 'import secrets; print(secrets.token_urlsafe(32))').")
    return key, False


class Listener:
    """Accepts connections for ``worker``; see the module docstring."""

    def __init__(self, worker: Worker, key: str, tls: ssl.SSLContext | None = None, max_sessions: int = 8,
                 idle_s: float = 1800, resume_s: float = 300, max_payload: int | None = None) -> None:
        if max_sessions < 1:
            raise BackendError("--max-sessions must be at least 1.")
        self.worker, self.key, self.tls = worker, key, tls
        self.max_sessions, self.idle_s, self.resume_s = max_sessions, idle_s, resume_s
        self.max_payload = max_payload
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[Backend, Channel]] = {}
        self._connections: dict[str, socket.socket] = {}  # session id → its live connection
        self._left: dict[str, float] = {}  # session id → when its client left
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)

    def serve(self, server: socket.socket) -> None:
        """Accept connections on ``server`` until the worker stops."""
        threading.Thread(target=self._reap, name="session-reaper", daemon=True).start()
        server.settimeout(0.5)
        while not self.worker.stopping.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:  # out of descriptors, or the socket closed: keep serving those connected
                time.sleep(0.1)
                continue
            if not self._handshakes.acquire(blocking=False):
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a click's reply is small: send it now
            threading.Thread(target=self._connection, args=(conn,), name="connection", daemon=True).start()

    def _handshake(self, conn: socket.socket) -> tuple[socket.socket, StreamReader, dict] | None:
        """TLS, then the hello with the key; the connection and its hello, or None (closed, nothing sent)."""
        try:
            conn.settimeout(HANDSHAKE_S)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            reader = StreamReader(conn.recv, max_payload=0, resync=False)
            message = reader.read()
            if message is None:
                conn.close()
                return None
            check_hello(message.header, self.key)
            return conn, reader, message.header
        except (KeyRefused, VersionMismatch) as error:
            request_id = message.header.get("id")  # echoed only when it is a number
            _refuse(conn, encode({"op": "error", "id": request_id if type(request_id) is int else None,
                                  "kind": type(error).__name__, "message": str(error)}))
        except (ProtocolError, OSError, EOFError):
            pass
        conn.close()
        return None

    def _connection(self, conn: socket.socket) -> None:
        try:
            accepted = self._handshake(conn)
        finally:
            self._handshakes.release()
        if accepted is None:
            return
        conn, _, hello = accepted
        conn.settimeout(None)
        if isinstance(conn, ssl.SSLSocket):  # one thread at a time on the SSL object (see .tls)
            serial = SerialTLS(conn)
            read, write = serial.recv, serial.sendall
        else:
            read, write = conn.recv, conn.sendall
        reader = StreamReader(read, self.max_payload) if self.max_payload else StreamReader(read)
        try:
            session_id, backend, channel, resumed = self._open(hello.get("session"), conn)
        except BackendError as error:
            _refuse(conn, encode({"op": "error", "id": hello.get("id"), "kind": "ServerFull", "message": str(error)}))
            conn.close()
            return
        channel.attach(write, lambda: cut(conn))
        self.worker.attach(backend)
        backend.welcome(hello.get("id"), resumed)
        try:
            serve_messages(backend, reader)
        finally:
            self._leave(session_id, conn)

    def _open(self, wanted, conn: socket.socket) -> tuple[str, Backend, Channel, bool]:
        """The session ``wanted`` names (resumed; a connection still holding it is closed) or a new one."""
        with self._lock:
            if isinstance(wanted, str) and wanted in self._sessions:
                backend, channel = self._sessions[wanted]
                old = self._connections.pop(wanted, None)
                if old is not None:
                    cut(old)
                self._left.pop(wanted, None)
                self._connections[wanted] = conn
                return wanted, backend, channel, True
            if len(self._sessions) >= self.max_sessions and self._left:
                self._end(min(self._left, key=self._left.get))  # the session whose client left longest ago
            if len(self._sessions) >= self.max_sessions:
                raise BackendError(f"The server serves {self.max_sessions} sessions at most, and all are in use: "
                                   f"try again later.")
            session_id = secrets.token_urlsafe(16)
            channel = Channel()
            backend = Backend(channel.send, self.worker, session_id, lambda: self._close(session_id))
            self._sessions[session_id] = (backend, channel)
            self._connections[session_id] = conn
            return session_id, backend, channel, False

    def _leave(self, session_id: str, conn: socket.socket) -> None:
        """``conn`` ended: unless another connection resumed the session meanwhile, stop its work and keep it
        ``resume_s`` s for its client to come back."""
        conn.close()
        with self._lock:
            if self._connections.get(session_id) is not conn:
                return
            del self._connections[session_id]
            backend, channel = self._sessions[session_id]
            self.worker.detach(backend)
            channel.attach(None)
            for task in self.worker.scheduler.drain(backend):
                del task  # nobody to answer: the client failed its requests when the connection broke
            self._left[session_id] = time.monotonic()

    def _end(self, session_id: str) -> None:
        """Close a session and free its memory (the lock is held)."""
        backend, channel = self._sessions.pop(session_id)
        conn = self._connections.pop(session_id, None)
        self._left.pop(session_id, None)
        self.worker.detach(backend)
        backend.close()
        channel.attach(None)
        if conn is not None:
            cut(conn)

    def _close(self, session_id: str) -> None:
        """A client's shutdown request: its session ends, the server goes on."""
        with self._lock:
            if session_id in self._sessions:
                self._end(session_id)

    def _reap(self) -> None:
        while not self.worker.stopping.wait(min(1.0, self.resume_s / 4, self.idle_s / 4)):
            now = time.monotonic()
            with self._lock:
                for session_id, (backend, _) in list(self._sessions.items()):
                    left = self._left.get(session_id)
                    idle = now - backend.last_active > self.idle_s and not self.worker.scheduler.busy(backend)
                    if (left is not None and now - left > self.resume_s) or idle:
                        self._end(session_id)

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)


def _refuse(conn: socket.socket, frame: list) -> None:
    """Send a refusal, then read and drop what the peer still sends (up to 2 s) before the caller closes: closing
    with unread data would reset the connection, and the peer could lose the refusal with it."""
    try:
        conn.sendall(b"".join(frame))
        socket.socket.shutdown(conn, socket.SHUT_WR)
        conn.settimeout(0.5)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and socket.socket.recv(conn, 1 << 16):
            pass
    except OSError:
        pass


def _exit_when_stdin_closes() -> None:
    """End this process when stdin reaches its end (the local client that started it closed it, or died). It
    reads the descriptor itself, not ``sys.stdin``: a blocked read there holds the stream's lock, and a process
    forked meanwhile (OpenVINO's telemetry sender did) hung for good closing its copy of stdin."""
    while os.read(sys.stdin.fileno(), 4096):
        pass
    os._exit(0)


def serve_network(worker: Worker, args: argparse.Namespace, max_payload: int) -> None:
    """``segmentwithsam serve``'s network mode: check the address and TLS, print where and how to connect, serve."""
    if args.keyfile and not args.certfile:
        raise BackendError("--keyfile needs --certfile.")
    tls = server_context(args.certfile, args.keyfile) if args.certfile else None
    if tls is None and not args.insecure and not is_loopback(args.host):
        raise BackendError(
            f"Refusing to serve {args.host} without TLS: anyone on the network could read the images and masks. "
            f"Give --certfile (and --keyfile), or --insecure on a network you trust, or serve on 127.0.0.1 and "
            f"reach it through an SSH tunnel: on the client, ssh -N -L {args.port or DEFAULT_PORT}:127.0.0.1:"
            f"{args.port or DEFAULT_PORT} you@this-machine, then connect to tcp://127.0.0.1:"
            f"{args.port or DEFAULT_PORT}.")
    key, made = read_key(args.key_file)
    try:
        server = socket.create_server((args.host, args.port))
    except OSError as error:
        raise BackendError(f"Cannot listen on {args.host}:{args.port}: {error.strerror}.") from None
    host, port = server.getsockname()[:2]
    scheme = "tls" if tls else "tcp"
    print(f"Listening on {scheme}://{host}:{port}", flush=True)
    if not args.watch_stdin:
        print(f"Key: {key}" if made else f"Key: the one in {args.key_file or '$' + KEY_ENV}", flush=True)
        print(f"Clients connect to {scheme}://<this machine>:{port} with that key (${KEY_ENV}, or the panel's "
              f"Backend → a server). At most {args.max_sessions} sessions.", flush=True)
    else:  # started by a local client, which ends this process by closing its stdin
        threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    listener = Listener(worker, key, tls, args.max_sessions, args.idle_timeout, args.resume_window, max_payload)
    worker.start()
    listener.serve(server)

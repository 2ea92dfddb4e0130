"""How a client reaches a backend: a process of its own (on pipes, or on a loopback port), or a server at an
address (``tcp://host:port``, ``tls://host:port``); and what to tell the user when that fails."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import BackendError
from .protocol import LISTENING, write_all
from .tls import SerialTLS, cut

_LIB_PARENT = str(Path(__file__).resolve().parents[2])  # the folder that holds SegmentWithSAMLib
# Windows gives a console program (python.exe, PythonSlicer) started from a GUI a console window of its own.
# Slicer's slicer.util.launchConsoleProcess (Base/Python/slicer/util.py) hides it with a STARTUPINFO; the
# backend gets none at all (its output goes to pipes and a log file). The value of subprocess.CREATE_NO_WINDOW,
# which exists only on Windows.
CREATE_NO_WINDOW = 0x08000000


def popen_flags(platform: str = sys.platform) -> dict:
    """The extra :class:`subprocess.Popen` arguments that start the backend without a window on ``platform``."""
    return {"creationflags": CREATE_NO_WINDOW} if platform == "win32" else {}


@dataclass(frozen=True)
class Address:
    """A server's address: ``scheme`` "tcp" or "tls", ``host``, ``port``."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """``tcp://host:port`` or ``tls://host:port``; :class:`BackendError` saying what is wrong otherwise."""
        parts = urlsplit(text.strip())
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("tcp", "tls") or not parts.hostname or port is None or parts.path not in ("", "/"):
            raise BackendError(f"A server address is tcp://HOST:PORT or tls://HOST:PORT (TLS), not {text!r}.")
        return cls(parts.scheme, parts.hostname, port)


class Link:
    """A live channel to a backend: ``read(n)``, ``write(buffer)``, and how it ends."""

    read: Callable[[int], bytes]
    write: Callable[[bytes | memoryview], None]
    pid: int | None = None

    def ended(self) -> str | None:
        """Why the backend is gone (None while it seems alive)."""
        return None

    def stop(self) -> None:
        raise NotImplementedError


class ProcessLink(Link):
    """A backend process of this client's own: ``command`` run with ``key`` in its environment; ``transport``
    "pipe" (its stdin/stdout) or "tcp" (it listens on loopback and prints where)."""

    def __init__(self, command: list[str], key: str, key_env: str, log, transport: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_LIB_PARENT, env.get("PYTHONPATH")) if p)
        env[key_env] = key
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                        bufsize=0, close_fds=True, **popen_flags())
        self.pid = self.process.pid
        self.transport = transport
        self._socket: socket.socket | None = None

    def connect(self, timeout: float) -> None:
        """Open the channel (on a worker thread: a TCP backend must start listening first)."""
        if self.transport == "tcp":
            line = self.process.stdout.readline().decode(errors="replace")
            found = LISTENING.match(line)
            if not found:
                raise OSError("the backend ended before it listened")
            self._socket = socket.create_connection((found[2], int(found[3])), timeout=timeout)
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socket.settimeout(None)
            self.read, self.write = self._socket.recv, self._socket.sendall
        else:
            fd_in = self.process.stdout.fileno()
            self.read, self.write = (lambda n: os.read(fd_in, n)), write_all(self.process.stdin.fileno())

    def ended(self) -> str | None:
        code = self.process.poll()
        if code is None:
            return None
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def exit_reason(self, wait: float) -> str:
        try:
            self.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return ""
        return self.ended() or ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        if self._socket is not None:
            self._socket.close()


class ServerLink(Link):
    """A connection to a server at ``address``, over TLS for ``tls://`` (verified against the system's
    certificates, or ``cafile``)."""

    def __init__(self, address: Address, cafile: str | None = None) -> None:
        self.address, self.cafile = address, cafile
        self._socket: socket.socket | None = None
        self._closed = False

    def connect(self, timeout: float) -> None:
        sock = socket.create_connection((self.address.host, self.address.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a click is small: send it now
        try:
            if self.address.scheme == "tls":
                context = ssl.create_default_context(cafile=self.cafile)
                sock = context.wrap_socket(sock, server_hostname=self.address.host)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        if isinstance(sock, ssl.SSLSocket):  # read and written by two threads: one at a time (see .tls)
            serial = SerialTLS(sock)
            self.read, self.write = serial.recv, serial.sendall
        else:
            self.read, self.write = sock.recv, sock.sendall

    def ended(self) -> str | None:
        return "the connection was closed" if self._closed else None

    def stop(self) -> None:
        self._closed = True
        if self._socket is not None:
            cut(self._socket)
            self._socket.close()


def describe(error: BaseException | None, address: Address | None, timeout: float, connecting: bool) -> str:
    """What a failure to reach a backend, or the end of its stream (``error`` None), means, in words a user can
    act on; ``connecting``: before the server answered the hello."""
    if address is None:
        return "it exited" if error is None else f"the channel broke ({error})"
    if isinstance(error, ConnectionRefusedError):
        return (f"nothing answers at {address} (connection refused): is `segmentwithsam serve` running there, on "
                f"that port")
    if isinstance(error, socket.gaierror):
        return f"the host {address.host!r} is unknown ({error.strerror})"
    if isinstance(error, ssl.SSLCertVerificationError):
        return (f"the TLS certificate of {address} could not be verified ({error.verify_message}): give the "
                f"server's certificate as the CA file, or use one signed by a CA this computer trusts")
    if isinstance(error, TimeoutError):
        return f"{address} did not answer within {timeout:g} s (a firewall, or the wrong address?)"
    if connecting and address.scheme == "tls" and isinstance(error, ssl.SSLError | ConnectionError | EOFError):
        return f"the TLS handshake with {address} failed ({error}): does it serve TLS? For plain TCP use tcp://"
    if connecting:
        return (f"{address} closed the connection without answering: if it serves TLS, use tls://; else it is not "
                f"a SegmentWithSAM server")
    return f"the connection to {address} broke ({error or 'closed by the server'})"

"""TLS for the backend's connections: the server's context, and one TLS socket shared by a reader and a writer
thread.

OpenSSL allows one thread at a time on an SSL object, and CPython releases the GIL inside ``SSL_read`` and
``SSL_write``: a reader thread blocked in ``recv`` while a writer thread calls ``sendall`` corrupts records
("bad record MAC") and can crash the process. :class:`SerialTLS` makes the socket non-blocking and holds one
lock around every SSL call; threads wait for the socket with ``select`` outside the lock.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading

from ..errors import BackendError

WAIT_S = 0.5  # how long a thread waits in select before it tries the socket again


def server_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    """The server's TLS context from PEM files (the key may be inside ``certfile``); TLS 1.2 at least."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as error:
        raise BackendError(f"Cannot use the TLS certificate {certfile}: {error}.") from None
    return context


def cut(sock: socket.socket) -> None:
    """End a connection from another thread: the socket's own shutdown (never the SSL layer's, which would
    pull the SSL object from under a thread using it); its reader sees the end of the stream."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class SerialTLS:
    """``recv``/``sendall`` of an SSL socket whose handshake is done, safe from a reader and a writer thread."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        sock.setblocking(False)

    def recv(self, size: int) -> bytes:
        while True:
            with self._lock:
                try:
                    return self.sock.recv(size)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            self._wait([self.sock], [])

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            with self._lock:
                try:
                    view = view[self.sock.send(view):]
                    continue
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            self._wait([], [self.sock])

    def _wait(self, readable: list, writable: list) -> None:
        try:
            select.select(readable, writable, [], WAIT_S)
        except (OSError, ValueError):  # closed by another thread
            raise OSError("the connection was closed") from None

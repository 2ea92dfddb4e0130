"""Which backend the controller's client talks to: a process of its own on this computer (the default), or a
``segmentwithsam serve`` server at ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` with its access key and, for a TLS
server whose certificate no CA of this computer signed, that certificate as a CA file.

The key is kept in memory only (:attr:`BackendChoice.key`): the settings are saved in the scene file, the key must
not be. The desktop starts from ``$SEGMENTWITHSAM_KEY`` (:func:`key_from_environment`); the web app sets a key only
for the server its command line names (``segmentwithsam web --backend``) and binds none of the backend settings to
its page, so no page can make the web app's process send a key to an address of the page's choosing.
The connection test blocks on the network, so it runs on a thread of its own and the controller's poll takes its
outcome (:meth:`BackendChoice.start_test`, :meth:`BackendChoice.test_outcome`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from SegmentWithSAMLib.backend.client import BackendClient, check_connection
from SegmentWithSAMLib.backend.links import Address
from SegmentWithSAMLib.backend.protocol import KEY_ENV
from SegmentWithSAMLib.errors import BackendError, PromptError, SegmentWithSAMError

from .settings import BACKENDS

TEST_TIMEOUT_S = 10.0  # how long the connection test waits for each answer


def key_from_environment() -> str:
    """The access key a desktop session starts with: ``$SEGMENTWITHSAM_KEY`` if set, else none."""
    return os.environ.get(KEY_ENV, "").strip()


@dataclass(frozen=True)
class Server:
    """A server to use: its ``address`` (as :class:`~SegmentWithSAMLib.backend.links.Address` writes it), the
    access ``key`` (never shown in a repr) and ``cafile`` (None: this computer's CAs)."""

    address: str
    key: str = field(repr=False)
    cafile: str | None = None

    def client(self) -> BackendClient:
        """A client with a session on this server (it connects in the background, at the first request)."""
        return BackendClient(server=self.address, key=self.key, cafile=self.cafile)


class BackendChoice:
    """The chosen backend (:attr:`server`; None: this computer), the access :attr:`key`, and a connection test."""

    def __init__(self) -> None:
        self.key = ""
        self.server: Server | None = None
        self._test: dict | None = None

    def server_at(self, address: str, cafile: str = "") -> Server:
        """The server at ``address`` with :attr:`key` and ``cafile``; :class:`BackendError` saying what to fix
        when the address is empty or malformed, the key missing or the CA file not there."""
        if not address.strip():
            raise BackendError("Enter the server's address: tcp://HOST:PORT, or tls://HOST:PORT for TLS.")
        parsed = str(Address.parse(address))
        key = self.key.strip()
        if not key:
            raise BackendError(f"Enter the server's access key (the {KEY_ENV} that `segmentwithsam serve` was "
                               "started with).")
        cafile = cafile.strip()
        if cafile and not Path(cafile).expanduser().is_file():
            raise BackendError(f"The CA file {cafile} does not exist: give the server's certificate (PEM), or leave "
                               "it empty to trust the certificates this computer trusts.")
        return Server(parsed, key, str(Path(cafile).expanduser()) if cafile else None)

    def chosen(self, backend: str, address: str = "", cafile: str = "") -> Server | None:
        """The server ``backend`` "server" means (at ``address``), or None for "local"; :class:`BackendError`
        for anything wrong (see :meth:`server_at`)."""
        if backend not in BACKENDS:
            raise BackendError(f"The backend is one of {', '.join(BACKENDS)}, not {backend!r}.")
        return self.server_at(address, cafile) if backend == "server" else None

    # ---- the connection test -------------------------------------------------------------------------------
    @property
    def testing(self) -> bool:
        """Whether a connection test is running (or its outcome is not taken yet)."""
        return self._test is not None

    def start_test(self, address: str, cafile: str = "") -> str:
        """Check the server at ``address`` (with :attr:`key` and ``cafile``) on a thread; returns the status to
        show meanwhile. Bad input raises :class:`BackendError` at once, a second test :class:`PromptError`."""
        if self._test is not None:
            raise PromptError("A connection test is running: wait for its result.")
        server = self.server_at(address, cafile)
        # the outcome stays a failure unless the test returns, so a thread ended by anything at all reports one
        job = {"outcome": (f"The connection test of {server.address} stopped unexpectedly; try again.", True),
               "finished": False}

        def run() -> None:
            try:
                info = check_connection(server.address, server.key, server.cafile, TEST_TIMEOUT_S)
            except SegmentWithSAMError as error:
                job["outcome"] = (f"No connection to {server.address}: {error}", True)
            except Exception as error:  # any failure must end the test, or "Testing…" stays forever
                job["outcome"] = (f"The connection test of {server.address} failed unexpectedly: "
                                  f"{type(error).__name__} ({error}).", True)
            else:
                serves = f"{info['model']} on {info.get('device')}" if info.get("model") else "its model is loading"
                job["outcome"] = (f"Connected to {server.address}: SegmentWithSAM {info.get('release', '?')}, "
                                  f"{serves}, round trip {info['round_trip_ms']:.1f} ms.", False)
            finally:
                job["finished"] = True

        threading.Thread(target=run, name="connection-test", daemon=True).start()
        self._test = job  # only once the thread runs: a thread that never started would block every test
        return f"Testing the connection to {server.address}…"

    def test_outcome(self) -> tuple[str, bool] | None:
        """The finished test's status line (text, whether it failed), given once; None while it runs or without
        a test."""
        job = self._test
        if job is None or not job["finished"]:
            return None
        self._test = None
        return job["outcome"]

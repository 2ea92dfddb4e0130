"""The web app inside another Python program (tests, benchmarks, a notebook): served from a thread of this
process, with its own event loop, and reachable from the caller through :meth:`EmbeddedApp.call`."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

from .app import WebApp, WebOptions


class EmbeddedApp:
    """A :class:`~.app.WebApp` for ``options`` serving from a thread; every MRML object lives on that thread's
    loop, so the caller reads and changes them only through :meth:`call`."""

    def __init__(self, options: WebOptions, client_factory=None, start_timeout: float = 120.0) -> None:
        self.options, self.client_factory = options, client_factory
        self.app: WebApp | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="segmentwithsam-web", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout) or self._error is not None:
            raise RuntimeError(f"The web app did not start: {self._error or 'timed out'}")

    def _serve(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.app = WebApp(self.options, client_factory=self.client_factory)
            self.app.server.controller.on_server_ready.add(lambda **_: self._ready.set())
            self.app.start(thread=True)
        except Exception as error:  # handed to the constructor, which raises it
            self._error = error
            self._ready.set()
            return
        for view in self.app.slicer_app.view_manager.get_views():  # on the thread whose GL contexts they hold
            view.finalize()

    @property
    def url(self) -> str:
        return self.app.url

    def call(self, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Run ``fn()`` on the app's loop and return its result, awaited if it is awaitable (a page handler of
        :class:`~.app.WebApp`), or raise its exception."""

        async def run():
            result = fn()
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def until(self, condition: Callable[[], Any], timeout: float = 120.0, what: str = "the app") -> Any:
        """Run ``condition`` on the app's loop until it returns something true, and return that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.call(condition)
            if value:
                return value
            time.sleep(0.1)
        message = self.call(lambda: self.app.workflow.message)
        raise TimeoutError(f"Timed out after {timeout:g} s waiting for {what}; the app says: {message}")

    def close(self) -> None:
        """Stop the backend and the server, and wait for the thread to end."""
        self.call(self.app.workflow.close)
        asyncio.run_coroutine_threadsafe(self.app.server.stop(), self.loop).result(30)
        self._thread.join(30)

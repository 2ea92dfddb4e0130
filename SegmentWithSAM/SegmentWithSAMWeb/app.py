"""The web app: trame-slicer's ``SlicerApp`` and remote views, the page, and the loop that keeps the page in step
with the workflow; :func:`main` is ``segmentwithsam web``.

One process serves one scene: every page connected to it sees and edits the same volume and segmentation. The
trame server's asyncio loop runs everything that touches MRML; reading and writing files runs on worker
threads, and the model runs in the backend process (its client is polled from the loop every ``POLL_S``), or on
the ``segmentwithsam serve`` server that ``--backend`` names: the operator's choice, which no page can change.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import itertools
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from aiohttp import web
from trame.app import get_server
from trame_server.utils.asynchronous import create_task
from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui, create_vertical_view_gutter_ui
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from SegmentWithSAMLib.backend.links import Address
from SegmentWithSAMLib.backend.listener import read_key
from SegmentWithSAMLib.backend.protocol import KEY_ENV as BACKEND_KEY_ENV
from SegmentWithSAMLib.data import colin27
from SegmentWithSAMLib.errors import BackendError, PromptError, SegmentWithSAMError
from SegmentWithSAMLib.io import SEGMENTATION_SUFFIX
from SegmentWithSAMLib.models import DEFAULT_MODEL, registry
from SegmentWithSAMSlicerLib.backend_choice import BackendChoice, Server, key_from_environment
from SegmentWithSAMSlicerLib.settings import Settings, coerce

from .page import build_page, view_marker
from .security import (
    KEY_ENV,
    DataFolder,
    OwnOrigin,
    ServeError,
    UploadedFile,
    Uploads,
    access_key,
    default_data_folder,
    is_loopback,
    page_url,
    read_checked,
    tls_context,
)
from .workflow import WebWorkflow

POLL_S = 0.05
LAYOUT = "SegmentWithSAM"
OPERATOR_SETTINGS = ("backend", "server_address", "server_cafile")  # from the command line only, never the page


@dataclass
class WebOptions:
    """What ``segmentwithsam web`` was started with (see :func:`parse_args`)."""

    volumes: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8080
    key: str | None = None  # for a program that embeds the app; the command reads --key-file or the environment
    key_file: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    data: str | None = None  # None: a private folder of the user's (see security.default_data_folder)
    max_upload_mb: float = 1024.0
    model: str = DEFAULT_MODEL
    device: str = "auto"
    multisamples: int = 0
    backend: str | None = None  # a server's address (tcp:// or tls://); None: a backend process on this computer
    backend_cafile: str | None = None
    backend_key_file: str | None = None  # else $SEGMENTWITHSAM_KEY


def parse_args(argv: list[str]) -> WebOptions:
    # no abbreviations: "--backend-key SECRET" must be refused, not read as --backend-key-file's file name
    parser = argparse.ArgumentParser(prog="segmentwithsam web", description="SegmentWithSAM in a web browser.",
                                     allow_abbrev=False)
    parser.add_argument("volumes", nargs="*", metavar="VOLUME", help="volumes to offer (the first is opened)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs --certfile)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = a free one)")
    parser.add_argument("--key-file", help=f"read the access key every connection must present from this file "
                        f"(default ${KEY_ENV}, else a new one, printed in the URL)")
    parser.add_argument("--certfile", help="TLS certificate (PEM): serve https (needed off 127.0.0.1)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM), if not in --certfile")
    parser.add_argument("--data", help="the only folder files are opened from and saved to (default: "
                        "segmentwithsam/web in your data folder, ~/.local/share, readable by you only)")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload (default 1024 MB)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model at start (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    parser.add_argument("--multisamples", type=int, default=0,
                        help="anti-aliasing samples per view (default 0: about half the render time of 8)")
    parser.add_argument("--backend", metavar="ADDRESS",
                        help="run the model on a server (segmentwithsam serve) at tcp://HOST:PORT or tls://HOST:PORT, "
                             f"with its key in ${BACKEND_KEY_ENV} or --backend-key-file; the server's model is used "
                             "(--model and --device are ignored), and pages cannot change it")
    parser.add_argument("--backend-cafile", metavar="PEM",
                        help="the certificate a TLS server's is checked against, if this computer's CAs do not know it")
    parser.add_argument("--backend-key-file", metavar="FILE",
                        help=f"read the server's access key from this file (default ${BACKEND_KEY_ENV})")
    return WebOptions(**vars(parser.parse_args(argv)))


def backend_server(options: WebOptions) -> Server | None:
    """The server ``--backend`` names, with its key (from ``--backend-key-file``, else ``$SEGMENTWITHSAM_KEY``:
    never a command-line value) and CA file, checked by the desktop's rules; None: a process on this computer.
    :class:`BackendError` saying what to fix, before anything starts."""
    if not options.backend:
        if options.backend_cafile or options.backend_key_file:
            raise BackendError("--backend-cafile and --backend-key-file go with --backend tcp://HOST:PORT or "
                               "tls://HOST:PORT.")
        return None
    Address.parse(options.backend)  # a malformed address is named before a missing key
    choice = BackendChoice()
    choice.key = read_key(options.backend_key_file)[0] if options.backend_key_file else key_from_environment()
    if not choice.key:
        raise BackendError(f"--backend needs the server's access key: set ${BACKEND_KEY_ENV} or give "
                           "--backend-key-file FILE (never the key itself: a command line is visible to all).")
    return choice.server_at(options.backend, options.backend_cafile or "")


def configure_environment() -> None:
    """Before VTK makes a window and trame reads its options: EGL off-screen rendering without an X display,
    trame's own command-line parsing off (this app passes it everything), wslink's start-up line silenced."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    os.environ["TRAME_ARGS"] = ""
    os.environ["WSLINK_READY_MSG"] = ""


def slice_view_ui(server, view_id: str, view) -> None:
    create_vertical_slice_view_gutter_ui(server, view_id, view)
    view_marker(server, view_id, view)


def threed_view_ui(server, view_id: str, view) -> None:
    create_vertical_view_gutter_ui(server, view_id, view)
    view_marker(server, view_id, view)


def action(method):
    """A page handler: one user action of the front end (its error is the status line until the next one), and
    the page shows the outcome at once."""

    @functools.wraps(method)
    async def run(self, *args):
        self.workflow.front.begin()
        try:
            result = method(self, *args)
            return await result if inspect.isawaitable(result) else result
        except SegmentWithSAMError as error:
            self.workflow.front.say(str(error), error=True)
            return None
        finally:
            self.push()

    return run


_INSTANCES = itertools.count(1)


class WebApp:
    """The app for ``options``; ``client_factory(model, device)`` makes the backend client (tests choose)."""

    def __init__(self, options: WebOptions, server=None, client_factory=None) -> None:
        self.options = options
        self.tls = tls_context(options.host, options.certfile, options.keyfile)
        self.key, self.key_generated = access_key(options.key, options.key_file)
        self.backend_server = backend_server(options)
        if self.backend_server is not None and self.backend_server.key == self.key:
            raise ServeError("The web app's access key is the server's: everyone given the page's address would hold "
                             "the server's key. Give the web app a key of its own (or none: a new one is made).")
        configure_environment()
        self.own_origin = OwnOrigin.serving(options.host, self.tls is not None)
        self.data = DataFolder(options.data or default_data_folder())
        self.uploads = Uploads(int(options.max_upload_mb * 2**20))
        # a trame server of its own: apps in one process (embedded ones) must not share their state and handlers
        self.server = server or get_server(f"segmentwithsam-{next(_INSTANCES)}", client_type="vue3")
        self.state = self.server.state
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server, slice_view_ui_f=slice_view_ui,
                               three_d_view_ui_f=threed_view_ui)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        column = LayoutDirection.Vertical
        self.layout_manager.register_layout(LAYOUT, Layout(LayoutDirection.Horizontal, [
            Layout(column, [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view()]),
            Layout(column, [ViewLayoutDefinition.threed_view(), ViewLayoutDefinition.sagittal_view()])]))
        self.layout_manager.set_layout(LAYOUT)
        self.workflow = WebWorkflow(self.slicer_app, client_factory, multisamples=options.multisamples,
                                    server=self.backend_server)
        self.workflow.settings.model, self.workflow.settings.device = options.model, options.device
        # the page's state keys are the settings' names, but for those that say where the model runs
        self.settings_keys = [f.name for f in fields(Settings) if f.name not in OPERATOR_SETTINGS]
        self.given = {Path(v).name: Path(v) for v in options.volumes}  # offered besides the data folder
        self.models = [options.model, *(name for name in registry() if name != options.model)]
        build_page(self, self.layout_manager, self.models, self.uploads.max_bytes)
        self.state.update({"sam": self.workflow.snapshot(), "upload_refused": "", "data_files": self.choices(),
                           "model_download": "", "trame__title": "SegmentWithSAM"})
        self.server.cli.set_defaults(authKey=self.key)
        self.server.controller.on_server_bind.add(self._on_bind)
        self.state.change("place_kind")(self._on_place_kind)
        self.state.change("display_window")(self._on_display_window)
        self.state.change("model")(self._on_model)
        self.state.change(*(name for name in self.settings_keys if name != "model"))(self._on_setting)
        self.state.change(*OPERATOR_SETTINGS)(self._on_operator_setting)
        self.server.controller.on_server_ready.add(self._on_ready)
        self._shown: dict = {}

    # ---- start-up and the loop -----------------------------------------------------------------------------
    def start(self, **kwargs) -> None:
        """Listen on the options' host and port (``kwargs`` go to trame's ``server.start``)."""
        self.server.start(port=self.options.port, host=self.options.host, open_browser=False,
                          show_connection_info=False, timeout=0, **kwargs)

    @property
    def url(self) -> str:
        return page_url(self.options.host, self.server.port, self.key, self.tls is not None)

    def _on_bind(self, wslink_server) -> None:
        """Before wslink listens: its TLS context, and the check of every request's Host and Origin first."""
        if self.tls is not None:
            wslink_server.config["ssl"] = self.tls
        wslink_server.app.middlewares.insert(0, self._own_pages_only)

    @web.middleware
    async def _own_pages_only(self, request: web.Request, handler):
        """403 for a request (page, script, websocket upgrade) that does not name this server as its Host and,
        when sent, its Origin (see :class:`~.security.OwnOrigin`)."""
        local = request.transport.get_extra_info("sockname") if request.transport else None
        refusal = "Refused: the connection is gone." if not local else self.own_origin.refusal(
            request.headers.get("Host"), request.headers.get("Origin"), local[:2])
        if refusal:
            return web.Response(status=403, text=refusal)
        return await handler(request)

    def _on_ready(self, **_) -> None:
        print(f"SegmentWithSAM is running at {self.url}", flush=True)
        print("Open that address: every page needs the access key in it" + (
            " (a new one at each start; keep it to yourself)." if self.key_generated else "."), flush=True)
        given = "" if self.options.data else " (--data chooses another folder)"
        server = self.backend_server
        if server is not None:
            address = Address.parse(server.address)
            clear = address.scheme == "tcp" and not is_loopback(address.host)
            print(f"The model runs on the server {server.address}; the page shows its state." + (
                " Warning: without TLS the key, the images and the masks cross the network in clear (use tls://, "
                "or an SSH tunnel to tcp://127.0.0.1)." if clear else ""), flush=True)
        print(f"Files are opened from and saved to {self.data.root}{given}", flush=True)
        create_task(self._poll_loop())
        if self.given:
            create_task(self.open_choice(next(iter(self.given))))

    async def _poll_loop(self) -> None:
        while True:
            self.workflow.poll()
            with self.state:
                self.push()
            await asyncio.sleep(POLL_S)

    def push(self) -> None:
        """Copy the workflow's snapshot into the page's state when it changed."""
        workflow = self.workflow
        if workflow.placing and not workflow.place_mode.active:  # Slicer left place mode by itself (a box placed)
            self._guarded(lambda: workflow.place(None))
        snapshot = workflow.snapshot()
        if snapshot != self._shown:
            self._shown = snapshot
            self.state.sam = snapshot
            self.state.place_kind = snapshot["placing"]

    def choices(self) -> list[str]:
        return [*self.given, *self.data.volumes()]

    # ---- state bindings ------------------------------------------------------------------------------------
    def _on_place_kind(self, place_kind=None, **_) -> None:
        if place_kind != self.workflow.placing:
            self._guarded(lambda: self.workflow.place(place_kind))

    def _on_display_window(self, display_window="volume", **_) -> None:
        if self.workflow.volume_node is not None:
            self._guarded(lambda: self.workflow.set_display_window(display_window))

    def _on_setting(self, **_) -> None:
        settings = self.workflow.settings
        for name in self.settings_keys:
            if name != "model" and name in self.state:
                try:
                    setattr(settings, name, coerce(name, self.state[name]))
                except ValueError as error:
                    self.workflow.front.say(str(error), error=True)

    def _on_operator_setting(self, **_) -> None:
        """A page sent a value for where the model runs: never applied (see ``OPERATOR_SETTINGS``)."""
        if any(self.state[name] is not None for name in OPERATOR_SETTINGS):
            self.workflow.front.say("Where the model runs is chosen when the web app is started (segmentwithsam web "
                                    "--backend ADDRESS); a page cannot change it.", error=True)

    def _on_model(self, model=DEFAULT_MODEL, **_) -> None:
        self.state.model_download = ""
        if model not in self.models:  # the page offers these: no other name, nor a path to load a file from
            self.workflow.front.say(f"Choose one of the models offered ({', '.join(self.models)}).", error=True)
            return
        self.workflow.settings.model = model
        try:
            entry = self.workflow.front.model_to_download()
        except SegmentWithSAMError as error:
            self.workflow.front.say(str(error), error=True)
            return
        if entry is not None:
            self.state.model_download = entry.name
            self.workflow.front.say(f"{entry.name} is not downloaded yet ({entry.size / 1e6:.0f} MB, licence "
                                    f"{entry.licence}): 'Download the model' gets it (SHA-256 checked).")

    def _guarded(self, change) -> None:
        try:
            change()
        except SegmentWithSAMError as error:
            self.workflow.front.say(str(error), error=True)

    # ---- opening -------------------------------------------------------------------------------------------
    @action
    async def open_sample(self) -> None:
        data = colin27()
        volume = await asyncio.to_thread(read_checked, data.image, "Colin27")
        self.workflow.load_volume(volume, "Colin27")
        self.state.save_name = "Colin27-segment.seg.nrrd"

    @action
    async def open_data_file(self) -> None:
        await self.open_choice(self.state.data_choice)

    async def open_choice(self, name: str) -> None:
        """Open ``name``: a volume given on the command line or in the data folder (a .seg.nrrd there opens as
        the segmentation of the loaded volume)."""
        path = self.given.get(name) or self.data.resolve(name)
        if path.name.lower().endswith(SEGMENTATION_SUFFIX):
            self.workflow.load_segmentation(path)
            return
        volume = await asyncio.to_thread(read_checked, path, name)
        stem = name.rstrip("/").split("/")[-1].split(".")[0] or "volume"
        self.workflow.load_volume(volume, stem)
        self.state.save_name = f"{stem}-segment.seg.nrrd"

    @action
    async def upload(self, files: list[dict]) -> None:
        """Files sent by the page: size-checked (from what the browser says, then the bytes), read and checked
        by the core in a private folder, and only then loaded; a bad upload changes nothing."""
        self.uploads.check_sizes([int(f.get("size") or 0) for f in files])
        uploaded = [UploadedFile(str(f.get("name", "")), _content(f)) for f in files]
        name, volume = await asyncio.to_thread(self.uploads.read, uploaded)
        self.workflow.load_volume(volume, name)
        self.state.save_name = f"{name}-segment.seg.nrrd"

    # ---- prompts, accept, undo, propagation ----------------------------------------------------------------
    @action
    def accept(self) -> None:
        self.workflow.accept()

    @action
    def clear_prompts(self) -> None:
        self.workflow.clear_prompts()

    @action
    def undo(self) -> None:
        self.workflow.undo()

    @action
    def redo(self) -> None:
        self.workflow.redo()

    @action
    def propagate(self) -> None:
        self.workflow.propagate()

    @action
    def cancel(self) -> None:
        self.workflow.cancel()

    @action
    def whole_range(self) -> None:
        self.workflow.front.all_slices = True

    @action
    def suggest(self) -> None:
        self.workflow.front.suggest()

    @action
    def take_suggestion(self) -> None:
        self.workflow.front.take_suggestion()

    @action
    def download_model(self) -> None:
        entry = self.workflow.front.model_to_download()
        if entry is not None:
            self.workflow.controller.start_download(entry)
        self.state.model_download = ""

    # ---- segments ------------------------------------------------------------------------------------------
    @action
    def select_segment(self, segment_id: str) -> None:
        self.workflow.editor.set_active_segment_id(segment_id)

    @action
    def add_segment(self) -> None:
        self.workflow.add_segment()

    @action
    def rename_segment(self, segment_id: str, name: str) -> None:
        self.workflow.set_segment(segment_id, name=name)

    @action
    def recolor_segment(self, segment_id: str, color_hex: str) -> None:
        self.workflow.set_segment(segment_id, color_hex=color_hex)

    @action
    def toggle_segment(self, segment_id: str) -> None:
        editor = self.workflow.editor
        editor.set_segment_visibility(segment_id, not editor.get_segment_visibility(segment_id))

    @action
    def toggle_finished(self, segment_id: str) -> None:
        self.workflow.toggle_finished(segment_id)

    @action
    def delete_segment(self, segment_id: str) -> None:
        self.workflow.editor.remove_segment(segment_id)

    # ---- saving --------------------------------------------------------------------------------------------
    @action
    async def save(self) -> None:
        """Save the active segment into the data folder under the page's file name."""
        path = self.data.output(self.state.save_name or "")
        voxels = await asyncio.to_thread(self.workflow.export().write, path)
        self.workflow.front.say(f"Saved {voxels} voxels to {path.name} in the data folder.")
        self.state.data_files = self.choices()

    @action
    async def download(self, suffix: str):
        """The active segment as a file for the browser to save (over the authenticated websocket)."""
        _name, content = await asyncio.to_thread(self.workflow.export().to_bytes, suffix)
        return self.server.protocol.addAttachment(content)


def _content(file: dict) -> bytes:
    content = file.get("content")
    if isinstance(content, list):
        content = b"".join(content)
    if not isinstance(content, bytes | bytearray):
        raise PromptError(f"The upload of {file.get('name', 'a file')} arrived without its content; try again.")
    return bytes(content)


def main(argv: list[str]) -> int:
    """``segmentwithsam web``: start the app and serve until interrupted."""
    options = parse_args(argv)
    app = WebApp(options)
    try:
        app.start()
    finally:
        app.workflow.close()
    return 0

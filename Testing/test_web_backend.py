"""``segmentwithsam web --backend``: the web app with its model on a ``segmentwithsam serve`` server.

The command's backend options are checked before anything starts (exit status 2, one line). Then one web app, in
this process on a trame server of its own that never listens (a page's state changes reach it through trame's
state, as a browser's ``trame.state.update`` does), uses a real server over TLS (``test_remote``'s helpers and
certificate): the page's backend line says where the model runs and what it does, a box through the web workflow
gives the mask of the same model in this process, no page state moves the backend (a decoy listener sees no
connection), and a server killed and started again is shown as lost, reconnecting, then ready. No browser.
"""

from __future__ import annotations

import re
import socket
import time

import numpy as np
import pytest

from SegmentWithSAMLib.actions import prompt_from_ras
from SegmentWithSAMLib.api import Segmenter
from SegmentWithSAMLib.backend.protocol import KEY_ENV
from SegmentWithSAMLib.cli import main as cli
from SegmentWithSAMLib.data import colin27
from SegmentWithSAMLib.geometry import View, slice_axes

from conftest import structure_box_ras

pytest.importorskip("trame_slicer", reason="needs the web extra (pip install -e .[web])")

from test_remote import KEY, Server, certificates  # noqa: E402,F401 (certificates: a fixture)
from trame.app import get_server  # noqa: E402

from SegmentWithSAMSlicerLib import mrml  # noqa: E402
from SegmentWithSAMWeb.app import WebApp, WebOptions  # noqa: E402
from SegmentWithSAMWeb.security import KEY_ENV as WEB_KEY_ENV  # noqa: E402

READY = re.compile(r"server tls://127\.0\.0\.1:\d+ · litemedsam on cpu \(\w+\) · ready")


@pytest.mark.parametrize(("args", "environment", "message"), [
    (["--backend", "gpu-host:8765"], {KEY_ENV: KEY}, "A server address is tcp://HOST:PORT or tls://HOST:PORT"),
    (["--backend", "tls://gpu-host:8765"], {}, f"--backend needs the server's access key: set ${KEY_ENV}"),
    (["--backend", "tls://gpu-host:8765", "--backend-key-file", "{tmp}/missing"], {}, "Cannot read the key file"),
    (["--backend", "tls://gpu-host:8765", "--backend-key-file", "{tmp}/short"], {}, "use at least 16"),
    (["--backend", "tls://gpu-host:8765", "--backend-cafile", "{tmp}/missing.pem"], {KEY_ENV: KEY},
     "does not exist"),
    (["--backend-key-file", "{tmp}/short"], {}, "go with --backend"),
    (["--backend", "tcp://127.0.0.1:8765"], {KEY_ENV: KEY, WEB_KEY_ENV: KEY}, "access key is the server's"),
])
def test_bad_backend_options_exit_2_before_anything_starts(args, environment, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "short").write_text("too-short\n")
    for name in (KEY_ENV, WEB_KEY_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert cli(["web", "--port", "0", "--data", str(tmp_path), *(a.format(tmp=tmp_path) for a in args)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("segmentwithsam: error:") and message in err and err.count("\n") == 1, err
    assert "running at" not in out
    with pytest.raises(SystemExit) as refused:  # the key is never a command-line value, nor read as a file name
        cli(["web", "--backend", "tls://gpu-host:8765", "--backend-key", KEY])
    assert refused.value.code == 2


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certificates):  # noqa: F811 (test_remote's fixture)
    server = Server(tmp_path_factory.mktemp("web-backend-server"), "--certfile", str(certificates[0]))
    yield server
    server.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, tls_server, certificates):  # noqa: F811
    """The web app on ``tls_server``, with the key in a file; polled by :func:`until` as its loop would."""
    if colin27().shipped:
        pytest.skip("needs Debian's mricron-data package (Colin27 and AAL)")
    folder = tmp_path_factory.mktemp("web-backend")
    (folder / "server.key").write_text(KEY)
    options = WebOptions(port=0, key="the-web-apps-own-key", data=str(folder), device="cpu",
                         backend=tls_server.address, backend_cafile=str(certificates[1]),
                         backend_key_file=str(folder / "server.key"))
    web = WebApp(options, server=get_server("test-web-backend", client_type="vue3"))
    web.state.ready()  # as when trame serves: state changes now reach the app's listeners
    yield web
    web.workflow.close()
    for view in web.slicer_app.view_manager.get_views():
        view.finalize()


def until(app, condition, timeout: float, what: str):
    """Poll the app as its loop does until ``condition()`` holds; returns its value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s; backend: {app.workflow.backend_state()}, "
                                 f"status: {app.workflow.message}")
        app.workflow.poll()
        app.push()
        time.sleep(0.05)
    return value


def place_box(app, volume, atlas) -> int:
    """The box a user drags around the left hippocampus on its middle axial slice (as deep as its shorter side),
    with the axial view on that slice; returns the slice."""
    index, corners = structure_box_ras(volume, atlas, slice_axes(volume, "axial"), "Hippocampus_L")
    size = np.abs(corners[1] - corners[0])
    size[size == 0] = size[size > 0].min()
    app.slicer_app.view_manager.get_view("Red").set_slice_value(float(corners[0][2]))
    box = app.workflow.prompts["box"]
    box.SetCenter(*corners.mean(axis=0))
    box.SetSize(*size)
    return index


def test_a_box_on_the_server_gives_the_in_process_mask_and_the_page_says_where(app, tls_server, colin, atlas,
                                                                               default_model):
    workflow = app.workflow
    until(app, lambda: READY.fullmatch(app.state.sam["backend"]), 180, "ready backend line")  # before any prompt
    assert app.state.sam["server"] is True
    workflow.load_volume(colin, "Colin27")
    index = place_box(app, colin, atlas)
    until(app, lambda: workflow.controller.preview_result, 300, "preview")
    served = workflow.controller.preview_result.changed[index]

    volume, box = workflow.controller.volume(workflow.volume_node), workflow.prompts["box"]
    window = workflow.controller.window(workflow.volume_node, workflow.settings.model_window)
    axes = slice_axes(volume, View.AXIAL)
    action = prompt_from_ras(volume, axes, np.zeros((0, 3)), np.zeros(0), mrml.roi_box(box, volume, View.AXIAL),
                             mrml.roi_slice_range(box, volume, View.AXIAL))  # as the web workflow's request
    here = Segmenter(volume, default_model, View.AXIAL, window=window).step("hippocampus", action)
    assert served.any() and np.array_equal(served, here.changed[index])
    status = workflow.controller.client.wait(workflow.controller.client.status(), 60)
    assert status["volumes"] == [volume.identity]  # the volume went to the server


def test_a_page_cannot_move_the_backend(app, tls_server, colin, atlas):
    """A page that sends the backend's settings (as a browser can send any state key) changes nothing and is
    told so; the next prompt still goes to the operator's server, none to the page's address; the page's own
    settings still apply."""
    workflow, decoy = app.workflow, socket.create_server(("127.0.0.1", 0))
    decoy.setblocking(False)
    chosen = workflow.controller.backend.server
    with decoy:
        changes = ({"backend": "local"}, {"server_address": f"tcp://127.0.0.1:{decoy.getsockname()[1]}"},
                   {"server_cafile": "/etc/ssl/certs/ca-certificates.crt"}, {"model": "/tmp/not-a-model.pth"})
        for skip, change in enumerate(changes, start=1):
            workflow.front.begin()
            with app.state:
                app.state.update({**change, "skip": skip})
            refusal = "Choose one of the models offered" if "model" in change else "a page cannot change it"
            assert workflow.front.status.error and refusal in workflow.message, (change, workflow.message)
            assert workflow.settings.skip == skip  # the page's own settings apply, in the same update
        with app.state:
            app.state.skip = 0
        assert workflow.settings.model == "litemedsam"
        s = workflow.settings
        assert (s.backend, s.server_address, s.server_cafile) == ("server", chosen.address, chosen.cafile)
        if workflow.volume_node is None:
            workflow.load_volume(colin, "Colin27")
        workflow.clear_prompts()
        place_box(app, colin, atlas)
        until(app, lambda: workflow.controller.preview_result, 300, "preview")
        assert workflow.controller.backend.server == chosen and str(workflow.controller.client.address) == \
            tls_server.address
        with pytest.raises(BlockingIOError):
            decoy.accept()  # nobody connected to the page's address


def test_a_lost_server_is_shown_reconnecting_then_ready(app, tls_server, certificates):  # noqa: F811
    until(app, lambda: READY.fullmatch(app.state.sam["backend"]), 180, "ready backend line")
    tls_server.close()
    line = until(app, lambda: "Reconnecting…" in app.state.sam["backend"] and app.state.sam["backend"], 60,
                 "lost connection")
    assert line.startswith(f"server {tls_server.address} · The connection to the server was lost:"), line
    again = Server(tls_server.log.parent, "--certfile", str(certificates[0]), port=tls_server.port)
    try:
        line = until(app, lambda: READY.match(app.state.sam["backend"]) and app.state.sam["backend"], 180,
                     "reconnected backend line")
        assert re.search(r" · reconnected \d+×$", line), line
    finally:
        again.close()

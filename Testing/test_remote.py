"""The remote backend for real: `segmentwithsam serve` processes on 127.0.0.1 (TLS with a certificate the test
makes), clients in this process and in child processes, a proxy that cuts connections, kill -9 on either side,
a fuzzed handshake. No assertion is on a duration: what a time would stand for is checked as what it means (the
order replies arrived in, which bytes were sent, what the server reports)."""

from __future__ import annotations

import copy
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from SegmentWithSAMLib.actions import Prompt, Propagate, UserEdit
from SegmentWithSAMLib.backend.client import BackendClient, check_connection
from SegmentWithSAMLib.backend.protocol import KEY_ENV, LISTENING, PROTOCOL_VERSION, StreamReader, encode
from SegmentWithSAMLib.backend.scheduler import Scheduler, Task
from SegmentWithSAMLib.errors import BackendError
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.propagation import StopRules

from conftest import middle_slice, tight_box

LIB_PARENT = str(Path(__file__).resolve().parents[1] / "SegmentWithSAM")
KEY = "remote-test-key-0123456789"


class Server:
    """A `segmentwithsam serve` process on 127.0.0.1 (a free port unless ``port`` is given)."""

    def __init__(self, tmp: Path, *args: str, port: int = 0, key: str = KEY) -> None:
        self.log = tmp / f"server-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "SegmentWithSAMLib.backend.server", "--host", "127.0.0.1", "--port", str(port),
                 "--device", "cpu", "--prefetch", "0", *args],
                stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONPATH": LIB_PARENT, KEY_ENV: key})
        line = self.process.stdout.readline().decode()
        found = LISTENING.match(line)
        assert found, (line, self.log.read_text())
        self.port = int(found[3])
        self.address = f"{found[1]}://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    import trustme

    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(folder / "server.pem")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    return folder / "server.pem", folder / "ca.pem"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certificates):
    server = Server(tmp_path_factory.mktemp("tls-server"), "--certfile", str(certificates[0]))
    yield server
    server.close()


def box_prompt(volume, atlas, structure: str) -> Prompt:
    index, truth = middle_slice(atlas, slice_axes(volume, "axial"), structure)
    return Prompt(index, box=tuple(float(v) for v in tight_box(truth) + [-2, -2, 2, 2]))


def few_slices(index: int, direction: str, count: int) -> Propagate:
    """A propagation through ``count`` slices each way asked (a few: the encoder runs on a shared 2-core CPU)."""
    span = (index - count if direction != "up" else index, index + count if direction != "down" else index)
    return Propagate(index, direction, span, StopRules(None, None, None, None, 0))  # through them all


def wait_for(predicate, timeout: float, *clients) -> None:
    """Poll ``clients`` until ``predicate()`` holds; ``timeout`` only bounds a test that would otherwise hang."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        for client in clients:
            client.poll()
        time.sleep(0.01)


# ---- sessions over TLS ---------------------------------------------------------------------------------------
def test_two_clients_have_their_own_sessions_over_tls(tls_server, certificates, colin, atlas):
    """Two clients at once: each its own session (volumes, states), the same masks for the same prompts, and a
    click of one answered while the other's propagation runs."""
    with (BackendClient(server=tls_server.address, key=KEY, cafile=str(certificates[1])) as a,
          BackendClient(server=tls_server.address, key=KEY, cafile=str(certificates[1])) as b):
        prompt = box_prompt(colin, atlas, "Putamen_L")
        first_a = a.step(colin, "axial", "putamen", None, prompt)
        first_b = b.step(colin, "axial", "putamen", None, prompt)
        (state_a, _), (state_b, _) = a.wait(first_a, 300), b.wait(first_b, 300)
        assert np.array_equal(state_a.masks[prompt.index], state_b.masks[prompt.index])
        assert state_a.masks[prompt.index].any()
        assert a.server_info["session"] != b.server_info["session"] and a.server_info["resumed"] is False
        assert a.server_info["model"] == "litemedsam" and a.server_info["version"] == PROTOCOL_VERSION

        propagation = a.step(colin, "axial", "putamen", state_a, few_slices(prompt.index, "up", 6))
        wait_for(lambda: len(propagation.events) >= 1, 300, a)
        click = b.step(colin, "axial", "other", None, box_prompt(colin, atlas, "Thalamus_L"))
        wait_for(lambda: click.done, 300, a, b)
        assert click.state == "done" and not propagation.done  # b's click did not wait for a's propagation
        wait_for(lambda: propagation.done, 600, a)
        assert propagation.state == "done" and len(propagation.result[1].changed) == 6

        status_a, status_b = a.wait(a.status(), 60), b.wait(b.status(), 60)
        assert status_a["session"] == a.server_info["session"] and status_a["sessions"] >= 2
        assert status_a["volumes"] == status_b["volumes"] == [colin.identity]  # each session holds its own copy
        assert status_a["states"] == 1 and status_b["states"] == 2  # a: putamen; b: putamen and other


def test_connection_test_reports_the_server_and_each_failure(tls_server, certificates):
    report = check_connection(tls_server.address, KEY, str(certificates[1]))
    assert report["version"] == PROTOCOL_VERSION and report["model"] == "litemedsam" and report["device"] == "cpu"
    assert report["round_trip_ms"] > 0
    failures = {
        "wrong key": dict(server=tls_server.address, key="not-the-key-at-all", cafile=str(certificates[1])),
        "unverified": dict(server=tls_server.address, key=KEY),
        "plain to TLS": dict(server=f"tcp://127.0.0.1:{tls_server.port}", key=KEY),
        "refused": dict(server=f"tls://127.0.0.1:{free_port()}", key=KEY),
    }
    expected = {"wrong key": "Wrong or missing key", "unverified": "could not be verified",
                "plain to TLS": "if it serves TLS, use tls://", "refused": "connection refused"}
    for name, options in failures.items():
        with pytest.raises(BackendError) as error:
            check_connection(options["server"], options["key"], options.get("cafile"), timeout=20)
        assert expected[name] in str(error.value), (name, str(error.value))
    with pytest.raises(BackendError, match="tcp://HOST:PORT or tls://HOST:PORT"):
        BackendClient(server="http://127.0.0.1:1", key=KEY)


def test_version_mismatch_names_both_versions(tls_server, certificates):
    reply = raw_hello(tls_server, certificates, {"op": "hello", "id": 1, "version": PROTOCOL_VERSION + 1, "key": KEY,
                                                 "release": "9.9"})
    assert reply["kind"] == "VersionMismatch"
    assert f"version {PROTOCOL_VERSION + 1} (SegmentWithSAM 9.9)" in reply["message"]
    assert f"this server speaks {PROTOCOL_VERSION}" in reply["message"]


def raw_hello(server: Server, certificates, header: dict) -> dict:
    import ssl

    context = ssl.create_default_context(cafile=str(certificates[1]))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=30),
                             server_hostname="127.0.0.1") as sock:
        sock.sendall(b"".join(encode(header)))
        return StreamReader(sock.recv).read().header


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the handshake under attack ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("plain-server"), "--max-sessions", "2", "--resume-window", "2")
    yield server
    server.close()


def received_frames(data: bytes) -> list[dict]:
    return [m.header for m in iter(StreamReader(io.BytesIO(data).read).read, None)]


def test_fuzzed_handshake_gets_nothing_and_the_server_serves_on(plain_server):
    """10 000 frames from peers without the key: mutated hellos, random headers, bad lengths, raw bytes. The
    server sends nothing to any of them but a refusal of a hello, and serves a client with the key throughout."""
    rng = np.random.default_rng(0)
    hello = b"".join(encode({"op": "hello", "id": 1, "version": PROTOCOL_VERSION, "key": "guess-" + "x" * 20}))
    with BackendClient(server=plain_server.address, key=KEY) as client:
        client.wait(client.status(), 120)
        frames = 0
        while frames < 10_000:
            burst = []
            for _ in range(10):
                kind = rng.integers(4)
                if kind == 0:  # a hello with bytes flipped
                    frame = bytearray(hello)
                    for at in rng.integers(0, len(frame), rng.integers(1, 4)):
                        frame[at] = rng.integers(256)
                    burst.append(bytes(frame))
                elif kind == 1:  # another op first, or JSON that is not an object
                    burst.append(b"".join(encode({"op": str(rng.choice(["status", "shutdown", "step", "cancel"])),
                                                  "id": int(rng.integers(9))})))
                elif kind == 2:  # a prefix announcing a huge payload or header
                    burst.append(b"SWS\x01" + rng.integers(0, 256, 12, dtype=np.uint8).tobytes())
                else:
                    burst.append(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes())
            frames += len(burst)
            with socket.create_connection(("127.0.0.1", plain_server.port), timeout=30) as sock:
                try:
                    sock.sendall(b"".join(burst))
                    sock.shutdown(socket.SHUT_WR)
                    data = b"".join(iter(lambda: sock.recv(1 << 16), b""))
                except OSError:  # the server closed it first (reset, or no longer connected)
                    data = b""
            for header in received_frames(data) if data else []:
                assert header["op"] == "error" and header["kind"] == "KeyRefused", header
            if frames % 2000 == 0:
                assert client.wait(client.status(), 60)["version"] == PROTOCOL_VERSION
        assert plain_server.process.poll() is None
        assert client.wait(client.status(), 60)["sessions"] == 1


def test_an_idle_socket_holds_nothing_and_is_closed(plain_server):
    with socket.create_connection(("127.0.0.1", plain_server.port), timeout=60) as idle:
        idle.sendall(b"SWS\x01")  # half a prefix, then nothing
        with BackendClient(server=plain_server.address, key=KEY) as client:
            assert client.wait(client.status(), 60)["version"] == PROTOCOL_VERSION  # served meanwhile
        assert idle.recv(1) == b""  # closed by the server after its handshake timeout, with nothing sent


def test_max_sessions_and_a_shutdown_ends_only_its_session(plain_server):
    with BackendClient(server=plain_server.address, key=KEY) as a, BackendClient(server=plain_server.address,
                                                                                    key=KEY) as b:
        a.wait(a.status(), 60)
        b.wait(b.status(), 60)
        with BackendClient(server=plain_server.address, key=KEY) as c, pytest.raises(BackendError) as error:
            c.wait(c.status(), 60)
        assert "2 sessions at most" in str(error.value)
    with BackendClient(server=plain_server.address, key=KEY) as d:  # a and b said shutdown: their sessions ended
        assert d.wait(d.status(), 60)["sessions"] == 1
    assert plain_server.process.poll() is None


# ---- connections lost ----------------------------------------------------------------------------------------
class Proxy:
    """A TCP relay to ``port`` whose connections the test can cut, as a network would."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [inbound, outbound]
            for source, sink in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sockets = []


def test_a_cut_connection_resumes_its_session_without_sending_the_volume_again(plain_server, colin, atlas):
    proxy = Proxy(plain_server.port)
    with BackendClient(server=f"tcp://127.0.0.1:{proxy.port}", key=KEY) as client:
        prompt = box_prompt(colin, atlas, "Caudate_L")
        state, _ = client.wait(client.step(colin, "axial", "caudate", None, prompt), 300)
        session = client.server_info["session"]
        proxy.cut()
        pending = client.status()
        wait_for(lambda: pending.done, 60, client)
        assert pending.state == "failed" and "Reconnecting in the background" in str(pending.error)
        wait_for(lambda: client.running and client.server_info.get("resumed"), 60, client)  # poll reconnected
        assert client.server_info["session"] == session
        click = client.step(colin, "axial", "caudate", state, Prompt(prompt.index, box=prompt.box,
                                                                     clicks=((prompt.box[0] + 3, prompt.box[1] + 3,
                                                                              False),)))
        client.wait(click, 300)
        assert click.sent < colin.array.nbytes // 100  # neither the volume nor the state went again


def test_server_killed_mid_propagation_loses_nothing_and_a_new_server_takes_over(tmp_path, colin, atlas):
    server = Server(tmp_path)
    try:
        with BackendClient(server=server.address, key=KEY) as client:
            axes = slice_axes(colin, "axial")
            index, truth = middle_slice(atlas, axes, "Putamen_L")
            seeded, _ = client.wait(client.step(colin, "axial", "putamen", None, UserEdit({index: truth})), 300)
            held = copy.deepcopy(seeded)
            handle = client.step(colin, "axial", "putamen", seeded, few_slices(index, "both", 4))
            wait_for(lambda: len(handle.events) >= 1, 300, client)
            server.process.send_signal(signal.SIGKILL)
            wait_for(lambda: handle.done, 60, client)
            assert handle.state == "failed" and "Nothing from this request was applied" in str(handle.error)
            assert handle.result is None
            assert sorted(seeded.masks) == sorted(held.masks) and all(
                np.array_equal(seeded.masks[i], held.masks[i]) for i in held.masks)  # the caller's state untouched

            server.close()
            server = Server(tmp_path, port=server.port)  # the same address, a fresh process
            wait_for(lambda: client.running and client.server_info.get("resumed") is False, 120, client)
            again = client.step(colin, "axial", "putamen", seeded, few_slices(index, "up", 2))
            new, update = client.wait(again, 600)  # the volume and the state went whole: the new server had neither
            assert update.changed and new.masks[index].any()
    finally:
        server.close()


CLIENT_SCRIPT = """
import sys, time
import numpy as np
from SegmentWithSAMLib.backend.client import BackendClient
from SegmentWithSAMLib.actions import UserEdit, Propagate
from SegmentWithSAMLib.io import read_volume
from SegmentWithSAMLib.propagation import StopRules
volume = read_volume(sys.argv[2])
index = volume.array.shape[0] // 2
mask = np.zeros(volume.array.shape[1:], bool)
mask[90:130, 70:110] = True
client = BackendClient(server=sys.argv[1], dispatch="thread")
state, _ = client.wait(client.step(volume, "axial", "o", None, UserEdit({index: mask})), 300)
handle = client.step(volume, "axial", "o", state, Propagate(index, "both", rules=StopRules(min_similarity=None)))
while not handle.events:
    time.sleep(0.05)
print("propagating", flush=True)
client.wait(handle, 600)  # killed meanwhile
"""


def test_a_client_killed_mid_task_frees_its_session(plain_server, tmp_path):
    from SegmentWithSAMLib.data import colin27

    child = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, plain_server.address, str(colin27().image)],
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": LIB_PARENT, KEY_ENV: KEY})
    try:
        assert child.stdout.readline().decode().strip() == "propagating"
        with BackendClient(server=plain_server.address, key=KEY) as observer:
            assert observer.wait(observer.status(), 60)["sessions"] == 2
            child.send_signal(signal.SIGKILL)
            child.wait()
            status = {}

            def freed() -> bool:
                status.update(observer.wait(observer.status(), 60))
                return status["sessions"] == 1 and status["queue"]["running"] is None

            wait_for(freed, 60)  # its propagation stopped at once, its session went after the resume window
            assert status["queue"]["queued"] == 0
    finally:
        child.kill()


def test_heartbeats_do_not_pile_up_while_nobody_polls(plain_server):
    with BackendClient(server=plain_server.address, key=KEY) as client:
        client.wait(client.status(), 60)
        time.sleep(1.5)  # six heartbeats arrive, and nobody polls (a Slicer whose timer stopped)
        assert client._inbox.qsize() == 0


# ---- the scheduler between sessions --------------------------------------------------------------------------
def test_sessions_take_turns_and_keep_their_ids_apart():
    scheduler = Scheduler()
    a, b = object(), object()
    for number in (1, 2, 3):
        scheduler.submit(Task(number, "step", {}, interactive=False, owner=a))
    scheduler.submit(Task(1, "step", {}, interactive=False, owner=b))
    scheduler.submit(Task(2, "step", {}, owner=b, target="preview"))
    assert scheduler.submit(Task(3, "step", {}, owner=a, target="preview")) == []  # another owner's target
    taken = [scheduler.take(0) for _ in range(6)]
    assert [(t.owner is a, t.id) for t in taken] == [(False, 2), (True, 3), (True, 1), (False, 1), (True, 2),
                                                     (True, 3)]
    assert scheduler.cancel(1, b) is None and scheduler.cancel(9, a) is None
    running = Task(7, "step", {}, interactive=False, owner=a)
    scheduler.submit(running)
    scheduler.take(0)
    assert scheduler.stalled(a)[0] == 7 and scheduler.stalled(b) == (None, 0.0)  # each heartbeat its own
    scheduler.submit(Task(8, "step", {}, interactive=False, owner=a))
    assert [t.id for t in scheduler.drain(a)] == [8] and running.cancel.is_set()  # a session that ends


# ---- the same address everywhere -----------------------------------------------------------------------------
def test_command_line_and_batch_on_a_server_give_the_masks_made_here(plain_server, tmp_path, colin, atlas,
                                                                      monkeypatch):
    from SegmentWithSAMLib.batch import run_batch
    from SegmentWithSAMLib.batch.manifest import Options
    from SegmentWithSAMLib.cli import main
    from SegmentWithSAMLib.data import colin27
    from SegmentWithSAMLib.io import read_volume

    axes = slice_axes(colin, "axial")
    index, truth = middle_slice(atlas, axes, "Putamen_L")
    x0, y0, x1, y1 = tight_box(truth) + np.array([-2, -2, 2, 2])
    corners = colin.to_ras(axes.pixel_to_ijk(index, np.array([[x0, y0], [x1, y1]], float)))
    box = ",".join(f"{v:.4f}" for v in corners.ravel())
    argv = ["segment", str(colin27().image), "--view", "axial", "--box", box, "--range", f"{index - 2}:{index + 2}",
            "--propagate", "both", "--device", "cpu", "--json"]
    monkeypatch.setenv(KEY_ENV, KEY)
    assert main([*argv, "--out", str(tmp_path / "here.nii.gz")]) == 0
    assert main([*argv, "--backend", plain_server.address, "--out", str(tmp_path / "there.nii.gz")]) == 0
    here = read_volume(tmp_path / "here.nii.gz").array
    assert here.any() and np.array_equal(read_volume(tmp_path / "there.nii.gz").array, here)

    row = {"volume": str(colin27().image), "name": "putamen", "view": "axial", "box": box,
           "range": f"{index - 2}:{index + 2}"}
    report = run_batch([row], tmp_path / "batch", defaults=Options(backend=plain_server.address), workers=1)
    assert [r["status"] for r in report.rows] == ["ok"], report.rows
    assert np.array_equal(read_volume(report.rows[0]["output"]).array > 0, here > 0)
    with pytest.raises(SystemExit):  # the key is never an argument (others could read it in the process list)
        main([*argv, "--backend", plain_server.address, "--key", KEY, "--out", str(tmp_path / "x.nii.gz")])


def test_the_backend_log_is_the_owners_only(tmp_path, monkeypatch):
    import stat

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    client = BackendClient()
    with client._open_log() as log:  # what the client opens for its backend process's stderr
        log.write(b"started")
    assert client.log_path.parent == tmp_path / "segmentwithsam" / "logs"
    assert stat.S_IMODE(client.log_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(client.log_path.stat().st_mode) == 0o600
    client.close()
    assert not client.log_path.exists()


def test_an_idle_session_is_closed_and_freed():
    """The listener in this process (no model needed to say hello): a session without requests for
    ``idle_s`` is closed, and its memory freed."""
    from SegmentWithSAMLib.backend.listener import Listener
    from SegmentWithSAMLib.backend.worker import Worker

    worker = Worker(model=object(), prefetch=0)
    listener = Listener(worker, KEY, idle_s=0.5, resume_s=60)
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=listener.serve, args=(server,), daemon=True).start()
    try:
        with socket.create_connection(server.getsockname(), timeout=30) as sock:
            sock.sendall(b"".join(encode({"op": "hello", "id": 1, "version": PROTOCOL_VERSION, "key": KEY})))
            reader = StreamReader(sock.recv)
            assert reader.read().header["op"] == "hello" and listener.session_count == 1
            while (message := reader.read()) is not None:  # heartbeats, until the server closes it
                assert message.op == "heartbeat"
        wait_for(lambda: listener.session_count == 0, 30)
    finally:
        worker.stop()
        server.close()

"""The backend process and its client, for real: child processes running LiteMedSAM, kill -9, SIGSTOP, cancel,
latest-wins, prefetch, malformed and oversized frames, tokens, and no socket unless TCP is asked for."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from SegmentWithSAMLib.backend.client import BackendClient
from SegmentWithSAMLib.backend.protocol import PROTOCOL_VERSION, TOKEN_ENV, StreamReader, encode_bytes
from SegmentWithSAMLib.backend.scheduler import Task
from SegmentWithSAMLib.backend.server import Backend
from SegmentWithSAMLib.errors import BackendError
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.session import Session

from conftest import middle_slice, tight_box

LIB_PARENT = str(Path(__file__).resolve().parents[1] / "SegmentWithSAM")


@pytest.fixture(scope="module")
def client():
    with BackendClient(device="cpu", engine="torch") as backend:  # the same engine as the in-process reference
        yield backend


def box_ras(volume, atlas, view, structure="Hippocampus_L", grow=0):
    axes = slice_axes(volume, view)
    index, truth = middle_slice(atlas, axes, structure)
    x0, y0, x1, y1 = tight_box(truth) + np.array([-grow, -grow, grow, grow])
    return index, volume.to_ras(axes.pixel_to_ijk(index, np.array([[x0, y0], [x1, y1]])))


def wait_for(predicate, timeout: float, client=None) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        if client is not None:
            client.poll()
        time.sleep(0.005)
    return time.monotonic() - start


def test_round_trip_equals_in_process_bit_for_bit(client, colin, atlas, model, cache):
    session = Session(colin, model, cache=cache)
    for view in ("axial", "coronal"):
        index, box = box_ras(colin, atlas, view)
        centre = box.mean(axis=0)
        clicks = np.array([centre, box[0] * 0.2 + box[1] * 0.8])
        for kwargs in ({"box_ras": box}, {"points_ras": clicks, "labels": [1, 0]}):
            local = session.refine(view, **kwargs)
            remote = client.wait(client.predict(colin, view, **kwargs), timeout=120)
            assert remote.index == local.index == index
            assert remote.score == local.score
            assert np.array_equal(remote.mask2d, local.mask2d) and remote.mask2d.any()
            assert np.array_equal(remote.low_res_logits, local.low_res_logits)
            assert np.array_equal(remote.volume_mask(), local.volume_mask())
    prompts = client.wait(client.predict(colin, "axial", points_ras=clicks[:1], mode="prompts"), timeout=60)
    assert np.array_equal(prompts.mask2d, session.segment("axial", clicks[:1]).mask2d)


def test_requests_return_at_once_and_errors_are_specific(client, colin):
    start = time.perf_counter()
    handle = client.predict(colin, "axial", points_ras=[[500.0, 0, 0]])
    assert time.perf_counter() - start < 0.05
    with pytest.raises(Exception, match="outside the volume"):
        client.wait(handle, timeout=60)
    assert handle.state == "failed" and handle.error.kind == "PromptError"
    with pytest.raises(Exception, match="window"):
        client.wait(client.predict(colin, "axial", points_ras=[[0.0, 0, 0]], window="nonsense"), timeout=60)
    assert client.wait(client.status(), timeout=10)["model"] == "litemedsam"


def test_latest_prediction_wins_and_stale_ones_are_dropped(client, colin, atlas):
    index, box = box_ras(colin, atlas, "sagittal")
    before = client.wait(client.status(), timeout=10)
    # An uncached slice keeps the model thread busy while five more predictions of one target arrive.
    busy = client.predict(colin, "sagittal", box_ras=box + [[3, 0, 0], [3, 0, 0]], target="other")
    handles = [client.predict(colin, "sagittal", box_ras=box + i * 0.5, target="hippocampus") for i in range(5)]
    for handle in [busy, *handles]:
        wait_for(lambda h=handle: h.done, 120, client)
    assert [h.state for h in handles] == ["dropped"] * 4 + ["done"]
    after = client.wait(client.status(), timeout=10)
    assert after["decoder_runs"] - before["decoder_runs"] == 2  # one box decode each: busy and the latest
    assert after["queue"]["dropped"] - before["queue"]["dropped"] == 4


def test_idle_backend_prefetches_neighbouring_slices(client, colin, atlas):
    index, box = box_ras(colin, atlas, "coronal", "Putamen_L")
    first = client.wait(client.predict(colin, "coronal", box_ras=box), timeout=120)
    wait_for(lambda: (s := client.wait(client.status(), 10))["queue"]["prefetch_planned"] == 0
             and s["queue"]["running"] is None, 60)
    hits = client.wait(client.status(), timeout=10)["cache"]["hits"]
    for step in (1, -1, 2, -2):
        moved = box + np.array([0, step * colin.spacing[1], 0])
        result = client.wait(client.predict(colin, "coronal", box_ras=moved), timeout=60)
        assert result.index == first.index + step and result.timings_ms["encode"] < 100
    assert client.wait(client.status(), timeout=10)["cache"]["hits"] >= hits + 4


def test_propagation_streams_and_cancel_applies_nothing(client, colin, atlas):
    axes = slice_axes(colin, "axial")
    index, truth = middle_slice(atlas, axes, "Putamen_L")
    handle = client.propagate(colin, "axial", {"putamen": (index, truth)}, direction="up",
                              rules={"min_similarity": None})
    wait_for(lambda: len(handle.events) >= 2 or handle.done, 120, client)
    client.cancel(handle)
    seconds = wait_for(lambda: handle.done, 30, client)
    assert handle.state == "cancelled" and handle.result is None
    assert seconds < 10  # within one slice (about 2 s of encoding on 2 cores)
    events = handle.take_events()
    assert events and all(e.index > index and set(e.masks) == {"putamen"} for e in events)
    result = client.wait(client.propagate(colin, "axial", {"putamen": (index, truth)}, slice_range=(index - 2,
                         index + 2), boxes={"putamen": tight_box(truth)}, skip=1), 120)
    assert sorted(result.masks["putamen"]) == [index - 2, index - 1, index + 1, index + 2]
    assert result.stopped["putamen"] == {"up": "range end", "down": "range end"}
    with pytest.raises(Exception, match="box of 'putamen' must be 4 numbers"):
        client.wait(client.propagate(colin, "axial", {"putamen": (index, truth)}, boxes={"putamen": [1.0, 2.0]}), 60)
    with pytest.raises(Exception, match="skip must be a whole number from 0 to 4"):
        client.wait(client.propagate(colin, "axial", {"putamen": (index, truth)}, skip=9), 60)


def test_kill_9_and_hang_are_noticed_and_the_next_request_restarts(colin, atlas):
    axes = slice_axes(colin, "axial")
    index, truth = middle_slice(atlas, axes, "Hippocampus_L")
    labelmap = np.zeros(colin.array.shape, np.uint8)
    before = labelmap.copy()
    with BackendClient(device="cpu", heartbeat_timeout=1.5, prefetch=0) as backend:
        handle = backend.propagate(colin, "axial", {"h": (index, truth)}, rules={"min_similarity": None})
        wait_for(lambda: handle.events or handle.done, 120, backend)
        first_pid = backend.pid
        os.kill(first_pid, signal.SIGKILL)
        noticed = wait_for(lambda: handle.done, 5, backend)
        assert noticed < 1.0
        assert handle.state == "failed" and handle.result is None and "Nothing from this request" in str(handle.error)
        if handle.result is not None:  # what a caller would do: apply only a completed result
            labelmap = handle.result.apply(labelmap, {"h": 1})
        assert np.array_equal(labelmap, before)

        _, box = box_ras(colin, atlas, "axial")
        result = backend.wait(backend.predict(colin, "axial", box_ras=box), timeout=120)
        assert result.mask2d.any() and backend.pid != first_pid and backend.restarts == 1

        os.kill(backend.pid, signal.SIGSTOP)  # hung: alive but silent
        stuck = backend.status()
        noticed = wait_for(lambda: stuck.done, 10, backend)
        assert stuck.state == "failed" and "stopped answering" in str(stuck.error) and noticed < 1.5 + 1.0
        assert backend.wait(backend.status(), timeout=120)["volumes"] == []  # a fresh backend


def test_out_of_memory_is_reported_and_the_backend_keeps_serving(colin, atlas, model, monkeypatch):
    import torch

    replies = []
    backend = Backend(lambda header, arrays=None: replies.append(header), model=model, prefetch=0)
    backend._run(Task(1, "load_volume", {"volume": colin.identity, "ijk_to_ras": colin.ijk_to_ras.tolist()},
                      {"array": colin.array}))
    _, box = box_ras(colin, atlas, "axial", grow=1)
    predict = {"volume": colin.identity, "view": "axial", "box_ras": box.tolist()}
    backend.cache.put("filler", torch.zeros(10))

    def out_of_memory(images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "encode", out_of_memory)
    backend._run(Task(2, "predict", predict))
    assert replies[-1]["kind"] == "OutOfMemory" and "still running" in replies[-1]["message"]
    assert len(backend.cache) == 0
    monkeypatch.undo()
    backend._run(Task(3, "predict", predict))
    assert replies[-1]["op"] == "result" and replies[-1]["id"] == 3


class RawBackend:
    """A backend process spoken to frame by frame, as a hostile or broken client would."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "SegmentWithSAMLib.backend.server", "--device", "cpu", "--prefetch", "0", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
            env={**os.environ, "PYTHONPATH": LIB_PARENT, **(env or {})})
        self.replies: queue.Queue = queue.Queue()

    def listen(self, read) -> None:
        def loop() -> None:
            reader = StreamReader(read)
            try:
                while (message := reader.read()) is not None:
                    if message.op != "heartbeat":
                        self.replies.put(message.header)
            except (OSError, EOFError):
                return  # the test closed the connection
        threading.Thread(target=loop, daemon=True).start()

    def reply(self, timeout: float = 30) -> dict:
        return self.replies.get(timeout=timeout)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def raw():
    backend = RawBackend("--max-payload-mb", "1", "--cache-mb", "64")
    backend.listen(backend.process.stdout.read)
    yield backend
    backend.close()


def test_malformed_oversized_and_out_of_order_messages_get_errors_and_service_goes_on(raw):
    send = raw.process.stdin.write
    send(encode_bytes({"op": "status", "id": 1}))
    assert raw.reply()["message"].startswith("Say hello first")
    send(encode_bytes({"op": "hello", "id": 2, "version": PROTOCOL_VERSION}))
    assert raw.reply()["op"] == "hello"
    send(b"GET / HTTP/1.1\r\n\r\n")
    send(encode_bytes({"op": "load_volume", "id": 3}, {"array": np.zeros((128, 128, 128), np.uint8)}))
    send(encode_bytes({"op": "no_such_op", "id": 4}))
    send(encode_bytes({"op": "status"}))
    send(encode_bytes({"op": "predict", "id": 5, "volume": "unknown", "view": "axial"}))
    send(encode_bytes({"op": "load_volume", "id": 6, "volume": "0" * 32, "ijk_to_ras": np.eye(4).tolist()},
                      {"array": np.ones((4, 4, 4), np.int16)}))
    expected = ["Not a SegmentWithSAM frame", "The payload is 2097", "Unknown operation 'no_such_op'",
                "Every request needs an integer 'id'", "The backend has no volume 'unknown'",
                "The volume's content hash"]
    replies = [raw.reply(timeout=120) for _ in expected]
    for reply, start in zip(replies, expected, strict=True):
        assert reply["op"] == "error" and reply["message"].startswith(start), (reply, start)
    send(encode_bytes({"op": "status", "id": 7}))
    status = raw.reply()
    assert status["id"] == 7 and status["cache"]["max_bytes"] == 64 << 20


def test_protocol_version_mismatch_is_a_clear_error(raw):
    raw.process.stdin.write(encode_bytes({"op": "hello", "id": 1, "version": PROTOCOL_VERSION + 1}))
    reply = raw.reply()
    assert reply["kind"] == "ProtocolError" and "protocol version" in reply["message"]


def open_files(pid: int) -> list[str]:
    """What process `pid` has open, from /proc; a descriptor closed while it is listed is left out."""
    fds = Path(f"/proc/{pid}/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:  # the process closed it (an import's file, a thread's pipe) between listing and reading
            continue
    return targets


def test_pipe_backend_opens_no_socket(client):
    client.wait(client.status(), timeout=60)
    targets = open_files(client.pid)
    assert not [t for t in targets if t.startswith("socket:")], targets


def test_tcp_listens_on_localhost_and_checks_the_token():
    token = "s3cret-token"
    raw = RawBackend("--tcp", "127.0.0.1:0", env={TOKEN_ENV: token})
    try:
        port = json.loads(raw.process.stdout.readline())["port"]
        for attempt, (given, ok) in enumerate([("wrong", False), (None, False), (token, True)]):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                assert sock.getpeername()[0] == "127.0.0.1"
                raw.listen(sock.recv)
                hello = {"op": "hello", "id": attempt, "version": PROTOCOL_VERSION}
                sock.sendall(encode_bytes(hello if given is None else {**hello, "token": given}))
                reply = raw.reply()
                if ok:
                    assert reply["op"] == "hello"
                    sock.sendall(encode_bytes({"op": "status", "id": 9}))
                    assert raw.reply()["id"] == 9
                else:
                    assert reply["op"] == "error" and "token" in reply["message"]
    finally:
        raw.close()


def test_tcp_client_round_trip():
    with BackendClient(device="cpu", transport="tcp") as backend:
        status = backend.wait(backend.status(), timeout=60)
        assert status["version"] == PROTOCOL_VERSION
        targets = open_files(backend.pid)
        assert any(t.startswith("socket:") for t in targets)


def test_3d_interaction_in_the_backend_equals_in_process_and_a_killed_backend_loses_nothing(client, colin, atlas,
                                                                                            model, cache):
    """The client keeps the object's state; the backend is stateless between clicks, so a restart loses nothing."""
    from SegmentWithSAMLib.interaction import Interaction, Kind, ObjectState

    local = Interaction(Session(colin, model, cache=cache), "axial")
    index, box = box_ras(colin, atlas, "axial", "Thalamus_L")
    expected = local.set_box_ras("t", box, (index - 1, index + 1))
    update, state = client.wait(client.interact(colin, "axial", "t", {"type": "box", "corners_ras": box,
                                                                      "range": (index - 1, index + 1)}), 300)
    assert sorted(update.changed) == sorted(expected.changed) == [index - 1, index, index + 1]
    assert all(np.array_equal(update.changed[i], expected.changed[i]) for i in expected.changed)
    click = {"type": "click", "point_ras": box.mean(axis=0) + [0, 0, 1.0], "positive": False}  # slice index + 1
    expected = local.click_ras("t", click["point_ras"], False)
    os.kill(client.pid, signal.SIGKILL)
    wait_for(lambda: not client.running, 5, client)
    client.poll()  # notices the exit: the next request starts a fresh backend
    update, after = client.wait(client.interact(colin, "axial", "t", click, state), 300)  # a fresh backend
    assert sorted(update.changed) == sorted(expected.changed) and index + 1 in update.changed
    assert all(np.array_equal(update.changed[i], expected.changed[i]) for i in expected.changed)
    assert after.clicks == local.objects["t"].clicks and after.kinds == local.objects["t"].kinds
    malformed = ObjectState((index - 1, index + 1), {index: np.zeros((3, 3), bool)}, {index: Kind.KEY})
    with pytest.raises(BackendError, match="missing or not"):
        client.wait(client.interact(colin, "axial", "t", click, malformed), 60)

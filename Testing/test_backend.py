"""The backend process and its client, for real: child processes running LiteMedSAM stepping the one engine
(:meth:`SegmentWithSAMLib.engine.Engine.step`) bit for bit as in process, a click costing what it changes,
kill -9, SIGSTOP, cancel, interactive steps ahead of and between a propagation's slices, latest-wins, a lost
state resent whole, prefetch, malformed and oversized frames, tokens, and no socket unless TCP is asked for.

No assertion here is on a duration: what a time once stood for is checked as what it means (cache counters,
the order tasks started in, the order replies arrived in, why a request failed)."""

from __future__ import annotations

import copy
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage as ndi

from SegmentWithSAMLib.actions import Box3D, Click, Prompt, Propagate, UserEdit, prompt_from_ras, to_message
from SegmentWithSAMLib.backend.client import BackendClient, popen_flags
from SegmentWithSAMLib.backend.protocol import PROTOCOL_VERSION, StreamReader, encode
from SegmentWithSAMLib.backend.scheduler import Scheduler, Task
from SegmentWithSAMLib.backend.server import Backend
from SegmentWithSAMLib.backend.worker import Worker
from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.engine import Engine
from SegmentWithSAMLib.errors import BackendError, PromptError
from SegmentWithSAMLib.geometry import Volume, slice_axes
from SegmentWithSAMLib.propagation import StopRules
from SegmentWithSAMLib.session import Session
from SegmentWithSAMLib.state import Kind, ObjectState, labelmap

from conftest import middle_slice, tight_box

LIB_PARENT = str(Path(__file__).resolve().parents[1] / "SegmentWithSAM")
HALF = 3  # a 3D box over 7 slices keeps the encoder's work small


@pytest.fixture(scope="module")
def client():
    """The module's backend, on the default engine as the in-process references (``default_model``). It does only
    what a test asks: idle-time prefetch (tested on a backend of its own) would encode slices no test asks for,
    on the cores the in-process references need."""
    with BackendClient(device="cpu", prefetch=0) as backend:
        yield backend


def box_ras(volume, atlas, view, structure="Hippocampus_L", grow=0):
    axes = slice_axes(volume, view)
    index, truth = middle_slice(atlas, axes, structure)
    x0, y0, x1, y1 = tight_box(truth) + np.array([-grow, -grow, grow, grow])
    return index, volume.to_ras(axes.pixel_to_ijk(index, np.array([[x0, y0], [x1, y1]])))


def wait_for(predicate, timeout: float, client=None) -> None:
    """Poll ``client`` until ``predicate()`` holds; ``timeout`` only bounds a test that would otherwise hang."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        if client is not None:
            client.poll()
        time.sleep(0.005)


def assert_same_state(got: ObjectState, expected: ObjectState) -> None:
    """Bit for bit: every slice's mask, kind, clicks and base, the range, the box, its offset and the rules."""
    assert got.slice_range == expected.slice_range
    assert sorted(got.masks) == sorted(expected.masks)
    for index, mask in expected.masks.items():
        assert got.masks[index].dtype == bool and np.array_equal(got.masks[index], mask), index
    assert got.kinds == expected.kinds
    assert got.clicks == expected.clicks
    assert sorted(got.base) == sorted(expected.base)
    for index, base in expected.base.items():
        assert (got.base[index] is None) == (base is None) and (base is None or np.array_equal(got.base[index], base))
    assert np.array_equal(got.offset, expected.offset)
    assert (got.box is None) == (expected.box is None)
    if expected.box is not None:
        assert got.box[0] == expected.box[0] and np.array_equal(got.box[1], expected.box[1])
    assert got.rules == expected.rules


def assert_same_update(got, expected) -> None:
    assert sorted(got.changed) == sorted(expected.changed)
    assert all(np.array_equal(got.changed[i], expected.changed[i]) for i in expected.changed)
    assert got.stopped == expected.stopped and got.notices == expected.notices


def message_bytes(header: dict, arrays: dict) -> int:
    """A message's size as the client counts it (its JSON header and its array bytes)."""
    return len(json.dumps(header)) + sum(np.asarray(a).nbytes for a in arrays.values())


def encode_bytes(header: dict, arrays: dict | None = None) -> bytes:
    return b"".join(bytes(b) for b in encode(header, arrays))


def state_bytes(state: ObjectState, slices=None) -> int:
    """The bytes of the arrays (masks and bases) that carry ``state``'s ``slices`` (None: all of it)."""
    return sum(a.nbytes for a in state.to_message(slices)[1].values())


def deepest(mask: np.ndarray) -> tuple[float, float]:
    """The deepest pixel (col, row) of the largest part of a 2D mask."""
    labels, count = ndi.label(mask)
    assert count, "nothing to click on"
    largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    row, col = np.unravel_index(np.argmax(ndi.distance_transform_edt(largest)), mask.shape)
    return float(col), float(row)


def corrective_click(state: ObjectState, truth: np.ndarray, positive: bool, slices) -> Click:
    """A user's click on the one of ``slices`` with the most missed (positive) or extra (negative) pixels, in the
    middle of the largest such part."""
    def wrong(i):
        mask = state.masks.get(i, np.zeros(truth.shape[1:], bool))
        return truth[i] & ~mask if positive else mask & ~truth[i]

    index = max(slices, key=lambda i: int(wrong(i).sum()))
    return Click(index, deepest(wrong(index)), positive)


@pytest.fixture(scope="module")
def reference(colin, atlas, default_model, cache):
    """A 3D box over 7 axial slices of the left thalamus, then three clicks (the second negative), stepped in
    process: the actions, the states after each and the updates."""
    engine = Engine(Session(colin, default_model, cache=cache), "axial")
    truth = engine.axes.oriented(atlas.array == AAL_STRUCTURES["Thalamus_L"])
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    mid = int(slices[len(slices) // 2])
    low, high = mid - HALF, mid + HALF
    actions = [Box3D(mid, tuple(float(v) for v in tight_box(truth[mid])), (low, high))]
    state, update = engine.step(None, actions[0])
    states, updates = [state], [update]
    around = [i for i in range(low, high + 1) if i != mid]  # not the box's key slice: a click changes a part
    for positive in (True, False, True):
        actions.append(corrective_click(state, truth, positive, around))
        state, update = engine.step(state, actions[-1])
        states.append(state)
        updates.append(update)
    assert sum(not a.positive for a in actions[1:]) == 1 and len({a.index for a in actions[1:]}) >= 2
    return SimpleNamespace(actions=actions, states=states, updates=updates, mid=mid, range=(low, high))


# ---- in-process equality ---------------------------------------------------------------------------------
def test_round_trip_equals_in_process_bit_for_bit(client, colin, atlas, default_model, cache):
    session = Session(colin, default_model, cache=cache)
    for view in ("axial", "coronal"):
        engine = Engine(session, view)
        index, box = box_ras(colin, atlas, view, "Thalamus_L")  # its axial slice is the reference's key slice
        centre = box.mean(axis=0)
        clicks = np.array([centre, box[0] * 0.2 + box[1] * 0.8])
        for n, kwargs in enumerate(({"box_ras": box}, {"points_ras": clicks, "labels": [1, 0]})):
            action = prompt_from_ras(colin, engine.axes, **kwargs)
            local, local_update = engine.step(None, action)
            remote, update = client.wait(client.step(colin, view, f"round trip {view} {n}", None, action), 120)
            assert action.index == index and sorted(update.changed) == [index]
            assert_same_state(remote, local)
            assert_same_update(update, local_update)
            assert remote.masks[index].any() and remote.kinds[index] is Kind.KEY


def test_a_3d_box_and_three_clicks_in_the_backend_equal_the_engine_in_process(client, colin, reference):
    state = None
    for n, action in enumerate(reference.actions):
        handle = client.step(colin, "axial", "thalamus/equal", state, action)
        state, update = client.wait(handle, 300)
        assert_same_state(state, reference.states[n])
        assert_same_update(update, reference.updates[n])
        events = handle.take_events()
        if n == 0:  # the box's propagation streamed every slice it wrote, as it wrote them: up, then down
            mid, written = reference.mid, sorted(update.changed)
            assert [i for i, _ in events] == [i for i in written if i > mid] + [i for i in written[::-1] if i < mid]
            assert len(events) == 2 * HALF and all(np.array_equal(mask, update.changed[i]) for i, mask in events)
        else:
            assert events == []  # a click's re-propagation comes with its result
    assert sorted(state.clicks) == sorted({a.index for a in reference.actions[1:]})


def test_a_click_costs_what_it_changes(client, colin, reference):
    """After the first step the client sends only the action (no state, no mask) and the backend answers only
    with the slices that changed; the slices it did not change are the very arrays the caller had."""
    key = "thalamus/cost"
    state, _ = client.wait(client.step(colin, "axial", key, None, reference.actions[0]), 300)
    mask_bytes = state_bytes(state, {reference.mid})  # one axial slice's mask on the wire: 217 × 181 bits
    for n, action in enumerate(reference.actions[1:], start=1):
        before = state
        handle = client.step(colin, "axial", key, before, action)
        state, update = client.wait(handle, 300)
        assert_same_state(state, reference.states[n])
        assert handle.sent < 2048 < mask_bytes  # the action alone
        changed = state.changed_since(before)  # the slices the reply carried (they are new arrays here) ...
        assert changed == reference.states[n].changed_since(reference.states[n - 1])  # ... = what the click changed
        assert set(update.changed) <= changed and reference.mid not in changed
        assert all(state.masks[i] is before.masks[i] for i in state.masks if i not in changed)
        delta = state_bytes(state, changed)
        assert delta <= handle.received < delta + 4096  # those slices' arrays and a small header
        assert handle.received < message_bytes(*state.to_message())  # less than the whole state


def test_the_backend_starts_without_a_console_window_on_windows(client):
    """Windows gets CREATE_NO_WINDOW (no console opens beside Slicer); the backend started with this platform's
    arguments runs."""
    assert popen_flags("win32")["creationflags"] & 0x08000000
    assert popen_flags("linux") == popen_flags("darwin") == {}
    if sys.platform == "win32":
        assert popen_flags()["creationflags"] == subprocess.CREATE_NO_WINDOW
    assert client.wait(client.status(), timeout=120)["pid"] == client.pid


# ---- requests, errors, latest-wins, prefetch, cancel ---------------------------------------------------------
def test_requests_return_at_once_and_errors_are_specific(client, colin, atlas):
    client.wait(client.status(), timeout=120)
    index, truth = middle_slice(atlas, slice_axes(colin, "axial"), "Hippocampus_L")
    # A request never waits for the backend: it returns a pending handle even while the backend cannot answer.
    os.kill(client.pid, signal.SIGSTOP)
    try:
        handles = []
        caller = threading.Thread(target=lambda: handles.append(
            client.step(colin, "axial", "errors", None, Click(500, (0.0, 0.0), True))))
        caller.start()
        caller.join(60)  # only bounds a hang
        assert not caller.is_alive() and handles[0].state == "pending"
    finally:
        os.kill(client.pid, signal.SIGCONT)
    handle = handles[0]
    with pytest.raises(BackendError, match="Slice 500 is outside the volume"):
        client.wait(handle, timeout=120)
    assert handle.state == "failed" and handle.error.kind == "PromptError"
    with pytest.raises(PromptError, match="outside the volume"):  # RAS prompts are checked by the caller at once
        prompt_from_ras(colin, slice_axes(colin, "axial"), [[500.0, 0, 0]])
    with pytest.raises(BackendError, match="window"):
        client.wait(client.step(colin, "axial", "errors", None, Prompt(index, None, ((10.0, 10.0, True),)),
                                window="nonsense"), timeout=60)
    with pytest.raises(BackendError, match="(?i)a box is x0, y0, x1, y1"):
        client.wait(client.step(colin, "axial", "errors", None, Prompt(index, (1.0, 2.0))), timeout=60)
    assert client.wait(client.status(), timeout=10)["model"] == "litemedsam"


def test_latest_step_of_a_target_wins_and_stale_ones_are_dropped(client, colin, atlas):
    index, truth = middle_slice(atlas, slice_axes(colin, "sagittal"), "Hippocampus_L")
    box = tight_box(truth)
    before = client.wait(client.status(), timeout=10)
    # An uncached slice keeps the model thread busy while five more steps of one target arrive.
    busy = client.step(colin, "sagittal", "other", None, Prompt(index + 3, tuple(box)), target="other")
    handles = [client.step(colin, "sagittal", "hippocampus", None, Prompt(index, tuple(box + [i, 0, i, 0])),
                           target="hippocampus") for i in range(5)]
    for handle in [busy, *handles]:
        wait_for(lambda h=handle: h.done, 120, client)
    assert [h.state for h in handles] == ["dropped"] * 4 + ["done"]
    after = client.wait(client.status(), timeout=10)
    assert after["decoder_runs"] - before["decoder_runs"] == 2  # one box decode each: busy and the latest
    assert after["queue"]["dropped"] - before["queue"]["dropped"] == 4
    assert {busy.id, handles[-1].id} <= set(after["order"])  # the dropped ones never started
    assert not {h.id for h in handles[:-1]} & set(after["order"])


def test_idle_backend_prefetches_neighbouring_slices(colin, atlas):
    axes = slice_axes(colin, "coronal")
    index, truth = middle_slice(atlas, axes, "Putamen_L")
    box = tight_box(truth)
    with BackendClient(device="cpu", prefetch=2) as backend:  # two slices either side (the default)
        backend.wait(backend.step(colin, "coronal", "prefetch", None, Prompt(index, tuple(box))), timeout=120)
        wait_for(lambda: (s := backend.wait(backend.status(), 10))["queue"]["prefetch_planned"] == 0
                 and s["queue"]["running"] is None, 60)
        before = backend.wait(backend.status(), timeout=10)["cache"]
        # Asked at once: queued steps run before prefetch, so none waits while the backend encodes the slices
        # a step before it planned (±3, ±4), which no assertion needs.
        steps = {step: backend.step(colin, "coronal", f"prefetch {step}", None, Prompt(index + step, tuple(box)))
                 for step in (1, -1, 2, -2)}
        for step, handle in steps.items():
            state, update = backend.wait(handle, timeout=60)
            assert sorted(update.changed) == [index + step] and state.masks[index + step].any()
        after = backend.wait(backend.status(), timeout=10)["cache"]
    assert after["misses"] == before["misses"]  # every one of the four slices was encoded before it was asked for
    assert after["hits"] >= before["hits"] + 4


def test_propagation_streams_and_cancel_applies_nothing(client, colin, atlas):
    axes = slice_axes(colin, "axial")
    index, truth = middle_slice(atlas, axes, "Putamen_L")
    seeded, _ = client.wait(client.step(colin, "axial", "putamen", None, UserEdit({index: truth})), 120)
    held = copy.deepcopy(seeded)
    handle = client.step(colin, "axial", "putamen", seeded,
                         Propagate(index, "up", rules=StopRules(min_similarity=None)))
    wait_for(lambda: len(handle.events) >= 2 or handle.done, 120, client)
    client.cancel(handle)
    # A status request goes out after the cancel and the backend reads them in order: when its reply is applied,
    # the running propagation has been told to stop. Record how many slices had come by then.
    marker = client.status()
    marker.finish = lambda message: len(handle.events)
    wait_for(lambda: handle.done and marker.done, 120, client)
    assert handle.state == "cancelled" and handle.result is None
    events = handle.take_events()
    assert len(events) <= marker.result + 1  # it stopped within one slice of being told
    indices = [i for i, _ in events]
    assert indices == list(range(index + 1, index + 1 + len(indices)))
    assert f"Cancelled at slice {indices[-1] + 1}" in handle.message  # the slice it was on was not sent
    assert_same_state(seeded, held)  # nothing was applied to what the caller holds
    # The same object goes on from the state the caller holds (the backend still holds it: the action alone).
    handle = client.step(colin, "axial", "putamen", seeded, Propagate(index, slice_range=(index - 2, index + 2),
                                                                      skip=1))
    result, update = client.wait(handle, 120)
    assert handle.sent < 2048
    assert sorted(update.changed) == [index - 2, index - 1, index + 1, index + 2]
    assert update.stopped == {"up": "range end", "down": "range end"}
    assert result.kinds[index] is Kind.USER and all(result.kinds[i] is Kind.ENGINE for i in update.changed)
    with pytest.raises(BackendError, match="(?i)a box is x0, y0, x1, y1"):
        client.wait(client.step(colin, "axial", "putamen", seeded, Prompt(index, (1.0, 2.0))), 60)
    with pytest.raises(BackendError, match="skip must be a whole number from 0 to 4"):
        client.wait(client.step(colin, "axial", "putamen", seeded, Propagate(index, skip=9)), 60)


# ---- priorities --------------------------------------------------------------------------------------------
def test_scheduler_lets_interactive_tasks_on_other_objects_through_a_running_one():
    scheduler = Scheduler()
    running = Task(1, "step", {}, interactive=False, subject="a")
    scheduler.submit(running)
    assert scheduler.take(0) is running
    same, other = Task(2, "step", {}, subject="a"), Task(3, "step", {}, subject="b")
    bulk = Task(4, "step", {}, interactive=False, subject="b")
    for task in (bulk, same, other):
        scheduler.submit(task)
    assert scheduler.take_interactive() is other  # not the one on the running task's object, not a bulk one
    scheduler.finish(other)
    assert scheduler.take_interactive() is None
    scheduler.finish(running)
    assert scheduler.take(0) is same and scheduler.take(0) is bulk  # interactive first
    assert list(scheduler.order) == [1, 3, 2, 4]
    first, second = Task(5, "step", {}, target="t"), Task(6, "step", {}, interactive=False, target="t")
    assert scheduler.submit(first) == [] and scheduler.submit(second) == [first]  # across both queues
    assert scheduler.stats()["dropped"] == 1


def test_interactive_steps_go_ahead_of_a_propagation_and_between_its_slices(client, colin, atlas, default_model, cache):
    """A long propagation on object A runs; a prompt on object B runs between two of its slices (its reply comes
    while A's slices still stream), a click on A waits for A's propagation to end, and of two previews of one
    target queued behind it the older is dropped."""
    axes = slice_axes(colin, "axial")
    index, truth = middle_slice(atlas, axes, "Putamen_L")
    index_b, truth_b = middle_slice(atlas, axes, "Caudate_R")
    box = tuple(tight_box(truth))
    first, _ = client.wait(client.step(colin, "axial", "A", None, Prompt(index, box, (), (index - 6, index + 6))),
                           300)
    extra = first.masks[index] & ~truth
    click = Click(index, deepest(extra if extra.any() else first.masks[index]), False)
    before = client.wait(client.status(), timeout=10)
    propagation = client.step(colin, "axial", "A", first, Propagate(index))  # 12 slices (the prompt's range)
    wait_for(lambda: propagation.id in client.wait(client.status(), 10)["order"], 120)  # it is running
    other = client.step(colin, "axial", "B", None, Prompt(index_b, tuple(tight_box(truth_b))))
    on_a = client.step(colin, "axial", "A", first, click)
    click_id = on_a.id
    previews = [client.step(colin, "axial", "A", None, Prompt(index, box), target="A/preview") for _ in range(2)]
    seen = {}
    for name, handle in (("other", other), ("click", on_a)):
        finish = handle.finish
        handle.finish = lambda message, name=name, finish=finish: (
            seen.setdefault(name, (propagation.done, len(propagation.events))), finish(message))[1]
    wait_for(lambda: all(h.done for h in (propagation, other, on_a, *previews)), 900, client)
    assert propagation.state == other.state == on_a.state == "done"
    streamed = len(propagation.take_events())
    assert streamed == len(propagation.result[1].changed) >= 10
    # B's reply came while A's propagation was running, and A streamed slices after it.
    assert seen["other"][0] is False and seen["other"][1] < streamed
    # The click on A came after A's propagation had ended (a step let through would have answered first).
    assert seen["click"] == (True, streamed)
    after = client.wait(client.status(), timeout=10)
    order = after["order"]
    assert order.index(propagation.id) < order.index(other.id) < order.index(click_id)
    # The backend's state of A moved on under the click's version: it was told so, and the client resent it whole.
    assert on_a.id != click_id and on_a.resend is None and on_a.sent > state_bytes(first)
    expected, _ = Engine(Session(colin, default_model, cache=cache), "axial").step(first, click)
    assert_same_state(on_a.result[0], expected)
    assert [h.state for h in previews] == ["dropped", "done"]
    assert previews[0].id not in order and previews[1].id in order
    assert after["queue"]["dropped"] - before["queue"]["dropped"] == 1


def test_a_version_names_one_state_even_after_two_whole_sends(client, colin, reference, default_model, cache):
    """Two steps on one new object (both send the state whole: None); the caller answers the first one's result
    with a click while the second still runs. The click names the first result's version and must apply to it."""
    mid = reference.mid
    first = Prompt(mid, reference.actions[0].box)
    client.wait(client.step(colin, "axial", "collide/warm", None, first), 300)  # its slice is encoded
    h1 = client.step(colin, "axial", "collide", None, first)
    h2 = client.step(colin, "axial", "collide", None, Prompt(150, None, ((90.0, 100.0, True),)))  # an uncached slice
    s1, _ = client.wait(h1, 300)
    if h2.done:
        pytest.skip("the second step ended before the first one's result was applied: nothing to check")
    click = Click(mid, deepest(s1.masks[mid]), False)
    h3 = client.step(colin, "axial", "collide", s1, click)  # s1 is the state this client got back: the action alone
    client.wait(h2, 300)
    got, _ = client.wait(h3, 300)  # today: "The object has no mask on slice …" (it ran on the second state)
    expected, _ = Engine(Session(colin, default_model, cache=cache), "axial").step(s1, click)
    assert_same_state(got, expected)


# ---- lost states and killed backends (these restart the module's backend: keep them last among its users) ----
def test_a_step_on_a_version_the_backend_does_not_hold_is_resent_whole(client, colin, reference):
    key = "thalamus/unknown"
    state, _ = client.wait(client.step(colin, "axial", key, None, reference.actions[0]), 300)
    whole = state_bytes(state)
    client._synced[key] = (999, state)  # the client believes the backend holds a version it never had
    handle = client.step(colin, "axial", key, state, reference.actions[1])
    first_id = handle.id
    state, update = client.wait(handle, 300)
    assert handle.id != first_id and handle.resend is None  # answered StateUnknown, sent again whole
    assert handle.sent > whole
    assert_same_state(state, reference.states[1])
    assert_same_update(update, reference.updates[1])


def test_a_backend_killed_between_two_clicks_loses_nothing(client, colin, reference):
    """The caller keeps the object's state; the backend's copy is a cache, so a restart loses nothing."""
    key = "thalamus/kill"
    state = None
    for action in reference.actions[:2]:
        state, _ = client.wait(client.step(colin, "axial", key, state, action), 300)
    assert_same_state(state, reference.states[1])
    held = copy.deepcopy(state)
    axes = slice_axes(colin, "axial")
    drawn = labelmap({"t": state}, axes, colin.array.shape)
    pid, restarts = client.pid, client.restarts
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: client.restarts == restarts + 1, 60, client)  # noticed at a poll (the GUI polls on a timer)
    handle = client.step(colin, "axial", key, state, reference.actions[2])  # a fresh backend
    first_id = handle.id
    new, update = client.wait(handle, 300)
    assert client.pid != pid and handle.id == first_id  # sent once, whole: never answered "send it again"
    assert handle.sent > state_bytes(state)  # the state went whole
    assert_same_state(new, reference.states[2])
    assert_same_update(update, reference.updates[2])
    assert_same_state(state, held)  # nothing the caller held changed
    assert np.array_equal(labelmap({"t": state}, axes, colin.array.shape), drawn)
    malformed = ObjectState(reference.range, {reference.mid: np.zeros((3, 3), bool)}, {reference.mid: Kind.KEY})
    with pytest.raises(BackendError, match="missing or not"):
        client.wait(client.step(colin, "axial", key, malformed, reference.actions[3]), 60)
    # The next click goes on from what this backend holds now: the action alone.
    handle = client.step(colin, "axial", key, new, reference.actions[3])
    last, _ = client.wait(handle, 300)
    assert handle.sent < 2048
    assert_same_state(last, reference.states[3])


def test_kill_9_and_hang_are_noticed_and_the_next_request_restarts(colin, atlas):
    axes = slice_axes(colin, "axial")
    index, truth = middle_slice(atlas, axes, "Hippocampus_L")
    with BackendClient(device="cpu", prefetch=0) as backend:
        state, _ = backend.wait(backend.step(colin, "axial", "h", None, UserEdit({index: truth})), 120)
        drawn = labelmap({"h": state}, axes, colin.array.shape)  # what the caller shows: the seed slice
        assert np.array_equal(axes.oriented(drawn > 0)[index], truth) and (drawn > 0).sum() == truth.sum()
        handle = backend.step(colin, "axial", "h", state, Propagate(index, rules=StopRules(min_similarity=None)))
        wait_for(lambda: handle.events or handle.done, 120, backend)
        first_pid = backend.pid
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: handle.done, 60, backend)
        assert handle.state == "failed" and handle.result is None and "Nothing from this request" in str(handle.error)
        assert handle.error.kind == "BackendDied"
        assert str(handle.error).startswith("The backend process")  # its end was seen, not its silence (10 s)
        streamed = handle.take_events()
        assert streamed and all(mask.any() for _, mask in streamed)  # slices did arrive before the kill ...
        after = labelmap({"h": state}, axes, colin.array.shape)  # ... and the caller's objects hold none of them
        assert np.array_equal(after, drawn)
        assert not any(axes.oriented(after)[i].any() for i, _ in streamed)

        _, box = box_ras(colin, atlas, "axial")
        action = prompt_from_ras(colin, axes, box_ras=box)
        result, _ = backend.wait(backend.step(colin, "axial", "h2", None, action), timeout=120)
        assert result.masks[action.index].any() and backend.pid != first_pid and backend.restarts == 1

        backend.heartbeat_timeout = 1.0  # a short watch, now that the model is loaded (loading it starves heartbeats)
        os.kill(backend.pid, signal.SIGSTOP)  # hung: alive but silent
        stuck = backend.status()
        wait_for(lambda: stuck.done, 60, backend)
        assert stuck.state == "failed" and "stopped answering" in str(stuck.error)  # the heartbeat, not the pipe
        backend.heartbeat_timeout = 60.0
        assert backend.wait(backend.status(), timeout=120)["volumes"] == []  # a fresh backend


def test_out_of_memory_is_reported_and_the_backend_keeps_serving(colin, atlas, default_model, monkeypatch):
    import torch

    replies = []
    worker = Worker(model=default_model, prefetch=0)
    backend = Backend(lambda header, arrays=None: replies.append(header), worker)
    worker.run(Task(1, "load_volume", {"volume": colin.identity, "ijk_to_ras": colin.ijk_to_ras.tolist()},
                    {"array": colin.array}, owner=backend))
    index, truth = middle_slice(atlas, slice_axes(colin, "axial"), "Hippocampus_L")
    action, _ = to_message(Prompt(index, tuple(tight_box(truth) + [-1, -1, 1, 1])))
    step = {"volume": colin.identity, "view": "axial", "object": "o", "state": None, "action": action}
    worker.cache.put("filler", torch.zeros(10))

    def out_of_memory(images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(default_model, "encode", out_of_memory)
    worker.run(Task(2, "step", step, owner=backend))
    assert replies[-1]["kind"] == "OutOfMemory" and "still running" in replies[-1]["message"]
    assert len(worker.cache) == 0 and "o" not in backend.states  # a failed step keeps no state
    monkeypatch.undo()
    worker.run(Task(3, "step", step, owner=backend))
    assert replies[-1]["op"] == "result" and replies[-1]["id"] == 3 and replies[-1]["version"] == 1


# ---- the channel -------------------------------------------------------------------------------------------
class RawBackend:
    """A backend process spoken to frame by frame, as a hostile or broken client would."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "SegmentWithSAMLib.backend.server", "--stdio", "--device", "cpu", "--prefetch", "0",
             *args],
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
    tiny = Volume(np.arange(4 * 16 * 16, dtype=np.int16).reshape(4, 16, 16), np.eye(4))
    prompt = {"type": "prompt", "index": 1, "clicks": [[3.0, 3.0, True]]}
    send(b"GET / HTTP/1.1\r\n\r\n")
    send(encode_bytes({"op": "load_volume", "id": 3}, {"array": np.zeros((128, 128, 128), np.uint8)}))
    send(encode_bytes({"op": "no_such_op", "id": 4}))
    send(encode_bytes({"op": "status"}))
    send(encode_bytes({"op": "predict", "id": 5, "volume": "unknown", "view": "axial"}))  # protocol 1's op
    send(encode_bytes({"op": "step", "id": 6, "volume": "unknown", "view": "axial", "object": "o", "action": prompt}))
    send(encode_bytes({"op": "load_volume", "id": 7, "volume": "0" * 32, "ijk_to_ras": np.eye(4).tolist()},
                      {"array": np.ones((4, 4, 4), np.int16)}))
    send(encode_bytes({"op": "load_volume", "id": 8, "volume": tiny.identity, "ijk_to_ras": np.eye(4).tolist()},
                      {"array": tiny.array}))
    send(encode_bytes({"op": "step", "id": 9, "volume": tiny.identity, "view": "axial", "object": "o", "version": 3,
                       "action": prompt}))
    send(encode_bytes({"op": "step", "id": 10, "volume": tiny.identity, "view": "axial", "object": "o",
                       "state": None, "action": {"type": "click", "index": 1}}))
    expected = [(None, "Not a SegmentWithSAM frame"), (None, "The payload is 2097"),
                (4, "Unknown operation 'no_such_op'"), (None, "Every request needs an integer 'id'"),
                (5, "Unknown operation 'predict'"), (6, "The backend has no volume 'unknown'"),
                (7, "The volume's content hash"), (8, None), (9, "This backend has no version 3 of 'o'"),
                (10, "The click action is malformed")]
    replies = [raw.reply(timeout=120) for _ in expected]
    for reply, (request_id, start) in zip(replies, expected, strict=True):
        assert reply["id"] == request_id, (reply, start)
        if start is None:
            assert reply["op"] == "result" and reply["volume"] == tiny.identity
        else:
            assert reply["op"] == "error" and reply["message"].startswith(start), (reply, start)
    assert replies[8]["kind"] == "StateUnknown"  # what makes a client send the state whole
    send(encode_bytes({"op": "status", "id": 11}))
    status = raw.reply()
    assert status["id"] == 11 and status["cache"]["max_bytes"] == 64 << 20 and status["states"] == 0


def test_protocol_version_mismatch_is_a_clear_error(raw):
    raw.process.stdin.write(encode_bytes({"op": "hello", "id": 1, "version": PROTOCOL_VERSION + 1}))
    reply = raw.reply()
    assert reply["kind"] == "VersionMismatch" and "protocol version" in reply["message"]
    assert f"speaks protocol version {PROTOCOL_VERSION + 1}" in reply["message"]  # both versions named
    assert f"this server speaks {PROTOCOL_VERSION}" in reply["message"]


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


def test_tcp_client_round_trip():
    with BackendClient(device="cpu", transport="tcp") as backend:
        status = backend.wait(backend.status(), timeout=60)
        assert status["version"] == PROTOCOL_VERSION
        targets = open_files(backend.pid)
        assert any(t.startswith("socket:") for t in targets)

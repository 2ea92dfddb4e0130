"""The backend process against in-process steps, side by side in one run (both step the same engine,
:meth:`SegmentWithSAMLib.engine.Engine.step`): a 2D prompt → mask on a cached slice, a 3D click on an object the
backend holds (time and bytes each way against the whole state), time to the first mask on a never-seen slice
with and without prefetch (the user moves on after 300 ms), and propagation throughput.

    python benchmarks/backend.py [--device cpu|cuda] [--trials 4] [--clicks 30] [--slices 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from SegmentWithSAMLib.actions import Box3D, Click, Prompt, Propagate, UserEdit
from SegmentWithSAMLib.backend.client import BackendClient
from SegmentWithSAMLib.cache import EmbeddingCache
from SegmentWithSAMLib.engine import Engine
from SegmentWithSAMLib.loading import load_model
from SegmentWithSAMLib.session import Session

from common import NO_STOPS, load_colin27, print_table, structure_slices, tight_box, write_json

VIEW = "axial"
HALF = 3  # the 3D box of the click measure spans 7 slices


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return (time.perf_counter() - start) * 1e3, value


def _box(mask2d, shift: float = 0.0) -> tuple[float, ...]:
    x0, y0, x1, y1 = tight_box(mask2d)
    return (x0 - shift, y0, x1 + shift, y1)


def _message_bytes(header: dict, arrays: dict) -> int:
    """A message's size as the client counts it (JSON header and array bytes)."""
    return len(json.dumps(header)) + sum(a.nbytes for a in arrays.values())


def _same(a, b) -> bool:
    return sorted(a.masks) == sorted(b.masks) and a.kinds == b.kinds and all(
        np.array_equal(a.masks[i], b.masks[i]) for i in a.masks)


def _wait_idle(client) -> None:
    """Until the backend has finished prefetching (so it does not compete for the CPU with what is timed)."""
    while (status := client.wait(client.status(), 60))["queue"]["prefetch_planned"] or status["queue"]["running"]:
        time.sleep(0.1)
    time.sleep(0.3)


def prompt_overhead(client, engine, volume, index, truth, prompts: int) -> dict:
    """A 2D box prompt on a cached slice (a new object each time), in process and in the backend, interleaved."""
    boxes = [_box(truth, shift=0.25 * (i % 8)) for i in range(prompts)]
    engine.step(None, Prompt(index, boxes[0]))
    client.wait(client.step(volume, VIEW, "prompt", None, Prompt(index, boxes[0])), 300)
    _wait_idle(client)
    status = [_timed(lambda: client.wait(client.status(), 60))[0] for _ in range(prompts)]
    local, remote = [], []
    for box in boxes:  # interleaved, so both see the same machine load
        local.append(_timed(lambda b=box: engine.step(None, Prompt(index, b)))[0])
        remote.append(_timed(lambda b=box: client.wait(client.step(volume, VIEW, "prompt", None, Prompt(index, b)),
                                                       60))[0])
    return {"status_round_trip_ms": statistics.median(status),
            "in_process_ms": statistics.median(local), "backend_ms": statistics.median(remote),
            "overhead_ms": statistics.median(np.subtract(remote, local))}


def click_cost(client, engine, volume, index, truth, clicks: int) -> dict:
    """A 3D box over 7 slices, then ``clicks`` positive clicks inside the mask on the slices around the box's,
    each on the state the one before returned: in process, and in the backend (which holds that state, so only
    the action goes out and only the changed slices come back)."""
    box3d = Box3D(index, _box(truth), (index - HALF, index + HALF))
    local, _ = engine.step(None, box3d)
    remote, _ = client.wait(client.step(volume, VIEW, "click", None, box3d), 600)
    _wait_idle(client)
    around = [i for i in range(index - HALF, index + HALF + 1) if i != index and local.masks.get(i) is not None
              and local.masks[i].any()]
    local_ms, remote_ms, sent, received, whole, same = [], [], [], [], [], True
    for n in range(clicks):
        slice_index = around[n % len(around)]
        rows, cols = np.nonzero(local.masks[slice_index])
        pick = (n * 7919) % len(rows)  # a pixel of the mask, different each time
        click = Click(slice_index, (float(cols[pick]), float(rows[pick])), True)
        ms, (local, _) = _timed(lambda c=click, s=local: engine.step(s, c))
        local_ms.append(ms)
        handle = client.step(volume, VIEW, "click", remote, click)
        ms, (remote, _) = _timed(lambda h=handle: client.wait(h, 300))
        remote_ms.append(ms)
        sent.append(handle.sent)
        received.append(handle.received)
        whole.append(_message_bytes(*remote.to_message()))
        same = same and _same(local, remote)
    return {"in_process_ms": statistics.median(local_ms), "backend_ms": statistics.median(remote_ms),
            "overhead_ms": statistics.median(np.subtract(remote_ms, local_ms)),
            "sent_bytes": statistics.median(sent), "received_bytes": statistics.median(received),
            "whole_state_bytes": statistics.median(whole), "same_as_in_process": bool(same)}


def first_mask_after_moving(client, volume, slices, truth_of, dwell_s: float = 0.3) -> list[float]:
    """For each slice pair (k, k+1): mask on k, wait ``dwell_s``, then time the first mask on k+1."""
    times = []
    for index in slices:
        client.wait(client.step(volume, VIEW, "moving", None, Prompt(index, _box(truth_of(index)))), 300)
        time.sleep(dwell_s)
        prompt = Prompt(index + 1, _box(truth_of(index + 1)))
        times.append(_timed(lambda p=prompt: client.wait(client.step(volume, VIEW, "moving", None, p), 300))[0])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=4, help="slice moves per prefetch setting")
    parser.add_argument("--clicks", type=int, default=30, help="2D prompts and 3D clicks timed")
    parser.add_argument("--slices", type=int, default=12, help="slices to propagate")
    args = parser.parse_args()
    volume, atlas = load_colin27()
    model = load_model("litemedsam", args.device, engine="torch")  # the backend below runs the same engine
    session = Session(volume, model, cache=EmbeddingCache())
    engine = Engine(session, VIEW)
    axes = engine.axes
    _, index, truth = next(structure_slices(atlas, axes, {"Putamen_L": 73}))
    oriented = axes.oriented(atlas.array == 73)

    def truth_of(i):
        return oriented[i] if oriented[i].any() else truth

    rows = []
    with BackendClient(device=args.device, prefetch=2, engine="torch") as client:
        prompts = prompt_overhead(client, engine, volume, index, truth, args.clicks)
        rows.append(["status round trip, median ms", "", prompts["status_round_trip_ms"], ""])
        rows.append(["2D prompt → mask (cached slice), median ms", prompts["in_process_ms"], prompts["backend_ms"],
                     f"overhead {prompts['overhead_ms']:.2f} ms"])
        clicks = click_cost(client, engine, volume, index, truth, args.clicks)
        rows.append(["3D click (backend holds the state), median ms", clicks["in_process_ms"], clicks["backend_ms"],
                     f"overhead {clicks['overhead_ms']:.2f} ms"])
        rows.append(["3D click bytes sent / received (whole state)", "",
                     f"{clicks['sent_bytes']:.0f} / {clicks['received_bytes']:.0f}",
                     f"whole state {clicks['whole_state_bytes']:.0f}"
                     + ("" if clicks["same_as_in_process"] else "; NOT the in-process masks")])
        low = index - 3 * args.trials - 6
        with_prefetch = first_mask_after_moving(client, volume, range(low, low + 3 * args.trials, 3), truth_of)
    half = args.slices // 2
    propagate = Propagate(index, "both", (index - half, index + half), NO_STOPS)
    with BackendClient(device=args.device, prefetch=0, engine="torch") as client:
        client.wait(client.step(volume, VIEW, "moving", None, Prompt(index, _box(truth))), 300)
        low = index + 6
        without_prefetch = first_mask_after_moving(client, volume, range(low, low + 3 * args.trials, 3), truth_of)
        seeded, _ = client.wait(client.step(volume, VIEW, "propagate", None, UserEdit({index: truth})), 60)
        t_remote, (_, remote) = _timed(lambda: client.wait(client.step(volume, VIEW, "propagate", seeded, propagate),
                                                           600))
    session.cache.clear()  # both propagations start with only the seed slice's neighbourhood unknown
    seed, _ = engine.step(None, UserEdit({index: truth}))
    t_local, (_, local) = _timed(lambda: engine.step(seed, propagate))
    rows.append(["first mask on the next slice after 300 ms, median ms", "",
                 f"{statistics.median(with_prefetch):.0f} (prefetch) / {statistics.median(without_prefetch):.0f} "
                 f"(none)", f"×{statistics.median(without_prefetch) / statistics.median(with_prefetch):.2f}"])
    local_rate = len(local.changed) / (t_local / 1e3)
    remote_rate = len(remote.changed) / (t_remote / 1e3)
    rows.append(["propagation slices/s (with encoding)", local_rate, remote_rate, f"×{remote_rate / local_rate:.2f}"])
    print(f"\nBackend vs in-process, LiteMedSAM on Colin27 ({args.device}):\n")
    print_table(["measure", "in-process", "backend", "ratio / note"], rows)
    write_json("backend", {"device": args.device, "prompt": prompts, "click": clicks,
                           "first_mask_ms": {"prefetch": with_prefetch, "no_prefetch": without_prefetch},
                           "propagation_slices_per_s": {"in_process": local_rate, "backend": remote_rate},
                           "propagated_slices": {"in_process": len(local.changed), "backend": len(remote.changed)}})


if __name__ == "__main__":
    main()

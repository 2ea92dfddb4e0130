"""The backend process against in-process calls, side by side in one run: click→mask overhead on a cached slice,
time to the first mask on a never-seen slice with and without prefetch (the user moves on after 300 ms), and
propagation throughput.

    python benchmarks/backend.py [--device cpu|cuda] [--trials 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from SegmentWithSAMLib.backend.client import BackendClient
from SegmentWithSAMLib.cache import EmbeddingCache
from SegmentWithSAMLib.models import load_model
from SegmentWithSAMLib.propagation import Propagator, StopRules
from SegmentWithSAMLib.session import Session

from common import load_colin27, print_table, structure_slices, write_json

NO_STOPS = {"min_similarity": None, "min_score": None, "max_area_ratio": None, "min_overlap": None}


def _box_ras(volume, axes, index, mask2d, shift=0.0):
    rows, cols = np.nonzero(mask2d)
    corners = np.array([[cols.min() - shift, rows.min()], [cols.max() + shift, rows.max()]], float)
    return volume.to_ras(axes.pixel_to_ijk(index, corners))


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return (time.perf_counter() - start) * 1e3, value


def click_overhead(client, session, volume, axes, index, truth, clicks: int) -> dict:
    boxes = [_box_ras(volume, axes, index, truth, shift=0.25 * (i % 8)) for i in range(clicks)]
    session.refine("axial", box_ras=boxes[0])
    client.wait(client.predict(volume, "axial", box_ras=boxes[0]), 300)
    _wait_idle(client)
    status = [_timed(lambda: client.wait(client.status(), 60))[0] for _ in range(clicks)]
    local, remote = [], []
    for box in boxes:  # interleaved, so both see the same machine load
        local.append(_timed(lambda b=box: session.refine("axial", box_ras=b))[0])
        remote.append(_timed(lambda b=box: client.wait(client.predict(volume, "axial", box_ras=b), 60))[0])
    return {"status_round_trip_ms": statistics.median(status),
            "in_process_ms": statistics.median(local), "backend_ms": statistics.median(remote),
            "overhead_ms": statistics.median(np.subtract(remote, local))}


def _wait_idle(client) -> None:
    """Until the backend has finished prefetching (so it does not compete for the CPU with what is timed)."""
    while (status := client.wait(client.status(), 60))["queue"]["prefetch_planned"] or status["queue"]["running"]:
        time.sleep(0.1)
    time.sleep(0.3)


def first_mask_after_moving(client, volume, axes, slices, truth_of, dwell_s: float = 0.3) -> list[float]:
    """For each slice pair (k, k+1): mask on k, wait ``dwell_s``, then time the first mask on k+1."""
    times = []
    for index in slices:
        client.wait(client.predict(volume, "axial", box_ras=_box_ras(volume, axes, index, truth_of(index))), 300)
        time.sleep(dwell_s)
        box = _box_ras(volume, axes, index + 1, truth_of(index + 1))
        times.append(_timed(lambda b=box: client.wait(client.predict(volume, "axial", box_ras=b), 300))[0])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=4, help="slice moves per prefetch setting")
    parser.add_argument("--clicks", type=int, default=30)
    parser.add_argument("--slices", type=int, default=12, help="slices to propagate")
    args = parser.parse_args()
    volume, atlas = load_colin27()
    model = load_model("litemedsam", args.device)
    session = Session(volume, model, cache=EmbeddingCache())
    axes = session.axes("axial")
    _, index, truth = next(structure_slices(atlas, axes, {"Putamen_L": 73}))
    oriented = axes.oriented(atlas.array == 73)

    def truth_of(i):
        return oriented[i] if oriented[i].any() else truth

    rows = []
    with BackendClient(device=args.device, prefetch=2) as client:
        clicks = click_overhead(client, session, volume, axes, index, truth, args.clicks)
        rows.append(["status round trip, median ms", "", clicks["status_round_trip_ms"], ""])
        rows.append(["click → mask (cached slice), median ms", clicks["in_process_ms"], clicks["backend_ms"],
                     f"overhead {clicks['overhead_ms']:.2f} ms"])
        low = index - 3 * args.trials - 6
        with_prefetch = first_mask_after_moving(client, volume, axes, range(low, low + 3 * args.trials, 3), truth_of)
    seeds, half = {"p": (index, truth)}, args.slices // 2
    with BackendClient(device=args.device, prefetch=0) as client:
        client.wait(client.predict(volume, "axial", box_ras=_box_ras(volume, axes, index, truth)), 300)
        low = index + 6
        without_prefetch = first_mask_after_moving(client, volume, axes, range(low, low + 3 * args.trials, 3), truth_of)
        client.wait(client.status(), 60)
        t_remote, remote = _timed(lambda: client.wait(client.propagate(
            volume, "axial", seeds, "both", (index - half, index + half), rules=NO_STOPS), 600))
    session.cache.clear()  # both propagations start with only the seed slice's neighbourhood unknown
    t_local, local = _timed(lambda: Propagator(session, "axial", StopRules(**NO_STOPS)).run(
        seeds, "both", (index - half, index + half)))
    rows.append(["first mask on the next slice after 300 ms, median ms", "",
                 f"{statistics.median(with_prefetch):.0f} (prefetch) / {statistics.median(without_prefetch):.0f} "
                 f"(none)", f"×{statistics.median(without_prefetch) / statistics.median(with_prefetch):.2f}"])
    local_rate = local.slice_count / (t_local / 1e3)
    remote_rate = remote.slice_count / (t_remote / 1e3)
    rows.append(["propagation slices/s (with encoding)", local_rate, remote_rate, f"×{remote_rate / local_rate:.2f}"])
    print(f"\nBackend vs in-process, LiteMedSAM on Colin27 ({args.device}):\n")
    print_table(["measure", "in-process", "backend", "ratio / note"], rows)
    write_json("backend", {"device": args.device, "click": clicks,
                           "first_mask_ms": {"prefetch": with_prefetch, "no_prefetch": without_prefetch},
                           "propagation_slices_per_s": {"in_process": local_rate, "backend": remote_rate},
                           "propagated_slices": {"in_process": local.slice_count, "backend": remote.slice_count}})


if __name__ == "__main__":
    main()

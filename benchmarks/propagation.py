"""3D propagation on Colin27 + AAL from one box on a structure's middle slice, side by side:
(a) naive: the previous mask's bounding box + 3 px as the next slice's box, until the mask is empty;
(b) the engine (SegmentWithSAMLib.propagation), also with ``skip=2`` (the model on every third slice, the two
between interpolated); (c) upper reference: the ground-truth box on every slice.

All three run within the structure's extent ± ``--pad`` slices (a user-set range), so the naive baseline's
run-on is bounded; 3D Dice counts every slice in that range. The engine is given the seed's box, as after
``segmentwithsam segment --box … --propagate``. Embeddings are shared between the methods and the cases (one
encoder run per slice); the engine's speed with encoding is measured on the first structure of each view, with
an empty embedding cache (for each of skip 0 and 2).

    python benchmarks/propagation.py [--structures Hippocampus_L,Putamen_L] [--views axial,coronal,sagittal]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from SegmentWithSAMLib.cache import EmbeddingCache
from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.geometry import bounding_box
from SegmentWithSAMLib.loading import configure_process_threads, load_model
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.propagation import Propagator
from SegmentWithSAMLib.session import Session

from common import VIEWS, load_colin27, print_table, write_json


def naive(session, view, seed_index, seed_mask, low, high) -> dict[int, np.ndarray]:
    out = {}
    for step in (1, -1):
        previous, index = seed_mask, seed_index
        while low <= index + step <= high:
            index += step
            session.set_slice(view, index)
            mask = session.predictor.predict(box=bounding_box(previous, 3.0)).masks[0]
            if not mask.any():
                break
            out[index], previous = mask, mask
    return out


def reference(session, view, truth) -> dict[int, np.ndarray]:
    out = {}
    for index in np.flatnonzero(truth.any(axis=(1, 2))):
        session.set_slice(view, int(index))
        out[int(index)] = session.predictor.predict(box=bounding_box(truth[index])).masks[0]
    return out


def score(masks: dict[int, np.ndarray], seed_index, seed_mask, truth, low, high) -> dict:
    volume = np.zeros_like(truth[low: high + 1])
    for index, mask in {**masks, seed_index: seed_mask}.items():
        volume[index - low] = mask
    reached = sorted({*masks, seed_index})
    extent = np.flatnonzero(truth.any(axis=(1, 2)))
    return {"dice3d": dice(volume, truth[low: high + 1]), "first": reached[0], "last": reached[-1],
            "true_first": int(extent[0]), "true_last": int(extent[-1]),
            "ends_within_2": bool(abs(reached[0] - extent[0]) <= 2 and abs(reached[-1] - extent[-1]) <= 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--structures", default=",".join(AAL_STRUCTURES))
    parser.add_argument("--views", default=",".join(VIEWS))
    parser.add_argument("--pad", type=int, default=12)
    args = parser.parse_args()
    volume, atlas = load_colin27()
    model = load_model("litemedsam")
    configure_process_threads(model)  # this script is the process's entry point
    session = Session(volume, model, cache=EmbeddingCache(8 << 30))
    records, rows, start, cold = [], [], time.perf_counter(), {}
    for view in args.views.split(","):
        axes = session.axes(view)
        session.cache.clear()  # the first structure of each view: the engine's speed includes encoding
        for number, name in enumerate(args.structures.split(",")):
            truth = axes.oriented(atlas.array == AAL_STRUCTURES[name])
            extent = np.flatnonzero(truth.any(axis=(1, 2)))
            seed_index = int(extent[len(extent) // 2])
            low, high = max(0, extent[0] - args.pad), min(axes.num_slices - 1, extent[-1] + args.pad)
            box = bounding_box(truth[seed_index])
            session.set_slice(view, seed_index)
            seed = session.predictor.predict(box=box).masks[0]
            record = {"structure": name, "view": view}
            for method, skip in (("engine", 0), ("skip2", 2)):
                if number == 0:
                    session.cache.clear()  # each is timed with encoding
                t = time.perf_counter()
                propagator = Propagator(session, view, skip=skip)
                masks = {step.index: step.mask
                         for step in propagator.steps((seed_index, seed), "both", (low, high), box=box)}
                speed = len(masks) / max(time.perf_counter() - t, 1e-9)
                record[method] = score(masks, seed_index, seed, truth, low, high)
                record[method]["stopped"] = dict(propagator.stopped)
                record[method]["slices_per_s"] = speed
                if number == 0:
                    cold.setdefault(method, []).append(speed)
            record["naive"] = score(naive(session, view, seed_index, seed, low, high), seed_index, seed, truth, low,
                                    high)
            record["reference"] = score(reference(session, view, truth), seed_index, seed, truth, low, high)
            records.append(record)
            rows.append([name, view, *(record[m]["dice3d"] for m in ("naive", "engine", "skip2", "reference")),
                         *(f"{record[m]['first']}-{record[m]['last']}" for m in ("naive", "engine")),
                         f"{record['reference']['true_first']}-{record['reference']['true_last']}",
                         f"{record['engine']['slices_per_s']:.2f}"])
    mean = {m: float(np.mean([r[m]["dice3d"] for r in records])) for m in ("naive", "engine", "skip2", "reference")}
    rows.append(["mean", "", mean["naive"], mean["engine"], mean["skip2"], mean["reference"], "", "", "", ""])
    print_table(["structure", "view", "(a) naive", "(b) engine", "(b) skip 2", "(c) GT box", "(a) reach", "(b) reach",
                 "truth", "(b) slices/s"], rows)
    ratio = mean["engine"] / mean["reference"]
    below = [f"{r['structure']}/{r['view']}" for r in records if r["engine"]["dice3d"] < r["naive"]["dice3d"]]
    ends = sum(r["engine"]["ends_within_2"] for r in records)
    print(f"\n(b)/(c) = {ratio:.2f}; (b) below (a) on: {below or 'none'}; (b) ends within 2 slices of the truth on "
          f"{ends}/{len(records)}; with encoding: (b) {np.mean(cold['engine']):.2f} slices/s, (b) skip 2 "
          f"{np.mean(cold['skip2']):.2f} slices/s")
    write_json("propagation", {"records": records, "mean": mean, "engine_over_reference": ratio,
                               "below_naive": below, "ends_within_2": ends,
                               "slices_per_s_with_encoding": cold["engine"],
                               "skip2_slices_per_s_with_encoding": cold["skip2"],
                               "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()

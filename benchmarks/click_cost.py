"""What a 3D click costs on the backend channel: bytes sent and received per click, now (the backend keeps the
object's state under a version: the click sends its action, the reply carries the changed slices) against the
protocol before it (the client sent the object's whole state with every click and got it back whole), on
Colin27 (the left hippocampus) and on a 512 × 512 × 300 CT-sized phantom with 3D boxes of growing spans.

Both sides come from the same run: "now" is what the client counted on its frames, "before" the size of the
same state and changed slices framed as the old ``interact`` request and reply were.

    python benchmarks/click_cost.py [--spans 10,40] [--json]

Writes results/click_cost.json.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage as ndi

from SegmentWithSAMLib.actions import Box3D, Click
from SegmentWithSAMLib.backend.client import BackendClient
from SegmentWithSAMLib.backend.protocol import encode
from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.geometry import Volume, bounding_box, slice_axes

from common import load_colin27, print_table, write_json


def framed(header: dict, arrays: dict) -> int:
    return sum(memoryview(b).nbytes for b in encode(header, arrays))


def phantom(shape=(300, 512, 512)) -> tuple[Volume, np.ndarray]:
    """A CT-sized volume (K, J, I) with an ellipsoid 'organ' in noise, 0.8 × 0.8 × 1.5 mm, and its mask."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    organ = ((k - 150) / 110) ** 2 + ((j - 256) / 90) ** 2 + ((i - 256) / 120) ** 2 <= 1
    rng = np.random.default_rng(0)
    array = (rng.normal(0, 20, shape) + np.where(organ, 60, -50)).astype(np.int16)
    return Volume(array, np.diag([0.8, 0.8, 1.5, 1.0])), organ


def clicks_on(volume: Volume, truth_kji: np.ndarray, middle: int, span: int, client: BackendClient,
              count: int = 3) -> list[dict]:
    """A 3D box over ``span`` slices around ``middle`` (axial), then ``count`` clicks at the largest error's
    deepest voxel; the bytes of each click now and before."""
    axes = slice_axes(volume, "axial")
    truth = axes.oriented(truth_kji)
    low, high = max(middle - span // 2, 0), min(middle + span // 2, axes.num_slices - 1)
    key = f"{volume.identity}/{span}"
    box = tuple(float(v) for v in bounding_box(truth[middle]))
    state, _ = client.wait(client.step(volume, "axial", key, None, Box3D(middle, box, (low, high))), 3600)
    rows = []
    for _ in range(count):
        predicted = state.oriented_mask(axes.num_slices, axes.image_shape)
        band = np.zeros_like(truth)
        band[low: high + 1] = truth[low: high + 1]
        under, over = band & ~predicted, predicted & ~band
        error, positive = (under, True) if under.sum() >= over.sum() else (over, False)
        d, r, c = np.unravel_index(np.argmax(ndi.distance_transform_edt(error)), error.shape)
        click = Click(int(d), (float(c), float(r)), positive)
        handle = client.step(volume, "axial", key, state, click)
        new, update = client.wait(handle, 3600)
        old_header, old_arrays = state.to_message()
        before_sent = framed({"op": "interact", "state": old_header, "action": {"type": "click"}}, old_arrays)
        new_header, new_arrays = new.to_message()
        before_received = framed({"op": "result", "state": new_header, "changed": sorted(update.changed)},
                                 {**new_arrays, **{f"changed/{i}": m for i, m in update.changed.items()}})
        rows.append({"span": high - low + 1, "object_slices": int(sum(m.any() for m in state.masks.values())),
                     "changed": len(update.changed), "sent": handle.sent, "received": handle.received,
                     "before_sent": before_sent, "before_received": before_received})
        state = new
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", default="10,40", help="the phantom's 3D box spans (slices)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    with BackendClient(device="cpu", dispatch="thread", request_timeout=3600) as client:
        colin, atlas = load_colin27()
        truth = atlas.array == AAL_STRUCTURES["Hippocampus_L"]
        oriented = slice_axes(colin, "axial").oriented(truth)
        slices = np.flatnonzero(oriented.any(axis=(1, 2)))
        results["Colin27 hippocampus"] = clicks_on(colin, truth, int(slices[len(slices) // 2]), len(slices), client)
        volume, organ = phantom()
        for span in (int(s) for s in args.spans.split(",")):
            results[f"512x512x300, span {span}"] = clicks_on(volume, organ, 150, span, client)
    rows = [[case, r["span"], r["object_slices"], r["changed"], r["sent"], r["before_sent"], r["received"],
             r["before_received"]] for case, per in results.items() for r in per]
    print_table(["case", "span", "object slices", "changed", "sent", "before: sent", "received",
                 "before: received"], rows)
    write_json("click_cost", results, one_line=args.json)


if __name__ == "__main__":
    main()

"""2D Dice of LiteMedSAM against the AAL atlas on Colin27, per structure and view, for a box prompt and for
point-only prompts (plain SAM point prompt vs the box ensemble), side by side in one run.

    python benchmarks/quality.py [--structures Hippocampus_L,Putamen_L]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage as ndi

from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.models import load_model
from SegmentWithSAMLib.prompts import PointStrategy, predict_prompts
from SegmentWithSAMLib.session import Session

from common import VIEWS, load_colin27, print_table, structure_slices, write_json

METHODS = ("box", "box+2px", "click:points", "click:box-ensemble")


def interior_point(mask: np.ndarray) -> np.ndarray:
    distance = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(np.argmax(distance), mask.shape)
    return np.array([[col, row]], dtype=float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--structures", default=",".join(AAL_STRUCTURES))
    args = parser.parse_args()
    structures = {n: AAL_STRUCTURES[n] for n in args.structures.split(",")}
    volume, atlas = load_colin27()
    session = Session(volume, load_model("litemedsam"))
    rows, records = [], []
    start = time.perf_counter()
    for view in VIEWS:
        axes = session.axes(view)
        for name, index, truth in structure_slices(atlas, axes, structures):
            session.set_slice(view, index)
            r, c = np.nonzero(truth)
            box = np.array([c.min(), r.min(), c.max(), r.max()], dtype=float)
            click = interior_point(truth)
            predictor = session.predictor
            masks = {
                "box": predictor.predict(box=box).masks[0],
                "box+2px": predictor.predict(box=box + [-2, -2, 2, 2]).masks[0],
                "click:points": predict_prompts(predictor, click, [1], strategy=PointStrategy.POINTS).masks[0],
                "click:box-ensemble": predict_prompts(predictor, click, [1], pixel_spacing=axes.pixel_spacing,
                                                      strategy=PointStrategy.BOX_ENSEMBLE).masks[0],
            }
            scores = {m: dice(masks[m], truth) for m in METHODS}
            records.append({"structure": name, "view": view, "slice": index, **scores})
            rows.append([name, view, index, *(scores[m] for m in METHODS)])
    means = {m: float(np.mean([r[m] for r in records])) for m in METHODS}
    rows.append(["mean", "", "", *(means[m] for m in METHODS)])
    print_table(["structure", "view", "slice", *METHODS], rows)
    for view in VIEWS:
        print(f"{view:9s} mean: " + ", ".join(
            f"{m} {np.mean([r[m] for r in records if r['view'] == view]):.3f}" for m in METHODS))
    write_json("quality", {"model": "litemedsam", "records": records, "mean": means,
                           "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()

"""2D Dice of LiteMedSAM against the AAL atlas on Colin27, per structure and view, for a box prompt and for
point-only prompts (plain SAM point prompt vs the boxes around the click, ``prompts.click_logits``), side by side
in one run; also the box and one click as the engine takes them (``Prompt``, as every front end sends it: the
box's mask taken on towards its sides, ``prompts.reaching_box_sides``; the boxes around the click refined by it).

    python benchmarks/quality.py [--structures Hippocampus_L,Putamen_L]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage as ndi

from SegmentWithSAMLib.actions import Prompt
from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.engine import Engine
from SegmentWithSAMLib.loading import configure_process_threads, load_model
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.prompts import click_logits
from SegmentWithSAMLib.session import Session

from common import VIEWS, load_colin27, print_table, structure_slices, write_json

METHODS = ("box", "box+2px", "box:engine", "box+2px:engine", "click:points", "click:boxes", "click:engine")


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
    model = load_model("litemedsam")
    configure_process_threads(model)  # this script is the process's entry point
    session = Session(volume, model)
    rows, records = [], []
    start = time.perf_counter()
    for view in VIEWS:
        axes, engine = session.axes(view), Engine(session, view)
        for name, index, truth in structure_slices(atlas, axes, structures):
            session.set_slice(view, index)
            r, c = np.nonzero(truth)
            box = np.array([c.min(), r.min(), c.max(), r.max()], dtype=float)
            click = interior_point(truth)
            predictor = session.predictor
            masks = {
                "box": predictor.predict(box=box).masks[0],
                "box+2px": predictor.predict(box=box + [-2, -2, 2, 2]).masks[0],
                "box:engine": engine.step(None, Prompt(index, box))[1].changed[index],
                "box+2px:engine": engine.step(None, Prompt(index, box + [-2, -2, 2, 2]))[1].changed[index],
                "click:points": predictor.predict(click, [1]).masks[0],
                "click:boxes": click_logits(predictor, click, axes.pixel_spacing) > 0,
                "click:engine": engine.step(None, Prompt(index, None, ((*click[0], True),)))[1].changed[index],
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

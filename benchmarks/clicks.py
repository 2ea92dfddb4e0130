"""Fewer clicks: NoC@80/85/90 and Dice after 1, 3 and 5 clicks on Colin27 + AAL, for (a) the plain predictor
(clicks as point prompts, no mask prompt, first multimask output) and (b) the refinement loop, side by side.

    python benchmarks/clicks.py [--clicks 20] [--structures Hippocampus_L,...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.loading import configure_process_threads, load_model
from SegmentWithSAMLib.metrics import clicks_to_reach
from SegmentWithSAMLib.refinement import Refiner, run_clicks
from SegmentWithSAMLib.session import Session

from common import VIEWS, load_colin27, print_table, structure_slices, write_json

THRESHOLDS = (0.80, 0.85, 0.90)


def plain_step(predictor):
    """(a): every click so far as SAM point prompts, no mask prompt, the first of the multimask outputs."""
    clicks: list[tuple[tuple[float, float], bool]] = []

    def step(xy, positive):
        clicks.append((xy, positive))
        points = np.array([c[0] for c in clicks])
        labels = np.array([int(c[1]) for c in clicks])
        return predictor.predict(points, labels, multimask_output=True).masks[0]

    return step


def summarise(dices: list[float]) -> dict:
    out = {f"noc{round(t * 100)}": clicks_to_reach(dices, t) for t in THRESHOLDS}
    out.update({f"dice@{n}": dices[n - 1] for n in (1, 3, 5)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--structures", default=",".join(AAL_STRUCTURES))
    args = parser.parse_args()
    structures = {n: AAL_STRUCTURES[n] for n in args.structures.split(",")}
    volume, atlas = load_colin27()
    model = load_model("litemedsam")
    configure_process_threads(model)  # this script is the process's entry point
    session = Session(volume, model)
    records, start = [], time.perf_counter()
    for view in VIEWS:
        axes = session.axes(view)
        for name, index, truth in structure_slices(atlas, axes, structures):
            session.set_slice(view, index)
            plain = summarise(run_clicks(plain_step(session.predictor), truth, args.clicks))
            refiner = Refiner(session.predictor, axes.pixel_spacing)
            refined = summarise(run_clicks(refiner.add_click, truth, args.clicks))
            records.append({"structure": name, "view": view, "plain": plain, "refined": refined})
    keys = list(records[0]["plain"])
    rows = [[r["structure"], r["view"], *(r[m][k] for k in keys for m in ("plain", "refined"))] for r in records]
    mean = {m: {k: float(np.mean([r[m][k] for r in records])) for k in keys} for m in ("plain", "refined")}
    rows.append(["mean", "", *(mean[m][k] for k in keys for m in ("plain", "refined"))])
    print_table(["structure", "view", *(f"{k} {m[0]}" for k in keys for m in ("plain", "refined"))], rows)
    by_structure = {}
    for r in records:
        by_structure.setdefault(r["structure"], []).append(r)
    worse = [s for s, rs in by_structure.items()
             if np.mean([r["refined"]["noc85"] for r in rs]) > np.mean([r["plain"]["noc85"] for r in rs])]
    saving = 1 - mean["refined"]["noc85"] / mean["plain"]["noc85"]
    print(f"\n(a) plain vs (b) refined, mean NoC@85: {mean['plain']['noc85']:.2f} vs {mean['refined']['noc85']:.2f} "
          f"({saving:.0%} fewer clicks); structures where (b) is worse: {worse or 'none'}")
    write_json("clicks", {"records": records, "mean": mean, "noc85_saving": saving, "worse_structures": worse,
                          "budget": args.clicks, "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()

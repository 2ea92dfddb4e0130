"""A 3D box drawn short, and one click to put it right: the CVPR 2025 protocol's box with one side moved in by a
share of its width or height (each of the four sides in turn), propagated through its range, then one click where
the protocol puts it (the centre of the largest 3D error). DSC after the box and after the click, per structure
(the mean of the four sides) and per group: how much one click mends a box that missed part of the object.

    python benchmarks/short_box.py [--groups "CT organ,MR organ,lesion"] [--structures ...] [--short 0.3]
                                   [--cache-dir FOLDER]

Writes results/short_box.json.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from interactive3d import InProcess, add_selection, all_cases, means_by_group, model_and_cache, selection

from SegmentWithSAMLib.challenge import box_from_truth, score, simulate_click_3d

from common import print_table, write_json

SIDES = ("x_min", "y_min", "x_max", "y_max")


def short_box(truth: np.ndarray, side: str, share: float):
    """The protocol's box for ``truth`` with ``side`` moved in by ``share`` of the box's size across it."""
    box = box_from_truth(truth)
    axis = side[0]
    low, high = getattr(box, f"z_mid_{axis}_min"), getattr(box, f"z_mid_{axis}_max")
    cut = int(round(share * (high - low)))
    return replace(box, **{f"z_mid_{side}": getattr(box, f"z_mid_{side}") + (cut if side.endswith("min") else -cut)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_selection(parser)
    parser.set_defaults(groups="CT organ,MR organ,lesion")
    parser.add_argument("--short", type=float, default=0.3, help="the share of the box's size a side moves in")
    parser.add_argument("--cache-dir", type=Path, help="keep the embeddings in (and reuse them from) this folder")
    args = parser.parse_args()
    if not 0 < args.short < 1:
        parser.error("--short must lie between 0 and 1")
    groups, names = selection(parser, args)
    model, cache = model_and_cache(args.cache_dir or Path(tempfile.mkdtemp(prefix="short-box-")) / "embeddings")
    results = {}
    for name, group, image, spacing, truth in all_cases(groups, names):
        sides = {}
        for side in SIDES:
            driver = InProcess(model, cache)
            box = short_box(truth, side, args.short)
            mask, _ = driver.step(image, spacing, box, [], None)
            click = simulate_click_3d(truth, mask)
            clicked, _ = driver.step(image, spacing, box, [click], None)
            sides[side] = {"box": score(truth, mask, spacing)[0], "click": score(truth, clicked, spacing)[0],
                           "positive": bool(click[1])}
        results[name] = {"group": group, "sides": sides,
                         "box": float(np.mean([s["box"] for s in sides.values()])),
                         "click": float(np.mean([s["click"] for s in sides.values()]))}
        print(f"{name}: DSC {results[name]['box']:.3f} -> {results[name]['click']:.3f}", flush=True)
    if not results:
        parser.error("no structure matched the groups and names given")

    means = means_by_group(results)
    rows = [[name, *(f"{r['sides'][s]['box']:.3f} -> {r['sides'][s]['click']:.3f}" for s in SIDES),
             r["box"], r["click"]] for name, r in results.items()]
    rows += [[label, *([""] * len(SIDES)), float(np.mean([r["box"] for r in rs])),
              float(np.mean([r["click"] for r in rs]))] for label, rs in means.items()]
    print(f"\nThe protocol's box with one side moved in by {args.short:.0%} of its size, then one protocol click "
          "(in process, axial): DSC\n")
    print_table(["structure", *(f"{s} short: box -> click" for s in SIDES), "box", "one click"], rows)
    write_json("short_box", {"model": model.name, "engine": model.engine, "short": args.short,
                             "structures": results})


if __name__ == "__main__":
    main()

"""A first click anywhere inside an object: the mask it gives on its slice (``prompts.click_logits``), at the
object's middle and off it, with the rule of the smallest box's filled border and without it, side by side.

For each structure, slices evenly spread through it (the first and last left out), a click at the deepest pixel
of the slice's truth and ``--off`` clicks at random pixels at least ``OFF_MIN_DEPTH`` as deep (seeded), each
decoded alone on its slice (no slices beside, no box); Dice against the slice's truth. "margin always" is the
rule before ``prompts.FILLED_BORDER`` (a larger width beats the small boxes by ``LARGER_MARGIN`` wherever their
masks are patches of the object).

    python benchmarks/first_click.py [--groups "AAL,CT organ,MR organ,lesion"] [--structures ...]
                                     [--slices 9] [--off 2] [--seed 1] [--cache-dir FOLDER]

Writes results/first_click.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from interactive3d import (
    HEAD_CT_GROUP,
    add_selection,
    all_cases,
    every_group,
    means_by_group,
    model_and_cache,
    selection,
)
from scipy import ndimage as ndi

from SegmentWithSAMLib import prompts
from SegmentWithSAMLib.cvpr25 import VIEW, WINDOW, Case
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.session import Session

from common import print_table, write_json

OFF_MIN_DEPTH = 0.3  # an off-middle click lies at least this deep (relative to the slice's deepest pixel)
RULES = {"now": prompts.FILLED_BORDER, "margin always": np.inf}


def clicks(truth: np.ndarray, off: int, rng: np.random.RandomState) -> list[tuple[str, np.ndarray]]:
    """("middle" | "off", (1, 2) XY) for one slice's truth (rows, cols): its deepest pixel, then ``off`` others."""
    depth = ndi.distance_transform_edt(truth)
    row, col = np.unravel_index(np.argmax(depth), depth.shape)
    inner = np.argwhere(depth >= OFF_MIN_DEPTH * depth.max())
    picked = [("middle", (row, col))] + [("off", tuple(inner[rng.randint(len(inner))])) for _ in range(off)]
    return [(kind, np.array([[c, r]], float)) for kind, (r, c) in picked]


def structure(session: Session, truth: np.ndarray, slices: int, off: int, rng) -> dict[str, dict[str, list]]:
    """Dice per rule and kind of click on ``slices`` slices of the object ``truth`` (D, H, W in the view)."""
    pixel_spacing = slice_axes(session.volume, VIEW).pixel_spacing
    filled = np.flatnonzero(truth.any(axis=(1, 2)))
    result = {rule: {"middle": [], "off": []} for rule in RULES}
    for index in np.unique(np.linspace(filled[0], filled[-1], slices + 2)[1:-1].round().astype(int)):
        if not truth[index].any():
            continue
        session.set_slice(VIEW, int(index))
        for kind, xy in clicks(truth[index], off, rng):
            for rule, border in RULES.items():
                prompts.FILLED_BORDER = border
                mask = prompts.click_logits(session.predictor, xy, pixel_spacing) > 0
                result[rule][kind].append(dice(mask, truth[index]))
    prompts.FILLED_BORDER = RULES["now"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_selection(parser)
    parser.set_defaults(groups=",".join(g for g in every_group() if g != HEAD_CT_GROUP))
    parser.add_argument("--slices", type=int, default=9, help="slices per structure (default 9)")
    parser.add_argument("--off", type=int, default=2, help="clicks off the middle per slice (default 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, help="keep the embeddings in (and reuse them from) this folder")
    args = parser.parse_args()
    groups, names = selection(parser, args)
    model, cache = model_and_cache(args.cache_dir or Path(tempfile.mkdtemp(prefix="first-click-")) / "embeddings")
    rng = np.random.RandomState(args.seed)
    results = {}
    for name, group, image, spacing, truth in all_cases(groups, names):
        volume = Case("case.npz", image, spacing, None, [[]]).volume()
        session = Session(volume, model, window=WINDOW, cache=cache)
        dices = structure(session, slice_axes(volume, VIEW).oriented(truth), args.slices, args.off, rng)
        results[name] = {"group": group, "dice": dices,
                         **{f"{kind} {rule}": float(np.mean(dices[rule][kind])) for rule in RULES
                            for kind in ("middle", "off")}}
        changed = np.subtract(sum(dices["now"].values(), []), sum(dices["margin always"].values(), []))
        results[name] |= {"higher": int((changed > 0.05).sum()), "lower": int((changed < -0.05).sum())}
        print(f"{name}: middle {results[name]['middle now']:.3f}, off {results[name]['off now']:.3f}", flush=True)
    if not results:
        parser.error("no structure matched the groups and names given")
    dices_columns, counts = ["middle now", "middle margin always", "off now", "off margin always"], ["higher", "lower"]
    columns = dices_columns + counts
    rows = [[name, *(r[c] for c in columns)] for name, r in results.items()]
    means = means_by_group(results)
    rows += [[label, *(float(np.mean([r[c] for r in rs])) for c in dices_columns),
              *(sum(r[c] for r in rs) for c in counts)] for label, rs in means.items()]
    print(f"\nA first click alone on its slice, Dice with the slice's truth ({args.slices} slices per structure; "
          f"the deepest pixel, and {args.off} clicks at least {OFF_MIN_DEPTH} as deep; higher / lower: clicks "
          "that moved by more than 0.05)\n")
    print_table(["structure", *columns], rows)
    write_json("first_click", {"model": model.name, "engine": model.engine, "slices": args.slices, "off": args.off,
                               "seed": args.seed, "structures": results,
                               "means": {label: {c: float(np.mean([r[c] for r in rs])) for c in columns}
                                         for label, rs in means.items()}})


if __name__ == "__main__":
    main()

"""Scribbles and lassos against clicks and the box (issue #31), on the interactive 3D protocol's cases.

Per structure, in process (one Segmenter per run), axial, whole volumes, the embeddings in a disk cache:

- **box**: the challenge's 3D box (step 0), then 5 steps of the challenge's clicks (the centre of the largest 3D
  error component), and beside them 5 steps of scribbles: each drawn along the skeleton of that component's cut
  on the click's slice (its longest path; positive where under-segmented, negative where over-segmented; a cut
  too small for a stroke gets the click itself);
- **lasso**: in place of the box, the truth's outline on the box's slice (the middle of the object's slices),
  each vertex moved 1–2 mm (a smooth random offset, seeded per structure), over the box's range; for each
  ``--snap`` width (``engine.SNAP_MM``: 0 is the plain outline).

Prints DSC per step and the mean gain per click and per scribble step, and writes results/scribbles.json. The
targets: a lasso's step 0 at least the box's + 0.05; a scribble step gaining at least a click step on average.

    python benchmarks/scribbles.py [--groups ...] [--structures ...] [--snap 0,1,2] [--steps 5]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import deque
from pathlib import Path

import numpy as np
from interactive3d import COLIN_GROUP, HEAD_CT_GROUP, _corners, all_cases

from SegmentWithSAMLib.challenge import CLICK_STEPS, box_from_truth, score, simulate_click_3d
from SegmentWithSAMLib.errors import PromptError

from common import print_table, write_json

JITTER_MM = (1.0, 2.0)
OUTLINE_MM = 2.0  # the simulated lasso's vertices: about this far apart along the outline


def longest_path(skeleton: np.ndarray) -> list[tuple[int, int]]:
    """The longest 8-connected path (row, col) through a skeleton's pixels (the farthest pixel from an end, found
    twice by breadth-first search)."""
    pixels = {tuple(p) for p in np.argwhere(skeleton)}

    def farthest(start):
        previous, queue, last = {start: None}, deque([start]), start
        while queue:
            last = queue.popleft()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    step = (last[0] + dr, last[1] + dc)
                    if step in pixels and step not in previous:
                        previous[step] = last
                        queue.append(step)
        path = [last]
        while previous[path[-1]] is not None:
            path.append(previous[path[-1]])
        return path

    return farthest(farthest(next(iter(pixels)))[0])


def simulated_scribble(truth: np.ndarray, prediction: np.ndarray):
    """The next scribble: (slice d, points (N, 2) as (w, h), positive), or the click ((d, h, w), positive) when
    the error's cut is too small for a stroke; None when the prediction is perfect."""
    from scipy import ndimage as ndi
    from skimage.morphology import skeletonize

    click = simulate_click_3d(truth, prediction)
    if click is None:
        return None
    (d, h, w), positive = click
    error = (truth[d] & ~prediction[d]) if positive else (prediction[d] & ~truth[d])
    parts, _ = ndi.label(error)
    cut = parts == parts[h, w] if parts[h, w] else error
    skeleton = skeletonize(cut)
    path = longest_path(skeleton) if skeleton.any() else []
    if len(path) < 3:
        return "click", click
    points = np.array([(c, r) for r, c in path[:: max(1, len(path) // 12)] + [path[-1]]], float)
    return "scribble", (d, points, positive)


def jittered_outline(mask: np.ndarray, spacing_hw: tuple[float, float], seed: int) -> np.ndarray:
    """The largest outline of ``mask`` (H, W) as points (N, 2) (w, h), about OUTLINE_MM apart, each moved by a
    smooth random offset of JITTER_MM; retried until it does not cross itself (else the outline unmoved)."""
    from skimage.measure import find_contours

    from SegmentWithSAMLib.strokes import check_stroke

    contour = max(find_contours(np.pad(mask, 1).astype(float), 0.5), key=len) - 1  # (row, col)
    length = np.sum(np.linalg.norm(np.diff(contour, axis=0) * spacing_hw, axis=1))
    points = contour[:: max(1, int(len(contour) / max(length / OUTLINE_MM, 3)))][:, ::-1]
    rng = np.random.default_rng(seed)
    scale = np.array([spacing_hw[1], spacing_hw[0]])
    for _ in range(20):
        offsets = rng.normal(size=points.shape)
        offsets = (np.roll(offsets, 1, 0) + offsets + np.roll(offsets, -1, 0)) / 3  # smooth along the outline
        offsets /= np.linalg.norm(offsets, axis=1, keepdims=True) + 1e-9
        moved = points + offsets * rng.uniform(*JITTER_MM, size=(len(points), 1)) / scale
        moved = np.clip(moved, 0, [mask.shape[1] - 1, mask.shape[0] - 1])
        try:
            return check_stroke(moved, mask.shape, closed=True)
        except PromptError:
            continue
    return check_stroke(points, mask.shape, closed=True)


def run_structure(model, cache, name, image, spacing, truth, steps: int, snaps: list[float]) -> dict:
    from SegmentWithSAMLib import engine
    from SegmentWithSAMLib.actions import Lasso, stroke_from_ras
    from SegmentWithSAMLib.api import Segmenter
    from SegmentWithSAMLib.cvpr25 import VIEW, WINDOW, Case

    box = box_from_truth(truth)
    volume = Case("case.npz", image, spacing, [box], [[]]).volume()

    def boxed() -> Segmenter:
        seg = Segmenter(volume, model, VIEW, WINDOW, cache)
        seg.box3d("object", volume.to_ras(_corners(box)), (box.z_min, box.z_max))
        return seg

    results = {}
    for kind in ("click", "scribble"):
        seg = boxed()
        dscs = [score(truth, seg.mask("object"), spacing)[0]]
        for _ in range(steps):
            found = simulate_click_3d(truth, seg.mask("object")) if kind == "click" else \
                simulated_scribble(truth, seg.mask("object"))
            if found is None:
                dscs.append(dscs[-1])
                continue
            if kind == "click" or found[0] == "click":
                (d, h, w), positive = found if kind == "click" else found[1]
                seg.click("object", volume.to_ras([w, h, d])[0], positive)
            else:
                d, points, positive = found[1]
                ras = volume.to_ras(np.column_stack([points, np.full(len(points), d)]))
                seg.step("object", stroke_from_ras(volume, seg.axes, ras, positive))
            dscs.append(score(truth, seg.mask("object"), spacing)[0])
        results[kind] = dscs
    outline = jittered_outline(truth[box.z_mid], (spacing[1], spacing[2]), seed=sum(map(ord, name)))
    saved = engine.SNAP_MM
    try:
        for snap in snaps:
            engine.SNAP_MM = snap
            seg = Segmenter(volume, model, VIEW, WINDOW, cache)
            seg.step("object", Lasso(box.z_mid, tuple(map(tuple, outline)), True, (box.z_min, box.z_max)))
            results[f"lasso {snap:g} mm"] = score(truth, seg.mask("object"), spacing)[0]
    finally:
        engine.SNAP_MM = saved
    return results


def main() -> None:
    from devset import GROUPS

    every_group = [COLIN_GROUP, HEAD_CT_GROUP, *GROUPS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, from {every_group} "
                        "(default: the development set's)")
    parser.add_argument("--structures", default="all", help="comma-separated structure names (default all)")
    parser.add_argument("--snap", default="0,1,2", help="lasso snap widths in mm to compare (default 0,1,2)")
    parser.add_argument("--steps", type=int, default=CLICK_STEPS, help="correction steps after the box (default 5)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "segmentwithsam-suggest-embeddings"),
                        help="the disk cache of embeddings (kept between runs)")
    args = parser.parse_args()

    from SegmentWithSAMLib.cache import EmbeddingCache
    from SegmentWithSAMLib.disk_cache import DiskEmbeddingCache
    from SegmentWithSAMLib.loading import configure_process_threads, load_model

    model = load_model()
    configure_process_threads(model)
    cache = EmbeddingCache(disk=DiskEmbeddingCache.for_model(model, args.cache, max_bytes=16 << 30))
    snaps = [float(v) for v in args.snap.split(",") if v]
    names = None if args.structures == "all" else args.structures.split(",")
    results = {}
    for name, group, image, spacing, truth in all_cases(args.groups.split(","), names):
        found = run_structure(model, cache, name, image, spacing, truth, args.steps, snaps)
        results[name] = {"group": group, **found}
        print(f"{name}: clicks " + " ".join(f"{v:.3f}" for v in found["click"]) + "; scribbles "
              + " ".join(f"{v:.3f}" for v in found["scribble"]) + "; "
              + ", ".join(f"{k} {v:.3f}" for k, v in found.items() if k.startswith("lasso")), flush=True)
    lassos = [f"lasso {s:g} mm" for s in snaps]
    rows = [[name, r["group"], r["click"][0], *(r[k] for k in lassos), r["click"][-1], r["scribble"][-1]]
            for name, r in results.items()]
    mean = {k: float(np.mean([r[k] for r in results.values()])) for k in lassos}
    click = np.mean([r["click"] for r in results.values()], axis=0)
    scribble = np.mean([r["scribble"] for r in results.values()], axis=0)
    rows.append(["mean", "", click[0], *mean.values(), click[-1], scribble[-1]])
    print_table(["structure", "group", "box DSC0", *(f"{k} DSC0" for k in lassos), f"box + {args.steps} clicks",
                 f"box + {args.steps} scribbles"], rows)
    gains = {"click_step": float((click[-1] - click[0]) / max(args.steps, 1)),
             "scribble_step": float((scribble[-1] - scribble[0]) / max(args.steps, 1))}
    print(f"\nmean gain per step: click {gains['click_step']:+.4f}, scribble {gains['scribble_step']:+.4f}; "
          + ", ".join(f"{k} − box DSC0 {mean[k] - click[0]:+.3f}" for k in lassos))
    write_json("scribbles", {"model": model.name, "steps": args.steps, "structures": results, "lasso_means": mean,
                             "click_means": click.tolist(), "scribble_means": scribble.tolist(), "gains": gains})


if __name__ == "__main__":
    main()

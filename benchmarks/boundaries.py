"""Where the NSD (normalized surface Dice at 2 mm) is lost (issue #30, item 4): the CVPR 2025 protocol's box and 5
clicks in process, then the final mask scored as it is and as it would be with one kind of error taken away.

- **extent**: the truth's first and last slices (the mask emptied on slices without truth, and the truth put on
  slices the mask misses): what the slice thickness and the object's ends cost;
- **ends**: the truth put on the slices where the mask holds more than twice the truth's pixels (the object's
  tapering first and last slices, which a chained mask overshoots);
- **smooth xy / smooth z**: the mask smoothed in the slice (Gaussian, 1 pixel) or across slices (0.7 slice),
  thresholded at 0.5: jagged or noisy edges;
- **erode / dilate**: the mask shrunk or grown by one pixel in each slice: a boundary bias;

and the share of the lost surface (both surfaces, by area) within 2–4 mm of the other (a boundary a pixel or two
off) and beyond 6 mm (a region missed or added). Oracle figures are in benchmarks/interactive3d.py.

    python benchmarks/boundaries.py [--groups "AAL,head CT,CT organ,MR organ,lesion"] [--structures ...]
                                    [--cache-dir FOLDER]

Writes results/boundaries.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from interactive3d import InProcess, add_selection, all_cases, means_by_group, model_and_cache, protocol, selection
from scipy import ndimage as ndi

from SegmentWithSAMLib.challenge import CLICK_STEPS, NSD_TOLERANCE_MM, normalized_surface_dice
from SegmentWithSAMLib.metrics import dice

from common import print_table, write_json

IN_SLICE = np.zeros((3, 3, 3), bool)
IN_SLICE[1] = ndi.generate_binary_structure(2, 1)  # a one-pixel step within each slice (D, H, W)


class KeepingMasks(InProcess):
    """The in-process driver, keeping each step's mask."""

    def __init__(self, model, cache) -> None:
        super().__init__(model, cache)
        self.masks: list[np.ndarray] = []

    def step(self, *args):
        mask, times = super().step(*args)
        self.masks.append(mask.copy())
        return mask, times


def overshooting(truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(D,) the slices of the truth where ``mask`` holds more than twice the truth's pixels."""
    return (mask.sum(axis=(1, 2)) > 2 * truth.sum(axis=(1, 2))) & truth.any(axis=(1, 2))


def variants(truth: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """``mask`` (D, H, W) with one kind of error taken away, or changed, each: see the module docstring."""
    truth_slices, mask_slices = truth.any(axis=(1, 2)), mask.any(axis=(1, 2))
    extent = mask.copy()
    extent[~truth_slices] = False
    missed = truth_slices & ~mask_slices
    extent[missed] = truth[missed]
    ends = mask.copy()
    over = overshooting(truth, mask)
    ends[over] = truth[over]
    return {"extent": extent, "ends": ends,
            "smooth xy": ndi.gaussian_filter(mask.astype(np.float32), (0.0, 1.0, 1.0)) > 0.5,
            "smooth z": ndi.gaussian_filter(mask.astype(np.float32), (0.7, 0.0, 0.0)) > 0.5,
            "erode": ndi.binary_erosion(mask, IN_SLICE), "dilate": ndi.binary_dilation(mask, IN_SLICE)}


def lost_surface(truth: np.ndarray, mask: np.ndarray, spacing) -> dict[str, float]:
    """The share of both surfaces (by area) farther than the tolerance from the other: all of it, within 2–4 mm
    and beyond 6 mm."""
    from surface_distance import compute_surface_distances

    found = compute_surface_distances(truth, mask, spacing_mm=tuple(float(s) for s in spacing))
    distances = np.concatenate([found["distances_gt_to_pred"], found["distances_pred_to_gt"]])
    areas = np.concatenate([found["surfel_areas_gt"], found["surfel_areas_pred"]])
    total = areas.sum()
    return {"lost": float(areas[distances > NSD_TOLERANCE_MM].sum() / total),
            "lost 2-4 mm": float(areas[(distances > NSD_TOLERANCE_MM) & (distances <= 4.0)].sum() / total),
            "lost > 6 mm": float(areas[distances > 6.0].sum() / total)}


def measure(truth: np.ndarray, mask: np.ndarray, spacing) -> dict:
    """DSC and NSD of ``mask`` and of each variant, the lost surface's shares, and the slices the ends rule fixes."""
    result = {"dsc": dice(truth, mask), "nsd": normalized_surface_dice(truth, mask, spacing),
              **lost_surface(truth, mask, spacing),
              "end slices": int(overshooting(truth, mask).sum())}
    for name, changed in variants(truth, mask).items():
        result[f"{name} dsc"] = dice(truth, changed)
        result[f"{name} nsd"] = normalized_surface_dice(truth, changed, spacing)
    return result


COLUMNS = ["dsc", "nsd", "lost", "lost 2-4 mm", "lost > 6 mm", "end slices", "extent nsd", "ends nsd", "ends dsc",
           "smooth xy nsd", "smooth z nsd", "erode nsd", "erode dsc", "dilate nsd"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_selection(parser)
    parser.add_argument("--cache-dir", type=Path, help="keep the embeddings in (and reuse them from) this folder")
    args = parser.parse_args()
    groups, names = selection(parser, args)
    model, cache = model_and_cache(args.cache_dir or Path(tempfile.mkdtemp(prefix="boundaries-")) / "embeddings")
    results = {}
    for name, group, image, spacing, truth in all_cases(groups, names):
        driver = KeepingMasks(model, cache)
        protocol(driver, image, spacing, truth, CLICK_STEPS)
        results[name] = {"group": group, "spacing": [float(s) for s in spacing],
                         **measure(truth, driver.masks[-1], spacing)}
        print(f"{name}: DSC {results[name]['dsc']:.3f} NSD {results[name]['nsd']:.3f}", flush=True)
    if not results:
        parser.error("no structure matched the groups and names given")

    means = means_by_group(results)
    rows = [[name, *(r[c] for c in COLUMNS)] for name, r in results.items()]
    rows += [[label, *(float(np.mean([r[c] for r in rs])) for c in COLUMNS)] for label, rs in means.items()]
    print(f"\nAfter the box and {CLICK_STEPS} clicks of the CVPR 2025 protocol (in process, axial): the final mask "
          "scored as it is and with one kind of error taken away\n")
    print_table(["structure", *COLUMNS], rows)
    write_json("boundaries", {"model": model.name, "engine": model.engine, "structures": results,
                              "means": {label: {c: float(np.mean([r[c] for r in rs])) for c in COLUMNS}
                                        for label, rs in means.items()}})


if __name__ == "__main__":
    main()

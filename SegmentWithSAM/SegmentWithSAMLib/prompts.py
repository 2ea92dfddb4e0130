"""A first positive click as calls a box-trained model (LiteMedSAM) handles well; removing negative-click parts.

LiteMedSAM's point embeddings were never trained (a click as a point prompt: mean 2D Dice 0.02 on Colin27 +
AAL); square boxes 14–40 mm wide centred on the click, their low-res logits averaged ("box ensemble"), reach
0.65, as good as a tight ground-truth box (``benchmarks/quality.py``, docs/measurements.md). Those widths fit
the brain's structures (14–26 mm across) and not an organ: on a kidney, a spleen, a liver or a tumour (40–160
mm) they gave a first-click Dice of 0.13–0.38, against 0.84–0.91 with the best single width. So larger boxes
are decoded too, and one replaces the ensemble where the model is sure of its mask (docs/interaction.md).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .geometry import bounding_box
from .predictor import SlicePredictor

# Side lengths (mm) of the candidate boxes around positive clicks: the ensemble, chosen by the benchmark above,
ENSEMBLE_BOX_MM = (14.0, 20.0, 28.0, 40.0)
# and the larger widths for an object bigger than those.
LARGER_BOX_MM = (56.0, 80.0, 112.0, 160.0, 224.0)
# A larger width wins when its fit (the predicted IoU × the 4th root of how central the clicks lie in its mask)
# beats every ensemble width's and reaches LARGER_MIN_FIT, and the model, given the tight box of that mask,
# predicts an IoU of LARGER_MIN_RESCORE or more (first-click Dice on 19 structures × 9 slices: AAL 0.599 → 0.599,
# the CT spleen 0.13 → 0.70, MR organs 0.18 → 0.80, tumours 0.38 → 0.64; docs/interaction.md, session 20).
LARGER_MIN_FIT = 0.8
LARGER_MIN_RESCORE = 0.8


def boxes_around(positive_xy: np.ndarray, pixel_spacing: tuple[float, float],
                 widths_mm: tuple[float, ...] = ENSEMBLE_BOX_MM) -> np.ndarray:
    """Boxes (B, 4) x0, y0, x1, y1 around the positive points' (N, 2) pixel XY bounding box, grown by each of
    the B ``widths_mm``; ``pixel_spacing`` is the slice's (row, col) pixel size in mm."""
    low, high = positive_xy.min(axis=0), positive_xy.max(axis=0)
    half_px = np.array(widths_mm)[:, None] / 2.0 / np.array([pixel_spacing[1], pixel_spacing[0]])
    return np.concatenate([low - half_px, high + half_px], axis=1)


def _centrality(mask: np.ndarray, points: np.ndarray) -> float:
    """How deep the points (N, 2) pixel XY lie in ``mask`` (rows, cols), as their mean depth over the mask's
    deepest: 1 at its centre, 0 outside it."""
    if not mask.any():
        return 0.0
    depth = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    rows = np.clip(np.rint(points[:, 1]).astype(int), 0, mask.shape[0] - 1)
    cols = np.clip(np.rint(points[:, 0]).astype(int), 0, mask.shape[1] - 1)
    return float(depth[rows, cols].mean() / depth.max())


def click_logits(predictor: SlicePredictor, positive_xy: np.ndarray, pixel_spacing: tuple[float, float],
                 negative_xy: np.ndarray | None = None, widest_mm: float = np.inf) -> np.ndarray:
    """The logit map (rows, cols) of an object started by positive points (N, 2) pixel XY (a click, or a
    stroke's points) on the slice set in ``predictor``: the ensemble's logits averaged, or, where a larger width
    of at most ``widest_mm`` fits better (see ``LARGER_MIN_FIT``) and its mask holds none of the negative clicks
    ``negative_xy`` (K, 2) on the slice, the average of that width's and its neighbours' on the ladder. All
    widths are decoded in one batch."""
    widths = ENSEMBLE_BOX_MM + LARGER_BOX_MM
    prediction = predictor.predict_boxes(boxes_around(positive_xy, pixel_spacing, widths))
    fit = prediction.scores * np.array([_centrality(mask, positive_xy) for mask in prediction.masks]) ** 0.25
    small = len(ENSEMBLE_BOX_MM)
    fit[small:][np.array(LARGER_BOX_MM) > widest_mm] = 0.0
    if negative_xy is not None and len(negative_xy):
        rows = np.clip(np.rint(negative_xy[:, 1]).astype(int), 0, prediction.masks.shape[1] - 1)
        cols = np.clip(np.rint(negative_xy[:, 0]).astype(int), 0, prediction.masks.shape[2] - 1)
        fit[small:][prediction.masks[small:, rows, cols].any(axis=1)] = 0.0
    best = small + int(np.argmax(fit[small:]))
    if (fit[best] > fit[:small].max() and fit[best] >= LARGER_MIN_FIT
            and predictor.predict(box=bounding_box(prediction.masks[best], 2.0)).scores[0] >= LARGER_MIN_RESCORE):
        return prediction.logits[best - 1: best + 2].mean(axis=0)
    return prediction.logits[:small].mean(axis=0)


def remove_clicked_regions(mask: np.ndarray, negative_xy: np.ndarray, keep_xy: np.ndarray = ()) -> np.ndarray:
    """Drop the connected parts of ``mask`` (rows, cols) that contain a negative click, except parts that also
    contain a point of ``keep_xy`` (the positive clicks)."""
    if not len(negative_xy) or not mask.any():
        return mask
    components, _ = ndi.label(mask)
    rows, cols = mask.shape

    def labels_at(points) -> set[int]:
        return {int(components[int(np.clip(round(y), 0, rows - 1)), int(np.clip(round(x), 0, cols - 1))])
                for x, y in points} - {0}

    hit = labels_at(negative_xy) - labels_at(keep_xy)
    return mask & ~np.isin(components, list(hit)) if hit else mask

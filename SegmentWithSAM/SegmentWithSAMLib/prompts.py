"""A first positive click as a box-trained model (LiteMedSAM) handles well; a box's mask that reaches its sides;
removing negative-click parts.

LiteMedSAM's point embeddings were never trained (a click as a point prompt: mean 2D Dice 0.02 on Colin27 +
AAL); square boxes 14–40 mm wide centred on the click, their low-res logits averaged ("box ensemble"), reach
0.65, as good as a tight ground-truth box (``benchmarks/quality.py``, docs/measurements.md). Those widths fit
the brain's structures (14–26 mm across) and not an organ: on a kidney, a spleen, a liver or a tumour (40–160
mm) they gave a first-click Dice of 0.13–0.38, against 0.84–0.91 with the best single width. So larger boxes
are decoded too, and one replaces the ensemble where the model is sure of its mask (docs/interaction.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from .geometry import bounding_box
from .predictor import Prediction, SlicePredictor

# Side lengths (mm) of the candidate boxes around positive clicks: the ensemble, chosen by the benchmark above,
ENSEMBLE_BOX_MM = (14.0, 20.0, 28.0, 40.0)
# and the larger widths for an object bigger than those.
LARGER_BOX_MM = (56.0, 80.0, 112.0, 160.0, 224.0)
# A larger width wins when its fit (the predicted IoU × the 4th root of how central the clicks lie in its mask)
# beats every ensemble width's and reaches LARGER_MIN_FIT, and the model, given the tight box of that mask,
# predicts an IoU of LARGER_MIN_RESCORE or more (first-click Dice on 19 structures × 9 slices, with the fallback
# below: AAL 0.599 → 0.606, the CT spleen 0.13 → 0.70, MR organs 0.18 → 0.81, tumours 0.38 → 0.72;
# docs/interaction.md, session 20).
LARGER_MIN_FIT = 0.8
LARGER_MIN_RESCORE = 0.8
# ... or, below LARGER_MIN_FIT, when its fit beats every ensemble width's by LARGER_MARGIN and no negative click
# lies on the slice (a negative click sends the choice back to the small boxes, below): the model clearly prefers
# the larger box though the click lies off the object's middle on its slice, as the CVPR 2025 protocol's first
# click (the object's centre in 3D) often does on thick slices. Objects started by clicks alone, 5 protocol clicks:
# the right MR kidney .104 -> .909, the whole tumour .570 -> .845, the MR spleen .835 -> .853, the other 18
# structures unchanged (on the AAL structures a larger width's fit beats the ensemble's by less); a 3D box's
# objects unchanged (docs/interaction.md, "Session 32").
LARGER_MARGIN = 0.15
# Where a width's fit has held on the slices either side too (``neighbours``: a first click on thick slices), its
# tight box's rescore need reach only LARGER_MIN_RESCORE_BESIDE: two more views of the object agreed on its width.
# Clicks alone, 5 protocol clicks: the MR liver .037 -> .573 (its first click's 112 mm mask, rescored .709, had
# lost to a 231-pixel patch); the other 20 structures and the 3D box's objects identical at every step, alike for
# 0.6, 0.65 and 0.7. On the CT spleen's and MR kidney's test slices, 120 first clicks at least a fifth as deep as
# the organ's deepest pixel, with this rule, BESIDE_MIN_FIT and the averaging of click_logits: 16 higher (mean Dice
# .410 -> .467), none lower (docs/interaction.md, "Session 34").
LARGER_MIN_RESCORE_BESIDE = 0.65
# ... where that fit is at least BESIDE_MIN_FIT: the hippocampus on 4 mm slices (Colin27 with every fourth slice),
# no small box's mask holding the click on a slice beside, chose a 56 mm box at a fit of .38 (rescored .77), 849
# pixels on the click's 364-pixel slice (after five clicks .400 -> .285); the organs' widths that gained fit .56-.72.
BESIDE_MIN_FIT = 0.5
# Where the smallest box's mask reaches along at least FILLED_BORDER of that box's border (within BORDER_MM inside
# its sides, in whole pixels), the object goes on past the small boxes on most sides, and their masks are patches of
# it: a larger width then needs no margin over them, and a rescore of LARGER_MIN_RESCORE_BESIDE. First clicks alone
# on 19 structures × 9 slices (benchmarks/first_click.py), Dice on the slice: the 7 organs and tumours off their
# middles .493 -> .577, at the deepest pixel .780 -> .801, 22 clicks higher, none lower; the 12 AAL structures
# unchanged (their smallest box's border reached .57 at most; at 0.45, 6 clicks were lower; docs/interaction.md).
FILLED_BORDER = 0.7
BORDER_MM = 3.0
# A negative click rules a larger width out when it lies this deep in that width's mask (relative to the mask's
# deepest point): a click in the middle of a leak says the box is too wide; one at the edge trims the mask (ruling
# the width out there dropped an MR kidney's Dice from 0.96 to 0.16 in one click).
NEGATIVE_DEPTH = 0.5
# A box's mask and the sides of the box: LiteMedSAM's mask often stops short of a side of the box drawn around the
# object (on the boxes' own slices of the 21 structures of the CVPR 2025 protocol, 41 of 84 sides by more than 3
# pixels). Where it stays more than SIDE_GAP_PX from a side, the pixels between whose logit is above SIDE_LOGIT and
# that connect to the mask join it. One box on a slice, 2D Dice (benchmarks/quality.py, 36 Colin27 slices): tight
# boxes 0.634 -> 0.661, 2 px larger 0.674 -> 0.706 (none lower by 0.01); the protocol's boxes on the 21 structures'
# own slices 0.728 -> 0.757 (docs/interaction.md, "Session 37"). Propagation chains from the model's own mask.
SIDE_GAP_PX = 3
SIDE_LOGIT = -2.0
SIDE_JOINED_LOGIT = 1e-3


def boxes_around(positive_xy: np.ndarray, pixel_spacing: tuple[float, float],
                 widths_mm: tuple[float, ...] = ENSEMBLE_BOX_MM) -> np.ndarray:
    """Boxes (B, 4) x0, y0, x1, y1 around the positive points' (N, 2) pixel XY bounding box: each side the
    points' extent plus one of the B ``widths_mm``; ``pixel_spacing`` is the slice's (row, col) pixel size in mm."""
    low, high = positive_xy.min(axis=0), positive_xy.max(axis=0)
    half_px = np.array(widths_mm)[:, None] / 2.0 / np.array([pixel_spacing[1], pixel_spacing[0]])
    return np.concatenate([low - half_px, high + half_px], axis=1)


def _pixels(mask: np.ndarray, points) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, cols) in ``mask`` (rows, cols) of points (N, 2) pixel XY, clipped to it."""
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    rows = np.clip(np.rint(points[:, 1]).astype(int), 0, mask.shape[0] - 1)
    cols = np.clip(np.rint(points[:, 0]).astype(int), 0, mask.shape[1] - 1)
    return rows, cols


def _depths(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """How deep each of the points (N, 2) pixel XY lies in ``mask`` (rows, cols), over the mask's deepest: 1 at
    its centre, 0 outside it (no distance transform when none is inside)."""
    rows, cols = _pixels(mask, points)
    if not mask[rows, cols].any():
        return np.zeros(len(rows))
    depth = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return depth[rows, cols] / depth.max()


def _border_reached(mask: np.ndarray, box: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """The share of the border of ``box`` (4,) x0, y0, x1, y1, clipped to ``mask`` (rows, cols), along which the
    mask lies within ``BORDER_MM`` inside the side (whole pixels of the (row, col) ``pixel_spacing``, at least one)."""
    rows, cols = mask.shape
    top, bottom = int(np.ceil(max(box[1], 0))), int(np.floor(min(box[3], rows - 1)))
    left, right = int(np.ceil(max(box[0], 0))), int(np.floor(min(box[2], cols - 1)))
    inside = mask[top: bottom + 1, left: right + 1]
    across_rows, across_cols = (max(1, int(np.ceil(BORDER_MM / spacing))) for spacing in pixel_spacing)
    sides = (inside[:across_rows].any(axis=0), inside[-across_rows:].any(axis=0),
             inside[:, :across_cols].any(axis=1), inside[:, -across_cols:].any(axis=1))
    return float(np.concatenate(sides).mean())


def _fits(prediction: Prediction, positive_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each box's fit (its predicted IoU × the 4th root of the points' centrality in its mask) and centrality."""
    centrality = np.array([_depths(mask, positive_xy).mean() for mask in prediction.masks])
    return prediction.scores * centrality**0.25, centrality


def click_logits(predictor: SlicePredictor, positive_xy: np.ndarray, pixel_spacing: tuple[float, float],
                 negative_xy: np.ndarray | None = None, widest_mm: float = np.inf,
                 neighbours: Callable[[np.ndarray], list[Prediction]] | None = None) -> np.ndarray:
    """The logit map (rows, cols) of an object started by positive points (N, 2) pixel XY (a click, or a
    stroke's points) on the slice set in ``predictor``.

    All widths are decoded in one batch. A larger width of at most ``widest_mm`` is eligible unless one of the
    negative clicks ``negative_xy`` (K, 2) on the slice lies deep in its mask (``NEGATIVE_DEPTH``); the best
    eligible one wins under the rule of ``LARGER_MIN_FIT`` (or ``LARGER_MARGIN``, none where the smallest box's mask
    fills its border: ``FILLED_BORDER``) and ``LARGER_MIN_RESCORE``, and its logits are averaged with those of its
    eligible neighbours on the ladder whose masks hold the points too (a wider box's mask of another object beside
    it, averaged in, left a mask of neither, not under the click: on the MR kidney's test slice 2 of 16 clicks off
    its middle, Dice .04 -> .59; docs/interaction.md, "Session 34").
    Otherwise the logits of the ensemble's widths whose masks hold the points are averaged (all four where none
    does). ``neighbours(boxes)``, optional: the same boxes (B, 4) decoded on the slices either side (a 3D object's
    first click); each width's fit is then its lowest over the three slices, and from ``BESIDE_MIN_FIT`` its
    rescore is held to ``LARGER_MIN_RESCORE_BESIDE``."""
    widths = ENSEMBLE_BOX_MM + LARGER_BOX_MM
    boxes = boxes_around(positive_xy, pixel_spacing, widths)
    prediction = predictor.predict_boxes(boxes)
    fit, centrality = _fits(prediction, positive_xy)
    for other in neighbours(boxes) if neighbours is not None else ():
        fit = np.minimum(fit, _fits(other, positive_xy)[0])
    small = len(ENSEMBLE_BOX_MM)
    eligible = np.ones(len(widths), bool)
    eligible[small:] = np.array(LARGER_BOX_MM) <= widest_mm
    if negative_xy is not None and len(negative_xy):
        eligible[small:] &= [_depths(mask, negative_xy).max() < NEGATIVE_DEPTH for mask in prediction.masks[small:]]
    fit[~eligible] = 0.0
    best = small + int(np.argmax(fit[small:]))
    margin = LARGER_MARGIN if negative_xy is None or not len(negative_xy) else np.inf
    beside = neighbours is not None and fit[best] >= BESIDE_MIN_FIT
    min_rescore = LARGER_MIN_RESCORE_BESIDE if beside else LARGER_MIN_RESCORE
    if np.isfinite(margin) and _border_reached(prediction.masks[0], boxes[0], pixel_spacing) >= FILLED_BORDER:
        margin, min_rescore = 0.0, LARGER_MIN_RESCORE_BESIDE
    if (fit[best] >= min(LARGER_MIN_FIT, fit[:small].max() + margin) and fit[best] > fit[:small].max()
            and predictor.predict(box=bounding_box(prediction.masks[best], 2.0)).scores[0] >= min_rescore):
        chosen = np.zeros(len(widths), bool)
        chosen[best - 1: best + 2] = True
        return prediction.logits[chosen & eligible & (centrality > 0)].mean(axis=0)
    holding = centrality[:small] > 0
    return prediction.logits[:small][holding if holding.any() else slice(None)].mean(axis=0)


def reaching_box_sides(logits: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The logits (rows, cols) of a box prompt ``box`` (4,) x0, y0, x1, y1 with the mask taken on towards the
    sides it stays away from: a box is drawn around the object, so on a side more than ``SIDE_GAP_PX`` beyond the
    mask the object goes on. In the strip between the mask and such a side, the pixels whose logit is above
    ``SIDE_LOGIT`` and that connect to the mask join it (their logit raised to just above 0, so a click still
    moves them). The model's own mask is ``logits > 0``; the result's is what the user sees."""
    mask = logits > 0
    if not mask.any():
        return logits
    rows, cols = mask.shape
    x0, y0 = max(int(np.ceil(box[0])), 0), max(int(np.ceil(box[1])), 0)
    x1, y1 = min(int(np.floor(box[2])), cols - 1), min(int(np.floor(box[3])), rows - 1)
    left, top, right, bottom = bounding_box(mask).astype(int)
    strip = np.zeros_like(mask)
    if left - x0 > SIDE_GAP_PX:
        strip[y0: y1 + 1, x0: left] = True
    if top - y0 > SIDE_GAP_PX:
        strip[y0: top, x0: x1 + 1] = True
    if x1 - right > SIDE_GAP_PX:
        strip[y0: y1 + 1, right + 1: x1 + 1] = True
    if y1 - bottom > SIDE_GAP_PX:
        strip[bottom + 1: y1 + 1, x0: x1 + 1] = True
    candidates = strip & (logits > SIDE_LOGIT)
    if not candidates.any():
        return logits
    parts, _ = ndi.label(candidates | mask)
    joined = candidates & np.isin(parts, np.unique(parts[mask]))
    return np.where(joined, np.maximum(logits, SIDE_JOINED_LOGIT), logits).astype(logits.dtype)


def remove_clicked_regions(mask: np.ndarray, negative_xy: np.ndarray, keep_xy: np.ndarray = ()) -> np.ndarray:
    """Drop the connected parts of ``mask`` (rows, cols) that contain a negative click, except parts that also
    contain a point of ``keep_xy`` (the positive clicks)."""
    if not len(negative_xy) or not mask.any():
        return mask
    components, _ = ndi.label(mask)

    def labels_at(points) -> set[int]:
        return {int(label) for label in components[_pixels(mask, points)]} - {0}

    hit = labels_at(negative_xy) - labels_at(keep_xy)
    return mask & ~np.isin(components, list(hit)) if hit else mask

"""Click-by-click refinement on one slice, and the standard click simulator used to measure it.

LiteMedSAM was trained with box prompts only: its point and mask-prompt embeddings are untrained. Measured on
Colin27 + AAL (``benchmarks/clicks.py``), feeding the previous low-res logits back as a mask prompt made every
later click worse, and SAM-style point prompts barely move the mask. So refinement works on the logits instead:

1. The first prompt (a box, or a positive click through the boxes of :mod:`.prompts`) gives a logit map.
2. Each click moves the mask's iso-contour locally so that it passes through the click: near a positive click
   the threshold drops to the click's logit, near a negative click it rises above it. "Near" is 2 × the
   click's distance to the mask edge when it was placed, at most 4 mm (the reach measured best: docs/
   measurements.md), so a click fixes the error region it sits in.
3. The clicked pixel and a disk of that radius always follow the click, so every click is honoured and later
   clicks override earlier ones where they overlap, but never on the pixel of an earlier click of the other sign
   (a click's disk stops short of it). On the MR spleen's one-pixel error sliver the challenge's user clicked +
   and - on neighbouring pixels in turn, each click undoing the last (five clicks ended 0.00004 below the box);
   on the 2D protocol NoC@85 5.14 -> 5.08, NoC@90 12.2 -> 11.8 (stopping halfway to the other click: 5.19, 11.8).
   A separate part of the mask holding a negative click and no positive one is removed whole.
4. A negative click deep inside the mask (its radius at least ``LIKE_FROM_MM``) reaches across other tissue the
   mask holds, so, given the slice's image, it removes only pixels that look like the tissue it was placed on:
   intensity within ``LIKE_TOLERANCE`` of the median under its disk. A negative click in the brain inside the
   head CT's skull mask (the model fills the shell) cut the bone away with it: 0.217 -> 0.171 after five
   clicks, 0.362 with this rule (docs/interaction.md, "Session 23").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import PromptError
from .metrics import dice
from .predictor import Prediction, SlicePredictor
from .prompts import click_logits, remove_clicked_regions

REACH = 2.0  # how far a click's threshold shift reaches, in multiples of its distance to the mask edge
MIN_RADIUS = 2.0  # pixels: the smallest region a click edits (_OWN_PIXEL beside an earlier click of the other sign)
MAX_RADIUS_MM = 4.0  # the largest (caps 3, 4, 6, 10 mm and none measured: 5.19, 4.94, 5.42, 5.47, 5.47)
# A negative click this deep (its radius, mm) removes only pixels within LIKE_TOLERANCE (of the image's [0, 1]
# range) of the intensity under its disk. From 4 mm it also gated the brain tumours' clicks near the edge, whose
# level on a carried slice is other tissue (-0.0015 DSC after five clicks); tolerance 0.1 / 0.2 / 0.3 on the skull
# +0.183 / +0.193 / +0.193, 0.1 lost on the hippocampi.
LIKE_FROM_MM = 8.0
LIKE_TOLERANCE = 0.2
_EPS = 1e-3
_OWN_PIXEL = 0.5  # the radius that holds only the clicked pixel


@dataclass(frozen=True)
class Click:
    """A click at pixel ``xy`` = (col, row); ``radius`` is its distance to the mask edge when placed."""

    xy: tuple[float, float]
    positive: bool
    radius: float


def _pixel(xy, shape) -> tuple[int, int]:
    col, row = (int(round(v)) for v in xy)
    if not (0 <= row < shape[0] and 0 <= col < shape[1]):
        raise PromptError(f"The click at pixel {xy} is outside the slice ({shape[1]}×{shape[0]} pixels).")
    return row, col


def edge_distance(mask: np.ndarray, row: int, col: int) -> float:
    """Distance from (row, col) to the other side of the mask edge (pixels); MIN_RADIUS for an empty mask."""
    if not mask.any():
        return MIN_RADIUS
    same_side = mask if mask[row, col] else ~mask
    return float(ndi.distance_transform_edt(same_side)[row, col])


class Refiner:
    """Refine a mask on the slice currently set in ``predictor`` with a sequence of clicks.

    ``pixel_spacing`` is the slice's (row, col) pixel size in mm. ``logits`` (rows, cols), optional: the logit
    map to refine (its mask is ``logits > 0``: a box prompt's, or the 3D interaction's for a slice that already
    has a mask); without it the first positive click makes one. ``centred_removal``: None removes a part of
    the mask holding a negative click whole wherever the click is (the 2D loop); a fraction removes it only when
    the click is at least that deep in the part relative to its deepest point (a click in the middle of a wrong
    blob removes it, a click near the edge of a right one trims it). ``max_radius_mm``: the cap on a click's
    radius (default ``MAX_RADIUS_MM``; the 3D interaction scales it with the object's size). ``widest_box_mm``:
    the widest box a first positive click may decode (:func:`~.prompts.click_logits`; the 3D interaction limits
    it by the object's size on other slices). ``neighbours``: see :func:`~.prompts.click_logits` (the 3D
    interaction's first click on an object). ``image`` (rows, cols) in [0, 1]: the slice as the model sees it,
    optional; with it, a deep negative click removes only tissue like its own (step 4 above). :meth:`add_click`
    returns the new mask (rows, cols) bool.
    """

    def __init__(self, predictor: SlicePredictor, pixel_spacing: tuple[float, float] = (1.0, 1.0),
                 logits: np.ndarray | None = None,
                 centred_removal: float | None = None, max_radius_mm: float = MAX_RADIUS_MM,
                 widest_box_mm: float = np.inf, image: np.ndarray | None = None,
                 neighbours: Callable[[np.ndarray], list[Prediction]] | None = None) -> None:
        if not predictor.is_image_set:
            raise RuntimeError("Set the slice image on the predictor before refining.")
        self.predictor = predictor
        self.pixel_spacing = pixel_spacing
        self.centred_removal = centred_removal
        self.max_radius_mm = float(max_radius_mm)
        self.widest_box_mm = float(widest_box_mm)
        self.neighbours = neighbours
        self.shape = predictor.transform.image_shape
        if image is not None and np.shape(image) != self.shape:
            raise ValueError(f"The image has shape {np.shape(image)}; the slice is {self.shape}.")
        self.image = image
        self.clicks: list[Click] = []
        self.logits: np.ndarray | None = None  # (rows, cols) logits of the first prompt
        self._first_click: np.ndarray | None = None  # (1, 2) the positive click that made them, if one did
        self.mask = np.zeros(self.shape, dtype=bool)
        if logits is not None:
            if np.shape(logits) != self.shape:
                raise ValueError(f"The logit map has shape {np.shape(logits)}; the slice is {self.shape}.")
            self.logits = np.asarray(logits, dtype=np.float32)
        if self.logits is not None:
            self.mask = self.logits > 0

    def add_click(self, xy: tuple[float, float], positive: bool) -> np.ndarray:
        """Add a click at pixel ``xy`` (col, row) and return the refined mask."""
        row, col = _pixel(xy, self.shape)
        if (self.logits is None and positive) or (self._first_click is not None and not positive):
            # the first positive click's boxes, chosen again with each negative click (see click_logits)
            self._first_click = np.array([xy], float) if self._first_click is None else self._first_click
            negatives = np.array([c.xy for c in self.clicks if not c.positive] + ([] if positive else [xy]), float)
            self.logits = click_logits(self.predictor, self._first_click, self.pixel_spacing,
                                       negatives.reshape(-1, 2), self.widest_box_mm, self.neighbours)
        max_radius = self.max_radius_mm / float(np.mean(self.pixel_spacing))
        radius = max(MIN_RADIUS, min(max_radius, edge_distance(self.mask, row, col)))
        # Its disk stops short of the pixel of an earlier click of the other sign, so that one stays honoured.
        opposite = [np.hypot(c.xy[0] - xy[0], c.xy[1] - xy[1]) for c in self.clicks if c.positive != positive]
        radius = max(_OWN_PIXEL, min([radius, *(d - _OWN_PIXEL for d in opposite)]))
        self.clicks.append(Click((float(xy[0]), float(xy[1])), bool(positive), radius))
        self.mask = self._apply_clicks() if self.logits is not None else self.mask
        return self.mask

    def _removing_clicks(self, base: np.ndarray) -> list[tuple[float, float]]:
        """The negative clicks that remove the part of ``base`` they are in (see ``centred_removal``)."""
        negatives = [c.xy for c in self.clicks if not c.positive]
        if self.centred_removal is None or not negatives or not base.any():
            return negatives
        parts, count = ndi.label(base)
        depth = ndi.distance_transform_edt(base)
        deepest = ndi.maximum(depth, parts, np.arange(1, count + 1))
        centred = []
        for xy in negatives:
            row, col = _pixel(xy, self.shape)
            if parts[row, col] and depth[row, col] >= self.centred_removal * deepest[parts[row, col] - 1]:
                centred.append(xy)
        return centred

    def _apply_clicks(self) -> np.ndarray:
        rows, cols = np.ogrid[: self.shape[0], : self.shape[1]]
        threshold = np.zeros(self.shape, dtype=np.float32)
        distances, removable = [], []
        for click in self.clicks:
            distance = np.hypot(cols - click.xy[0], rows - click.xy[1])
            distances.append(distance)
            near = distance <= REACH * click.radius
            level = self.logits[_pixel(click.xy, self.shape)]
            if click.positive:
                threshold[near] = np.minimum(threshold[near], level - _EPS)
                removable.append(True)
            else:
                removable.append(self._like(click, distance))
                near &= removable[-1]
                threshold[near] = np.maximum(threshold[near], level + _EPS)
        # Parts of the model's own mask that hold a negative click (and no positive one) go whole.
        base = self.logits > 0
        kept = remove_clicked_regions(base, self._removing_clicks(base),
                                      [c.xy for c in self.clicks if c.positive])
        mask = (self.logits > threshold) & ~(base & ~kept)
        for click, distance, like in zip(self.clicks, distances, removable, strict=True):
            disk = distance <= click.radius
            mask = mask | disk if click.positive else mask & ~(disk & like)
        return mask

    def _like(self, click: Click, distance: np.ndarray) -> np.ndarray | bool:
        """The pixels a negative ``click`` (``distance`` from it, pixels) may remove: all (True) but for a deep
        click on a slice whose image is known, those whose intensity lies within LIKE_TOLERANCE of the median
        under its disk."""
        if self.image is None or click.radius * float(np.mean(self.pixel_spacing)) < LIKE_FROM_MM:
            return True
        level = float(np.median(self.image[distance <= click.radius]))
        return np.abs(self.image - level) <= LIKE_TOLERANCE


def simulate_click(truth: np.ndarray, mask: np.ndarray) -> tuple[tuple[float, float], bool] | None:
    """The next click of the standard protocol: the interior point (distance-transform maximum) of the largest
    error region, positive for a false negative region, negative for a false positive one.

    Returns ((col, row), positive), or None when ``mask`` equals ``truth``. Distances count the slice border as
    outside, so the click never lands on the border of an error region.
    """
    truth, mask = np.asarray(truth, bool), np.asarray(mask, bool)
    best = None
    for error, positive in ((truth & ~mask, True), (mask & ~truth, False)):
        labels, count = ndi.label(error)
        if not count:
            continue
        sizes = ndi.sum_labels(error, labels, np.arange(1, count + 1))
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            best = (sizes[largest], labels == largest + 1, positive)
    if best is None:
        return None
    _, region, positive = best
    distance = ndi.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return (float(col), float(row)), positive


def run_clicks(step, truth: np.ndarray, budget: int = 20, start: np.ndarray | None = None) -> list[float]:
    """Drive ``step(xy, positive) -> mask`` with simulated clicks against ``truth`` for ``budget`` clicks and
    return the Dice after each click. Once the mask is perfect, the remaining clicks score 1.0."""
    if budget < 1:
        raise ValueError(f"The click budget must be at least 1, not {budget}.")
    mask = np.zeros_like(truth, dtype=bool) if start is None else start
    dices: list[float] = []
    for _ in range(budget):
        click = simulate_click(truth, mask)
        if click is not None:
            mask = step(*click)
        dices.append(dice(mask, truth))
    return dices

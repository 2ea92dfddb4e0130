"""Slice-to-slice propagation of one object's mask through a volume, with range, stop rules, key slices,
streaming and cancel.

With models that have no memory of earlier slices (:class:`BoxChain`), each step prompts slice k±1 from the
mask on slice k. A model's mask rarely fills its box, so chaining mask boxes shrinks or drifts: the seed's
box-to-mask offset (grown by half a millimetre) is kept on every slice, and the previous mask is added as a
shape prior to the logits. LiteMedSAM's predicted quality, the area and the overlap with the previous slice
hardly change when the mask drifts onto a neighbour; the mean image-embedding feature of the mask does, so each
object's mask is compared with its seed's (cosine similarity) to stop (figures: docs/measurements.md). SAM 2
models track with their memory instead (:mod:`.video_propagation`), chosen in :class:`Propagator` only. With
``skip`` every (skip + 1)-th slice of the volume is segmented and the slices between are interpolated. Nothing is
written here: the caller (:mod:`.engine`) commits the slices when the step completed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy import ndimage as ndi

from .device import encode_batch
from .errors import PromptError, SegmentWithSAMError
from .geometry import bounding_box, equivalent_radius_mm
from .metrics import dice

# Margin (mm) added on every side to the box prompted on each slice. Measured (benchmarks/propagation.py, cached
# embeddings): 0.25–0.75 mm give 0.484–0.486 mean 3D Dice, 0 mm 0.469, 1.5 mm 0.463; averaging the logits of
# three boxes (−1, 0, +2 mm) gave 0.483 for three times the decoder's work.
BOX_MARGIN_MM = 0.5
# The previous slice's mask as a shape prior: PRIOR_WEIGHT × its signed distance in units of PRIOR_SCALE_MM,
# clipped to ±3, is added to the logits.
PRIOR_WEIGHT, PRIOR_SCALE_MM = 3.0, 2.0
# Across slices gap mm apart the shape prior is weighted min(1, PRIOR_GAP_MM / gap), and from EXPAND_FROM_MM on,
# a box side the mask reaches moves out by EXPAND_GAPS x the gap and the slice is decoded again, at most
# EXPAND_TIMES times. Thick slices change the object a lot: with the full prior and a box from the last mask,
# masks on 7.5-7.7 mm MR/CT slices lagged behind it (step 0 on the development set's abdominal organs: mean
# DSC 0.781; prior only 0.838; both 0.852, the oracle 0.939). On 1 mm slices the prior is needed (AAL: 0.559;
# a third of it 0.520) and moving box sides lost 0.04 (docs/interaction.md, "Step 0").
PRIOR_GAP_MM, EXPAND_GAPS, EXPAND_TIMES, EXPAND_FROM_MM = 2.0, 1.0, 3, 3.0
# Shrinking: across the same gaps the box then follows a shrinking object too. It is fitted once to the decoded
# mask (its box + offset + margin; each side that did not just move out moves in, by at most EXPAND_GAPS x the
# gap), and that decode is kept where the model's predicted IoU is higher. Boxes only grew before, so the CT
# spleen's masks stayed twice its size on its last slices (3,856 true pixels, about 7,200 masked). Step 0 /
# after 5 clicks: CT organ 0.872 / 0.878 -> 0.887 / 0.894, MR organs 0.844 / 0.883 -> 0.846 / 0.894. Kept
# without the IoU check it lost the MR liver's second lobe (0.730 -> 0.624 at step 0); moved in all the way,
# 0.619 (docs/interaction.md, "Session 21").
# Across the same gaps the box the seed came from (a 3D box's, as the user drew it) is decoded on each slice too,
# and its mask taken where the model predicts its IoU GIVEN_BOX_MARGIN higher than the chained mask's: a box
# chained from the last mask never finds a part it does not touch (the MR liver's second lobe on its upper
# slices). Step 0 / after 5 clicks: MR organs 0.846 / 0.894 -> 0.872 / 0.907 (liver 0.733 / 0.852 -> 0.809 /
# 0.891), the CT spleen unchanged. Margins 0, 0.01, 0.02, 0.03, 0.08, 0.12, 0.20: MR organs 0.867 / 0.899, 0.864
# / 0.898, 0.868 / 0.901, 0.867 / 0.902, 0.865 / 0.904, 0.852 / 0.894, 0.846 / 0.894. On 1 mm slices it lost
# (tumours 0.846 -> 0.828 at step 0), so thin slices chain only (docs/interaction.md, "Session 21"). A click's
# walk skips it (its box is the clicked mask's, not one the user drew): the MR liver's first click decodes 27 times,
# not 38, and every mask of the protocol's 21 structures stayed as it was (docs/interaction.md, "Session 29").
GIVEN_BOX_MARGIN = 0.05
# A propagation from a prompt (a 3D box, a lasso, Propagate; not a click's walk, whose time is the user's wait)
# takes each slice's logits as the mean of the chained prompt's with the box-to-mask offset grown by each of
# OFFSET_JITTER_PX on every side: the chain's discrete choices (which sides the mask reaches and move out, which
# decode the predicted IoU keeps) made step 0 jump with the box's size by a pixel. The MR spleen's box 1 px smaller
# on each side gave 0.874 against 0.950 (its masks stopped following it past slice 18); averaged, 0.951 and 0.950.
# On the 19 structures, step 0 with the box as given / 1 px smaller / 1 px larger: 0.672 / 0.669 / 0.669 alone,
# 0.674 / 0.676 / 0.672 averaged (docs/interaction.md, "Session 22"), for three times the decoder's work (step 0
# on cached embeddings about twice as long; clicks would have taken 4.4 s instead of 2.4 s at most).
OFFSET_JITTER_PX = (-1.0, 0.0, 1.0)
# The jitter is only for a seed whose box is narrower than this many model-input pixels on its shorter side. A
# pixel is under 1/64 of a wider box, and one decode does: on the head CT's skull and head and the MR liver
# (84-149 px) step 0 and every click stayed within 0.0016 of the three offsets' mean (the skull +0.0005, the
# liver's step 0 -0.0016 and five clicks -0.0002; the 18 other structures are narrower), and the head CT's two
# boxes through `cvpr25` on cached embeddings took 16-18 s instead of 29.5 s (docs/interaction.md, "Session 24").
JITTER_BELOW_PX = 64
# A range that came with the object's box (a 3D box) ends where the object does, and objects taper there: on the
# range's first and last slice a chained box (the previous mask's, grown by the seed's offset, with its shape prior)
# carries the slice before's size onto a smaller cap (the MR left kidney's last slice: 816 pixels masked, 194 true).
# There a seed narrower than JITTER_BELOW_PX is decoded from the previous mask's own box alone. In process on the 21
# structures (docs/interaction.md, "Session 25"), step 0 / after 5 clicks / NSD after 5 clicks: AAL .560 / .668 /
# .797 -> .563 / .672 / .801, MR organs .875 / .911 / .804 -> .880 / .915 / .815, lesions .847 / .860 / .718 ->
# .849 / .862 / .724, the CT spleen .887 / .891 / .684 -> .888 / .893 / .687, the worst single click -0.006 ->
# -0.001. The head CT's wide skull and head lost .0003 at step 0 with it (so wide seeds chain as before), and the
# offset kept with the shape prior dropped gained nothing (AAL .558 / .669).
# A large object (the seed's equivalent radius at least TAPER_FROM_MM) tapers over more than its last slice: the chain
# kept the tumour core's masks 26-30 pixels wide on its last 8 slices while it narrowed from 21 to 3. For such a
# narrow seed the ceil(TAPER_SHARE x (high - low)) slices before each end of a 3D box's range (at least one) are
# decoded from the previous mask's own box too, on a walk heading for that end.
# Step 0 / after 5 clicks on the development set (in process, docs/interaction.md, "Session 28"): the CT spleen
# .888 / .893 -> .896 / .900, MR organs .880 / .917 -> .882 / .921, tumours .849 / .861 -> .857 / .869 (NSD5 .723 ->
# .752); the AAL structures and the head CT unchanged. The same zone for every narrow seed lost on the AAL
# structures (shares 0.05 / 0.1: .563 -> .560 / .546 at step 0), and for wide seeds on the head CT (the skull .217
# -> .166). Shares 0.05 / 0.15 on the large seeds: tumours .854 / .860, the MR spleen .956 / .939 (.955 with none,
# .953 at 0.1).
TAPER_FROM_MM, TAPER_SHARE = 16.0, 0.1
# Propagator(skip=…): at most this many slices interpolated between two that the model segments.
MAX_SKIP = 4
# For a narrow seed (JITTER_BELOW_PX), or on slices at least EXPAND_FROM_MM thick, a skipping step is taken only
# where the model's mask on the slice it skips to agrees this well (Dice) with the mask it came from; else that
# stretch is done slice by slice, as where a stop rule refuses it. A narrow seed's mask there is also decoded once
# more from itself: across the skipped slices the box chained from the last mask lags behind an object that
# tapers. With skip 1 (every other slice encoded), step 0 of the protocol without / with both: the tumours' whole
# 0.806 / 0.841 and core 0.840 / 0.865 (0.835 and 0.863 with every slice encoded). Checked at 0.8, the MR liver's
# 7.7 mm slices were skipped too (0.810 -> 0.759; at 0.9 as with every slice). The head CT's wide objects on
# 1.5 mm slices gained .012 at step 0 from the check but its box step through `cvpr25` took 74-85 s instead of
# 57 s, past the time it is for (docs/interaction.md, "Session 27").
SKIP_AGREE = 0.9
# Without the seed's box, the box-to-mask offset is the margin (mm) whose box best reproduces the seed mask; for a
# drawn seed (a lasso's outline, a user's edit: not the model's own mask) the smallest margin within
# DRAWN_TOLERANCE Dice of the best. The model reproduces a drawn outline best from a wide box (6-8 mm on the
# putamina and the MR kidney), and that width, chained, let the masks grow slice by slice (Putamen_R's lasso: 461
# pixels on its slice, 937 ten slices on, 357 true); the tolerance chose 0-3 mm there (lasso step 0 on the
# development set: mean 3D Dice 0.687 -> 0.702, docs/strokes.md). A model-made seed (a click's) keeps the best
# margin: the tolerance lowered clicks that start an object (0.419 -> 0.405 after 5).
CALIBRATION_MM = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
DRAWN_TOLERANCE = 0.02


class Cancelled(SegmentWithSAMError):
    """The propagation was cancelled; nothing was applied."""


class Direction(str, Enum):
    """Which way to propagate: ``up`` = increasing slice index, ``down`` = decreasing, or ``both``."""

    UP = "up"
    DOWN = "down"
    BOTH = "both"

    def steps(self) -> tuple[int, ...]:
        return {Direction.UP: (1,), Direction.DOWN: (-1,), Direction.BOTH: (1, -1)}[self]


@dataclass(frozen=True)
class StopRules:
    """When a direction stops. Each rule but ``max_empty`` can be switched off with None; ``max_empty`` (at least
    1) always ends a direction after that many consecutive empty slices."""

    min_similarity: float | None = 0.65  # cosine similarity of the mask's image features to the seed's below this
    min_score: float | None = 0.35  # the model's predicted quality below this
    max_area_ratio: float | None = 2.5  # area grows or shrinks by more than this factor from the previous slice
    min_overlap: float | None = 0.2  # Dice with the previous slice's mask below this
    max_empty: int = 1  # this many consecutive empty slices

    @classmethod
    def from_options(cls, min_similarity: float, min_score: float, max_area_ratio: float, min_overlap: float,
                     max_empty: int) -> StopRules:
        """The rules from the command line's (or a manifest's) values, where a negative threshold (0 for
        ``max_area_ratio``) switches that rule off."""
        return cls(min_similarity=None if min_similarity < 0 else min_similarity,
                   min_score=None if min_score < 0 else min_score,
                   max_area_ratio=None if max_area_ratio <= 0 else max_area_ratio,
                   min_overlap=None if min_overlap < 0 else min_overlap, max_empty=max_empty)

    def check(self, mask: np.ndarray, score: float, previous: np.ndarray, similarity: float | None) -> str | None:
        """The reason to stop at this slice, or None to accept it (empty masks are counted by the caller;
        ``similarity`` None: the model has no such check)."""
        area, previous_area = int(mask.sum()), int(previous.sum())
        if not area:
            return None
        if self.min_similarity is not None and similarity is not None and similarity < self.min_similarity:
            return f"appearance similarity to the seed {similarity:.2f} < {self.min_similarity}"
        if self.min_score is not None and score < self.min_score:
            return f"predicted quality {score:.2f} < {self.min_score}"
        if self.max_area_ratio is not None and previous_area:
            ratio = area / previous_area
            if ratio > self.max_area_ratio or ratio < 1 / self.max_area_ratio:
                return f"area changed ×{ratio:.2f}"
        if self.min_overlap is not None and dice(mask, previous) < self.min_overlap:
            return f"overlap with the previous slice {dice(mask, previous):.2f} < {self.min_overlap}"
        return None


@dataclass
class SliceStep:
    """One propagated slice: the ``mask`` (rows, cols) on slice ``index`` and its predicted quality."""

    index: int
    mask: np.ndarray
    score: float


def _mm_to_box(margins_mm, pixel_spacing: tuple[float, float]) -> np.ndarray:
    """(M, 4) offsets growing a box by each margin (mm) on every side."""
    per_axis = np.array(margins_mm, float)[:, None] / np.array([pixel_spacing[1], pixel_spacing[0]])
    return np.concatenate([-per_axis, per_axis], axis=1)


def _signed_distance(mask: np.ndarray, pixel_spacing: tuple[float, float]) -> np.ndarray:
    """Distance (mm) to the edge of ``mask`` (rows, cols), positive inside."""
    inside = ndi.distance_transform_edt(mask, sampling=pixel_spacing)
    outside = ndi.distance_transform_edt(~mask, sampling=pixel_spacing)
    return inside - outside


def _shape_prior(mask: np.ndarray, pixel_spacing: tuple[float, float]) -> np.ndarray:
    """PRIOR_WEIGHT × the clipped signed distance (positive inside) to the edge of ``mask``."""
    return PRIOR_WEIGHT * np.clip(_signed_distance(mask, pixel_spacing) / PRIOR_SCALE_MM, -3.0, 3.0)


def _touched_sides(mask: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(4,) for x0, y0, x1, y1: 1 where ``mask`` (rows, cols) reaches that side of ``box`` (within a pixel)."""
    if not mask.any():
        return np.zeros(4)
    found = bounding_box(mask)
    return np.concatenate([found[:2] <= box[:2] + 1, found[2:] >= box[2:] - 1]).astype(float)


def _shrunk_box(box: np.ndarray, fitted: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``box`` (x0, y0, x1, y1) with each side moved in towards ``fitted``'s, by at most ``step``'s (as
    :func:`_mm_to_box` gives it: negative on x0, y0), never out."""
    low = np.minimum(np.maximum(box[:2], fitted[:2]), box[:2] - step[:2])
    high = np.maximum(np.minimum(box[2:], fitted[2:]), box[2:] - step[2:])
    return np.concatenate([low, np.maximum(high, low)])


def chained_logits(predictor, neighbour: np.ndarray, offset: np.ndarray, pixel_spacing: tuple[float, float],
                   gap_mm: float = 0.0, jitter: tuple[float, ...] = (0.0,)) -> tuple[np.ndarray, float]:
    """Logits (rows, cols) and the predicted quality on the predictor's current slice, prompted from a mask
    ``neighbour`` (rows, cols) ``gap_mm`` away (0: on this slice): its bounding box plus ``offset`` (4,) (how the
    object's box sat around its mask) plus BOX_MARGIN_MM as the box, and the mask as a shape prior. Across a
    gap, each side of the box the mask reaches is moved out by the gap and the slice decoded again (at most
    EXPAND_TIMES), then the box is fitted once to the mask (each other side moved in by at most the gap) and that
    decode kept where the model predicts it better (see "Shrinking" above), and the prior weakens with the gap
    (PRIOR_GAP_MM). ``jitter``: the model's logits and quality are the mean over the offset grown by each of
    these pixels on every side (see OFFSET_JITTER_PX). The one home of a propagated slice's prompt: propagation
    chains it from slice to slice, and a click refines a slice from its own mask with it."""
    margin = _mm_to_box([BOX_MARGIN_MM], pixel_spacing)[0]
    arounds = [offset + margin + np.array([-px, -px, px, px]) for px in jitter]  # each offset's box around its mask
    boxes = np.array([bounding_box(neighbour) + around for around in arounds])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    first = predictor.predict_boxes(boxes)  # every offset's box in one batched decoder run
    predictions = [_expanded(predictor, box, first.take(i), around, pixel_spacing, gap_mm)
                   for i, (box, around) in enumerate(zip(boxes, arounds, strict=True))]
    logits = np.mean([prediction.logits[0] for prediction in predictions], axis=0)
    weight = min(1.0, PRIOR_GAP_MM / gap_mm) if gap_mm > 0 else 1.0
    return logits + weight * _shape_prior(neighbour, pixel_spacing), float(np.mean([p.scores[0] for p in predictions]))


def _expanded(predictor, box: np.ndarray, prediction, around: np.ndarray, pixel_spacing: tuple[float, float],
              gap_mm: float):
    """One offset's prediction for :func:`chained_logits`: ``prediction`` (the model's for ``box``), across a
    thick gap with each side of the box its mask reaches moved out and decoded again, then the box fitted to the
    mask (``around``: the box's margin around its mask)."""
    step = _mm_to_box([EXPAND_GAPS * gap_mm], pixel_spacing)[0]
    thick, grown = gap_mm >= EXPAND_FROM_MM, np.zeros(4, bool)
    for _ in range(int(EXPAND_TIMES) if thick else 0):
        sides = _touched_sides(prediction.masks[0], box)
        if not sides.any():
            break
        box, grown = box + sides * step, grown | (sides > 0)
        prediction = predictor.predict(box=box)
    if thick and prediction.masks[0].any():
        fitted = _shrunk_box(box, bounding_box(prediction.masks[0]) + around, step * ~grown)
        if np.abs(fitted - box).max() >= 1:
            shrunk = predictor.predict(box=fitted)
            if shrunk.scores[0] > prediction.scores[0]:
                prediction = shrunk
    return prediction


def interpolate_masks(first: np.ndarray, last: np.ndarray, count: int,
                      pixel_spacing: tuple[float, float] = (1.0, 1.0)) -> list[np.ndarray]:
    """``count`` masks evenly between the non-empty masks ``first`` and ``last`` (rows, cols), shape-based:
    both signed distance maps are moved to the centre interpolated between theirs and blended linearly, so a
    shape that moves or grows does so gradually (even when the two do not overlap)."""
    near, far = _signed_distance(first, pixel_spacing), _signed_distance(last, pixel_spacing)
    start, end = np.array(ndi.center_of_mass(first)), np.array(ndi.center_of_mass(last))
    masks = []
    for t in np.arange(1, count + 1) / (count + 1):
        centre = (1 - t) * start + t * end
        moved = [ndi.shift(distance, centre - origin, order=1, mode="nearest")
                 for distance, origin in ((near, start), (far, end))]
        masks.append((1 - t) * moved[0] + t * moved[1] > 0)
    return masks


class BoxChain:
    """Masks for :class:`Propagator` from models without a memory: slice k±1 is prompted from the mask on slice k
    (:func:`chained_logits`), with the seed's box-to-mask offset (across thick slices the seed's box may win:
    GIVEN_BOX_MARGIN); the mask's appearance (mean image feature) is compared with the seed's for the similarity
    stop. ``box``: the box (x0, y0, x1, y1 pixels) the seed came from, if known (else the offset is calibrated
    on the seed, ``drawn``: a seed the user drew); ``ends``: ``low`` and ``high`` are the object's first and last
    slices (its box's range), where a narrow seed's chain ends on the previous mask's own box (see
    JITTER_BELOW_PX; a large narrow seed's over the slices before each end too: TAPER_SHARE); ``prompt``: the seed
    is a prompt's (a box, a lasso, an edit), so ``box`` is decoded on thick slices too (GIVEN_BOX_MARGIN) and a
    seed narrower than JITTER_BELOW_PX averages the logits of OFFSET_JITTER_PX's offsets; else (a click's walk,
    whose box is only the clicked mask's with the object's offset) the box's offset alone is kept."""

    def __init__(self, propagator: Propagator, seed: tuple[int, np.ndarray], low: int, high: int,
                 box: np.ndarray | None = None, drawn: bool = False, ends: bool = False, prompt: bool = True) -> None:
        self.session, self.axes = propagator.session, propagator.axes
        self.skip, self.batch = propagator.skip, propagator.batch
        self.low, self.high, self.step = low, high, 1
        index, mask = seed
        self.session.set_slice(self.axes.view, index)
        self.signature = self.session.predictor.region_feature(mask)
        self.box = box if prompt else None  # decoded on thick slices too (GIVEN_BOX_MARGIN)
        side = np.diff(self.session.predictor.transform.box_to_model(bounding_box(mask)).reshape(2, 2), axis=0).min()
        self.narrow = bool(side < JITTER_BELOW_PX)
        self.jitter = OFFSET_JITTER_PX if prompt and self.narrow else (0.0,)
        # the slices this many or fewer from the end a walk heads for are decoded as the end is (None: not even the end)
        large = equivalent_radius_mm(mask, self.axes.pixel_spacing) >= TAPER_FROM_MM
        self.taper = (int(np.ceil(TAPER_SHARE * (high - low))) if large else 0) if ends and self.narrow else None
        self.offset = box - bounding_box(mask) if box is not None else \
            self._calibrated_offset(mask, DRAWN_TOLERANCE if drawn else 0.0)

    def _calibrated_offset(self, seed: np.ndarray, tolerance: float) -> np.ndarray:
        """The smallest offset, among CALIBRATION_MM on every side, whose box around the seed (current slice)
        reproduces it within ``tolerance`` Dice of the best."""
        offsets = _mm_to_box(CALIBRATION_MM, self.axes.pixel_spacing)
        prediction = self.session.predictor.predict_boxes(bounding_box(seed) + offsets)
        scores = np.array([dice(mask, seed) for mask in prediction.masks])
        return offsets[int(np.flatnonzero(scores >= scores.max() - tolerance)[0])]

    def start(self, step: int, start: int) -> None:
        self.step = step * (self.skip + 1)  # encoding ahead follows the slices the model sees

    def _encode_ahead(self, index: int) -> None:
        """Encode the next ``batch`` slices in one go when ``index`` is not cached yet (GPU: one batch of 8)."""
        if self.batch > 1 and not self.session.is_cached(self.axes.view, index):
            ahead = [i for i in range(index, index + self.step * self.batch, self.step) if self.low <= i <= self.high]
            self.session.prefetch_many(self.axes.view, ahead)

    def _tapering(self, index: int) -> bool:
        """Whether slice ``index`` lies at the object's tapering end the chain is heading for (see TAPER_SHARE): a
        walk towards the middle of the range (a click's near an end) chains, as an object grows there."""
        if self.taper is None:
            return False
        return index >= self.high - self.taper if self.step > 0 else index <= self.low + self.taper

    def predict(self, index: int, previous: np.ndarray, gap: int) -> tuple[np.ndarray, float]:
        """The mask on slice ``index`` and its predicted quality, from the mask ``previous`` ``gap`` slices away."""
        self._encode_ahead(index)
        self.session.set_slice(self.axes.view, index)
        if self._tapering(index):
            end = self.session.predictor.predict(box=bounding_box(previous).astype(float))
            return end.masks[0], float(end.scores[0])
        gap_mm = gap * self.axes.spacing_ijk[self.axes.slice_axis]
        logits, score = chained_logits(self.session.predictor, previous, self.offset, self.axes.pixel_spacing, gap_mm,
                                       self.jitter)
        if self.box is not None and gap_mm >= EXPAND_FROM_MM:  # see GIVEN_BOX_MARGIN
            given = self.session.predictor.predict(box=self.box)
            if given.scores[0] > score + GIVEN_BOX_MARGIN:
                return given.masks[0], float(given.scores[0])
        return logits > 0, score

    def similarity(self, mask: np.ndarray) -> float:
        return float(self.session.predictor.region_feature(mask) @ self.signature) if mask.any() else 0.0

    def close(self) -> None:
        pass


class Propagator:
    """Propagate one object's mask on slices of one view of a :class:`~.session.Session`'s volume.

    ``skip`` > 0 (models without a memory): the model segments every (skip + 1)-th slice of the volume (those whose
    number is a multiple of skip + 1) and the slices between are interpolated from the two masks around them
    (:func:`interpolate_masks`), so each slice skipped saves an encoder run; where a stop rule refuses a skipping
    step, that stretch is done again slice by slice, so directions stop where they would without skipping. Near
    key slices and the range end it goes slice by slice too. ``stopped`` says why each direction ("up", "down")
    of the last :meth:`steps` stopped.
    """

    def __init__(self, session, view, rules: StopRules | None = None, skip: int = 0) -> None:
        self.session = session
        self.axes = session.axes(view)
        self.rules = rules or StopRules()
        self.batch = encode_batch(session.model.device)  # slices encoded at once, ahead of the decoder (BoxChain)
        if not isinstance(skip, int | np.integer) or isinstance(skip, bool) or not 0 <= skip <= MAX_SKIP:
            raise PromptError(f"skip must be a whole number from 0 to {MAX_SKIP} (slices interpolated between "
                              f"two slices the model segments); got {skip!r}.")
        if skip and session.model.tracks_video:
            raise PromptError(f"{session.model.name} tracks objects through every slice with its memory; "
                              "skip works with models without a memory (LiteMedSAM, MedSAM, SAM).")
        self.skip = int(skip)
        self.stopped: dict[str, str] = {}

    def _range(self, slice_range: tuple[int, int] | None) -> tuple[int, int]:
        if slice_range is None:
            return 0, self.axes.num_slices - 1
        low, high = sorted(int(v) for v in slice_range)
        if low < 0 or high >= self.axes.num_slices:
            raise PromptError(f"The range {low}:{high} is outside the volume: {self.axes.view.value} slices are "
                              f"0 to {self.axes.num_slices - 1}.")
        return low, high

    def steps(self, seed: tuple[int, np.ndarray], direction: Direction | str = Direction.BOTH,
              slice_range: tuple[int, int] | None = None, keys: dict[int, np.ndarray] | None = None,
              box: np.ndarray | None = None, drawn: bool = False, ends: bool = False,
              prompt: bool = True) -> Iterator[SliceStep]:
        """Yield one :class:`SliceStep` per slice as it is done, from ``seed`` (slice index, mask (rows, cols))
        ``direction`` within ``slice_range``; ``keys`` (slice → mask) are never overwritten and end a direction
        when reached; ``box`` (x0, y0, x1, y1 slice pixels) is the box the seed was made from, if any; ``drawn``:
        the seed is the user's (a lasso, an edit), not the model's (see DRAWN_TOLERANCE); ``ends``: ``slice_range``
        holds the object's ends (see JITTER_BELOW_PX); ``prompt``: a prompt's propagation, not a click's walk (see
        :class:`BoxChain`; models without a memory). Models with a memory of earlier slices (SAM 2) track the
        object (:class:`~.video_propagation.Tracker`); the others are prompted on each slice from the mask on the
        slice before (:class:`BoxChain`)."""
        direction = Direction(direction)
        low, high = self._range(slice_range)
        index, mask = int(seed[0]), np.asarray(seed[1], dtype=bool)
        if mask.shape != self.axes.image_shape:
            raise PromptError(f"The seed has shape {mask.shape}; a {self.axes.view.value} slice is "
                              f"{self.axes.image_shape}.")
        if not low <= index <= high:
            raise PromptError(f"The seed slice {index} is outside the range {low}:{high}.")
        if not mask.any():
            raise PromptError(f"The seed mask on slice {index} is empty: draw or accept a mask first.")
        if box is not None and (np.shape(box) != (4,) or not np.all(np.isfinite(box))):
            raise PromptError(f"The seed's box must be 4 finite numbers: x0, y0, x1, y1 in slice pixels, not {box!r}.")
        keys = dict(keys or {})
        self.stopped = {}
        if self.session.model.tracks_video:
            from .video_propagation import Tracker

            source = Tracker(self, (index, mask), keys, low, high)
        else:
            source = BoxChain(self, (index, mask), low, high, None if box is None else np.asarray(box, float), drawn,
                              ends, prompt)
        try:
            for step in direction.steps():
                source.start(step, index)
                yield from self._direction(source, step, index, mask, (low, high), keys)
        finally:
            source.close()

    def _direction(self, source, step: int, index: int, seed: np.ndarray, bounds: tuple[int, int],
                   keys: dict) -> Iterator[SliceStep]:
        label = "up" if step > 0 else "down"
        state = {"previous": seed, "at": index, "empty": 0, "score": 1.0}
        careful = 0  # slices still to do one by one after a skipping step was refused
        while True:
            stride = 1 if careful else self._stride(index, step, bounds, keys)
            careful = max(0, careful - stride)
            index += step * stride
            if not bounds[0] <= index <= bounds[1]:
                self.stopped[label] = "range end"
                return
            if stride > 1:
                done = self._skipping_step(source, step, index, stride, state)
                if done is None:  # refused: the same stretch again, one slice at a time
                    index -= step * stride
                    careful = stride
                    continue
                yield from done
                continue
            if index in keys:
                self.stopped[label] = f"key slice {index}"
                return
            mask, score, reason = self._segment(source, index, state)
            if not mask.any():
                state["empty"] += 1
                if state["empty"] < max(1, self.rules.max_empty):
                    continue
                reason = "empty mask"
            if reason:
                self.stopped[label] = reason
                return
            state.update(empty=0, previous=mask, at=index, score=score)
            yield SliceStep(index, mask, score)

    def _segment(self, source, index: int, state: dict) -> tuple[np.ndarray, float, str | None]:
        """The mask on slice ``index`` from the last one accepted (``state``), its score and why a stop rule
        refuses it."""
        mask, score = source.predict(index, state["previous"], abs(index - state["at"]))
        return mask, score, self.rules.check(mask, score, state["previous"], source.similarity(mask))

    def _stride(self, index: int, step: int, bounds: tuple[int, int], keys: dict) -> int:
        """How far the next step goes: to the next slice of the volume's grid (slices whose number is a multiple
        of skip + 1, whatever slice a propagation starts from, so that objects and later clicks' walks share
        their encoded slices) when no range end or key slice lies within reach (the slices skipped must have
        masks on both sides); else 1."""
        every = self.skip + 1
        stride = (-index * step) % every or every
        reach = range(index + step, index + step * (stride + 1), step)
        return stride if all(bounds[0] <= i <= bounds[1] and i not in keys for i in reach) else 1

    def _skipping_step(self, source, step: int, index: int, stride: int, state: dict) -> list[SliceStep] | None:
        """Segment slice ``index`` and interpolate the stride − 1 slices before it; None (nothing recorded) when
        the mask there is empty, refused by a stop rule or unlike the last one (SKIP_AGREE)."""
        mask, score, reason = self._segment(source, index, state)
        if not reason and mask.any() and source.narrow:  # see SKIP_AGREE
            mask, score = source.predict(index, mask, 1)
            reason = self.rules.check(mask, score, state["previous"], source.similarity(mask))
        checked = source.narrow or self.axes.spacing_ijk[self.axes.slice_axis] >= EXPAND_FROM_MM  # see SKIP_AGREE
        if reason or not mask.any() or (checked and dice(mask, state["previous"]) < SKIP_AGREE):
            return None
        between = interpolate_masks(state["previous"], mask, stride - 1, self.axes.pixel_spacing)
        steps = [SliceStep(index - step * (stride - 1 - offset), filled, min(state["score"], score))
                 for offset, filled in enumerate(between)]
        state.update(empty=0, previous=mask, at=index, score=score)
        steps.append(SliceStep(index, mask, score))
        return steps

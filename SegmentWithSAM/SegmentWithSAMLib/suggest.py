"""Where to click next: after a step, the place where the engine believes its mask of an object is most wrong.

A :class:`Suggestion` is a voxel on a slice of the engine's view (its slice index and pixel XY = (col, row), as
:class:`~.actions.Click` takes it), whether the object is probably missing there (``"add"``: a positive click)
or leaking there (``"remove"``: a negative one), a sentence saying why, and a confidence. Each signal proposes
regions, 2D on one slice of some view, wholly outside (add) or inside (remove) the object's 3D mask:

- ``box``: on the slice of the object's box, a side of the box the mask stays away from (the box was drawn
  around the whole object, so the object reaches each side; the slack of the side the mask comes closest to
  is the user's margin), and the mask past the box;
- ``appearance``: parts of the engine's masks whose image features (the model's embedding) are less like the
  object's on its key slices than almost any pixel of the key slices' masks is;
- ``views``: the model on the slice of each other view through the object, prompted with the box of the 3D
  mask's cut there, where it disagrees with the cut (within the object's slice range);
- ``neighbours``: a slice whose mask lacks what both of its neighbours have, or has what neither has;
- ``ends``: the first slice past each end of the object's masks but within its slice range, where the model
  prompted from the end's mask finds it going on.

A region's score is its signal's weight × its depth (mm; for ``box`` sides, how far the mask stays from the
side, halved): a click's reach grows with its distance to the mask's edge (:mod:`.refinement`), as the
challenge's simulated user, who sees the truth, clicks at the deepest point of the largest error. The suggestion
is the deepest pixel of the best region (for a box side: halfway between the mask and the side, where the
model's logits for the box are highest). Pixels within ``CLICKED_MM`` of an earlier click are left out: the
user has corrected there already. The model's own predicted quality (each slice decoded from its own mask's
box) was measured and left out; the figures of every variant: docs/suggest.md (``benchmarks/suggest.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import PromptError
from .geometry import SliceAxes, View, Volume, bounding_box
from .propagation import chained_logits
from .state import Kind, ObjectState

ADD, REMOVE = "add", "remove"
# Each signal's weight, and the confidence of its suggestions: the share of its suggestions that lay on an error
# of the 3D mask (12 AAL structures, 5 suggested clicks each, benchmarks/suggest.py). ``neighbours`` and ``ends``
# never won there after a 3D box (0.5: not measured); they catch slices gone wrong outright (emptied, moved).
WEIGHTS = {"box": 0.68, "appearance": 0.62, "views": 0.35, "neighbours": 0.5, "ends": 0.5}
CLICKED_MM = 4.0  # a region's pixels this near an earlier click are left out
BOX_SLACK_MM = 2.0  # a box side counts as not reached when the mask stays this much farther from it than the nearest
UNLIKE_SHARE = 0.02  # appearance: less like the object than all but this share of the key masks' own pixels
VIEW_MARGIN_MM = 2.0  # the box on another view's slice: the 3D mask's cut there grown by this on every side
NEARBY_CACHED = 2  # another view's slice through the object: one encoded already up to this many slices away is used
MIN_DEPTH_MM = 0.5  # a thinner region is an outline, not an error


@dataclass(frozen=True)
class Suggestion:
    """Click here next: pixel ``xy`` (col, row) on slice ``index`` of the engine's view; ``hint`` "add" (the
    object is probably missing there) or "remove" (probably leaking there); ``reason`` a sentence for the user;
    ``confidence`` in (0, 1]: the share of such suggestions that lay on an error in the benchmark."""

    index: int
    xy: tuple[float, float]
    hint: str
    reason: str
    confidence: float

    def ras(self, volume: Volume, axes: SliceAxes) -> np.ndarray:
        """The suggested voxel's centre (3,) in RAS millimetres (``axes``: the engine's view of ``volume``)."""
        return volume.to_ras(axes.pixel_to_ijk(self.index, np.array([self.xy], float)))[0]

    def to_header(self) -> dict:
        """As JSON-able data (the backend's reply)."""
        return {"index": self.index, "xy": list(self.xy), "hint": self.hint, "reason": self.reason,
                "confidence": self.confidence}

    @classmethod
    def from_header(cls, header: dict) -> Suggestion:
        """The suggestion :meth:`to_header` wrote; :class:`PromptError` naming what is malformed."""
        try:
            hint = str(header["hint"])
            if hint not in (ADD, REMOVE):
                raise ValueError(f"hint {hint!r}")
            x, y = (float(v) for v in header["xy"])
            return cls(int(header["index"]), (x, y), hint, str(header["reason"]), float(header["confidence"]))
        except (KeyError, TypeError, ValueError) as error:
            raise PromptError(f"The suggestion is malformed: {type(error).__name__}: {error}.") from None


@dataclass
class _Region:
    """A candidate ``region`` (rows, cols) on slice ``index`` of ``axes``' view, wholly outside (add) or inside
    (remove) the 3D mask; ``point`` (row, col) and ``depth`` (mm), when given, replace its deepest pixel."""

    axes: SliceAxes
    index: int
    region: np.ndarray
    hint: str
    signal: str
    reason: str
    point: tuple[int, int] | None = None
    depth: float | None = None


def _filled(state: ObjectState) -> list[int]:
    """The slices where the object has a mask, ascending; :class:`PromptError` when there is none."""
    filled = sorted(i for i, mask in state.masks.items() if mask.any())
    if not filled:
        raise PromptError("The object has no mask yet: start it with a box or a click before asking where to click "
                          "next.")
    return filled


def _box(session, axes: SliceAxes, state: ObjectState) -> list[_Region]:
    """On the box's slice: each side of the box the mask stays away from, and the mask past the box."""
    if state.box is None or not state.masks.get(state.box[0], np.zeros(1, bool)).any():
        return []
    index, box = state.box
    mask = state.masks[index]
    rows, cols = np.indices(axes.image_shape)
    in_box = (cols >= box[0]) & (cols <= box[2]) & (rows >= box[1]) & (rows <= box[3])
    past = mask & ~in_box
    regions = [_Region(axes, index, past, REMOVE, "box", f"The mask reaches past its box on slice {index}.")] \
        if past.any() else []
    size = np.array([axes.pixel_spacing[1], axes.pixel_spacing[0]] * 2)
    edges = bounding_box(mask)
    slack = np.array([1, 1, -1, -1]) * (edges - box) * size  # mm: left, top, right, bottom
    beyond = (cols < edges[0], rows < edges[1], cols > edges[2], rows > edges[3])
    distance = ndi.distance_transform_edt(~mask, sampling=axes.pixel_spacing)
    logits = None
    for side, strip, name in zip(slack, beyond, ("left", "top", "right", "bottom"), strict=True):
        halfway = in_box & strip & ~mask & (np.abs(distance - side / 2) <= max(axes.pixel_spacing))
        if side - slack.min() < BOX_SLACK_MM or not halfway.any():
            continue
        if logits is None:
            session.set_slice(axes.view, index)
            logits = session.predictor.predict(box=box).logits[0]
        row, col = np.unravel_index(int(np.argmax(np.where(halfway, logits, -np.inf))), logits.shape)
        regions.append(_Region(axes, index, halfway, ADD, "box",
                               f"The object does not reach the {name} side of its box on slice {index}.",
                               point=(int(row), int(col)), depth=float(side / 2)))
    return regions


def _appearance(session, axes: SliceAxes, state: ObjectState) -> list[_Region]:
    """Parts of the engine's masks that look unlike the object on its key (box, clicked, user) slices."""
    keys = [i for i, kind in state.kinds.items() if kind is not Kind.ENGINE and state.masks[i].any()]
    engine = [i for i, kind in state.kinds.items() if kind is Kind.ENGINE and state.masks[i].any()]
    if not keys or not engine:
        return []
    signature = np.zeros(0)
    for index in keys:
        session.set_slice(axes.view, index)
        feature = session.predictor.region_feature(state.masks[index])
        signature = feature if not signature.size else signature + feature
    signature /= np.linalg.norm(signature)
    own = []
    for index in keys:
        session.set_slice(axes.view, index)
        own.append(session.predictor.similarity_map(signature)[state.masks[index]])
    threshold = np.quantile(np.concatenate(own), UNLIKE_SHARE)
    regions = []
    for index in sorted(engine):
        session.set_slice(axes.view, index)
        unlike = state.masks[index] & (session.predictor.similarity_map(signature) < threshold)
        if unlike.any():
            regions.append(_Region(axes, index, unlike, REMOVE, "appearance",
                                   f"On slice {index} the mask covers tissue unlike the object's on its key slices."))
    return regions


def _cached_near(session, view: View, index: int, count: int) -> int:
    """``index``, or the nearest slice of ``view`` within NEARBY_CACHED of it that is encoded already."""
    for distance in range(NEARBY_CACHED + 1):
        for other in (index - distance, index + distance):
            if 0 <= other < count and session.is_cached(view, other):
                return other
    return index


def _within_range(other: SliceAxes, index: int, axes: SliceAxes, slice_range: tuple[int, int]) -> np.ndarray:
    """The pixels (rows, cols) of slice ``index`` of ``other`` that lie on slices ``slice_range`` of ``axes``."""
    rows, cols = np.indices(other.image_shape)
    ijk = other.pixel_to_ijk(index, np.stack([cols.ravel(), rows.ravel()], axis=1))
    along = np.rint(axes.ijk_to_pixel(ijk)[0]).reshape(other.image_shape)
    return (along >= slice_range[0]) & (along <= slice_range[1])


def _views(session, axes: SliceAxes, state: ObjectState) -> list[_Region]:
    """Where the model on the other views' slices through the object disagrees with the 3D mask's cut there."""
    kji = np.zeros(session.volume.array.shape, bool)
    axes.oriented(kji)[:] = state.oriented_mask(axes.num_slices, axes.image_shape)
    regions = []
    for view in View:
        if view == axes.view:
            continue
        other = session.axes(view)
        oriented = other.oriented(kji)
        centre = int(round(float(np.mean(np.flatnonzero(oriented.any(axis=(1, 2)))))))
        index = _cached_near(session, view, centre, other.num_slices)
        cut = np.array(oriented[index])
        if not cut.any():
            continue
        margin = VIEW_MARGIN_MM / np.array([other.pixel_spacing[1], other.pixel_spacing[0]])
        session.set_slice(view, index)
        seen = session.predictor.predict(box=bounding_box(cut) + np.concatenate([-margin, margin])).masks[0]
        in_range = _within_range(other, index, axes, state.slice_range)
        for region, hint, what in ((seen & ~cut & in_range, ADD, "more"), (cut & ~seen & in_range, REMOVE, "less")):
            if region.any():
                regions.append(_Region(other, index, region, hint, "views",
                                       f"The {view.value} view (slice {index}) sees {what} of the object here."))
    return regions


def _neighbours(axes: SliceAxes, state: ObjectState) -> list[_Region]:
    """Slices whose mask lacks what both neighbours have, or has what neither has (slices with a mask on both
    sides only: an end is no disagreement)."""
    empty = np.zeros(axes.image_shape, bool)
    regions = []
    for index in sorted(state.masks):
        below, above = state.masks.get(index - 1, empty), state.masks.get(index + 1, empty)
        if not (below.any() and above.any()):
            continue
        here = state.masks[index]
        for region, hint, what in ((below & above & ~here, ADD, "lacks what both neighbours have"),
                                   (here & ~below & ~above, REMOVE, "has what neither neighbour has")):
            if region.any():
                regions.append(_Region(axes, index, region, hint, "neighbours",
                                       f"The mask on slice {index} {what}."))
    return regions


def _ends(session, axes: SliceAxes, state: ObjectState, filled: list[int]) -> list[_Region]:
    """The first slice past each end of the object's masks, within its slice range (the user said it spans the
    range): what the model finds there prompted from the end's mask, as propagation would prompt it."""
    low, high = state.slice_range
    regions = []
    for end, step in ((filled[0], -1), (filled[-1], 1)):
        index = end + step
        if not low <= index <= high:
            continue
        session.set_slice(axes.view, index)
        logits, _ = chained_logits(session.predictor, state.masks[end], state.offset, axes.pixel_spacing)
        if (logits > 0).any():
            regions.append(_Region(axes, index, logits > 0, ADD, "ends",
                                   f"The object seems to go on to slice {index}, in its range."))
    return regions


def _away_from_clicks(candidate: _Region, axes: SliceAxes, state: ObjectState) -> np.ndarray:
    """The candidate's region without its pixels within CLICKED_MM of an earlier click."""
    clicks = [(index, x, y) for index, placed in state.clicks.items() for x, y, _ in placed]
    if not clicks:
        return candidate.region
    spacing = np.asarray(axes.spacing_ijk)
    clicked = np.concatenate([axes.pixel_to_ijk(i, np.array([[x, y]])) for i, x, y in clicks]) * spacing
    rows, cols = np.nonzero(candidate.region)
    pixels = candidate.axes.pixel_to_ijk(candidate.index, np.stack([cols, rows], axis=1)) * spacing
    near = np.zeros(len(rows), bool)
    for point in clicked:
        near |= np.linalg.norm(pixels - point, axis=1) < CLICKED_MM
    region = candidate.region.copy()
    region[rows[near], cols[near]] = False
    return region


def _deepest(part: np.ndarray, pixel_spacing: tuple[float, float]) -> tuple[float, tuple[int, int]]:
    """The depth (mm) of the region ``part`` (rows, cols) and its deepest pixel (row, col)."""
    depth = ndi.distance_transform_edt(np.pad(part, 1), sampling=pixel_spacing)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(depth[row, col]), (int(row), int(col))


def candidates(session, axes: SliceAxes, state: ObjectState | None,
               signals=tuple(WEIGHTS)) -> list[tuple[float, Suggestion]]:
    """Every candidate (score, :class:`Suggestion`) of ``signals`` (names in ``WEIGHTS``), best first, for the
    object of ``state`` on ``axes``' view of ``session``'s volume (see the module docstring)."""
    if state is None:
        raise PromptError("The object has no mask yet: start it with a box or a click before asking where to click "
                          "next.")
    filled = _filled(state)
    unknown = set(signals) - set(WEIGHTS)
    if unknown:
        raise ValueError(f"Unknown signals {sorted(unknown)}: use some of {', '.join(WEIGHTS)}.")
    found = {"box": lambda: _box(session, axes, state), "appearance": lambda: _appearance(session, axes, state),
             "views": lambda: _views(session, axes, state), "neighbours": lambda: _neighbours(axes, state),
             "ends": lambda: _ends(session, axes, state, filled)}
    scored = []
    for signal in signals:
        for candidate in found[signal]():
            region = _away_from_clicks(candidate, axes, state)
            if candidate.point is not None:
                parts = [(candidate.depth, candidate.point)] if region[candidate.point] else []
            else:
                labels, count = ndi.label(region)
                parts = [_deepest(labels == part, candidate.axes.pixel_spacing) for part in range(1, count + 1)]
            for depth, (row, col) in parts:
                if depth < MIN_DEPTH_MM:
                    continue
                along, xy = axes.ijk_to_pixel(candidate.axes.pixel_to_ijk(candidate.index, np.array([[col, row]])))
                suggestion = Suggestion(int(np.rint(along[0])), (float(np.rint(xy[0, 0])), float(np.rint(xy[0, 1]))),
                                        candidate.hint, candidate.reason, WEIGHTS[signal])
                scored.append((WEIGHTS[signal] * depth, suggestion))
    return sorted(scored, key=lambda pair: -pair[0])


def suggest(session, axes: SliceAxes, state: ObjectState | None, signals=tuple(WEIGHTS)) -> Suggestion:
    """Where to click next on the object of ``state`` (None: no object yet) on ``axes``' view of ``session``'s
    volume: the deepest point of the region the signals believe most wrong. :class:`PromptError` when the object
    has no mask, or when no signal finds anything to correct."""
    found = candidates(session, axes, state, signals)
    if not found:
        raise PromptError("Nothing looks wrong to the model here: check the object's edges and ends yourself.")
    return found[0][1]

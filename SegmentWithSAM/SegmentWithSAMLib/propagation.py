"""Slice-to-slice propagation of accepted masks through a volume, with range, stop rules, key slices,
several objects in one pass, streaming and cancel.

With models that have no memory of earlier slices (:class:`BoxChain`), each step prompts slice k±1 from the
mask on slice k. What matters, measured on Colin27 + AAL (``benchmarks/propagation.py``): the box of the
previous *mask* is not the box the user would draw (a model's mask rarely fills its box), so chaining mask boxes
shrinks or drifts; keeping the seed's box-to-mask offset (grown by half a millimetre) on every slice and adding
the previous mask as a shape prior to the logits took the mean 3D Dice over 12 structures × 3 views from 0.39 to
0.49 (chaining mask boxes + 3 px: 0.33; a ground-truth box on every slice: 0.61).
LiteMedSAM's predicted quality, the area and the overlap with the previous slice hardly change when the mask
drifts off the structure onto its neighbour; the mean image-embedding feature of the mask does, so each
object's mask is compared with its seed's (cosine similarity) to stop.
SAM 2 models track the objects with their memory instead (:mod:`.video_propagation`); range, stop rules, key
slices, several objects, streaming and cancel work the same for both.
With ``skip`` the model segments every (skip + 1)-th slice and the slices between are interpolated: on a
2-core CPU, where encoding bounds propagation, skip 2 took it from 1.5 to 3.2 slices/s for 0.01 of mean 3D Dice.

Nothing is written anywhere: the caller gets a :class:`PropagationResult` and applies it in one step, so a
cancelled or failed propagation changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from scipy import ndimage as ndi

from .device import encode_batch
from .errors import PromptError, SegmentWithSAMError
from .geometry import SliceAxes, bounding_box
from .metrics import dice

# Margin (mm) added on every side to the box prompted on each slice. Measured (benchmarks/propagation.py, cached
# embeddings): 0.25–0.75 mm give 0.484–0.486 mean 3D Dice, 0 mm 0.469, 1.5 mm 0.463; averaging the logits of
# three boxes (−1, 0, +2 mm) gave 0.483 for three times the decoder's work.
BOX_MARGIN_MM = 0.5
# The previous slice's mask as a shape prior: PRIOR_WEIGHT × its signed distance in units of PRIOR_SCALE_MM,
# clipped to ±3, is added to the logits.
PRIOR_WEIGHT, PRIOR_SCALE_MM = 3.0, 2.0
# Propagator(skip=…): at most this many slices interpolated between two that the model segments.
MAX_SKIP = 4
# Without the seed's box, the box-to-mask offset is the margin (mm) whose box best reproduces the seed mask.
CALIBRATION_MM = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)


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
    """When a direction stops. Each rule can be switched off with None (or 0 for ``max_empty``)."""

    min_similarity: float | None = 0.65  # cosine similarity of the mask's image features to the seed's below this
    min_score: float | None = 0.35  # the model's predicted quality below this
    max_area_ratio: float | None = 2.5  # area grows or shrinks by more than this factor from the previous slice
    min_overlap: float | None = 0.2  # Dice with the previous slice's mask below this
    max_empty: int = 1  # this many consecutive empty slices

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
    """One propagated slice: ``masks`` maps object name → mask (rows, cols) on slice ``index``."""

    index: int
    masks: dict[str, np.ndarray]
    scores: dict[str, float]


@dataclass
class PropagationResult:
    """Propagated masks per object and slice (seed and key slices not included), and why each object's
    directions stopped (``stopped[object]["up"|"down"]``)."""

    axes: SliceAxes
    masks: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    stopped: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def slice_count(self) -> int:
        return len({i for per_object in self.masks.values() for i in per_object})

    def apply(self, labelmap: np.ndarray, labels: dict[str, int]) -> np.ndarray:
        """A copy of ``labelmap`` (KJI) with each object's propagated slices written as its label value;
        ``labelmap`` itself is never modified."""
        out = np.array(labelmap, copy=True)
        oriented = self.axes.oriented(out)
        for name, per_slice in self.masks.items():
            for index, mask in per_slice.items():
                oriented[index][mask] = labels[name]
        return out


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
    """Masks for :class:`Propagator` from models without a memory: slice k±1 is prompted with the box of the
    mask on slice k plus the seed's box-to-mask offset and BOX_MARGIN_MM, with the mask on
    slice k as a shape prior; each object's appearance (mean image feature) is compared with its seed's for the
    similarity stop. ``boxes`` maps object name → the box (x0, y0, x1, y1 pixels) its seed came from, if known."""

    def __init__(self, propagator: Propagator, seeds: dict, low: int, high: int,
                 boxes: dict[str, np.ndarray] | None = None) -> None:
        self.propagator, self.session, self.axes = propagator, propagator.session, propagator.axes
        self.low, self.high, self.step = low, high, 1
        self.batch = propagator.batch
        self.margin = _mm_to_box([BOX_MARGIN_MM], self.axes.pixel_spacing)[0]
        self.signatures, self.offsets = {}, {}
        for name, (index, mask) in seeds.items():
            self.session.set_slice(self.axes.view, index)
            self.signatures[name] = self.session.predictor.region_feature(mask)
            box = (boxes or {}).get(name)
            self.offsets[name] = box - bounding_box(mask) if box is not None else self._calibrated_offset(mask)

    def _calibrated_offset(self, seed: np.ndarray) -> np.ndarray:
        """The offset, among CALIBRATION_MM on every side, whose box around the seed (current slice) best
        reproduces it."""
        offsets = _mm_to_box(CALIBRATION_MM, self.axes.pixel_spacing)
        prediction = self.session.predictor.predict_boxes(bounding_box(seed) + offsets)
        return offsets[int(np.argmax([dice(mask, seed) for mask in prediction.masks]))]

    def start(self, step: int, start: int) -> None:
        self.step = step * (self.propagator.skip + 1)  # encoding ahead follows the slices the model sees

    def _encode_ahead(self, index: int) -> None:
        """Encode the next ``batch`` slices in one go when ``index`` is not cached yet (GPU: one batch of 8)."""
        if self.batch > 1 and not self.session.is_cached(self.axes.view, index):
            ahead = [i for i in range(index, index + self.step * self.batch, self.step) if self.low <= i <= self.high]
            self.session.prefetch_many(self.axes.view, ahead)

    def predict(self, name: str, index: int, previous: np.ndarray) -> tuple[np.ndarray, float]:
        self._encode_ahead(index)
        self.session.set_slice(self.axes.view, index)
        box = bounding_box(previous) + self.offsets[name] + self.margin
        box[2:] = np.maximum(box[2:], box[:2])
        prediction = self.session.predictor.predict(box=box)
        return prediction.logits[0] + _shape_prior(previous, self.axes.pixel_spacing) > 0, float(prediction.scores[0])

    def similarity(self, name: str, mask: np.ndarray) -> float:
        return float(self.session.predictor.region_feature(mask) @ self.signatures[name]) if mask.any() else 0.0

    def close(self) -> None:
        pass


class Propagator:
    """Propagate masks on slices of one view of a :class:`~.session.Session`'s volume.

    ``seeds`` maps object name → (slice index, mask (rows, cols)); ``keys`` maps object name → {slice index:
    mask} of accepted or user-edited slices, which are never overwritten and end a direction when reached.
    ``skip`` > 0 (models without a memory): the model segments every (skip + 1)-th slice and the slices between
    are interpolated from the two masks around them (:func:`interpolate_masks`), so each slice skipped saves an
    encoder run; where a stop rule refuses a skipping step, that stretch is done again slice by slice, so
    directions stop where they would without skipping. Near key slices, seeds and the range end it goes slice
    by slice too.
    """

    def __init__(self, session, view, rules: StopRules | None = None, skip: int = 0) -> None:
        self.session = session
        self.axes = session.axes(view)
        self.rules = rules or StopRules()
        self.batch = encode_batch(session.model.device)  # slices encoded at once, ahead of the decoder (BoxChain)
        if not isinstance(skip, int | np.integer) or not 0 <= skip <= MAX_SKIP:
            raise PromptError(f"skip must be a whole number from 0 to {MAX_SKIP} (slices interpolated between "
                              f"two slices the model segments); got {skip!r}.")
        if skip and getattr(session.model, "tracks_video", False):
            raise PromptError(f"{session.model.name} tracks objects through every slice with its memory; "
                              "skip works with models without a memory (LiteMedSAM, MedSAM, SAM).")
        self.skip = int(skip)

    def _check_seed(self, name: str, index: int, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.axes.image_shape:
            raise PromptError(f"The seed of {name!r} has shape {mask.shape}; a {self.axes.view.value} slice is "
                              f"{self.axes.image_shape}.")
        if not 0 <= index < self.axes.num_slices:
            raise PromptError(f"The seed slice {index} of {name!r} is outside the volume (0 to "
                              f"{self.axes.num_slices - 1}).")
        if not mask.any():
            raise PromptError(f"The seed mask of {name!r} on slice {index} is empty: draw or accept a mask first.")
        return mask

    @staticmethod
    def _check_box(name: str, box) -> np.ndarray:
        box = np.asarray(box, dtype=float)
        if box.shape != (4,) or not np.all(np.isfinite(box)):
            raise PromptError(f"The box of {name!r} must be 4 numbers: x0, y0, x1, y1 in slice pixels, all finite "
                              f"(got shape {box.shape}).")
        return box

    def _range(self, slice_range: tuple[int, int] | None) -> tuple[int, int]:
        if slice_range is None:
            return 0, self.axes.num_slices - 1
        low, high = sorted(int(v) for v in slice_range)
        if low < 0 or high >= self.axes.num_slices:
            raise PromptError(f"The range {low}:{high} is outside the volume: {self.axes.view.value} slices are "
                              f"0 to {self.axes.num_slices - 1}.")
        return low, high

    def steps(self, seeds: dict[str, tuple[int, np.ndarray]], direction: Direction | str = Direction.BOTH,
              slice_range: tuple[int, int] | None = None, keys: dict[str, dict[int, np.ndarray]] | None = None,
              result: PropagationResult | None = None, allow_overlap: bool = False,
              boxes: dict[str, np.ndarray] | None = None) -> Iterator[SliceStep]:
        """Yield one :class:`SliceStep` per slice as it is done; fill ``result`` as it goes.

        All objects move together, so each slice is encoded once and decoded once per object. Where objects
        overlap, the pixel goes to the object listed first unless ``allow_overlap``. ``boxes`` maps object
        name → the box (x0, y0, x1, y1 slice pixels) its seed mask was made from, where there was one. Models
        with a memory of earlier slices (SAM 2) track the objects (:class:`~.video_propagation.Tracker`); the
        others are prompted on each slice from the mask on the slice before (:class:`BoxChain`).
        """
        direction = Direction(direction)
        low, high = self._range(slice_range)
        keys = {name: dict(per) for name, per in (keys or {}).items()}
        result = result if result is not None else PropagationResult(self.axes)
        seeds = {name: (int(i), self._check_seed(name, int(i), m)) for name, (i, m) in seeds.items()}
        boxes = {name: self._check_box(name, box) for name, box in (boxes or {}).items()}
        if not seeds:
            raise PromptError("Nothing to propagate: give at least one seed mask.")
        for name, (index, _) in seeds.items():
            if not low <= index <= high:
                raise PromptError(f"The seed slice {index} of {name!r} is outside the range {low}:{high}.")
            result.masks.setdefault(name, {})
            result.stopped.setdefault(name, {})
        if getattr(self.session.model, "tracks_video", False):
            from .video_propagation import Tracker

            source = Tracker(self, seeds, keys, low, high)
        else:
            source = BoxChain(self, seeds, low, high, boxes)
        try:
            for step in direction.steps():
                start = min(i for i, _ in seeds.values()) if step > 0 else max(i for i, _ in seeds.values())
                source.start(step, start)
                yield from self._direction(source, seeds, step, start, (low, high), keys, result, allow_overlap)
        finally:
            source.close()

    def _direction(self, source, seeds, step: int, index: int, bounds: tuple[int, int], keys: dict,
                   result: PropagationResult, allow_overlap: bool) -> Iterator[SliceStep]:
        label = "up" if step > 0 else "down"
        state = {name: {"index": i, "previous": m, "empty": 0, "score": 1.0} for name, (i, m) in seeds.items()}
        active = set(state)
        careful = 0  # slices still to do one by one after a skipping step was refused
        while active:
            stride = 1 if careful else self._stride(index, step, bounds, keys, active, state)
            careful = max(0, careful - stride)
            index += step * stride
            if not bounds[0] <= index <= bounds[1]:
                for name in active:
                    result.stopped[name][label] = "range end"
                break
            if stride > 1:
                done = self._skipping_step(source, seeds, step, index, stride, active, state, result, allow_overlap)
                if done is None:  # refused: the same stretch again, one slice at a time
                    index -= step * stride
                    careful = stride
                    continue
                yield from done
                continue
            masks, scores = {}, {}
            for name in sorted(active, key=list(seeds).index):
                info = state[name]
                if (step > 0 and index <= info["index"]) or (step < 0 and index >= info["index"]):
                    continue  # this object's seed lies further on
                if index in keys.get(name, {}):
                    result.stopped[name][label] = f"key slice {index}"
                    active.discard(name)
                    continue
                mask, score, reason = self._segment(source, name, index, info["previous"], masks, allow_overlap)
                if not mask.any():
                    info["empty"] += 1
                    if info["empty"] >= max(1, self.rules.max_empty):
                        reason = "empty mask"
                    else:
                        continue
                if reason:
                    result.stopped[name][label] = reason
                    active.discard(name)
                    continue
                info.update(empty=0, previous=mask, score=score)
                masks[name], scores[name] = mask, score
                result.masks[name][index] = mask
            if masks:
                yield SliceStep(index, masks, scores)

    def _segment(self, source, name: str, index: int, previous: np.ndarray, taken: dict[str, np.ndarray],
                 allow_overlap: bool) -> tuple[np.ndarray, float, str | None]:
        """Object ``name``'s mask on slice ``index`` from its mask on the slice before, without the pixels of the
        objects already ``taken`` there unless ``allow_overlap``; its score and why a stop rule refuses it."""
        mask, score = source.predict(name, index, previous)
        if not allow_overlap:
            for other in taken.values():
                mask = mask & ~other
        return mask, score, self.rules.check(mask, score, previous, source.similarity(name, mask))

    def _stride(self, index: int, step: int, bounds: tuple[int, int], keys: dict, active: set, state: dict) -> int:
        """skip + 1 when every active object has started and no range end, key slice or seed lies within reach
        (the slices skipped must have masks on both sides); else 1."""
        stride = self.skip + 1
        if stride == 1:
            return 1
        reach = range(index + step, index + step * (stride + 1), step)
        if not all(bounds[0] <= i <= bounds[1] for i in reach):
            return 1
        for name in active:
            if (step > 0 and index < state[name]["index"]) or (step < 0 and index > state[name]["index"]):
                return 1  # this object's seed lies further on
            if any(i in keys.get(name, {}) for i in reach):
                return 1
        return stride

    def _skipping_step(self, source, seeds, step: int, index: int, stride: int, active: set, state: dict,
                       result: PropagationResult, allow_overlap: bool) -> list[SliceStep] | None:
        """Segment slice ``index`` for every active object and interpolate the stride − 1 slices before it;
        None (nothing recorded) when any object's mask there is empty or refused by a stop rule."""
        masks, scores = {}, {}
        for name in sorted(active, key=list(seeds).index):
            mask, score, reason = self._segment(source, name, index, state[name]["previous"], masks, allow_overlap)
            if reason or not mask.any():
                return None
            masks[name], scores[name] = mask, score
        between = {name: interpolate_masks(state[name]["previous"], masks[name], stride - 1, self.axes.pixel_spacing)
                   for name in masks}
        steps = []
        for offset in range(stride - 1):
            here = index - step * (stride - 1 - offset)
            filled, taken = {}, np.zeros(self.axes.image_shape, bool)
            for name in masks:
                filled[name] = between[name][offset] if allow_overlap else between[name][offset] & ~taken
                taken |= filled[name]
                result.masks[name][here] = filled[name]
            steps.append(SliceStep(here, filled, {name: min(state[name]["score"], scores[name]) for name in masks}))
        for name in masks:
            state[name].update(empty=0, previous=masks[name], score=scores[name])
            result.masks[name][index] = masks[name]
        steps.append(SliceStep(index, masks, scores))
        return steps

    def fill_between(self, name: str, keys: dict[int, np.ndarray],
                     cancel: Callable[[], bool] | None = None) -> PropagationResult:
        """Fill the slices between consecutive key slices of one object from both ends.

        Each gap is propagated up from its lower key and down from its upper key (each stopping at the other
        key or by the stop rules); where both reach a slice, the one from the nearer key wins, so the two
        fronts meet in the middle. Key slices themselves are never changed.
        """
        ordered = sorted(keys)
        if len(ordered) < 2:
            raise PromptError("Filling between key slices needs at least two key slices.")
        result = PropagationResult(self.axes, masks={name: {}}, stopped={name: {}})
        start = time.perf_counter()
        for low, high in zip(ordered[:-1], ordered[1:], strict=True):
            fronts = {}
            for seed, direction in ((low, Direction.UP), (high, Direction.DOWN)):
                fronts[direction] = self.run({name: (seed, keys[seed])}, direction, (low, high), {name: keys},
                                             cancel=cancel)
            up, down = fronts[Direction.UP].masks[name], fronts[Direction.DOWN].masks[name]
            for index in range(low + 1, high):
                nearer, other = (up, down) if index - low <= high - index else (down, up)
                if index in nearer or index in other:
                    result.masks[name][index] = nearer.get(index, other.get(index))
            result.stopped[name][f"{low}-{high}"] = (f"up: {fronts[Direction.UP].stopped[name]['up']}; "
                                                     f"down: {fronts[Direction.DOWN].stopped[name]['down']}")
        result.seconds = time.perf_counter() - start
        return result

    def run(self, seeds: dict[str, tuple[int, np.ndarray]], direction: Direction | str = Direction.BOTH,
            slice_range: tuple[int, int] | None = None, keys: dict[str, dict[int, np.ndarray]] | None = None,
            on_slice: Callable[[SliceStep], None] | None = None, cancel: Callable[[], bool] | None = None,
            allow_overlap: bool = False, boxes: dict[str, np.ndarray] | None = None) -> PropagationResult:
        """Propagate to the end and return the result; ``on_slice`` sees each slice as it is done, ``cancel``
        is asked between slices and raises :class:`Cancelled` (nothing is returned, so nothing is applied)."""
        start = time.perf_counter()
        result = PropagationResult(self.axes)
        for step in self.steps(seeds, direction, slice_range, keys, result, allow_overlap, boxes):
            if on_slice is not None:
                on_slice(step)
            if cancel is not None and cancel():
                raise Cancelled(f"Propagation cancelled after slice {step.index}; nothing was applied.")
        result.seconds = time.perf_counter() - start
        return result

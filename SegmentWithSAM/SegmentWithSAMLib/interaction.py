"""3D interactive segmentation: a 3D box, then corrective clicks anywhere in the volume, each improving the
whole 3D mask (the loop of the CVPR 2025 interactive-3D challenge and of nnInteractive).

One :class:`Interaction` holds the state of several objects on one view of a :class:`~.session.Session`'s volume
(the view's slice axis is the propagation axis): per object the slice range it spans, its mask on each slice and
who wrote it (the engine, a click, the user), the clicks per slice and how the box sat around its mask. The
backend, the Slicer module, the ``cvpr25`` command and the benchmark all drive this one class.

- :meth:`Interaction.set_box`: the box's slice is segmented from the box and propagated through the range. With a
  range given, only empty masks stop it (the user said where the object is); without one, the usual stop rules.
- :meth:`Interaction.click`: the slice through the click is refined (the 2D loop of :mod:`.refinement`, from the
  slice's current mask and its earlier clicks) and becomes a key slice. A positive click is then propagated
  outwards on both sides through the engine's slices, which only gain the parts that continue what the click added
  (never lose any), and through empty ones, until a key or user slice, the range end, a stop rule, a slice where
  the new mask agrees with the one there, or one with nothing to add. A negative click trims the engine's
  neighbouring slices around the same pixel as far as it lay deep in the 3D mask. A positive click past the range
  extends it; a negative click on an end slice of the object removes its part whole, and a click that empties a
  slice ends the object there for good (an empty key slice), clearing the engine's slices beyond it.

Masks are (rows, cols) bool slices of the view in display orientation (:class:`~.geometry.SliceAxes`); pixel XY
is (col, row). Nothing outside this object changes; a cancelled call changes nothing here either.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

import numpy as np
from scipy import ndimage as ndi

from .errors import PromptError
from .geometry import View, bounding_box
from .metrics import dice
from .propagation import (
    BOX_MARGIN_MM,
    Cancelled,
    Direction,
    PropagationResult,
    Propagator,
    StopRules,
    _mm_to_box,
    _shape_prior,
)
from .refinement import MAX_RADIUS_MM, Refiner

# A click's re-propagation stops at the first slice where its mask and the one there agree this well (Dice).
AGREE_DICE = 0.95
# On an end slice of the object's extent a negative click removes that slice's part of the mask whole when it
# is this deep in it (relative to the part's deepest point): the middle of a wrong blob past the object's end.
# Inside the extent it only trims around itself: removing parts whole there emptied slices of mostly right masks
# (Colin27's putamen and hippocampus, the challenge's clicks: -0.06 for one click).
CENTRED_REMOVAL = 0.6
# A negative click trims the engine's neighbouring slices this many times as far as it lay deep in the 3D mask
# (mean gain of 5 clicks on the 14 benchmark structures: 0.5x +0.056, 1x +0.076, 1.5x +0.078, in process).
NEGATIVE_REACH = 1.5
# A click's reach on a slice is capped at refinement.MAX_RADIUS_MM (tuned on small structures), or for large
# objects at LARGE_REACH x (the mask's equivalent radius - LARGE_FROM_MM): the head CT gained nothing from five
# clicks under the fixed cap, +0.05 under this one, and the AAL structures (radius < 20 mm) are unchanged.
LARGE_FROM_MM, LARGE_REACH = 16.0, 0.75
# ... and for small objects at their size (the equivalent radius of the largest mask within two slices, at least
# SMALL_REACH_MM): a positive click on a wrong 17-pixel mask at the amygdala's end added 104 pixels for a 38-pixel
# object under the fixed cap (-0.010 3D Dice), +0.008 under this one.
SMALL_REACH_MM = 2.0
# Within a range the user gave, only empty masks stop propagation (two in a row: one empty slice is bridged).
RANGE_RULES = StopRules(min_similarity=None, min_score=None, max_area_ratio=None, min_overlap=None, max_empty=2)
_NEARBY_SLICES = 2  # the object's size near a slice: its largest mask within this many slices
_ADDED_NEAR_PX = 2  # a positive click's addition on a slice continues what it added on the slice before within this
_LOGIT_FLOOR = 1e-3  # |logit| given to pixels whose sign is forced to the slice's current mask


def _continuing(grown: np.ndarray, added: np.ndarray) -> np.ndarray:
    """The parts of ``grown`` (rows, cols) that touch ``added`` (the addition on the slice before) within
    ``_ADDED_NEAR_PX`` pixels."""
    return ndi.binary_propagation(ndi.binary_dilation(added, iterations=_ADDED_NEAR_PX) & grown, mask=grown)


class Kind(str, Enum):
    """Who wrote a slice's mask: the engine (propagation, replaceable), a key slice (the box or clicks), or the
    user (edited outside the interaction). Key and user slices are never overwritten by propagation."""

    ENGINE = "engine"
    KEY = "key"
    USER = "user"


@dataclass
class ObjectState:
    """One object on the interaction's view. ``masks`` maps slice → mask (rows, cols) for every slice with a
    mask or a kind (a key slice may be empty: the object ends there); ``clicks`` slice → [(x, y, positive)];
    ``base`` slice → that slice's mask before its first click (None if it had none); ``offset`` (4,) the box
    minus the bounding box of its mask on the box's slice (zeros without a box)."""

    slice_range: tuple[int, int]
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    kinds: dict[int, Kind] = field(default_factory=dict)
    clicks: dict[int, list[tuple[float, float, bool]]] = field(default_factory=dict)
    base: dict[int, np.ndarray | None] = field(default_factory=dict)
    offset: np.ndarray = field(default_factory=lambda: np.zeros(4))
    box: tuple[int, np.ndarray] | None = None  # (slice, (x0, y0, x1, y1)) of the box prompt, if any
    rules: StopRules | None = None  # the stop rules of its propagations

    def to_message(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The state as a JSON-able header and named arrays (``mask/<slice>``, ``base/<slice>``), as the backend
        protocol carries it (no pickle): the caller keeps it, so a backend that restarts loses nothing."""
        header = {"range": list(self.slice_range), "kinds": {str(i): k.value for i, k in self.kinds.items()},
                  "clicks": {str(i): [list(c) for c in clicks] for i, clicks in self.clicks.items()},
                  "bases": {str(i): base is not None for i, base in self.base.items()},
                  "offset": [float(v) for v in self.offset],
                  "box": None if self.box is None else [self.box[0], [float(v) for v in self.box[1]]],
                  "rules": None if self.rules is None else asdict(self.rules)}
        arrays = {f"mask/{i}": m for i, m in self.masks.items()}
        arrays.update({f"base/{i}": b for i, b in self.base.items() if b is not None})
        return header, arrays

    @classmethod
    def from_message(cls, header: dict, arrays: dict[str, np.ndarray], image_shape: tuple[int, int]) -> ObjectState:
        """The state :meth:`to_message` wrote; a malformed one raises :class:`PromptError` naming the field."""
        try:
            low, high = (int(v) for v in header["range"])
            kinds = {int(i): Kind(k) for i, k in header.get("kinds", {}).items()}
            clicks = {int(i): [(float(x), float(y), bool(p)) for x, y, p in c]
                      for i, c in header.get("clicks", {}).items()}
            has_base = {int(i): bool(b) for i, b in header.get("bases", {}).items()}
            offset = np.asarray(header.get("offset", [0, 0, 0, 0]), dtype=float).reshape(4)
            box = header.get("box")
            box = None if box is None else (int(box[0]), np.asarray(box[1], dtype=float).reshape(4))
            rules = header.get("rules")
            rules = None if rules is None else StopRules(**rules)
        except (KeyError, TypeError, ValueError) as error:
            raise PromptError(f"The interaction state is malformed: {type(error).__name__}: {error}.") from None

        def mask(name: str) -> np.ndarray:
            value = arrays.get(name)
            if value is None or np.shape(value) != tuple(image_shape):
                raise PromptError(f"The interaction state's {name} is missing or not {tuple(image_shape)}.")
            return np.asarray(value, dtype=bool)

        return cls((low, high), {i: mask(f"mask/{i}") for i in kinds}, kinds, clicks,
                   {i: mask(f"base/{i}") if b else None for i, b in has_base.items()}, offset, box, rules)


@dataclass
class Update:
    """What one call changed: ``changed`` slice → new mask (all False where a slice lost its mask), the stop
    reason per direction, notices for the user (e.g. a box clipped to the volume) and the seconds it took."""

    name: str
    changed: dict[int, np.ndarray] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Interaction:
    """3D box + clicks on ``view`` of ``session``'s volume for any number of named objects (see module doc).

    ``rules``: the stop rules where no range was given (default :class:`~.propagation.StopRules`); ``agree``:
    the Dice at which a click's re-propagation stops. Masks are not held within the box's in-plane extent: on the
    12 AAL structures (axial, box on the middle slice, the true range) that gave a mean 3D Dice of 0.541–0.542
    for margins of 2, 5 and 10 mm against 0.543 without."""

    def __init__(self, session, view: View | str = View.AXIAL, rules: StopRules | None = None,
                 agree: float = AGREE_DICE) -> None:
        self.session = session
        self.axes = session.axes(view)
        self.rules = rules or StopRules()
        self.agree = float(agree)
        self.objects: dict[str, ObjectState] = {}
        self._margin = _mm_to_box([BOX_MARGIN_MM], self.axes.pixel_spacing)[0]

    # ---- prompts in slice pixels ---------------------------------------------------------------------------
    def set_box(self, name: str, index: int, box: np.ndarray, slice_range: tuple[int, int] | None = None,
                cancel: Callable[[], bool] | None = None) -> Update:
        """(Re)start object ``name`` from ``box`` (4,) x0, y0, x1, y1 pixels on slice ``index``, spanning
        ``slice_range`` (first, last slice; None: as far as the stop rules let it). Replaces what the object
        had. The box is clipped to the slice (a notice says so); a box that misses the slice is an error."""
        start = time.perf_counter()
        notices: list[str] = []
        index = self._check_index(index)
        box = self._clip_box(box, notices)
        low, high = self._clip_range(slice_range, notices) if slice_range is not None else (0, self._last)
        if not low <= index <= high:
            raise PromptError(f"The box is on slice {index}, outside its range {low}:{high}.")
        self.session.set_slice(self.axes.view, index)
        seed = Refiner(self.session.predictor, self.axes.pixel_spacing, box).mask
        state = ObjectState((low, high), rules=RANGE_RULES if slice_range is not None else self.rules,
                            box=(index, box))
        update = Update(name, notices=notices)
        if not seed.any():
            update.notices.append(f"The model found nothing in the box on slice {index}; draw it around the object.")
            self.objects[name] = state
            update.seconds = time.perf_counter() - start
            return update
        state.offset = box - bounding_box(seed)
        state.masks[index], state.kinds[index] = seed, Kind.KEY
        update.changed[index] = seed
        for step in (1, -1):
            self._propagate(state, index, seed, step, update, cancel, replace_all=True)
        self._commit(name, state, update, start)
        return update

    def click(self, name: str, index: int, xy, positive: bool, cancel: Callable[[], bool] | None = None) -> Update:
        """A positive or negative click at pixel ``xy`` (col, row) on slice ``index`` of object ``name``: refine
        that slice and re-propagate from it (see the module docstring). A first positive click on an object
        without a box starts it from the click (range: the whole volume, the usual stop rules)."""
        start = time.perf_counter()
        index = self._check_index(index)
        xy = self._check_xy(xy)
        update = Update(name)
        state = self.objects.get(name)
        if state is None:
            if not positive:
                raise PromptError(f"{name!r} has no mask yet: start it with a box or a positive click.")
            state = ObjectState((0, self._last), rules=self.rules)
        low, high = state.slice_range
        if not low <= index <= high:
            if not positive:
                raise PromptError(f"Slice {index} is outside {name!r}'s range {low}:{high}: there is nothing to "
                                  "remove there.")
            low, high = min(low, index), max(high, index)
            update.notices.append(f"{name!r} now spans slices {low}:{high}.")
        # Work on a copy, committed only when everything is done (a cancel or an error changes nothing).
        work = replace(state, slice_range=(low, high), masks=dict(state.masks), kinds=dict(state.kinds),
                       clicks=dict(state.clicks), base=dict(state.base))
        clicks = [*work.clicks.get(index, []), (float(xy[0]), float(xy[1]), bool(positive))]
        current = work.masks.get(index)
        base = work.base.get(index, current.copy() if current is not None and current.any() else None)
        if base is None and not any(c[2] for c in clicks):
            raise PromptError(f"{name!r} has no mask on slice {index}: a negative click there removes nothing.")
        depth = self._depth_mm(work, index, xy) if not positive else 0.0
        removal = CENTRED_REMOVAL if self._is_end(work, index) else np.inf
        mask = self._refine(work, index, base, clicks, removal=removal)
        work.masks[index], work.kinds[index] = mask, Kind.KEY
        work.clicks[index], work.base[index] = clicks, base
        update.changed[index] = mask
        if not mask.any():
            self._end_at(work, index, update)
        elif positive:
            added = mask & ~base if base is not None else mask
            for step in (1, -1):
                self._propagate(work, index, mask, step, update, cancel, replace_all=False, added=added)
        else:
            for step in (1, -1):
                self._carry_negative(work, index, xy, depth, step, update, cancel)
        self._commit(name, work, update, start)
        return update

    def set_user_slice(self, name: str, index: int, mask: np.ndarray) -> None:
        """Record that the user drew ``mask`` (rows, cols) on slice ``index`` outside the interaction: it is
        never overwritten and ends propagation like a key slice."""
        index = self._check_index(index)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.axes.image_shape:
            raise PromptError(f"A {self.axes.view.value} slice is {self.axes.image_shape}, not {mask.shape}.")
        state = self.objects.setdefault(name, ObjectState((0, self._last), rules=self.rules))
        state.masks[index], state.kinds[index] = mask, Kind.USER
        low, high = state.slice_range
        state.slice_range = (min(low, index), max(high, index))

    # ---- prompts in RAS millimetres ------------------------------------------------------------------------
    def set_box_ras(self, name: str, corners_ras: np.ndarray, slice_range: tuple[int, int] | None = None,
                    cancel: Callable[[], bool] | None = None) -> Update:
        """:meth:`set_box` from two opposite corners (2, 3) RAS of a box on one slice of the view."""
        corners = np.asarray(corners_ras, dtype=float).reshape(2, 3)
        slices, xy = self.axes.ijk_to_pixel(self.session.volume.to_ijk(corners))
        index = int(np.rint(slices.mean()))
        if np.any(np.abs(slices - index) > 0.5):
            raise PromptError(f"The box's corners lie on different {self.axes.view.value} slices "
                              f"({np.round(slices, 1).tolist()}); draw it on one slice.")
        if not 0 <= index <= self._last:
            raise PromptError(f"The box is outside the volume: on {self.axes.view.value} slice {index}, which runs "
                              f"0 to {self._last}.")
        return self.set_box(name, index, np.concatenate([xy.min(axis=0), xy.max(axis=0)]), slice_range, cancel)

    def click_ras(self, name: str, point_ras, positive: bool, cancel: Callable[[], bool] | None = None) -> Update:
        """:meth:`click` at a RAS point (3,) anywhere in the volume, whichever view it was placed in: it refines
        the slice of this interaction's view through that point."""
        ijk = self.session.volume.to_ijk(np.asarray(point_ras, dtype=float).reshape(1, 3))[0]
        if np.any(ijk < -0.5) or np.any(ijk > np.asarray(self.session.volume.shape_ijk) - 0.5):
            ras = np.asarray(point_ras, dtype=float).ravel()
            raise PromptError(f"The click at R={ras[0]:.1f}, A={ras[1]:.1f}, S={ras[2]:.1f} mm is outside the volume.")
        slices, xy = self.axes.ijk_to_pixel(ijk[None])
        return self.click(name, int(np.rint(slices[0])), np.rint(xy[0]), positive, cancel)

    # ---- results -------------------------------------------------------------------------------------------
    def oriented_mask(self, name: str) -> np.ndarray:
        """Object ``name`` as (slice, rows, cols) bool in the view's orientation."""
        out = np.zeros((self.axes.num_slices, *self.axes.image_shape), bool)
        for index, mask in self.objects[name].masks.items():
            out[index] = mask
        return out

    def mask(self, name: str) -> np.ndarray:
        """Object ``name`` as a bool KJI array on the volume's grid."""
        out = np.zeros(self.session.volume.array.shape, bool)
        self.axes.oriented(out)[:] = self.oriented_mask(name)
        return out

    def labelmap(self, names: list[str] | None = None) -> np.ndarray:
        """uint8 KJI labelmap: the i-th of ``names`` (default: the objects in the order they were started) has
        value i + 1. Where objects overlap, a key or user slice wins over an engine slice, then the earlier
        object wins."""
        names = list(self.objects) if names is None else names
        if len(names) > 255:
            raise PromptError(f"A uint8 labelmap holds at most 255 objects, not {len(names)}.")
        out = np.zeros(self.session.volume.array.shape, np.uint8)
        oriented = self.axes.oriented(out)
        for engine_pass in (False, True):
            for value, name in enumerate(names, start=1):
                state = self.objects[name]
                for index, mask in state.masks.items():
                    if (state.kinds.get(index) is Kind.ENGINE) == engine_pass:
                        oriented[index][mask & (oriented[index] == 0)] = value
        return out

    # ---- internals -----------------------------------------------------------------------------------------
    @property
    def _last(self) -> int:
        return self.axes.num_slices - 1

    def _check_index(self, index) -> int:
        if not 0 <= int(index) <= self._last:
            raise PromptError(f"Slice {index} is outside the volume: {self.axes.view.value} slices are 0 to "
                              f"{self._last}.")
        return int(index)

    def _check_xy(self, xy) -> np.ndarray:
        xy = np.asarray(xy, dtype=float).ravel()
        rows, cols = self.axes.image_shape
        if xy.shape != (2,) or not (-0.5 <= xy[0] <= cols - 0.5 and -0.5 <= xy[1] <= rows - 0.5):
            raise PromptError(f"The click at pixel {xy.tolist()} is outside the slice ({cols}×{rows} pixels).")
        return np.rint(xy)

    def _clip_box(self, box, notices: list[str]) -> np.ndarray:
        box = np.asarray(box, dtype=float).ravel()
        if box.shape != (4,) or not np.all(np.isfinite(box)) or np.any(box[2:] < box[:2]):
            raise PromptError(f"A box is x0, y0, x1, y1 with x0 <= x1 and y0 <= y1, not {box.tolist()}.")
        rows, cols = self.axes.image_shape
        upper = np.array([cols - 1, rows - 1, cols - 1, rows - 1], float)
        clipped = np.clip(box, 0, upper)
        if np.any(clipped[2:] - clipped[:2] < 0) or box[2] < 0 or box[3] < 0 or box[0] > cols - 1 or box[1] > rows - 1:
            raise PromptError(f"The box {np.round(box, 1).tolist()} misses the slice ({cols}×{rows} pixels).")
        if not np.allclose(clipped, box):
            notices.append(f"The box reached past the volume's edge; it was clipped to {np.round(clipped).tolist()}.")
        return clipped

    def _clip_range(self, slice_range, notices: list[str]) -> tuple[int, int]:
        low, high = sorted(int(v) for v in slice_range)
        if high < 0 or low > self._last:
            raise PromptError(f"The range {low}:{high} is outside the volume: {self.axes.view.value} slices are 0 to "
                              f"{self._last}.")
        clipped = (max(low, 0), min(high, self._last))
        if clipped != (low, high):
            notices.append(f"The range {low}:{high} was clipped to the volume: {clipped[0]}:{clipped[1]}.")
        return clipped

    def _base_logits(self, state: ObjectState, base: np.ndarray) -> np.ndarray:
        """Logits (rows, cols) whose sign is ``base`` exactly, shaped by the model around it: the box prompt that
        propagation would give this mask (its box + the object's box offset + margin) plus its shape prior, on
        the current slice."""
        box = bounding_box(base) + state.offset + self._margin
        box[2:] = np.maximum(box[2:], box[:2])
        logits = self.session.predictor.predict(box=box).logits[0] + _shape_prior(base, self.axes.pixel_spacing)
        logits = np.where(base, np.maximum(logits, _LOGIT_FLOOR), np.minimum(logits, -_LOGIT_FLOOR))
        return logits.astype(np.float32)

    def _radius_mm(self, mask: np.ndarray) -> float:
        """The radius (mm) of a disk as large as ``mask`` (rows, cols)."""
        return float(np.sqrt(mask.sum() * np.prod(self.axes.pixel_spacing) / np.pi))

    def _reach_cap_mm(self, state: ObjectState, index: int, base: np.ndarray | None) -> float:
        """The cap on a click's reach on slice ``index`` (see ``LARGE_REACH`` and ``SMALL_REACH_MM``)."""
        if base is None:
            return MAX_RADIUS_MM
        own = self._radius_mm(base)
        nearby = [self._radius_mm(state.masks[i]) for i in range(index - _NEARBY_SLICES, index + _NEARBY_SLICES + 1)
                  if i != index and i in state.masks]
        return max(min(MAX_RADIUS_MM, max(SMALL_REACH_MM, own, *nearby)), LARGE_REACH * (own - LARGE_FROM_MM))

    def _refine(self, state: ObjectState, index: int, base: np.ndarray | None, clicks,
                removal: float = CENTRED_REMOVAL) -> np.ndarray:
        """The slice's mask after ``clicks`` (replayed in order) from ``base`` (None: from the first positive
        click, as in 2D); ``removal``: see :class:`~.refinement.Refiner`'s ``centred_removal``."""
        self.session.set_slice(self.axes.view, index)
        logits = self._base_logits(state, base) if base is not None else None
        refiner = Refiner(self.session.predictor, self.axes.pixel_spacing, logits=logits, centred_removal=removal,
                          max_radius_mm=self._reach_cap_mm(state, index, base))
        for x, y, positive in clicks:
            refiner.add_click((x, y), positive)
        return refiner.mask

    def _propagate(self, state: ObjectState, index: int, seed: np.ndarray, step: int, update: Update, cancel,
                   replace_all: bool, added: np.ndarray | None = None) -> None:
        """Propagate ``seed`` on slice ``index`` one way (``step`` ±1) into ``state``: through engine and empty
        slices, up to a key or user slice, the range end or a stop rule; unless ``replace_all``, also up to the
        first slice where the new mask agrees with the one there. ``added`` (a positive click's addition on
        slice ``index``): an engine slice with a mask keeps it and gains only the new mask's parts that touch
        the addition on the slice before, and the walk stops where there is none (replacing those slices whole
        lowered the 3D Dice of one click by up to 0.05 on Colin27's caudate: their masks, right elsewhere, were
        rebuilt from one slice's). Slices past the stop keep what they had
        (clearing them after a stop rule, e.g. a shrunken mask's empty neighbours, lost right masks of earlier
        propagations on Colin27's hippocampus; a click there corrects them)."""
        label = "up" if step > 0 else "down"
        keys = {i: m for i, m in state.masks.items() if state.kinds.get(i) in (Kind.KEY, Kind.USER) and i != index}
        propagator = Propagator(self.session, self.axes.view, state.rules or self.rules)
        result = PropagationResult(self.axes)
        boxes = {"object": bounding_box(seed) + state.offset} if state.box is not None else None
        steps = propagator.steps({"object": (index, seed)}, Direction.UP if step > 0 else Direction.DOWN,
                                 state.slice_range, {"object": keys}, result, boxes=boxes)
        reason = None
        try:
            for slice_step in steps:
                if cancel is not None and cancel():
                    raise Cancelled(f"Cancelled at slice {slice_step.index}; nothing was changed.")
                new = slice_step.masks["object"]
                old = state.masks.get(slice_step.index)
                if not replace_all and old is not None and old.any() and dice(new, old) >= self.agree:
                    reason = f"agrees with slice {slice_step.index}"
                    break
                if added is not None:
                    if old is not None and old.any():
                        kept = _continuing(new & ~old, added)
                        if not kept.any():
                            reason = f"nothing to add on slice {slice_step.index}"
                            break
                        new = old | kept
                    added = new & ~old if old is not None else new
                state.masks[slice_step.index], state.kinds[slice_step.index] = new, Kind.ENGINE
                update.changed[slice_step.index] = new
        finally:
            steps.close()
        update.stopped[label] = reason or result.stopped["object"].get(label, "range end")

    def _is_end(self, state: ObjectState, index: int) -> bool:
        """Whether slice ``index`` ends the object's extent: a neighbour on either side has no mask."""
        empty = np.zeros(self.axes.image_shape, bool)
        return not all(state.masks.get(index + step, empty).any() for step in (1, -1))

    def _depth_mm(self, state: ObjectState, index: int, xy: np.ndarray) -> float:
        """How deep (mm) the pixel ``xy`` on slice ``index`` lies inside the object's 3D mask (0 outside)."""
        if index not in state.masks or not state.masks[index][int(xy[1]), int(xy[0])]:
            return 0.0
        first, last = min(state.masks), max(state.masks)
        stack = np.zeros((last - first + 3, *self.axes.image_shape), bool)  # an empty slice past each end
        for i, mask in state.masks.items():
            stack[i - first + 1] = mask
        spacing = (self.axes.spacing_ijk[self.axes.slice_axis], *self.axes.pixel_spacing)
        depth = ndi.distance_transform_edt(stack, sampling=spacing)
        return float(depth[index - first + 1, int(xy[1]), int(xy[0])])

    def _carry_negative(self, state: ObjectState, index: int, xy: np.ndarray, depth_mm: float, step: int,
                        update: Update, cancel) -> None:
        """A negative click's error region is a 3D blob: the same click corrects the engine's slices beyond it
        (``step`` ±1) as far as it lay deep in the 3D mask and while it still falls inside their masks, each from
        its own mask (re-propagating from the corrected slice instead lowered the Dice on Colin27's
        hippocampus: the neighbours' masks, right elsewhere, were rebuilt from a smaller one)."""
        spacing = self.axes.spacing_ijk[self.axes.slice_axis]
        col, row = int(xy[0]), int(xy[1])
        other = index + step
        while (other - index) * step * spacing < NEGATIVE_REACH * depth_mm and 0 <= other <= self._last:
            mask = state.masks.get(other)
            if state.kinds.get(other) is not Kind.ENGINE or mask is None or not mask[row, col]:
                break
            if cancel is not None and cancel():
                raise Cancelled(f"Cancelled at slice {other}; nothing was changed.")
            # Only trimmed around the click, never a part removed whole: the click was not placed on this slice.
            new = self._refine(state, other, mask, [(float(col), float(row), False)], removal=np.inf)
            state.masks[other] = new
            update.changed[other] = new
            other += step
        update.stopped["up" if step > 0 else "down"] = f"the click corrected slices up to {other - step}"

    def _clear_engine(self, state: ObjectState, start: int, step: int, update: Update) -> None:
        """Remove the engine's slices from ``start`` on (``step`` ±1) up to the first key or user slice."""
        index = start
        while 0 <= index <= self._last and state.kinds.get(index) not in (Kind.KEY, Kind.USER):
            if state.kinds.get(index) is Kind.ENGINE:
                update.changed[index] = np.zeros(self.axes.image_shape, bool)
                del state.masks[index], state.kinds[index]
            index += step

    def _end_at(self, state: ObjectState, index: int, update: Update) -> None:
        """Slice ``index`` was emptied by a click: on each side with no non-empty key or user slice, the object
        ends here, so the engine's slices there go."""
        for step, label in ((1, "up"), (-1, "down")):
            anchored = any(state.kinds.get(i) in (Kind.KEY, Kind.USER) and mask.any() and (i - index) * step > 0
                           for i, mask in state.masks.items())
            if not anchored:
                self._clear_engine(state, index + step, step, update)
            update.stopped[label] = "the object goes on past it" if anchored else f"the object ends at slice {index}"

    def _commit(self, name: str, state: ObjectState, update: Update, start: float) -> None:
        self.objects[name] = state
        update.changed = dict(sorted(update.changed.items()))
        update.seconds = time.perf_counter() - start

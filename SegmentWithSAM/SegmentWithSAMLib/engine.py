"""One engine under every front end: ``Engine(session, view).step(state, action) → (state, update)``, one step
over one object's :class:`~.state.ObjectState` per action (:mod:`.actions`; the design: docs/engine.md).

The actions: :class:`~.actions.Prompt` (a 2D prompt; a preview is this step alone), :class:`~.actions.Box3D`
(a prompt whose box spans slices, then propagation both ways; within the range only empty masks stop,
:data:`RANGE_RULES`), :class:`~.actions.Propagate`, :class:`~.actions.Click` (a correction anywhere: its slice is
refined and becomes a key slice, then the change is carried through the engine's slices) and
:class:`~.actions.UserEdit` (slices painted outside the engine). What each does to the slices, and why, is in
docs/interaction.md ("How a click works") and docs/engine.md.

A step never changes the state it is given; a cancelled or failed step changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import numpy as np
from scipy import ndimage as ndi

from .actions import Action, Box3D, Click, Lasso, Prompt, Propagate, Scribble, UserEdit, clip_box
from .click_scale import grown_by_box, reach_cap_mm, size_near_mm, widest_box_mm
from .errors import PromptError
from .geometry import Reach, View, bounding_box, equivalent_radius_mm
from .metrics import dice
from .predictor import normalize_slice
from .prompts import click_logits, reaching_box_sides
from .propagation import Cancelled, Direction, Propagator, StopRules, chained_logits
from .reanchor import reanchored, trimmed
from .refinement import Refiner
from .state import Kind, ObjectState, Update
from .strokes import check_stroke, fill_lasso, sample_stroke
from .surface_shift import SHIFT_MAX_DEPTH_MM, click_depth_mm, moved_by_click

# A click's re-propagation stops at the first slice where its mask and the one there agree this well (Dice).
AGREE_DICE = 0.95
# On an end slice of the object's extent a negative click removes that slice's part of the mask whole when it
# is this deep in it (relative to the part's deepest point): the middle of a wrong blob past the object's end.
# Inside the extent it only trims around itself: removing parts whole there emptied slices of mostly right masks
# (Colin27's putamen and hippocampus, the challenge's clicks: -0.06 for one click).
CENTRED_REMOVAL = 0.6
# A negative click trims the engine's neighbouring slices this many times as far as it lay deep in the 3D mask
# (mean gain of 5 clicks on the 14 benchmark structures: 0.5x +0.056, 1x +0.076, 1.5x +0.078, in process), ...
NEGATIVE_REACH = 1.5
# ... or this many times where its surface shift (surface_shift.py) trims the neighbouring slices around it too (a
# click within SHIFT_MAX_DEPTH_MM of the surface): the two together removed right tissue beside the atlas's truth
# (Amygdala_R's fourth click -0.012). The challenge's clicks, all 21: AAL after five .701 -> .704, the worst click
# -0.012 -> -0.009; the head CT and the organs identical (docs/interaction.md, "Session 33").
SHIFTED_NEGATIVE_REACH = 1.25
# A positive click's additions carried to other slices stay within CARRY_REACH x (its reach cap, or the radius
# of what it added if larger) of the click in 3D, slices counted at the pixel size when thicker: unbounded, a
# caudate-sized click on the amygdala grew five neighbours to 4x their size (-0.062 DSC). On the 12 AAL
# structures, 5 challenge clicks: mean 0.659 -> 0.669, worst click -0.062 -> -0.018; on the development set's
# thick-slice organs and tumours 0.880 -> 0.877 (docs/interaction.md).
CARRY_REACH = 1.5
# An object started by a click spans FIRST_CLICK_EXTENT x its mask's equivalent radius on either side of it.
FIRST_CLICK_EXTENT = 2.0
# On slices at least THICK_SLICES x as thick as their pixels, a click on a slice without a mask (an object's first
# click, and every replay of that slice's clicks) judges its boxes' widths on the slices either side too
# (prompts.click_logits' ``neighbours``): there the neighbours are other views of the object, which a patch or a leak
# rarely fits as well. Clicks alone, 5 protocol clicks: the left MR kidney (7.7 mm slices, 1.25 mm pixels) .497 ->
# .848, the other 20 unchanged; on every slice it cost the head CT's head (1.5 mm slices, 0.96 mm pixels) .351 ->
# .009, where near copies flipped a close choice of width (docs/interaction.md, "Session 32").
THICK_SLICES = 3.0
# A positive lasso's mask is its filled outline; within SNAP_MM of the outline the model's mask for the outline's
# box would decide. Measured with outlines moved 1-2 mm (benchmarks/scribbles.py, 19 structures): step 0 over the
# box's +0.022 at 0 mm, +0.019 at 1 mm, +0.007 at 2 mm (2 mm helped the MR kidneys, lost on AAL's atlas labels).
SNAP_MM = 0.0
# A positive lasso with a range is first the box around it, propagated through the range as a 3D box is (the box's
# offset holds each slice's box at the object's size); then its outline is the key slice, carried to the slices
# while they agree less than LASSO_AGREE (Dice) with the box's. Lasso step 0 on the 19 structures of
# benchmarks/scribbles.py: 0.7025 -> 0.718 (box 0.672); propagated from the outline alone its masks shrank slice by
# slice (a drawn outline calibrates to a 0 mm offset). Carried until 0.95, 0.8, 0.7: 0.707, 0.700, 0.693
# (docs/strokes.md, "Session 22").
LASSO_AGREE = 0.9
# Within a range the user gave with a box, only empty masks stop propagation (two in a row: one is bridged).
RANGE_RULES = StopRules(min_similarity=None, min_score=None, max_area_ratio=None, min_overlap=None, max_empty=2)
_ADDED_NEAR_PX = 2  # a positive click's addition on a slice continues what it added on the slice before within this
_LOGIT_FLOOR = 1e-3  # |logit| given to pixels whose sign is forced to the slice's current mask

Cancel = Callable[[], bool] | None
OnSlice = Callable[[int, np.ndarray], None] | None


def _continuing(grown: np.ndarray, added: np.ndarray) -> np.ndarray:
    """The parts of ``grown`` (rows, cols) that touch ``added`` (the addition on the slice before) within
    ``_ADDED_NEAR_PX`` pixels."""
    return ndi.binary_propagation(ndi.binary_dilation(added, iterations=_ADDED_NEAR_PX) & grown, mask=grown)


class Engine:
    """Steps on ``view`` of ``session``'s volume (see the module docstring). ``rules``: the stop rules of an object
    that has none of its own (default :class:`~.propagation.StopRules`); ``agree``: the Dice at which a click's
    re-propagation stops. Masks are not held within the box's in-plane extent: on the 12 AAL structures (axial,
    box on the middle slice, the true range) that gave a mean 3D Dice of 0.541–0.542 for margins of 2, 5 and
    10 mm against 0.543 without."""

    def __init__(self, session, view: View | str = View.AXIAL, rules: StopRules | None = None,
                 agree: float = AGREE_DICE) -> None:
        self.session = session
        self.axes = session.axes(view)
        self.rules = rules or StopRules()
        self.agree = float(agree)

    def step(self, state: ObjectState | None, action: Action, cancel: Cancel = None,
             on_slice: OnSlice = None) -> tuple[ObjectState, Update]:
        """Apply ``action`` to ``state`` (None: a new object). Returns the new state and what changed.
        ``cancel`` is asked between slices (it raises :class:`~.propagation.Cancelled`); ``on_slice(index,
        mask)`` sees each slice a propagation writes, as it is done."""
        start = time.perf_counter()
        update = Update()
        work = state.copy() if state is not None else None
        if isinstance(action, Prompt):
            work = self._prompt(work, action, update)
        elif isinstance(action, Box3D):
            work = self._prompt(work, Prompt(action.index, action.box, (), action.slice_range), update)
            if work.masks[action.index].any():
                self._propagate(work, Propagate(action.index, skip=action.skip), update, cancel, on_slice)
        elif isinstance(action, Propagate):
            if work is None:
                raise PromptError("Nothing to propagate: segment a slice first.")
            self._propagate(work, action, update, cancel, on_slice)
        elif isinstance(action, (Click, Scribble)):
            work = self._click(work, action, update, cancel)
        elif isinstance(action, Lasso):
            work = self._lasso(work, action, update, cancel, on_slice)
        elif isinstance(action, UserEdit):
            work = self._user_edit(work, action, update)
        else:
            raise PromptError(f"Unknown action {action!r:.80}.")
        update.changed = dict(sorted(update.changed.items()))
        update.seconds = time.perf_counter() - start
        return work, update

    # ---- actions -------------------------------------------------------------------------------------------
    def _new_state(self) -> ObjectState:
        return ObjectState((0, self._last))

    def _prompt(self, state: ObjectState | None, prompt: Prompt, update: Update) -> ObjectState:
        index = self._check_index(prompt.index)
        state = state if state is not None else self._new_state()
        box = None
        if prompt.box is not None:  # users draw boxes generously near the edges: clipped, with a notice
            box, clipped = clip_box(prompt.box, self.axes.image_shape)
            if clipped:
                update.notices.append("The box reached past the volume's edge; it was clipped to the volume.")
        if prompt.slice_range is not None:
            low, high = self._clip_range(prompt.slice_range, update.notices)
            if not low <= index <= high:
                raise PromptError(f"The prompt is on slice {index}, outside its range {low}:{high}.")
            state.slice_range = (low, high)
            if box is not None:
                state.rules = RANGE_RULES
        if box is None and not any(positive for _, _, positive in prompt.clicks):
            raise PromptError("Give at least one positive point or a box: negative points alone select nothing.")
        self.session.set_slice(self.axes.view, index)
        own = logits = None if box is None else self.session.predictor.predict(box=box).logits[0]
        if own is not None and (prompt.slice_range is None or state.slice_range[0] == state.slice_range[1]):
            logits = reaching_box_sides(own, box)  # a box on one slice (a 3D box's slice keeps the model's mask)
        refiner = Refiner(self.session.predictor, self.axes.pixel_spacing, logits,
                          widest_box_mm=widest_box_mm(state.masks, index, self.axes.pixel_spacing),
                          image=self._image(index, prompt.clicks))
        for x, y, positive in prompt.clicks:
            refiner.add_click((x, y), positive)
        mask = self._kept(state, index, refiner.mask)
        if box is not None and not mask.any():
            update.notices.append(f"The model found nothing in the box on slice {index}; draw it around the object.")
        state.box = (index, box) if box is not None else None
        self._set_slice(state, index, mask, update)
        seed = self._chain_seed(state, index, mask, own)
        state.offset = box - bounding_box(seed) if box is not None and seed.any() else np.zeros(4)
        return state

    def _propagate(self, state: ObjectState, action: Propagate, update: Update, cancel: Cancel,
                   on_slice: OnSlice) -> None:
        index = self._check_index(action.index)
        seed = state.masks.get(index)
        if seed is None or not seed.any():
            raise PromptError(f"The object is empty on {self.axes.view.value} slice {index}: segment it there first.")
        if action.slice_range is not None:  # a range of its own: its rules (or the engine's) hold within it
            state.slice_range = self._clip_range(action.slice_range, update.notices)
            state.rules = action.rules
        elif action.rules is not None and state.rules != RANGE_RULES:  # a 3D box's range: only empty masks stop
            state.rules = action.rules
        if not state.slice_range[0] <= index <= state.slice_range[1]:
            raise PromptError(f"Slice {index} is outside the range {state.slice_range[0]}:{state.slice_range[1]}.")
        state.skip = action.skip  # checked by the propagator; the object's later clicks walk with it too
        seed = self._chain_seed(state, index, seed)
        for step in Direction(action.direction).steps():
            self._walk(state, index, seed, step, update, cancel, on_slice, skip=action.skip,
                       drawn=state.kinds.get(index) is Kind.USER)
            self._clear_engine(state, index + step, step, update, keep=set(update.changed))

    def _click(self, state: ObjectState | None, action: Click | Scribble, update: Update,
               cancel: Cancel) -> ObjectState:
        """A click, or a scribble as clicks every SAMPLE_MM along it: its slice refined (a key slice), then the
        change carried through the engine's slices within its reach."""
        index = self._check_index(action.index)
        scribble = isinstance(action, Scribble)
        points = sample_stroke(check_stroke(action.points, self.axes.image_shape, closed=False),
                               self.axes.pixel_spacing) if scribble else self._check_xy(action.xy)[None]
        what = "scribble" if scribble else "click"
        started = state is None or not any(mask.any() for mask in state.masks.values())
        if started:
            if not action.positive:
                raise PromptError(f"The object has no mask yet: start it with a box, a lasso or a positive {what}.")
            state = state if state is not None else self._new_state()
        low, high = state.slice_range
        if not low <= index <= high:
            if not action.positive:
                raise PromptError(f"Slice {index} is outside the object's range {low}:{high}: there is nothing to "
                                  "remove there.")
            low, high = min(low, index), max(high, index)
            update.notices.append(f"The object now spans slices {low}:{high}.")
        state.slice_range = (low, high)
        added_clicks = [(float(x), float(y), bool(action.positive)) for x, y in np.rint(points)]
        clicks = [*state.clicks.get(index, []), *added_clicks]
        current = state.masks.get(index)
        base = state.base.get(index, current if current is not None and current.any() else None)
        if base is None and not any(c[2] for c in clicks):
            raise PromptError(f"The object has no mask on slice {index}: a negative {what} there removes nothing.")
        # how deep the click lies in the object's 3D mask (< 0: how far outside): the carry's and the shift's
        depth = click_depth_mm(state.masks, self.axes.oriented_spacing, index, np.rint(points),
                               np.inf if not action.positive else SHIFT_MAX_DEPTH_MM)
        surface = None if scribble else self._surface_moved(state, index, np.rint(points)[0], depth, action.positive)
        removal = CENTRED_REMOVAL if self._is_end(state, index) else np.inf
        if base is None and scribble:  # a scribble on an empty slice segments the object there: its mask is the base
            base = self._stroke_mask(state, index, points)
            clicks = []
        mask = self._kept(state, index, self._refine(state, index, base, clicks, removal=removal) if clicks else base)
        anchor = None  # a positive click beside a small object's engine mask, apart from it, re-anchors it there
        if action.positive and not scribble and base is not None:
            spacing = self.axes.pixel_spacing
            engine_slice = state.kinds.get(index) == Kind.ENGINE and not state.clicks.get(index)
            anchor = reanchored(mask, base, points[0], engine_slice, size_near_mm(state.masks, index, base, spacing),
                               spacing)
            mask, base = anchor if anchor is not None else (mask, base)
        state.masks[index], state.kinds[index] = mask, Kind.KEY
        state.clicks[index], state.base[index] = clicks, base
        update.changed[index] = mask
        if started and mask.any():
            state.slice_range = self._click_extent(index, mask, update.notices)
        if not mask.any():
            self._end_at(state, index, update)
        elif action.positive:
            added = mask & ~base if base is not None and clicks else mask
            cap = reach_cap_mm(state.masks, index, base, self.axes.pixel_spacing)
            radius = CARRY_REACH * max(cap, self._radius_mm(added))
            reach = Reach(self.axes, index, np.rint(points), radius)
            for step in (1, -1):
                self._walk(state, index, mask, step, update, cancel, None, agree=self.agree, added=added,
                           skip=self._skip(state), reach=reach, trim=anchor is not None)
        else:
            lost = current & ~mask if current is not None else np.zeros_like(mask)
            carry_mm = (SHIFTED_NEGATIVE_REACH if surface is not None else NEGATIVE_REACH) * max(depth, 0.0)
            for step in (1, -1):
                self._carry_negative(state, index, np.rint(points), carry_mm, step, update, cancel, lost)
        if surface is not None and mask.any():
            self._move_surface(state, index, action.positive, *surface, update)
        return state

    def _stroke_mask(self, state: ObjectState, index: int, points: np.ndarray) -> np.ndarray:
        """The mask a positive scribble makes on an empty slice: the model from boxes around it (as for a first
        click), then the scribble's points as positive clicks, so it covers the whole stroke."""
        self.session.set_slice(self.axes.view, index)
        logits = click_logits(self.session.predictor, points, self.axes.pixel_spacing,
                              widest_mm=widest_box_mm(state.masks, index, self.axes.pixel_spacing))
        refiner = Refiner(self.session.predictor, self.axes.pixel_spacing, logits=logits)
        for xy in points:
            refiner.add_click(tuple(xy), True)
        return refiner.mask

    def _lasso(self, state: ObjectState | None, lasso: Lasso, update: Update, cancel: Cancel,
               on_slice: OnSlice) -> ObjectState:
        """A positive lasso makes its slice a key slice with its outline's mask (see ``SNAP_MM``); with a range,
        after the box around it has been propagated through the range (see ``LASSO_AGREE``); carried to the
        engine's slices while they disagree. A negative one removes its inside there and what continues it on the
        neighbouring engine slices."""
        index = self._check_index(lasso.index)
        outline = check_stroke(lasso.points, self.axes.image_shape, closed=True)
        inside = fill_lasso(outline, self.axes.image_shape)
        if not lasso.positive:
            if state is None or index not in state.masks or not state.masks[index].any():
                raise PromptError(f"The object has no mask on slice {index}: a negative lasso there removes nothing.")
            old = state.masks[index]
            self._set_slice(state, index, old & ~inside, update)
            if not state.masks[index].any():
                self._end_at(state, index, update)
            else:
                for step in (1, -1):
                    self._cut_through(state, index, old & inside, inside, step, update, cancel)
            return state
        state = state if state is not None else self._new_state()
        if lasso.slice_range is not None:
            low, high = sorted(int(v) for v in lasso.slice_range)
            if not low <= index <= high:
                raise PromptError(f"The lasso is on slice {index}, outside its range {low}:{high}.")
            state = self._prompt(state, Prompt(index, bounding_box(inside).astype(float), (), lasso.slice_range),
                                 update)
            if state.masks[index].any():
                self._propagate(state, Propagate(index), update, cancel, on_slice)
        elif not state.slice_range[0] <= index <= state.slice_range[1]:
            state.slice_range = (min(state.slice_range[0], index), max(state.slice_range[1], index))
        mask = inside
        if SNAP_MM > 0:
            self.session.set_slice(self.axes.view, index)
            logits = self.session.predictor.predict(box=bounding_box(inside).astype(float)).logits[0]
            band = ndi.distance_transform_edt(~inside, sampling=self.axes.pixel_spacing) <= SNAP_MM
            band &= ndi.distance_transform_edt(inside, sampling=self.axes.pixel_spacing) <= SNAP_MM
            mask = np.where(band, logits > 0, inside)
        mask = self._kept(state, index, mask)
        # The outline's own walk calibrates its boxes on the outlined mask, as after a click. A lasso's tight box
        # chained slice to slice from the outline lost the left kidney's lower half (CHAOS MR: 3D Dice 0.673
        # against 0.906).
        state.box, state.offset = None, np.zeros(4)
        self._set_slice(state, index, mask, update)
        others = any(m.any() for i, m in state.masks.items() if i != index)
        if lasso.slice_range is not None or others:  # (with a range and no box mask: through the whole range)
            agree = None if not others else LASSO_AGREE if lasso.slice_range is not None else self.agree
            for step in Direction.BOTH.steps():
                self._walk(state, index, mask, step, update, cancel, on_slice, agree=agree, drawn=True)
        return state

    @staticmethod
    def _set_slice(state: ObjectState, index: int, mask: np.ndarray, update: Update, kind: Kind = Kind.KEY) -> None:
        """Slice ``index`` becomes a key (or user) slice with ``mask``; later clicks there start from it."""
        state.masks[index], state.kinds[index] = mask, kind
        state.clicks.pop(index, None)
        state.base.pop(index, None)
        update.changed[index] = mask

    def _user_edit(self, state: ObjectState | None, edit: UserEdit, update: Update) -> ObjectState:
        state = state if state is not None else self._new_state()
        low, high = state.slice_range
        for index, mask in sorted(edit.masks.items()):
            index = self._check_index(index)
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != self.axes.image_shape:
                raise PromptError(f"A {self.axes.view.value} slice is {self.axes.image_shape}, not {mask.shape}.")
            self._set_slice(state, index, mask, update, Kind.USER)
            low, high = min(low, index), max(high, index)
        state.slice_range = (low, high)
        return state

    # ---- checks --------------------------------------------------------------------------------------------
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

    def _clip_range(self, slice_range, notices: list[str]) -> tuple[int, int]:
        low, high = sorted(int(v) for v in slice_range)
        if high < 0 or low > self._last:
            raise PromptError(f"The range {low}:{high} is outside the volume: {self.axes.view.value} slices are 0 to "
                              f"{self._last}.")
        clipped = (max(low, 0), min(high, self._last))
        if clipped != (low, high):
            notices.append(f"The range {low}:{high} was clipped to the volume: {clipped[0]}:{clipped[1]}.")
        return clipped

    # ---- one slice -----------------------------------------------------------------------------------------
    @staticmethod
    def _kept(state: ObjectState, index: int, mask: np.ndarray) -> np.ndarray:
        """``mask`` without the pixels the object must keep out of on slice ``index`` (locked segments): every
        mask the engine makes passes here before it is kept or carried to the next slice."""
        keep = state.keep_out.get(index)
        return mask & ~keep if keep is not None and (mask & keep).any() else mask

    def _chain_seed(self, state: ObjectState, index: int, mask: np.ndarray, logits=None) -> np.ndarray:
        """What a propagation from slice ``index`` chains from: ``mask``, but on the box's slice, before a click
        there, without what reaching the box's sides added (:func:`~.prompts.reaching_box_sides`; ``logits``: the
        model's for the box, if at hand): the box sat around the model's own mask (the offset); chained from the
        reached one, the boxes outgrew the box drawn or shrank slice by slice (docs/interaction.md, "Session 37")."""
        if state.box is None or state.box[0] != index or state.clicks.get(index):
            return mask
        if logits is None:
            self.session.set_slice(self.axes.view, index)
            logits = self.session.predictor.predict(box=state.box[1]).logits[0]
        return mask & ~((reaching_box_sides(logits, state.box[1]) > 0) & (logits <= 0))

    def _base_logits(self, state: ObjectState, base: np.ndarray) -> np.ndarray:
        """Logits (rows, cols) whose sign is ``base`` exactly, shaped by the model around it: the prompt that
        propagation would give this mask (:func:`~.propagation.chained_logits`), on the current slice."""
        logits, _ = chained_logits(self.session.predictor, base, state.offset, self.axes.pixel_spacing)
        logits = np.where(base, np.maximum(logits, _LOGIT_FLOOR), np.minimum(logits, -_LOGIT_FLOOR))
        return logits.astype(np.float32)

    def _image(self, index: int, clicks) -> np.ndarray | None:
        """Slice ``index`` (rows, cols) as the model sees it, in [0, 1], for a deep negative click's tissue test
        (:class:`~.refinement.Refiner`'s ``image``); None when ``clicks`` ((x, y, positive) each) has no negative."""
        if all(positive for *_, positive in clicks):
            return None
        return normalize_slice(self.session.windowed_slice(self.axes, index))

    def _radius_mm(self, mask: np.ndarray) -> float:
        """The radius (mm) of a disk as large as ``mask`` (rows, cols)."""
        return equivalent_radius_mm(mask, self.axes.pixel_spacing)

    def _refine(self, state: ObjectState, index: int, base: np.ndarray | None, clicks,
                removal: float = CENTRED_REMOVAL) -> np.ndarray:
        """The slice's mask after ``clicks`` (replayed in order) from ``base`` (None: from the first positive
        click, as in 2D, its boxes judged on the slices beside it too where they are thick, ``THICK_SLICES``: every
        replay of the slice's clicks judges them alike); ``removal``: see :class:`~.refinement.Refiner`'s
        ``centred_removal``."""
        self.session.set_slice(self.axes.view, index)
        thick = self.axes.spacing_ijk[self.axes.slice_axis] >= THICK_SLICES * max(self.axes.pixel_spacing)
        neighbours = partial(self.session.predict_boxes_on, self.axes.view, (index - 1, index + 1)) \
            if base is None and thick else None
        if base is not None:
            base = grown_by_box(self.session.predictor, base, state.offset,
                                [(x, y) for x, y, positive in clicks if positive], self.axes.pixel_spacing)
        logits = self._base_logits(state, base) if base is not None else None
        refiner = Refiner(self.session.predictor, self.axes.pixel_spacing, logits=logits, centred_removal=removal,
                          max_radius_mm=reach_cap_mm(state.masks, index, base, self.axes.pixel_spacing),
                          widest_box_mm=widest_box_mm(state.masks, index, self.axes.pixel_spacing)
                          if base is None else np.inf,
                          image=self._image(index, clicks), neighbours=neighbours)
        for x, y, positive in clicks:
            refiner.add_click((x, y), positive)
        return refiner.mask

    # ---- through the slices --------------------------------------------------------------------------------
    def _walk(self, state: ObjectState, index: int, seed: np.ndarray, step: int, update: Update, cancel: Cancel,
              on_slice: OnSlice, agree: float | None = None, added: np.ndarray | None = None, skip: int = 0,
              reach: Reach | None = None, drawn: bool = False, trim: bool = False) -> None:
        """Propagate ``seed`` on slice ``index`` one way (``step`` ±1) into ``state``: through engine and empty
        slices, up to a key or user slice, the range end or a stop rule; with ``agree`` (a Dice), also up to the
        first slice where the new mask agrees that well with the one there. ``added`` (a positive click's
        addition on slice ``index``): an engine slice with a mask keeps it and gains only the new mask's parts that
        touch the addition on the slice before, and the walk stops where there is none (replacing those slices whole
        lowered the 3D Dice of one click by up to 0.05 on Colin27's caudate: their masks, right elsewhere, were
        rebuilt from one slice's); with ``reach`` (:class:`~.geometry.Reach`) only within it; with ``trim`` (a click
        that re-anchored the object, :mod:`.reanchor`) that mask also keeps only what the new one covers. Slices past
        the stop keep what they had (clearing them after a stop rule, e.g. a shrunken mask's empty neighbours, lost
        right masks of earlier propagations on Colin27's hippocampus; a click there corrects them). ``drawn``: the
        seed is the user's (a lasso's outline, an edit). Without ``added`` the walk is a prompt's propagation (see
        :class:`~.propagation.BoxChain`'s ``prompt``)."""
        label = "up" if step > 0 else "down"
        keys = {i: m for i, m in state.masks.items() if state.kinds.get(i) in (Kind.KEY, Kind.USER) and i != index}
        propagator = Propagator(self.session, self.axes.view, state.rules or self.rules, skip=skip)
        # how the object's box sat around its mask holds on every slice (without a box: calibrated on the seed)
        box = bounding_box(seed) + state.offset if state.box is not None else None
        steps = propagator.steps((index, seed), Direction.UP if step > 0 else Direction.DOWN, state.slice_range,
                                 keys, box=box, drawn=drawn,
                                 ends=box is not None and state.rules == RANGE_RULES,  # a 3D box's range
                                 prompt=added is None)
        reason = None
        try:
            for slice_step in steps:
                if cancel is not None and cancel():
                    raise Cancelled(f"Cancelled at slice {slice_step.index}; nothing was changed.")
                new, old = self._kept(state, slice_step.index, slice_step.mask), state.masks.get(slice_step.index)
                if agree is not None and old is not None and old.any() and dice(new, old) >= agree:
                    reason = f"agrees with slice {slice_step.index}"
                    break
                if added is not None:
                    if old is not None and old.any():
                        kept = _continuing(new & ~old, added)
                        kept &= reach.on(slice_step.index) if reach is not None else True
                        if not kept.any():
                            reason = f"nothing to add on slice {slice_step.index} within the click's reach"
                            break
                        new = (trimmed(old, new) if trim else old) | kept
                    added = new & ~old if old is not None else new
                state.masks[slice_step.index], state.kinds[slice_step.index] = new, Kind.ENGINE
                update.changed[slice_step.index] = new
                if on_slice is not None:
                    on_slice(slice_step.index, new)
        finally:
            steps.close()
        update.stopped[label] = reason or propagator.stopped.get(label, "range end")

    def _click_extent(self, index: int, mask: np.ndarray, notices: list[str]) -> tuple[int, int]:
        """The range of an object started by a click on slice ``index``: FIRST_CLICK_EXTENT × its mask's
        equivalent radius on either side (without it, the stop rules let one click's object spread over twice
        its slices, and every slice on the way was encoded)."""
        reach = int(np.ceil(FIRST_CLICK_EXTENT * self._radius_mm(mask) / self.axes.spacing_ijk[self.axes.slice_axis]))
        low, high = max(0, index - reach), min(self._last, index + reach)
        notices.append(f"A click started the object: it spans slices {low}:{high}; a click beyond extends it.")
        return low, high

    def _skip(self, state: ObjectState) -> int:
        """The skip the object's clicks walk with: its propagations' (0 for a model that tracks every slice with
        its memory: the object may have been propagated by another model)."""
        return 0 if self.session.model.tracks_video else state.skip

    def _is_end(self, state: ObjectState, index: int) -> bool:
        """Whether slice ``index`` ends the object's extent: a neighbour on either side has no mask."""
        empty = np.zeros(self.axes.image_shape, bool)
        return not all(state.masks.get(index + step, empty).any() for step in (1, -1))

    def _surface_moved(self, state: ObjectState, index: int, xy: np.ndarray, depth_mm: float,
                       positive: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """What a click at pixel ``xy`` (col, row) on slice ``index``, ``depth_mm`` deep in the object's mask (see
        :func:`~.surface_shift.click_depth_mm`), says about the object's surface (see
        :func:`~.surface_shift.moved_by_click`; None unless it lies on an error, outside the masks for a positive
        click, inside for a negative one, at a measured distance: -inf is none, or none within the limit)."""
        if positive != (depth_mm < 0) or not np.isfinite(depth_mm):
            return None
        voxel = (index, int(xy[1]), int(xy[0]))
        return moved_by_click(state.masks, self.axes.oriented_spacing, voxel, self._radius_mm(state.masks[index]),
                              depth_mm)

    def _move_surface(self, state: ObjectState, index: int, positive: bool, moved: np.ndarray, low: np.ndarray,
                      update: Update) -> None:
        """Add (``positive``) or remove the voxels ``moved`` (a block at ``low``, see :meth:`_surface_moved`) on
        the engine's slices but the clicked one, ``index`` (the model refined it). Unlike a click's carry the
        shift goes past key and user slices, which it leaves as they are: stopped at them, five clicks gained .014
        less on the AAL structures (docs/interaction.md, "Session 31")."""
        for offset, part in enumerate(moved):
            other = int(low[0]) + offset
            if other == index or state.kinds.get(other) is not Kind.ENGINE or not part.any():
                continue
            mask = state.masks[other].copy()
            window = mask[low[1]: low[1] + part.shape[0], low[2]: low[2] + part.shape[1]]
            window[...] = (window | part) if positive else (window & ~part)
            state.masks[other] = update.changed[other] = self._kept(state, other, mask)

    def _carry_negative(self, state: ObjectState, index: int, points: np.ndarray, reach_mm: float, step: int,
                        update: Update, cancel: Cancel, lost: np.ndarray) -> None:
        """A negative click's (or scribble's: ``points`` (K, 2) XY) error region is a 3D blob: the same points correct
        the engine's slices beyond it (``step`` ±1) up to ``reach_mm`` away (``NEGATIVE_REACH``,
        ``SHIFTED_NEGATIVE_REACH``) and while one still falls inside their masks, each slice from its own mask
        (re-propagating from the corrected slice instead lowered the Dice on Colin27's hippocampus: the neighbours'
        masks, right elsewhere, were rebuilt from a smaller one). ``lost``: what the click removed on its own slice. An
        object propagated with ``skip`` is refined on its grid's slices only (the others were never encoded): a slice
        between two refined ones loses what both of them lost, one past the last what that one lost."""
        spacing = self.axes.spacing_ijk[self.axes.slice_axis]
        cols, rows = points[:, 0].astype(int), points[:, 1].astype(int)
        every, between, last = self._skip(state) + 1, [], index
        other = index + step
        while (other - index) * step * spacing < reach_mm and 0 <= other <= self._last:
            mask = state.masks.get(other)
            inside = mask[rows, cols] if mask is not None else np.zeros(len(points), bool)
            if state.kinds.get(other) is not Kind.ENGINE or not inside.any():
                break
            if cancel is not None and cancel():
                raise Cancelled(f"Cancelled at slice {other}; nothing was changed.")
            if other % every:
                between.append(other)
                other += step
                continue
            # Only trimmed around the click, never a part removed whole: the click was not placed on this slice.
            negatives = [(float(c), float(r), False) for c, r in zip(cols[inside], rows[inside], strict=True)]
            new = self._refine(state, other, mask, negatives, removal=np.inf)
            for i in between:
                state.masks[i] = update.changed[i] = state.masks[i] & ~(lost & mask & ~new)
            state.masks[other], lost, between, last = new, mask & ~new, [], other
            update.changed[other] = new
            other += step
        for i in between:  # past the last refined slice, as it
            state.masks[i] = update.changed[i] = state.masks[i] & ~lost
        update.stopped["up" if step > 0 else "down"] = f"the click corrected slices up to {(between or [last])[-1]}"

    def _cut_through(self, state: ObjectState, index: int, removed: np.ndarray, inside: np.ndarray, step: int,
                     update: Update, cancel: Cancel) -> None:
        """A negative lasso on slice ``index`` removed ``removed``: on the engine's slices beyond it (``step``
        ±1), the parts of their masks within the lasso's region ``inside`` that touch what was removed on the
        slice before go too, as far as NEGATIVE_REACH × the removed region's depth and while there is any."""
        depth = float(ndi.distance_transform_edt(np.pad(removed, 1), sampling=self.axes.pixel_spacing).max())
        spacing = self.axes.spacing_ijk[self.axes.slice_axis]
        other = index + step
        while (other - index) * step * spacing < NEGATIVE_REACH * depth and 0 <= other <= self._last:
            mask = state.masks.get(other)
            if state.kinds.get(other) is not Kind.ENGINE or mask is None:
                break
            if cancel is not None and cancel():
                raise Cancelled(f"Cancelled at slice {other}; nothing was changed.")
            cut = ndi.binary_propagation(removed & mask & inside, mask=mask & inside)
            if not cut.any():
                break
            state.masks[other] = mask & ~cut
            update.changed[other] = state.masks[other]
            removed, other = cut, other + step
        update.stopped["up" if step > 0 else "down"] = f"the lasso cut slices up to {other - step}"

    def _clear_engine(self, state: ObjectState, start: int, step: int, update: Update, keep=()) -> None:
        """Remove the engine's slices from ``start`` on (``step`` ±1) up to the first key or user slice, but
        those in ``keep``."""
        index = start
        while 0 <= index <= self._last and state.kinds.get(index) not in (Kind.KEY, Kind.USER):
            if state.kinds.get(index) is Kind.ENGINE and index not in keep:
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

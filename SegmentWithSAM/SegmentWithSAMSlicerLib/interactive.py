"""Clicks in 3D on a segment in Slicer: the segment ⇄ the core's interaction state (:mod:`SegmentWithSAMLib.
interaction`), and the pending result of clicks before it is written.

The state is rebuilt from the segment itself at each click (so a backend restart or an edit with another
Segment Editor effect loses nothing): slices the engine wrote are known from the segment's propagated-slices
tag (their masks still as written), every other slice with voxels is the user's and is never overwritten. The
clicks made so far on each slice and how the box sat around the accepted mask are kept in memory per segment
and used while the segment still matches them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from SegmentWithSAMLib.errors import PromptError
from SegmentWithSAMLib.geometry import SliceAxes, View, bounding_box
from SegmentWithSAMLib.interaction import RANGE_RULES, Kind, ObjectState, Update
from SegmentWithSAMLib.propagation import StopRules

from . import mrml


def state_from_segment(oriented: np.ndarray, axes: SliceAxes, written: dict[int, int], remembered: ObjectState | None,
                       slice_range: tuple[int, int] | None, box: tuple[int, np.ndarray] | None,
                       rules: StopRules | None) -> ObjectState:
    """The interaction state of a segment given as ``oriented`` (slices, rows, cols) bool, whose slices in
    ``written`` ({slice: crc}) the engine wrote. ``remembered``: the state after this segment's last click, kept
    where its slices still match; ``slice_range``: the range the user gave (the ROI's extent across slices),
    else the segment's extent; ``box``: (slice, box in pixels) of the accepted box, if any."""
    filled = [int(i) for i in np.flatnonzero(oriented.any(axis=(1, 2)))]
    if not filled:
        raise PromptError("The segment is empty: accept a mask on a slice first, then click to correct it in 3D.")
    low, high = slice_range if slice_range is not None else (filled[0], filled[-1])
    state = ObjectState((min(low, filled[0]), max(high, filled[-1])),
                        rules=RANGE_RULES if slice_range is not None else rules)
    if remembered is not None:
        state.slice_range = (min(state.slice_range[0], remembered.slice_range[0]),
                             max(state.slice_range[1], remembered.slice_range[1]))
        state.offset, state.box = remembered.offset, remembered.box
    elif box is not None and oriented[box[0]].any():
        state.box, state.offset = box, box[1] - bounding_box(oriented[box[0]])
    known = remembered.kinds if remembered is not None else {}
    for index in sorted(set(filled) | set(known)):
        mask = oriented[index]
        if remembered is not None and index in known and np.array_equal(remembered.masks[index], mask):
            state.masks[index], state.kinds[index] = mask.copy(), known[index]
        elif written.get(index) == mrml.mask_crc(mask) and mask.any():
            state.masks[index], state.kinds[index] = mask.copy(), Kind.ENGINE
        elif mask.any() or index in known:  # made or edited by the user (an emptied key slice stays a key)
            emptied_key = not mask.any() and known.get(index) is Kind.KEY
            state.masks[index], state.kinds[index] = mask.copy(), Kind.KEY if emptied_key else Kind.USER
    if remembered is not None:
        for index, clicks in remembered.clicks.items():
            if state.kinds.get(index) is Kind.KEY:
                state.clicks[index], state.base[index] = list(clicks), remembered.base.get(index)
    return state


@dataclass
class Refinement:
    """Clicks on one segment whose results are not written yet: the segment when the first was sent
    (``before``, KJI bool), the newest state, the slices changed since, a click in flight and those waiting."""

    segmentation_node: object
    segment_id: str
    volume_node: object
    view: View
    axes: SliceAxes
    before: np.ndarray
    state: ObjectState
    editor_node: object = None
    save_state: object = None
    auto_accept: bool = False
    window: object = None
    handle: object = None
    waiting: list[tuple[np.ndarray, bool]] = field(default_factory=list)
    changed: set[int] = field(default_factory=set)

    def add(self, update: Update, state: ObjectState) -> None:
        self.state = state
        self.changed |= set(update.changed)

    def result(self) -> np.ndarray:
        """The segment (KJI bool) with the changed slices as the clicks made them."""
        new = self.before.copy()
        oriented = self.axes.oriented(new)
        empty = np.zeros(self.axes.image_shape, bool)
        for index in self.changed:
            oriented[index] = self.state.masks.get(index, empty)
        return new

    def engine_slices(self) -> dict[int, int]:
        """{slice: crc} of the engine's slices in the newest state (for the propagated-slices tag)."""
        return {i: mrml.mask_crc(m) for i, m in self.state.masks.items()
                if self.state.kinds.get(i) is Kind.ENGINE and m.any()}

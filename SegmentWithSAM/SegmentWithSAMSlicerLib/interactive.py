"""A segment in Slicer as the engine's object state (:mod:`SegmentWithSAMLib.state`), and a step's result
before it is written.

The state is rebuilt from the segment itself before each step (so a backend restart or an edit with another
Segment Editor effect loses nothing): slices the engine wrote are known from the segment's propagated-slices
tag (their masks still as written), every other slice with voxels is the user's and is never overwritten. The
state after the segment's last step (its box, range, key slices and clicks) is kept in memory per segment and
used while the segment still matches it; when it matches on every slice it is used as it is, so the backend,
which holds it under a version, is sent only the next action.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from SegmentWithSAMLib.geometry import SliceAxes, View
from SegmentWithSAMLib.state import Kind, ObjectState, Update

from . import mrml


def _matches(oriented: np.ndarray, state: ObjectState, written: dict[int, int]) -> bool:
    """Whether the segment (slices, rows, cols) is exactly ``state``'s masks, with the engine's slices tagged."""
    filled = set(np.flatnonzero(oriented.any(axis=(1, 2))).tolist())
    if filled - set(state.masks):
        return False
    if any(not np.array_equal(oriented[i], m) for i, m in state.masks.items()):
        return False
    engine = {i for i, kind in state.kinds.items() if kind is Kind.ENGINE and state.masks[i].any()}
    return all(written.get(i) == mrml.mask_crc(state.masks[i]) for i in engine)


def state_from_segment(oriented: np.ndarray, axes: SliceAxes, written: dict[int, int],
                       remembered: ObjectState | None) -> ObjectState | None:
    """The engine state of a segment given as ``oriented`` (slices, rows, cols) bool, whose slices in ``written``
    ({slice: crc}) the engine wrote; None for an empty segment without one. ``remembered``: the state after this
    segment's last step, returned as it is where the segment still matches it, else kept where its slices do."""
    if remembered is not None and _matches(oriented, remembered, written):
        return remembered
    filled = [int(i) for i in np.flatnonzero(oriented.any(axis=(1, 2)))]
    if not filled and remembered is None:
        return None
    state = ObjectState((0, axes.num_slices - 1))
    if remembered is not None:
        state.slice_range = (min([remembered.slice_range[0], *filled]), max([remembered.slice_range[1], *filled]))
        state.offset, state.box, state.rules = remembered.offset, remembered.box, remembered.rules
    known = remembered.kinds if remembered is not None else {}
    for index in sorted(set(filled) | set(known)):
        mask = oriented[index]
        if remembered is not None and index in known and np.array_equal(remembered.masks[index], mask):
            state.masks[index], state.kinds[index] = remembered.masks[index], known[index]
        elif written.get(index) == mrml.mask_crc(mask) and mask.any():
            state.masks[index], state.kinds[index] = mask.copy(), Kind.ENGINE
        elif mask.any():  # made or edited by the user
            state.masks[index], state.kinds[index] = mask.copy(), Kind.USER
        elif known.get(index) is Kind.KEY or (known.get(index) is Kind.ENGINE and index in written):
            # emptied: a key slice a click emptied ends the object there; an engine slice still tagged was erased
            # by hand (one no longer tagged was undone: it goes)
            state.masks[index], state.kinds[index] = mask.copy(), known[index] if known[index] is Kind.KEY \
                else Kind.USER
    if remembered is not None:
        for index, clicks in remembered.clicks.items():
            if state.kinds.get(index) is Kind.KEY:
                state.clicks[index], state.base[index] = list(clicks), remembered.base.get(index)
    return state


@dataclass
class Pending:
    """Steps on one segment whose results are not written yet: ``kind`` "preview" (a 2D prompt), "propagation"
    or "correction" (clicks in 3D); the segment when the first was sent (``before``, KJI bool), the newest
    state, the slices changed since, a step in flight and the clicks waiting for it."""

    kind: str
    segmentation_node: object
    segment_id: str
    volume_node: object
    view: View
    axes: SliceAxes
    before: np.ndarray
    state: ObjectState | None
    editor_node: object = None
    save_state: object = None
    auto_accept: bool = False
    window: object = None
    handle: object = None
    waiting: list = field(default_factory=list)
    changed: set[int] = field(default_factory=set)
    update: Update | None = None  # the latest step's
    stream: np.ndarray | None = None  # a propagation's slices done so far (KJI bool), for its preview
    slice_range: tuple[int, int] | None = None  # the 3D box's slices, for a preview of one

    @property
    def key(self) -> str:
        """The object's key for the backend (one per segment and view)."""
        return f"{self.segmentation_node.GetID()}/{self.segment_id}/{self.view.value}"

    def add(self, update: Update, state: ObjectState) -> None:
        self.state, self.update = state, update
        self.changed |= set(update.changed)

    def result(self) -> np.ndarray:
        """The segment (KJI bool) with the changed slices as the steps made them."""
        new = self.before.copy()
        oriented = self.axes.oriented(new)
        empty = np.zeros(self.axes.image_shape, bool)
        for index in self.changed:
            oriented[index] = self.state.masks.get(index, empty)
        return new

    def changed_slices(self) -> np.ndarray:
        """KJI bool: True on the slices the steps changed (what the preview shows)."""
        out = np.zeros(self.before.shape, bool)
        oriented = self.axes.oriented(out)
        for index in self.changed:
            oriented[index] = True
        return out

    def engine_slices(self) -> dict[int, int]:
        """{slice: crc} of the engine's slices in the newest state (for the propagated-slices tag)."""
        return {i: mrml.mask_crc(m) for i, m in self.state.masks.items()
                if self.state.kinds.get(i) is Kind.ENGINE and m.any()}

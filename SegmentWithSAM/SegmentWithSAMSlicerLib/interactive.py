"""A segment in Slicer as the engine's object state (:mod:`SegmentWithSAMLib.state`), and a step's result
before it is written.

The state is rebuilt from the segment itself before each step (so a backend restart or an edit with another
Segment Editor effect loses nothing): slices the engine wrote are known from the segment's propagated-slices
tag (their masks still as written), every other slice with voxels is the user's and is never overwritten. The
state after the segment's last step (its box, range, key slices and clicks) is kept in memory per segment and
used while the segment still matches it; when it matches on every slice it is used as it is, so the backend,
which holds it under a version, is sent only the next action.

Reading a CT-sized segment whole takes tenths of a second, so :class:`SegmentCache` keeps the last read of each
segment and reads it again only when its labelmap changed; the controller's own writes patch the block they
wrote, and results are written and previewed block by block (:meth:`Pending.result_block`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from SegmentWithSAMLib.geometry import SliceAxes, View
from SegmentWithSAMLib.state import Kind, ObjectState, Update

from . import mrml


def _memory_order(oriented: np.ndarray) -> tuple[int, int]:
    """The steps (±1) along rows and columns that undo a view's flips: a flipped view of a CT-sized segment is
    reduced or compared about ten times slower than one read forwards."""
    return -1 if oriented.strides[1] < 0 else 1, -1 if oriented.strides[2] < 0 else 1


def _filled(oriented: np.ndarray) -> list[int]:
    """The slices of ``oriented`` (slices, rows, cols) with voxels."""
    rows, cols = _memory_order(oriented)
    return [int(i) for i in np.flatnonzero(oriented[:, ::rows, ::cols].any(axis=(1, 2)))]


def _same(oriented: np.ndarray, index: int, mask: np.ndarray) -> bool:
    """Whether slice ``index`` of ``oriented`` is ``mask`` (rows, cols, bool)."""
    rows, cols = _memory_order(oriented)
    plain = oriented[index, ::rows, ::cols]
    if cols < 0 and plain.strides[1] == 1 and mask.flags.c_contiguous and mask.shape[1] % 8 == 0:
        # a row read backwards is its bytes in reverse order: its 8-byte words in reverse order, each byte-swapped
        # (elementwise, a backwards row compares about five times slower)
        return np.array_equal(plain.view(np.uint64), mask.view(np.uint64)[::rows, ::-1].byteswap())
    # slices that differ mostly differ in their voxel count, which is quicker to tell
    return np.count_nonzero(plain) == np.count_nonzero(mask) and np.array_equal(plain, mask[::rows, ::cols])


def _matches(filled: list[int], same: dict[int, bool], state: ObjectState, written: dict[int, int]) -> bool:
    """Whether a segment (``filled``: its slices with voxels; ``same``: which of ``state``'s masks its slices are)
    is exactly ``state``'s masks, with the engine's slices tagged."""
    if set(filled) - set(state.masks) or not all(same.values()):
        return False
    engine = {i for i, kind in state.kinds.items() if kind is Kind.ENGINE and state.masks[i].any()}
    return all(written.get(i) == mrml.mask_crc(state.masks[i]) for i in engine)


def state_from_segment(oriented: np.ndarray, axes: SliceAxes, written: dict[int, int],
                       remembered: ObjectState | None) -> ObjectState | None:
    """The engine state of a segment given as ``oriented`` (slices, rows, cols) bool, whose slices in ``written``
    ({slice: crc}) the engine wrote; None for an empty segment without one. ``remembered``: the state after this
    segment's last step, returned as it is where the segment still matches it, else kept where its slices do."""
    filled = _filled(oriented)
    same = {} if remembered is None else {i: _same(oriented, i, m) for i, m in remembered.masks.items()}
    if remembered is not None and _matches(filled, same, remembered, written):
        return remembered
    if not filled and remembered is None:
        return None
    state = ObjectState((0, axes.num_slices - 1))
    if remembered is not None:
        state.slice_range = (min([remembered.slice_range[0], *filled]), max([remembered.slice_range[1], *filled]))
        state.offset, state.box, state.rules = remembered.offset, remembered.box, remembered.rules
        state.skip = remembered.skip
    known, filled = remembered.kinds if remembered is not None else {}, set(filled)
    for index in sorted(filled | set(known)):
        mask = oriented[index]
        if index in known and same.get(index):
            state.masks[index], state.kinds[index] = remembered.masks[index], known[index]
        elif index in filled and index in written and written[index] == mrml.mask_crc(mask):
            state.masks[index], state.kinds[index] = mask.copy(), Kind.ENGINE
        elif index in filled:  # made or edited by the user
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


class SegmentCache:
    """The segments last read (KJI bool on a volume's grid, read-only), each with the
    :func:`~.mrml.segment_stamp` it was read at; ``size`` segments at most (each is a volume's worth of bytes)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[tuple, np.ndarray]] = OrderedDict()

    @staticmethod
    def _key(segmentation_node, segment_id: str, volume_node) -> tuple:
        return segmentation_node.GetID(), segment_id, volume_node.GetID()

    def array(self, segmentation_node, segment_id: str, volume_node) -> np.ndarray:
        """The segment as :func:`~.mrml.segment_array` reads it, read again only if it changed since."""
        key = self._key(segmentation_node, segment_id, volume_node)
        stamp = mrml.segment_stamp(segmentation_node, segment_id, volume_node)
        entry = self._entries.get(key)
        if entry is None or entry[0] != stamp:
            array = mrml.segment_array(segmentation_node, segment_id, volume_node)
            array.flags.writeable = False
            entry = (stamp, array)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry[1]

    def current(self, segmentation_node, segment_id: str, volume_node) -> np.ndarray | None:
        """The segment's read if it is still the segment (known without reading it), else None."""
        entry = self._entries.get(self._key(segmentation_node, segment_id, volume_node))
        fresh = entry is not None and entry[0] == mrml.segment_stamp(segmentation_node, segment_id, volume_node)
        return entry[1] if fresh else None

    def patch(self, segmentation_node, segment_id: str, volume_node, before: np.ndarray, written) -> None:
        """After a write (a :class:`~.editing.Written`) into a segment that was ``before`` when it started: keep
        ``before`` with the written block as the segment's read, so the next read costs nothing."""
        key = self._key(segmentation_node, segment_id, volume_node)
        entry = self._entries.get(key)
        if entry is None or entry[1] is not before:
            return
        array = before.copy()
        array[mrml.block_index(written.block)] = written.segment
        array.flags.writeable = False
        self._entries[key] = (mrml.segment_stamp(segmentation_node, segment_id, volume_node), array)


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
    stream: dict[int, np.ndarray] = field(default_factory=dict)  # a propagation's slices so far, for its preview
    slice_range: tuple[int, int] | None = None  # the 3D box's slices, for a preview of one

    @property
    def key(self) -> str:
        """The object's key for the backend (one per segment and view)."""
        return f"{self.segmentation_node.GetID()}/{self.segment_id}/{self.view.value}"

    def add(self, update: Update, state: ObjectState) -> None:
        self.state, self.update = state, update
        self.changed |= set(update.changed)

    def slice_block(self, indices) -> mrml.Block:
        """The block of the volume from the first to the last of the view's slices ``indices``."""
        block = list(mrml.whole_block(self.volume_node))
        block[2 - self.axes.slice_axis] = (min(indices), max(indices) + 1)
        return tuple(block)

    def result_block(self) -> tuple[mrml.Block, np.ndarray]:
        """The block of the changed slices and the segment there (KJI bool) with them as the steps made them."""
        block = self.slice_block(self.changed)
        new = self.before[mrml.block_index(block)].copy()
        oriented, first = self.axes.oriented(new), block[2 - self.axes.slice_axis][0]
        for index, mask in self.changed_masks().items():
            oriented[index - first] = mask
        return block, new

    def changed_masks(self) -> dict[int, np.ndarray]:
        """{slice: mask} of the changed slices in the newest state (what the preview shows)."""
        empty = np.zeros(self.axes.image_shape, bool)
        return {index: self.state.masks.get(index, empty) for index in self.changed}

    def preview_block(self, masks: dict[int, np.ndarray]) -> tuple[mrml.Block, np.ndarray]:
        """The block of the slices of ``masks`` ({slice: mask}) and those masks in it (KJI bool), nothing else."""
        block = self.slice_block(masks)
        out = np.zeros([stop - start for start, stop in block], bool)
        oriented, first = self.axes.oriented(out), block[2 - self.axes.slice_axis][0]
        for index, mask in masks.items():
            oriented[index - first] = mask
        return block, out

    def engine_slices(self) -> dict[int, int]:
        """{slice: crc} of the engine's slices in the newest state (for the propagated-slices tag)."""
        return {i: mrml.mask_crc(m) for i, m in self.state.masks.items()
                if self.state.kinds.get(i) is Kind.ENGINE and m.any()}

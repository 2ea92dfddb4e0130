"""Finished segments stay put: a segment marked finished is never written into by another segment's prompts,
previews, propagation or 3D clicks, whatever the Segment Editor's overwrite setting, and the engine treats its
voxels as "not this object" (:attr:`SegmentWithSAMLib.state.ObjectState.keep_out`: propagation does not grow
into them).

"Finished" is Slicer's own segment status *Completed* (``vtkSlicerSegmentationsModuleLogic::SetSegmentStatus``,
the ``Segmentation.Status`` tag, Slicer v5.10.0 ``Modules/Loadable/Segmentations/Logic``), which the Segment
Editor's segment table shows and sets: marking a segment finished here or there is the same thing, and it is
saved with the scene. Other segments keep the editor's masking and overwrite settings.
"""

from __future__ import annotations

import numpy as np
import slicer

from SegmentWithSAMLib.geometry import SliceAxes
from SegmentWithSAMLib.state import filled_slices

from . import mrml

_LOGIC = slicer.vtkSlicerSegmentationsModuleLogic


def is_finished(segmentation_node, segment_id: str) -> bool:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segmentation_node is not None else None
    return segment is not None and _LOGIC.GetSegmentStatus(segment) == _LOGIC.Completed


def set_finished(segmentation_node, segment_id: str, finished: bool) -> None:
    """Mark the segment finished (Completed) or back in progress."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    _LOGIC.SetSegmentStatus(segment, _LOGIC.Completed if finished else _LOGIC.InProgress)


def finished_ids(segmentation_node, but: str | None = None) -> list[str]:
    """The IDs of the segmentation's finished segments, but ``but``."""
    segmentation = segmentation_node.GetSegmentation()
    return [sid for sid in segmentation.GetSegmentIDs() if sid != but and is_finished(segmentation_node, sid)]


class KeepOut:
    """What a segment must keep out of: the union of the other finished segments of its segmentation, as
    {slice: mask (rows, cols)} of a view's slices that have any (read again only when one of them changed, and
    then the same dict while they do not, so a state that holds it stays the state the backend knows)."""

    def __init__(self) -> None:
        self._memo: tuple | None = None

    def __call__(self, segmentation_node, segment_id: str | None, volume_node, axes: SliceAxes) -> dict:
        if segmentation_node is None:
            return {}
        ids = finished_ids(segmentation_node, segment_id)
        source = (segmentation_node.GetID(), volume_node.GetID(), axes.view, tuple(ids),
                  tuple(mrml.segment_stamp(segmentation_node, sid, volume_node) for sid in ids))
        if self._memo is None or self._memo[0] != source:
            union = np.zeros(volume_node.GetImageData().GetDimensions()[::-1], bool)
            for sid in ids:
                union |= mrml.segment_array(segmentation_node, sid, volume_node)
            self._memo = (source, filled_slices(axes.oriented(union)))
        return self._memo[1]

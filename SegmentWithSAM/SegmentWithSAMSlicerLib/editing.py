"""Undoable segment writes, made the way Slicer's Segment Editor effects make them.

A write turns "the segment should now be this KJI mask within this block of the volume" into at most two
labelmap modifications (add the new voxels, remove the dropped ones) through ``vtkSlicerSegmentEditorLogic``, so
the editor node's masking (editable area, editable intensity range) and overwrite settings apply as for any
effect.

Three things of Slicer's ``ModifySegmentByLabelmap`` (``Modules/Loadable/Segmentations/Logic/
vtkSlicerSegmentEditorLogic.cxx``, the same in 5.10 and 5.12) decide how this is built:

- it combines the editor's mask with the modifier through ``vtkOrientedImageDataResample::ModifyImage``, which
  refuses an image of another geometry and whose result it does not check, and with the editable intensity range
  on it returns without writing when the modifier's geometry is not the aligned source volume's. So the modifier
  is built in the segmentation's own reference geometry, in the segmentation node's coordinates (its parent
  transform undone), never on the volume's grid (:func:`.mrml.modifier_labelmap`);
- those geometry checks compare origin, spacing and axes, not extents, and every mask is combined over the
  modifier's extent: so the modifier covers only the part of the reference geometry the change touches, and
  Slicer's masking is computed there alone;
- masking can leave nothing to write. An undo state saved for a write that changed nothing would be an undo step
  that does nothing, so each write is first tried on a scratch segmentation node outside the scene holding a copy
  of just the one segment's labelmap within the modifier's extent (the same call, with the real editor node, so
  Slicer's own masking code decides from the real segmentation and source volume), and the state is saved and
  the real segment touched only when the copy changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import slicer

from . import mrml

EDITOR_SINGLETON_TAG = "SegmentEditor"  # the tag Slicer's Segment Editor module gives its parameter node


def ensure_editor_node(scene, editor_node=None):
    """``editor_node`` if it is in ``scene``, else the scene's Segment Editor parameter node, created as the
    Segment Editor module creates it when there is none.

    Why: ``File → Close Scene`` (``vtkMRMLScene::Clear(0)``) removes every node without a singleton tag and resets
    the rest, and the Segment Editor module then forgets its node (``SegmentEditor.py``, ``onSceneStartClose``:
    ``self.parameterSetNode = None``) and selects one again only when it is entered (``onSceneEndClose``, ``enter``
    → ``selectParameterNode``: ``GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")``, else a new node
    with that tag). Without an editor node ``vtkSlicerSegmentEditorLogic::SetSegmentationNode`` (which
    ``qMRMLSegmentEditorWidget::setSegmentationNode`` calls) does nothing, so the widget's
    ``saveStateForUndo`` records nothing and its ``undo`` restores nothing. A write therefore always goes through
    a node in the scene; the desktop module should also give this node to the widget
    (``setMRMLSegmentEditorNode``) before it passes the widget's ``saveStateForUndo``. The widget side cannot run
    outside desktop Slicer; the scene side is tested on ``slicer-core``."""
    if editor_node is not None and scene.IsNodePresent(editor_node):
        return editor_node
    node = scene.GetSingletonNode(EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = slicer.vtkMRMLSegmentEditorNode()
        node.SetSingletonTag(EDITOR_SINGLETON_TAG)
        node = scene.AddNode(node)
    return node


class Written(NamedTuple):
    """A write's outcome: how many voxels of the segment changed (on the volume's grid), and the segment
    (KJI bool) within ``block`` after it."""

    count: int
    block: mrml.Block
    segment: np.ndarray


class SegmentEditing:
    """Writes into segments of ``scene`` as single undoable steps (see the module docstring).

    ``write(..., editor_node, save_state)``: ``editor_node`` is the Segment Editor's parameter node whose masking
    and overwrite settings apply (:func:`ensure_editor_node` when it is None or no longer in the scene),
    ``save_state`` saves the undo state (the Segment Editor widget's ``saveStateForUndo``, so Ctrl+Z there undoes
    the write; this object's own history when None, see :meth:`undo`)."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)

    def _point_at(self, editor_node, segmentation_node, segment_id: str, volume_node) -> None:
        self.logic.SetSegmentEditorNode(editor_node)
        self.logic.SetSegmentationNode(segmentation_node)
        self.logic.SetSourceVolumeNode(volume_node)
        self.logic.SetCurrentSegmentID(segment_id)

    def _modify(self, segmentation_node, segment_id: str, modifiers) -> None:
        for modifier, mode in modifiers:
            self.logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, mode, False, False)

    def _changes_anything(self, segmentation_node, segment_id: str, modifiers) -> bool:
        """Whether the modifiers would change the segment: tried on a segmentation node outside the scene (no
        MRML events, no subject hierarchy items) holding a copy of the segment's labelmap within their extent."""
        extents = np.array([modifier.GetExtent() for modifier, _ in modifiers])
        reference = slicer.vtkOrientedImageData()
        extent = np.empty(6, int)
        extent[0::2], extent[1::2] = extents[:, 0::2].min(axis=0), extents[:, 1::2].max(axis=0)
        reference.SetExtent([int(v) for v in extent])
        reference.SetImageToWorldMatrix(mrml.image_to_world(modifiers[0][0]))
        before = self._segment_on(segmentation_node, segment_id, reference)
        trial = slicer.vtkMRMLSegmentationNode()
        segment = slicer.vtkSegment()
        segment.SetLabelValue(1)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName(),
                                  mrml.labelmap_image(before, reference))
        trial.GetSegmentation().AddSegment(segment, segment_id)
        self._modify(trial, segment_id, modifiers)
        return not np.array_equal(self._segment_on(trial, segment_id, reference), before)

    @staticmethod
    def _segment_on(segmentation_node, segment_id: str, reference) -> np.ndarray:
        """The segment (KJI bool) on the voxels of ``reference`` (a geometry in the node's coordinates)."""
        labelmap, label = mrml.segment_labelmap(segmentation_node, segment_id)
        extent = reference.GetExtent()
        shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        if mrml.image_array(labelmap) is None:
            return np.zeros(shape, bool)
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference,
                                                                                        resampled)
        values = mrml.image_array(resampled)
        return np.zeros(shape, bool) if values is None else values.reshape(shape) == label

    def write(self, segmentation_node, segment_id: str, volume_node, new_kji: np.ndarray, editor_node=None,
              save_state: Callable[[], None] | None = None, block: mrml.Block | None = None) -> Written:
        """Make the segment ``new_kji`` (KJI bool) within ``block`` of the volume's grid (the whole volume when
        None) as one undoable step, only adding the new voxels and removing the dropped ones, as far as the
        editor's masking lets it; the segment outside the block is not read or touched. Saves an undo state
        only when the segment changes."""
        block = mrml.whole_block(volume_node) if block is None else block
        new_kji = np.asarray(new_kji, dtype=bool)
        if new_kji.shape != tuple(stop - start for start, stop in block):
            raise ValueError(f"The mask's shape {new_kji.shape} is not the block's {block}.")
        old = mrml.segment_array(segmentation_node, segment_id, volume_node, block)
        add, remove = new_kji & ~old, old & ~new_kji
        changed = mrml.mask_block(add | remove, within=block)
        if changed is None:
            return Written(0, block, old)
        inner = mrml.block_index(changed, within=block)
        editor_node = ensure_editor_node(self.scene, editor_node)
        self._point_at(editor_node, segmentation_node, segment_id, volume_node)
        modifiers = [(modifier, mode) for change, mode in ((add, self.logic.ModificationModeAdd),
                                                           (remove, self.logic.ModificationModeRemove))
                     if change[inner].any()
                     for modifier in [mrml.modifier_labelmap(segmentation_node, volume_node, change[inner], changed)]
                     if modifier is not None]
        if not modifiers or not self._changes_anything(segmentation_node, segment_id, modifiers):
            return Written(0, block, old)
        if save_state is not None:
            save_state()
        else:
            self.logic.SaveStateForUndo()
        self._modify(segmentation_node, segment_id, modifiers)
        after = old.copy()
        after[inner] = mrml.segment_array(segmentation_node, segment_id, volume_node, changed)
        return Written(int(np.count_nonzero(after[inner] != old[inner])), block, after)

    def undo(self) -> None:
        """Undo the last write saved in this object's own history."""
        self.logic.Undo()

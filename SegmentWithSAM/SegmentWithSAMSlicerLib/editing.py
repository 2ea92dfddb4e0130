"""Undoable segment writes, made the way Slicer's Segment Editor effects make them.

A write turns "the segment should now be this KJI mask on the volume's grid" into at most two labelmap
modifications (add the new voxels, remove the dropped ones) through ``vtkSlicerSegmentEditorLogic``, so the
editor node's masking (editable area, editable intensity range) and overwrite settings apply as for any effect.

Two things of Slicer's ``ModifySegmentByLabelmap`` (``Modules/Loadable/Segmentations/Logic/
vtkSlicerSegmentEditorLogic.cxx``, the same in 5.10 and 5.12) decide how this is built:

- it combines the editor's mask with the modifier through ``vtkOrientedImageDataResample::ModifyImage``, which
  refuses an image of another geometry and whose result it does not check, and with the editable intensity range
  on it returns without writing when the modifier's geometry is not the aligned source volume's. So the modifier
  is built in the segmentation's own reference geometry (what ``ResetModifierLabelmapToDefault`` gives the
  effects), in the segmentation node's coordinates (its parent transform undone), never on the volume's grid;
- masking can leave nothing to write. An undo state saved for a write that changed nothing would be an undo step
  that does nothing, so each write is first tried on a scratch copy of the segmentation with a copy of the editor
  node (Slicer's own masking code decides), and the state is saved and the real segment touched only when the
  copy changed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import slicer

from . import mrml


class SegmentEditing:
    """Writes into segments of ``scene`` as single undoable steps (see the module docstring).

    ``write(..., editor_node, save_state)``: ``editor_node`` is the Segment Editor's parameter node whose masking
    and overwrite settings apply (a private one with Slicer's defaults when None), ``save_state`` saves the undo
    state (the Segment Editor widget's ``saveStateForUndo``, so Ctrl+Z there undoes the write; this object's own
    history when None, see :meth:`undo`)."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self._trial = slicer.vtkSlicerSegmentEditorLogic()
        self._trial.SetMRMLScene(scene)
        self._editor_node = None

    def _default_editor_node(self):
        if self._editor_node is None or self._editor_node.GetScene() is None:
            self._editor_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
            self._editor_node.SetSaveWithScene(False)
        return self._editor_node

    @staticmethod
    def _modify(logic, editor_node, segmentation_node, segment_id: str, volume_node, changes) -> None:
        logic.SetSegmentEditorNode(editor_node)
        logic.SetSegmentationNode(segmentation_node)
        logic.SetSourceVolumeNode(volume_node)
        logic.SetCurrentSegmentID(segment_id)
        for change, mode in changes:
            modifier = mrml.modifier_labelmap(logic, segmentation_node, volume_node, change)
            logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, mode, False, False)

    def _changes_anything(self, editor_node, segmentation_node, segment_id: str, volume_node, changes,
                          old: np.ndarray) -> bool:
        """Whether the write would change the segment: tried on scratch copies of the segmentation and the
        editor node, removed again (nothing of the scene's content changes)."""
        copy = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        editor_copy = self.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        try:
            copy.Copy(segmentation_node)  # a deep copy, parent transform included
            copy.SetHideFromEditors(True)
            editor_copy.Copy(editor_node)
            editor_copy.SetAndObserveSegmentationNode(copy)
            self._modify(self._trial, editor_copy, copy, segment_id, volume_node, changes)
            return not np.array_equal(mrml.segment_array(copy, segment_id, volume_node), old)
        finally:
            self._trial.SetSegmentEditorNode(None)
            self.scene.RemoveNode(editor_copy)
            self.scene.RemoveNode(copy)

    def write(self, segmentation_node, segment_id: str, volume_node, new_kji: np.ndarray, editor_node=None,
              save_state: Callable[[], None] | None = None) -> int:
        """Make the segment ``new_kji`` (KJI bool on the volume's grid) as one undoable step, only adding the
        new voxels and removing the dropped ones, as far as the editor's masking lets it. Saves an undo state only
        when the segment changes. Returns how many voxels of the segment (on the volume's grid) changed."""
        old = mrml.segment_array(segmentation_node, segment_id, volume_node)
        new_kji = np.asarray(new_kji, dtype=bool)
        changes = [(change, mode) for change, mode in ((new_kji & ~old, self.logic.ModificationModeAdd),
                                                       (old & ~new_kji, self.logic.ModificationModeRemove))
                   if change.any()]
        if not changes:
            return 0
        editor_node = editor_node if editor_node is not None else self._default_editor_node()
        if not self._changes_anything(editor_node, segmentation_node, segment_id, volume_node, changes, old):
            return 0
        self.logic.SetSegmentEditorNode(editor_node)
        self.logic.SetSegmentationNode(segmentation_node)
        self.logic.SetSourceVolumeNode(volume_node)
        if save_state is not None:
            save_state()
        else:
            self.logic.SaveStateForUndo()
        self._modify(self.logic, editor_node, segmentation_node, segment_id, volume_node, changes)
        return int(np.count_nonzero(mrml.segment_array(segmentation_node, segment_id, volume_node) != old))

    def undo(self) -> None:
        """Undo the last write saved in this object's own history."""
        self.logic.Undo()

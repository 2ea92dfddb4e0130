"""Where trame-slicer's Slicer core differs from the desktop application, behind one seam.

The Slicer-side rules (:mod:`SegmentWithSAMSlicerLib`) were written for desktop Slicer; three things differ here:

- ``slicer.util``: the desktop application gives it ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()``;
  trame-slicer keeps the scene and the logics on its ``SlicerApp``. :func:`bind_slicer_util` points
  ``slicer.util`` at them (one scene per process, as in the desktop application).
- undo: desktop code passes the Segment Editor widget's ``saveStateForUndo`` ("save, then write"); trame-slicer
  keeps an ``UndoStack`` of commands that each restore a before/after pair. :class:`UndoSeam` takes the
  before snapshot when the controller saves state and pushes one command with the after snapshot on
  :meth:`UndoSeam.commit` (called after every controller call that may write), so each accept, propagation or
  import is one step on the stack that also holds trame-slicer's segment add/rename/colour/delete.
- place mode: desktop uses ``qSlicerMarkupsPlaceWidget``; here the markups logic and the interaction node
  (:class:`PlaceMode`).
"""

from __future__ import annotations

import types

import slicer
from trame_slicer.segmentation.segmentation_state_stack import SegmentationStateStack
from trame_slicer.segmentation.segmentation_undo_command import SegmentationLabelMapUndoCommand


def bind_slicer_util(slicer_app) -> None:
    """Make ``slicer.util`` work on ``slicer_app``'s scene, as the desktop application's globals do."""
    slicer.mrmlScene = slicer_app.scene
    slicer.modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: slicer_app.volumes_logic),
        segmentations=types.SimpleNamespace(logic=lambda: slicer_app.segmentations_logic),
        colors=types.SimpleNamespace(logic=lambda: slicer_app.color_logic))


class UndoSeam:
    """The controller's ``save_state`` hook on trame-slicer's undo stack (see the module docstring)."""

    def __init__(self, segmentation_editor, undo_stack) -> None:
        self.editor = segmentation_editor
        self.stack = undo_stack
        self._pending: tuple[object, SegmentationStateStack] | None = None

    def save_state(self) -> None:
        """Snapshot the active segmentation before a write (the controller calls this only when it writes)."""
        segmentation = self.editor.active_segmentation
        if segmentation is None:
            raise RuntimeError("No active segmentation to save an undo state for.")
        states = SegmentationStateStack(segmentation.segmentation, max_size=2)
        states.save_state()
        self._pending = (segmentation, states)

    def commit(self) -> bool:
        """Push the write since :meth:`save_state` as one undo step; False if nothing was written."""
        if self._pending is None:
            return False
        segmentation, states = self._pending
        self._pending = None
        states.save_state()
        self.stack.push(SegmentationLabelMapUndoCommand(states, segmentation))
        return True


class PlaceMode:
    """Markups place mode on trame-slicer: a click (or two for a box) in any view places into ``node``."""

    def __init__(self, markups_logic) -> None:
        self.logic = markups_logic

    def start(self, node, persistent: bool) -> None:
        self.logic.place_node(node, persistent)

    def stop(self) -> None:
        self.logic.disable_place_mode()

    @property
    def active(self) -> bool:
        """Whether the views are still in place mode (Slicer leaves it by itself once a box is placed)."""
        node = self.logic.interaction_node
        return node is not None and node.GetCurrentInteractionMode() == node.Place

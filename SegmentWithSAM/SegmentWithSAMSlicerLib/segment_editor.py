"""Pointing desktop Slicer's Segment Editor at our segmentation before a write, so that its masking applies and
Ctrl+Z there undoes the write, without disturbing what the user has open in it.

Only desktop Slicer has the Segment Editor module widget, so what this relies on is read in Slicer's source
(v5.10 and main, the same):

- ``Modules/Scripted/SegmentEditor/SegmentEditor.py``: ``onSceneStartClose`` sets the module's
  ``parameterSetNode`` to None, and only ``enter``/``onSceneEndClose`` while the module is shown call
  ``selectParameterNode`` again. After File → Close Scene the editor widget therefore has no segment editor node
  until the user opens the Segment Editor, and ``qMRMLSegmentEditorWidget`` ignores interactions and effects
  without one. :func:`point_segment_editor` calls ``selectParameterNode`` (it gets or makes the scene's singleton
  "SegmentEditor" node) before every write.
- ``Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx``, ``setSegmentationNode``: returns at
  once for the node it already has, and otherwise deactivates the active effect
  (``setActiveEffect(nullptr)``). So the nodes are switched only when they differ, and the effect the user had
  active is activated again on the new segmentation.
"""

from __future__ import annotations


def point_segment_editor(module_widget, segmentation_node, volume_node):
    """The Segment Editor module's editor widget (``module_widget.editor``), with a segment editor node and
    pointed at ``segmentation_node`` and ``volume_node``; its active effect stays active."""
    module_widget.selectParameterNode()
    editor = module_widget.editor
    if editor.segmentationNode() is segmentation_node and editor.sourceVolumeNode() is volume_node:
        return editor
    effect = editor.activeEffect()
    name = effect.name if effect is not None else ""
    editor.setSegmentationNode(segmentation_node)
    editor.setSourceVolumeNode(volume_node)
    if name:
        editor.setActiveEffectByName(name)
    return editor

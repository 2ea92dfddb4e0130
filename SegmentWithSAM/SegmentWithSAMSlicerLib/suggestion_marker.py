"""Where to click next, shown in the views: one locked markups point, "+" (the object is probably missing there:
a positive click) or "−" (probably leaking there: a negative one), in a colour no prompt uses. It is not saved
with the scene and is not one of the prompt nodes: placing it starts nothing. The user clicks there, or anywhere
else (:meth:`.front_end.FrontEnd.take_suggestion` places the prompt point on it).
"""

from __future__ import annotations

from .mrml import add_markups_node

MARKER_NAME = "SAM suggestion"
MARKER_COLOR = (0.2, 0.6, 1.0)
LABELS = {"add": "+", "remove": "\u2212"}


def show(scene, point_ras, hint: str):
    """The marker at ``point_ras`` (3,) with the label of ``hint`` ("add" or "remove"), made if needed."""
    node = scene.GetFirstNodeByName(MARKER_NAME)
    if node is None:
        node = add_markups_node(scene, "vtkMRMLMarkupsFiducialNode", MARKER_NAME)
        node.SetSaveWithScene(False)
        node.SetHideFromEditors(True)
        node.SetLocked(True)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*MARKER_COLOR)
        display.SetColor(*MARKER_COLOR)
    node.RemoveAllControlPoints()
    node.AddControlPoint(*(float(v) for v in point_ras), LABELS[hint])
    return node


def clear(scene) -> None:
    """No marker."""
    node = scene.GetFirstNodeByName(MARKER_NAME)
    if node is not None:
        scene.RemoveNode(node)

"""Live preview from markups prompts: react when the placed prompts change, and only then.

Markups events alone are a poor signal of that (read in Slicer's source, 5.10 and 5.12): in place mode the
markups widget moves a preview control point with the mouse, firing ``PointModifiedEvent`` on every move
(``vtkSlicerMarkupsWidget::UpdatePreviewPoint`` → ``vtkMRMLMarkupsDisplayNode::UpdateActiveControlPointWorld``
→ ``SetNthControlPointPositionOrientationWorld`` with ``PositionPreview``), and ``ForcePlaceMultipleMarkups``
keeps place mode on between clicks; a click fires ``PointModifiedEvent`` and ``PointPositionDefinedEvent``; the
click-order description the module writes fires ``PointModifiedEvent`` again; removing the prompts node by
node fires ``PointRemovedEvent`` with the others still there. So :class:`PromptWatcher` treats every event as a
hint and compares the placed prompts (defined control points, a placed ROI) with those it last reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import vtk

from . import mrml

EVENTS = ("PointAddedEvent", "PointModifiedEvent", "PointPositionDefinedEvent", "PointPositionUndefinedEvent",
          "PointRemovedEvent")
DECIMALS = 3  # positions compared to a micrometre


def prompt_signature(nodes: Sequence) -> tuple:
    """What the preview depends on: each node's placed control points (index, RAS) and a placed ROI's corners;
    preview (moving) and undefined points do not count, nor labels or descriptions."""
    signature = []
    for node in nodes:
        if node is None:
            signature.append(None)
        elif node.IsA("vtkMRMLMarkupsROINode"):
            placed = mrml.roi_corners(node)
            signature.append(None if placed is None else tuple(np.round(placed[0], DECIMALS).ravel()))
        else:
            signature.append(tuple((i, *np.round(p, DECIMALS)) for i, p in mrml.defined_points(node)))
    return tuple(signature)


class PromptWatcher:
    """Observes prompt markups nodes and calls ``on_change()`` once per real change of :func:`prompt_signature`.

    :meth:`paused` holds reactions back while the caller changes prompts itself (e.g. clears them all) and
    takes the state after it as the new baseline, without calling ``on_change``."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self._nodes: list = []
        self._tags: list[tuple[object, int]] = []
        self._last: tuple = ()
        self._paused = 0

    def watch(self, nodes: Sequence) -> None:
        """Observe ``nodes`` (fiducial or ROI markups nodes, None allowed) instead of those before."""
        self.close()
        self._nodes = list(nodes)
        for node in self._nodes:
            if node is None:
                continue
            events = [getattr(node, name) for name in EVENTS]
            if node.IsA("vtkMRMLMarkupsROINode"):
                events.append(vtk.vtkCommand.ModifiedEvent)  # size and orientation changes
            self._tags += [(node, node.AddObserver(event, self._on_event)) for event in events]
        self._last = prompt_signature(self._nodes)

    def close(self) -> None:
        for node, tag in self._tags:
            node.RemoveObserver(tag)
        self._tags, self._nodes = [], []

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if not self._paused:
                self._last = prompt_signature(self._nodes)

    def _on_event(self, caller=None, event=None) -> None:
        if self._paused:
            return
        signature = prompt_signature(self._nodes)
        if signature != self._last:
            self._last = signature
            self.on_change()

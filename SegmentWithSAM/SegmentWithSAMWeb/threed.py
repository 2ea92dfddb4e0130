"""The 3D view besides the segments' surfaces: Slicer's three slice planes in it, and its camera centred on the
active segment after each write (what Slicer's "Center 3D view" does, at a distance that keeps the
surroundings in sight). Runs on the app's loop, like everything that touches MRML.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from SegmentWithSAMSlicerLib import mrml

VIEW_FROM = (1.0, 2.0, 1.2)  # RAS: from the front, a little right and above, where all three slice planes show
SEGMENT_FILL = 0.5  # the segment's bounding sphere spans this fraction of the 3D view's narrower side
MIN_RADIUS = 0.15  # of the volume's half diagonal: a segment one slice thin is still seen within its surroundings


def show_volume_in_3d(view_manager, volume_node) -> None:
    """Show the axial, coronal and sagittal slices as planes in the 3D views (Slicer's "Show in 3D"), each view
    looking at them from ``VIEW_FROM``, superior up, with the whole volume in sight."""
    for view in view_manager.get_slice_views():
        view.set_visible_in_3d(True)
    bounds = [0.0] * 6
    volume_node.GetRASBounds(bounds)
    centre = (np.asarray(bounds[::2]) + np.asarray(bounds[1::2])) / 2
    for view in view_manager.get_threed_views():
        camera = view.renderer().GetActiveCamera()
        camera.SetFocalPoint(*centre)
        camera.SetPosition(*(centre + np.asarray(VIEW_FROM)))
        camera.SetViewUp(0.0, 0.0, 1.0)
        camera.OrthogonalizeViewUp()
        view.renderer().ResetCamera(bounds)  # keeps the direction, steps back until the volume fits
        view.schedule_render()


def segment_bounds_ras(segmentation_node, segment_id: str, volume_node) -> np.ndarray | None:
    """The RAS box (2, 3: minimum and maximum corner, mm) around the segment's voxels, or None if it is empty."""
    mask = mrml.segment_array(segmentation_node, segment_id, volume_node)  # KJI
    if not mask.any():
        return None
    ranges = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in (2, 1, 0)]
    ijk = np.array([(r[0] - 0.5, r[-1] + 0.5) for r in ranges])  # I, J, K: the voxels' outer faces
    corners = mrml.volume_from_node(volume_node).to_ras(np.array(list(itertools.product(*ijk))))
    return np.array([corners.min(axis=0), corners.max(axis=0)])


def center_on_segment(view_manager, segmentation_node, segment_id: str, volume_node) -> None:
    """Aim every 3D view's camera at the segment's centre, from the direction it looks now, at the distance where
    the segment's bounding sphere spans ``SEGMENT_FILL`` of the view; nothing changes for an empty segment."""
    if segmentation_node is None or volume_node is None or not segment_id:
        return
    bounds = segment_bounds_ras(segmentation_node, segment_id, volume_node)
    if bounds is None:
        return
    volume_bounds = [0.0] * 6
    volume_node.GetRASBounds(volume_bounds)
    volume_radius = np.linalg.norm(np.subtract(volume_bounds[1::2], volume_bounds[::2])) / 2
    radius = max(float(np.linalg.norm(bounds[1] - bounds[0])) / 2, MIN_RADIUS * volume_radius)
    centre = bounds.mean(axis=0)
    for view in view_manager.get_threed_views():
        camera = view.renderer().GetActiveCamera()
        width, height = view.render_window().GetSize()
        half_span = radius / (SEGMENT_FILL * min(1.0, width / height if height else 1.0))  # half the view's height
        direction = np.asarray(camera.GetDirectionOfProjection())
        if camera.GetParallelProjection():
            camera.SetParallelScale(half_span)
            distance = camera.GetDistance()
        else:
            distance = half_span / math.tan(math.radians(camera.GetViewAngle()) / 2)
        camera.SetFocalPoint(*centre)
        camera.SetPosition(*(centre - distance * direction))
        view.renderer().ResetCameraClippingRange()
        view.schedule_render()

"""MRML nodes ⇄ the core's arrays: volumes, markups prompts, slice views and segment labelmaps.

Only ``slicer`` (MRML, the segmentation logics, ``slicer.util``) and ``vtk`` are used here, never Qt, so all of
it runs against the ``slicer-core`` package in tests. Geometry is decided by the core
(:mod:`SegmentWithSAMLib.geometry`); this module only reads matrices and positions from nodes.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import slicer
import vtk

from SegmentWithSAMLib.errors import PromptError, VolumeError
from SegmentWithSAMLib.geometry import View, Volume, box_on_slice, slice_axes, view_for_normal

ORDER_PREFIX = "SegmentWithSAM click "  # a control point's description: its place in the click order
PROPAGATED_TAG = "SegmentWithSAM.propagated."  # + view: JSON {slice: crc32 of the mask it was given}


def world_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's IJK→RAS (4, 4) in world coordinates, parent transforms included (linear only)."""
    transform = volume_node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise VolumeError(f"{volume_node.GetName()} is under a non-linear transform: harden it first.")
    matrix = vtk.vtkMatrix4x4()
    slicer.vtkSlicerSegmentEditorLogic.ImageToWorldMatrix(volume_node, matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volume_from_node(volume_node) -> Volume:
    """The core :class:`Volume` of a scalar volume node (its voxels are shared, not copied)."""
    if volume_node is None:
        raise PromptError("Select an input volume first.")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.GetImageData() is None:
        raise VolumeError(f"{volume_node.GetName()} is not a scalar volume with voxels; choose a CT or MRI volume.")
    return Volume(slicer.util.arrayFromVolume(volume_node), world_ijk_to_ras(volume_node))


def display_window(volume_node) -> tuple[float, float] | None:
    """The (width, level) the volume is displayed with, or None if it has no scalar display node."""
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    if display is None or not display.IsA("vtkMRMLScalarVolumeDisplayNode") or not display.GetWindow() > 0:
        return None
    return float(display.GetWindow()), float(display.GetLevel())


def defined_points(markups_node) -> list[tuple[int, np.ndarray]]:
    """(index, world RAS (3,)) of each placed control point of a markups node (none if the node is None)."""
    if markups_node is None:
        return []
    points = []
    for i in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(i) == markups_node.PositionDefined:
            position = [0.0, 0.0, 0.0]
            markups_node.GetNthControlPointPositionWorld(i, position)
            points.append((i, np.array(position)))
    return points


def click_number(markups_node, index: int) -> int | None:
    """The place of control point ``index`` in the click order (see :func:`stamp_click_order`), or None."""
    text = markups_node.GetNthControlPointDescription(index) or ""
    number = text[len(ORDER_PREFIX):]
    return int(number) if text.startswith(ORDER_PREFIX) and number.isdigit() else None


def stamp_click_order(positive_node, negative_node) -> None:
    """Number the placed points that have no number yet, after those that have one, so that clicks keep the
    order they were placed in across the positive and negative lists (call it whenever points change)."""
    nodes = [n for n in (positive_node, negative_node) if n is not None]
    numbers = [click_number(n, i) for n in nodes for i, _ in defined_points(n)]
    following = max([n for n in numbers if n is not None], default=0) + 1
    for node in nodes:
        for i, _ in defined_points(node):
            if click_number(node, i) is None:
                node.SetNthControlPointDescription(i, f"{ORDER_PREFIX}{following}")
                following += 1


def new_clicks(positive_node, negative_node, sent: set) -> list[tuple[np.ndarray, bool]]:
    """The placed points not in ``sent`` ((node ID, control point ID) pairs), as (RAS (3,), positive) in click
    order; their IDs are added to ``sent``. Both front ends send points placed on a segment with a mask as clicks
    in 3D this way, each once."""
    stamp_click_order(positive_node, negative_node)
    # a control point's ID is unique within its node only: the node's ID makes it unique across both lists
    placed = sorted((click_number(node, i), (node.GetID(), node.GetNthControlPointID(i)), position,
                     node is positive_node)
                    for node in (positive_node, negative_node) if node is not None
                    for i, position in defined_points(node))
    fresh = [(position, positive) for _, point_id, position, positive in placed if point_id not in sent]
    sent.update(point_id for _, point_id, _, _ in placed)
    return fresh


def segment_has_mask(segmentation_node, segment_id: str, volume_node) -> bool:
    """Whether the segment exists and has voxels (then points placed on it correct it in 3D)."""
    if segmentation_node is None or not segment_id or volume_node is None \
            or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        return False
    return bool(segment_array(segmentation_node, segment_id, volume_node).any())


def ordered_clicks(positive_node, negative_node) -> tuple[np.ndarray, np.ndarray]:
    """All placed points (N, 3) RAS and labels (N,) (1 positive, 0 negative) in click order."""
    stamp_click_order(positive_node, negative_node)
    clicks = [(click_number(node, i), p, label) for node, label in ((positive_node, 1), (negative_node, 0))
              for i, p in defined_points(node)]
    clicks.sort(key=lambda c: c[0])
    points = np.array([c[1] for c in clicks], dtype=float).reshape(-1, 3)
    return points, np.array([c[2] for c in clicks], dtype=int)


def roi_corners(roi_node) -> tuple[np.ndarray, np.ndarray] | None:
    """The 8 corners (8, 3) and the centre (3,) of a placed ROI in world RAS, or None."""
    if roi_node is None or roi_node.GetNumberOfControlPoints() == 0 or not roi_node.GetControlPointPlacementComplete():
        return None
    to_world = slicer.util.arrayFromVTKMatrix(roi_node.GetObjectToWorldMatrix())
    half = np.asarray(roi_node.GetSize()) / 2.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    corners = (signs * half) @ to_world[:3, :3].T + to_world[:3, 3]  # the ROI's frame is centred on it
    return corners, corners.mean(axis=0)


def roi_box(roi_node, volume: Volume, view: View) -> np.ndarray | None:
    """The ROI as a box prompt: two opposite corners (2, 3) RAS on the slice through its centre, or None."""
    placed = roi_corners(roi_node)
    return None if placed is None else box_on_slice(volume, view, *placed)


def roi_slice_range(roi_node, volume: Volume, view: View) -> tuple[int, int] | None:
    """The slices of ``view`` a placed ROI spans (first, last), clipped to the volume, or None when it is
    thinner than two slices (a box drawn on one slice) or not placed."""
    placed = roi_corners(roi_node)
    if placed is None:
        return None
    axes = slice_axes(volume, view)
    coords, _ = axes.ijk_to_pixel(volume.to_ijk(placed[0]))
    low, high = int(np.ceil(coords.min() - 0.5)), int(np.floor(coords.max() + 0.5))
    low, high = max(low, 0), min(high, axes.num_slices - 1)
    return (low, high) if high > low else None


def slice_node_view(slice_node, volume: Volume) -> View:
    """Which of the volume's views a slice view shows; a clear error if the view is oblique to the volume."""
    slice_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    try:
        return view_for_normal(volume, slice_to_ras[:3, 2])
    except PromptError as error:
        raise PromptError(f"{slice_node.GetName()} view: {error}") from None


def view_of_prompts(points_ras: np.ndarray, slice_nodes, volume: Volume, prefer=None):
    """The slice node whose plane holds all prompt points (``prefer``, e.g. the view last clicked in, wins a
    tie) and the volume view it shows. Points at a view's plane within half a voxel count as on it."""
    points_ras = np.atleast_2d(np.asarray(points_ras, dtype=float))
    tolerance = 0.5 * float(volume.spacing.max())
    holding = []
    for node in slice_nodes:
        slice_to_ras = slicer.util.arrayFromVTKMatrix(node.GetSliceToRAS())
        normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
        if np.all(np.abs((points_ras - slice_to_ras[:3, 3]) @ normal) <= tolerance):
            holding.append(node)
    if not holding:
        raise PromptError("The prompts do not lie on the plane of any slice view: place them all on one slice.")
    node = prefer if prefer in holding else holding[0]
    return node, slice_node_view(node, volume)


def segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a boolean KJI array on the volume's grid (all False for an empty segment)."""
    if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise PromptError(f"The segment {segment_id!r} is not in {segmentation_node.GetName()}.")
    return np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)) > 0


def oriented_image(mask_kji: np.ndarray, ijk_to_ras: np.ndarray):
    """A ``vtkOrientedImageData`` (uint8 0/1) of a KJI mask with the given IJK→RAS geometry."""
    from vtk.util import numpy_support

    mask = np.ascontiguousarray(mask_kji, dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.ravel()
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    return image


def world_to_segmentation(segmentation_node) -> np.ndarray:
    """World RAS → the segmentation node's own coordinates (4, 4): its parent transform undone (linear only)."""
    transform = segmentation_node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise VolumeError(f"{segmentation_node.GetName()} is under a non-linear transform: harden it first.")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformFromWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def modifier_labelmap(editor_logic, segmentation_node, volume_node, mask_kji: np.ndarray):
    """``mask_kji`` (KJI bool on the volume's grid) as a modifier labelmap for ``editor_logic`` (pointed at
    ``segmentation_node``): resampled (nearest neighbour) into the segmentation's reference geometry, in the
    segmentation node's coordinates, as Segment Editor effects build theirs (``ResetModifierLabelmapToDefault``).
    Voxels outside that geometry cannot be written, as with any effect."""
    editor_logic.ResetModifierLabelmapToDefault()
    reference = editor_logic.GetModifierLabelmap()
    source = oriented_image(mask_kji, world_to_segmentation(segmentation_node) @ world_ijk_to_ras(volume_node))
    modifier = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(source, reference, modifier)
    return modifier


def mask_crc(mask2d: np.ndarray) -> int:
    return zlib.crc32(np.packbits(np.asarray(mask2d, dtype=bool)).tobytes())


def propagated_slices(segmentation_node, segment_id: str, view: View) -> dict[int, int]:
    """{slice: crc} of the slices a propagation wrote into the segment (kept in a segment tag)."""
    text = vtk.reference("")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None or not segment.GetTag(PROPAGATED_TAG + view.value, text):
        return {}
    try:
        return {int(k): int(v) for k, v in json.loads(str(text)).items()}
    except (ValueError, AttributeError):
        return {}


def set_propagated_slices(segmentation_node, segment_id: str, view: View, slices: dict[int, int]) -> None:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    segment.SetTag(PROPAGATED_TAG + view.value, json.dumps({str(k): v for k, v in sorted(slices.items())}))

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

Block = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (start, stop) along K, J, I; stop excluded
_NOTHING, _NOWHERE = np.zeros((0, 0, 0), np.uint8), (slice(0, 0),) * 3  # an empty labelmap's values, and where
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
    """Whether the segment exists and has voxels on the volume's grid (then points placed on it correct it in 3D).
    Stops at the first slab of voxels found, so a segment with voxels costs far less than reading it whole."""
    if segmentation_node is None or not segment_id or volume_node is None \
            or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        return False
    whole = whole_block(volume_node)
    aligned = _aligned_labelmap(segmentation_node, segment_id, volume_node, whole)
    if aligned is None:
        return bool(segment_array(segmentation_node, segment_id, volume_node).any())
    values, label, _ = aligned
    return any(bool((values[k: k + 8] == label).any()) for k in range(0, values.shape[0], 8))


def ordered_clicks(positive_node, negative_node) -> tuple[np.ndarray, np.ndarray]:
    """All placed points (N, 3) RAS and labels (N,) (1 positive, 0 negative) in click order."""
    stamp_click_order(positive_node, negative_node)
    clicks = [(click_number(node, i), p, label) for node, label in ((positive_node, 1), (negative_node, 0))
              for i, p in defined_points(node)]
    clicks.sort(key=lambda c: c[0])
    points = np.array([c[1] for c in clicks], dtype=float).reshape(-1, 3)
    return points, np.array([c[2] for c in clicks], dtype=int)


def add_markups_node(scene, class_name: str, name: str):
    """A new markups node of ``class_name`` in ``scene`` that leaves the node being placed as it was. The markups
    logic makes each markups node added to the scene the one placed into (vtkSlicerMarkupsLogic::
    OnMRMLSceneNodeAdded calls SetActiveList, Slicer v5.10.0), so a suggestion marker made while the user placed
    points would have taken their next click."""
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    before = None if selection is None else (selection.GetActivePlaceNodeClassName(),
                                             selection.GetActivePlaceNodeID())
    node = scene.AddNewNodeByClass(class_name, name)
    if before is not None and before[1] and (selection.GetActivePlaceNodeClassName(),
                                             selection.GetActivePlaceNodeID()) != before:
        selection.SetReferenceActivePlaceNodeClassName(before[0])
        selection.SetReferenceActivePlaceNodeID(before[1])
    return node


def empty_prompt(markups_node) -> None:
    """Remove the prompt's control points so that it can be placed anew. A box (an ROI) once placed keeps
    requiring one control point (vtkMRMLMarkupsROINode::UpdateControlPointsFromBoxROI sets the required and
    maximum number to 1, and UpdateBoxROIFromControlPoints returns early without points, Slicer v5.10.0): its next
    placement would end at its first click with an empty box. Setting the ROI type again restores two clicks."""
    markups_node.RemoveAllControlPoints()
    if markups_node.IsA("vtkMRMLMarkupsROINode"):
        markups_node.SetROIType(markups_node.ROITypeBoundingBox)
        markups_node.SetROIType(markups_node.ROITypeBox)


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


def whole_block(volume_node) -> Block:
    """The block of all of a volume's voxels."""
    return tuple((0, n) for n in volume_node.GetImageData().GetDimensions()[::-1])


def block_index(block: Block, within: Block | None = None) -> tuple[slice, slice, slice]:
    """NumPy index of a block in a KJI array of the volume, or of the part of it in block ``within``."""
    starts = [0, 0, 0] if within is None else [start for start, _ in within]
    return tuple(slice(start - first, stop - first) for (start, stop), first in zip(block, starts, strict=True))


def mask_block(mask: np.ndarray, within: Block | None = None) -> Block | None:
    """The smallest block holding the True voxels of ``mask`` (KJI bool), or None if there are none; ``mask`` may
    be the part of a volume in block ``within`` (the result is then in the volume's indices)."""
    starts = [0, 0, 0] if within is None else [start for start, _ in within]
    slices = np.flatnonzero(mask.any(axis=(1, 2)))  # in memory order, then only the slices with voxels
    if not len(slices):
        return None
    plane = mask[slices[0]: slices[-1] + 1].any(axis=0)  # (J, I)
    hits = (slices, np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0)))
    return tuple((start + int(hit[0]), start + int(hit[-1]) + 1) for start, hit in zip(starts, hits, strict=True))


def _shifted(matrix: np.ndarray, block: Block) -> np.ndarray:
    """An IJK→RAS (4, 4) moved to start at the block's first voxel."""
    shift = np.eye(4)
    shift[:3, 3] = [start for start, _ in block][::-1]
    return matrix @ shift


def _grid_in_segmentation(segmentation_node, volume_node) -> np.ndarray:
    """The volume's IJK → the segmentation node's own coordinates (4, 4), where its labelmaps live."""
    return world_to_segmentation(segmentation_node) @ world_ijk_to_ras(volume_node)


def segment_labelmap(segmentation_node, segment_id: str):
    """The segment's binary labelmap (the layer it may share with others; None if it has none) and its label."""
    segmentation = segmentation_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(name):
        segmentation.CreateRepresentation(name)  # as Slicer's export does for a segmentation of surfaces
    segment = segmentation.GetSegment(segment_id)
    return segment.GetRepresentation(name), segment.GetLabelValue()


def image_array(image) -> np.ndarray | None:
    """The scalars of a one-component image as a KJI view (None if it has none)."""
    from vtk.util import numpy_support

    extent = image.GetExtent() if image is not None else (0, -1, 0, -1, 0, -1)
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None or extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return None
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    return numpy_support.vtk_to_numpy(scalars).reshape(shape)


def _whole_voxel_shift(grid_to_grid: np.ndarray) -> np.ndarray | None:
    """The (I, J, K) whole-voxel translation that an IJK → IJK matrix (4, 4) is, or None if it is not one."""
    shift = np.round(grid_to_grid[:3, 3])
    if np.allclose(grid_to_grid[:3, :3], np.eye(3), atol=1e-6) and np.allclose(grid_to_grid[:3, 3], shift, atol=1e-4):
        return shift.astype(int)
    return None


def _aligned_labelmap(segmentation_node, segment_id: str, volume_node, block: Block):
    """(layer values (K, J, I) over ``block`` ∩ the layer, the segment's label, where in the block they go) when
    the segment's labelmap lies on the volume's grid up to a whole-voxel shift (the usual case: a segmentation
    made on this volume), so that it is read without resampling; None otherwise. An empty segment gives empty
    values."""
    labelmap, label = segment_labelmap(segmentation_node, segment_id)
    if labelmap is None:
        return _NOTHING, label, _NOWHERE
    shift = _whole_voxel_shift(np.linalg.inv(slicer.util.arrayFromVTKMatrix(image_to_world(labelmap)))
                               @ _grid_in_segmentation(segmentation_node, volume_node))  # volume IJK → layer IJK
    if shift is None:
        return None
    values = image_array(labelmap)
    if values is None:
        return _NOTHING, label, _NOWHERE
    extent, shift_kji = labelmap.GetExtent(), shift[::-1]
    source, target = [], []
    for axis, (start, stop) in enumerate(block):
        first = extent[2 * (2 - axis)]  # the layer's first index on this axis, in its own IJK
        low = max(start + shift_kji[axis], first)
        high = min(stop + shift_kji[axis], first + values.shape[axis])
        high = max(high, low)
        source.append(slice(low - first, high - first))
        target.append(slice(low - shift_kji[axis] - start, high - shift_kji[axis] - start))
    return values[tuple(source)], label, tuple(target)


def image_to_world(image) -> vtk.vtkMatrix4x4:
    """An oriented image's IJK → coordinates matrix."""
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return matrix


def geometry_image(matrix: np.ndarray, block: Block):
    """An image without voxels: the grid of ``matrix`` (IJK → coordinates, (4, 4)) over ``block`` of its
    indices."""
    image = slicer.vtkOrientedImageData()
    (k0, k1), (j0, j1), (i0, i1) = block
    image.SetExtent(i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(matrix))
    return image


def segment_array(segmentation_node, segment_id: str, volume_node, block: Block | None = None) -> np.ndarray:
    """The segment as a boolean KJI array on the volume's grid (all False for an empty segment), only within
    ``block`` if given (then of the block's shape). Voxel for voxel what Slicer's export of the segment to a
    labelmap on the volume gives (``slicer.util.arrayFromSegmentBinaryLabelmap``), without its temporary nodes:
    read straight from the labelmap when it lies on the volume's grid, else resampled as the export does
    (nearest neighbour, the segmentation's parent transform undone)."""
    if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise PromptError(f"The segment {segment_id!r} is not in {segmentation_node.GetName()}.")
    block = whole_block(volume_node) if block is None else block
    out = np.zeros([stop - start for start, stop in block], bool)
    aligned = _aligned_labelmap(segmentation_node, segment_id, volume_node, block)
    if aligned is not None:
        values, label, target = aligned
        np.equal(values, label, out=out[target])
        return out
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    merged = slicer.vtkOrientedImageData()
    geometry = geometry_image(_grid_in_segmentation(segmentation_node, volume_node), block)
    segmentation_node.GenerateMergedLabelmapForAllSegments(merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
                                                           geometry, ids)
    values = image_array(merged)
    return out if values is None else values.reshape(out.shape) > 0


def segment_stamp(segmentation_node, segment_id: str, volume_node) -> tuple:
    """What a read of the segment on the volume's grid depends on: its labelmap (object and modification time),
    label value and geometry; equal stamps mean an equal :func:`segment_array`."""
    labelmap, label = segment_labelmap(segmentation_node, segment_id)
    image = volume_node.GetImageData()
    return (labelmap, labelmap.GetMTime() if labelmap is not None else 0, label, image.GetDimensions(),
            _grid_in_segmentation(segmentation_node, volume_node).tobytes())


def write_block(segmentation_node, segment_id: str, volume_node, mask: np.ndarray, block: Block) -> None:
    """Make the segment ``mask`` (KJI bool of the block's shape) and nothing else, with no undo step (for a
    preview segment of its own)."""
    image = oriented_image(mask, _shifted(_grid_in_segmentation(segmentation_node, volume_node), block))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)


def labelmap_image(values_kji: np.ndarray, geometry):
    """An image of KJI label values (any integer type, kept) over the extent and on the grid of ``geometry``."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetExtent(geometry.GetExtent())
    image.SetImageToWorldMatrix(image_to_world(geometry))
    image.AllocateScalars(numpy_support.get_vtk_array_type(values_kji.dtype), 1)
    image_array(image)[:] = values_kji
    return image


def image_values(image, geometry) -> np.ndarray:
    """The voxels of a labelmap ``image`` (KJI, its scalar type; uint8 zeros for an empty one) over the extent of
    ``geometry``, zero where the image has none: copied where both are on one grid (origin, spacing and axes
    equal), else resampled onto it (nearest neighbour)."""
    extent = geometry.GetExtent()
    values = image_array(image)
    out = np.zeros((extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1),
                   np.uint8 if values is None else values.dtype)
    if values is None:
        return out
    if not slicer.vtkOrientedImageDataResample.DoGeometriesMatch(image, geometry):
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, geometry, resampled)
        values = image_array(resampled)
        return out if values is None else values.reshape(out.shape).astype(out.dtype)
    have, source, target = image.GetExtent(), [], []
    for axis in (2, 1, 0):  # K, J, I
        low, high = max(have[2 * axis], extent[2 * axis]), min(have[2 * axis + 1], extent[2 * axis + 1])
        if high < low:
            return out
        source.append(slice(low - have[2 * axis], high - have[2 * axis] + 1))
        target.append(slice(low - extent[2 * axis], high - extent[2 * axis] + 1))
    out[tuple(target)] = values[tuple(source)]
    return out


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


def reference_geometry(segmentation_node, volume_node):
    """The segmentation's reference geometry, as Segment Editor effects get it (``vtkSlicerSegmentEditorLogic::
    GetReferenceImageGeometryString``: its reference image geometry, grown to hold every segment; the volume's
    when it has none, which it then keeps): an image without voxels, in the segmentation node's coordinates."""
    segmentation = segmentation_node.GetSegmentation()
    text = slicer.vtkSlicerSegmentEditorLogic.GetReferenceImageGeometryStringFromSegmentation(segmentation)
    if not text:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        text = slicer.vtkSlicerSegmentEditorLogic.GetReferenceImageGeometryStringFromSegmentation(segmentation)
    geometry = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, geometry, False)
    return geometry


def modifier_labelmap(segmentation_node, volume_node, mask: np.ndarray, block: Block):
    """``mask`` (KJI bool of ``block`` of the volume) as a Segment Editor modifier labelmap: on the segmentation's
    reference geometry in the segmentation node's coordinates, as effects build theirs
    (``ResetModifierLabelmapToDefault``), but only over the part of that geometry the block covers (the masking
    in ``ModifySegmentByLabelmap`` compares geometries without extents, so it applies there as on a whole one);
    the mask's voxels themselves where the volume's grid is the reference's up to a whole-voxel shift, else
    resampled (nearest neighbour). Voxels outside the reference geometry cannot be written, as with any effect.
    None if nothing of the mask lands on it."""
    reference = reference_geometry(segmentation_node, volume_node)
    source_matrix = _shifted(_grid_in_segmentation(segmentation_node, volume_node), block)
    to_reference = np.linalg.inv(slicer.util.arrayFromVTKMatrix(image_to_world(reference))) @ source_matrix
    sizes = [stop - start for start, stop in block][::-1]  # I, J, K
    corners = np.array([[x, y, z, 1.0] for x in (-0.5, sizes[0] - 0.5) for y in (-0.5, sizes[1] - 0.5)
                        for z in (-0.5, sizes[2] - 0.5)]) @ to_reference.T
    # the reference voxels whose centres lie within the block's box (its voxels' faces), give or take a rounding
    # error: on the volume's own grid, exactly the block's voxels
    extent = reference.GetExtent()
    low = np.maximum(np.ceil(corners[:, :3].min(axis=0) - 1e-3).astype(int), extent[0::2])
    high = np.minimum(np.floor(corners[:, :3].max(axis=0) + 1e-3).astype(int), extent[1::2])
    if np.any(high < low):
        return None
    reference.SetExtent(low[0], high[0], low[1], high[1], low[2], high[2])
    shift = _whole_voxel_shift(to_reference)
    if shift is not None:  # the block lies on the reference grid (the usual case): its voxels are the modifier's
        (i0, j0, k0), (i1, j1, k1) = low - shift, high - shift + 1
        modifier = labelmap_image(mask[k0:k1, j0:j1, i0:i1].astype(np.uint8), reference)
    else:  # resampling: slow (a general transform, voxel by voxel), but exact
        modifier = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            oriented_image(mask, source_matrix), reference, modifier)
    values = image_array(modifier)
    return modifier if values is not None and values.any() else None


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

"""Undoable segment writes, made the way Slicer's Segment Editor effects make them.

A write turns "the segment should now be this KJI mask within this block of the volume" into at most two
labelmap modifications (add the new voxels, remove the dropped ones) through ``vtkSlicerSegmentEditorLogic::
ModifySegmentByLabelmap``, so the editor node's masking (editable area, editable intensity range) and overwrite
settings (overwrite other segments, or allow overlap) apply as for any effect.

What Slicer's code does decides how (lines of v5.10.0; 5.12 is the same): ``Modules/Loadable/Segmentations/Logic/
vtkSlicerSegmentEditorLogic.cxx`` (SEL), ``Libs/vtkSegmentationCore/vtkSegmentationModifier.cxx`` (SM) and
``vtkOrientedImageDataResample.cxx`` (OIDR).

- ``ModifySegmentByLabelmap`` (SEL 1663) combines the editor's mask with the modifier through
  ``vtkOrientedImageDataResample::ModifyImage``, which refuses an image of another geometry and whose result it
  does not check, and with the editable intensity range on it returns without writing when the modifier's
  geometry is not the aligned source volume's. So the modifier is built in the segmentation's own reference
  geometry, in the segmentation node's coordinates, never on the volume's grid (:func:`.mrml.modifier_labelmap`);
- those geometry checks compare origin, spacing and axes, not extents, and every mask is combined over the
  modifier's extent: so the modifier covers only the part of the reference geometry the change touches;
- yet a call costs in proportion to the whole of every labelmap layer it writes to, whatever the modifier's
  size: ``ModifyBinaryLabelmap`` pads the layer to hold the modifier (``MergeImage``, SM 443 → OIDR 1160
  ``PadImageToContainImage``), then scans the whole layer for its effective extent and crops it to that
  (``ShrinkSegmentToEffectiveExtent``, SM 104), and with "overwrite other segments" does the same to the layer of
  every other segment (the ``segmentsToErase`` loop, SEL 1984). On a CT-sized segmentation of two layers that
  was 110 ms of a one-slice Accept.

So the calls run on a replica (:class:`_Replica`): a segmentation node outside the scene holding the layers over
the modifier's extent alone, with the same segment IDs, labels and layer sharing, while the editor logic points
at the real segmentation, source volume and editor node, from which it computes the masks. Slicer's own code
thus decides every voxel, and the replica shows what changed. If nothing did (masking left nothing to write),
nothing is written and no undo state is saved: an undo step that does nothing. Otherwise the undo state is saved
and the changed voxels are copied into the segmentation's layers; the layers and the changed segments then report
themselves modified, as ``slicer.util.arrayFromSegmentInternalBinaryLabelmap`` prescribes after an edit in place
(``Base/Python/slicer/util.py`` 2140): a layer's ``Modified`` makes the segmentation send
``SourceRepresentationModified`` (``vtkSegmentation.cxx`` 775), which the undo history observes
(``vtkSegmentationHistory.cxx`` 86); a segment's sends ``SegmentModified``, on which the slice views redraw it
(``vtkMRMLSegmentationsDisplayableManager2D.cxx`` 1392). The calls run on the segmentation itself instead, after
the undo state is saved, where the replica cannot stand for it (:meth:`_Replica.copyable`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import slicer
import vtk

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


def _labelmap_name() -> str:
    return slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()


class _Replica:
    """The labelmap layers of a segmentation node over ``geometry`` (an extent of its reference geometry, an
    image without voxels), in a segmentation node outside the scene (``node``: no MRML events, no subject
    hierarchy items) with the same segment IDs, labels and layer sharing: every segment with voxels there, and
    the one written to (``segment_id``). The others, and layers without voxels there, are left out: no call can
    change them there (only the segment written to gains voxels; overwriting and masks by other segments involve
    only voxels they have), and each segment of a node costs its removal an event to every other one (a
    TotalSegmentator segmentation has over a hundred). ``layers``: the segmentation's layer → (its replica, the
    replica's voxels as copied (KJI), the IDs of its segments in the replica)."""

    def __init__(self, segmentation_node, segment_id: str, geometry) -> None:
        self.segmentation_node, self.geometry = segmentation_node, geometry
        self.node = slicer.vtkMRMLSegmentationNode()
        self.layers: dict = {}
        members: dict = {}  # the segmentation's layer → [(segment ID, label)]
        for member_id in segmentation_node.GetSegmentation().GetSegmentIDs():
            layer, label = mrml.segment_labelmap(segmentation_node, member_id)
            members.setdefault(layer, []).append((member_id, label))
        for layer, segments in members.items():
            values = mrml.image_values(layer, geometry)
            present = set(np.unique(values).tolist())
            segments = [(i, label) for i, label in segments if label in present or i == segment_id]
            if not segments:
                continue
            copy = mrml.labelmap_image(values, geometry)
            self.layers[layer] = (copy, values, [i for i, _ in segments])
            for member_id, label in segments:
                segment = slicer.vtkSegment()
                segment.SetLabelValue(label)
                segment.AddRepresentation(_labelmap_name(), copy)
                self.node.GetSegmentation().AddSegment(segment, member_id)

    def outcome(self) -> tuple[dict, bool]:
        """After the calls on the replica: ({the segmentation's layer: its replica's voxels (KJI)} for the layers
        whose voxels changed, whether the replica stopped standing for the segmentation: a segment moved to a
        layer of its own (``SeparateModifiedSegmentFromSharedLabelmap``, SM 70: overlap allowed with a segment of
        its layer) or a layer changed its scalar type to hold a label (``CastImageForValue``, SM 313))."""
        segmentation, changed, apart = self.node.GetSegmentation(), {}, False
        for layer, (copy, before, ids) in self.layers.items():
            apart |= any(segmentation.GetSegment(i).GetRepresentation(_labelmap_name()) is not copy for i in ids)
            after = mrml.image_values(copy, self.geometry)
            apart |= after.dtype != before.dtype
            if not np.array_equal(after, before):
                changed[layer] = after
        return changed, apart

    def copyable(self, changed: dict, editor_node) -> bool:
        """Whether the changed voxels can be copied into the segmentation as they are in the replica, which holds
        unless: "overwrite visible segments" is set (visibility lives in the display node, SEL 1869, which a node
        outside the scene has not); the segmentation holds a representation besides the labelmap, or another one
        is its source (``SetBinaryLabelmapToSegment`` converts the changed segments again; in place the others
        would be dropped); a changed layer is not on the reference grid (Slicer resamples the whole layer onto the
        modifier's)."""
        segmentation, names = self.segmentation_node.GetSegmentation(), []
        segmentation.GetContainedRepresentationNames(names)
        return (editor_node.GetOverwriteMode() != editor_node.OverwriteVisibleSegments
                and segmentation.GetSourceRepresentationName() == _labelmap_name() and names == [_labelmap_name()]
                and all(mrml.image_array(layer) is None
                        or slicer.vtkOrientedImageDataResample.DoGeometriesMatch(layer, self.geometry)
                        for layer in changed))

    def copy_into_segmentation(self, changed: dict, segment_id: str) -> None:
        """Copy the changed voxels (the block of each layer's replica that holds them) into the segmentation's
        layers, which then report themselves modified (``SourceRepresentationModified``), and mark the segment in
        progress, as ``ModifySegmentByLabelmap`` does (SEL 1977). A layer that does not hold the block is replaced
        (in place, so that its segments still share it) by a grown copy (:func:`_grown`); an empty one by the
        block, as ``AppendLabelmapToSegment`` copies the modifier into it (SM 308, 354). Erasing never grows a
        layer: only voxels it has change. The layers are grown before any of them changes, and report the change
        once all are written."""
        segmentation, targets, modified = self.segmentation_node.GetSegmentation(), {}, []
        matrix, extent = slicer.util.arrayFromVTKMatrix(mrml.image_to_world(self.geometry)), _block_of(self.geometry)
        for layer, after in changed.items():
            _, before, ids = self.layers[layer]
            block = mrml.mask_block(after != before, within=extent)  # in the reference grid's indices
            values = after[mrml.block_index(block, within=extent)]
            if mrml.image_array(layer) is None:
                target = mrml.labelmap_image(values, mrml.geometry_image(matrix, block))
            elif _holds(_block_of(layer), block):
                target = layer
            else:
                target = _grown(layer, block)
            targets[layer] = (target, mrml.block_index(block, within=_block_of(target)), values)
            was, now = before[after != before], after[after != before]
            modified += [i for i in ids if _label_changed(segmentation.GetSegment(i).GetLabelValue(), was, now)]
        for target, index, values in targets.values():
            mrml.image_array(target)[index] = values
        for layer, (target, _, _) in targets.items():
            if target is layer:
                layer.GetPointData().GetScalars().Modified()
                layer.Modified()
            else:
                layer.ShallowCopy(target)  # geometry included (vtkOrientedImageData::ShallowCopy)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if logic.GetSegmentStatus(segmentation.GetSegment(segment_id)) == logic.NotStarted:
            logic.SetSegmentStatus(segmentation.GetSegment(segment_id), logic.InProgress)
        for modified_id in modified:
            segmentation.GetSegment(modified_id).Modified()  # → SegmentModified: the slice views redraw it


def _crop_to_voxels(layer) -> None:
    """Crop a labelmap layer with an empty face (one as read from a file spans the whole reference geometry) to
    the extent of its voxels, as Slicer crops every layer it writes to (``ShrinkSegmentToEffectiveExtent``, SM 104,
    with ``CalculateEffectiveExtent``): the undo history keeps a copy of each changed layer, whole, per step, so a
    write crops before the undo state is saved. The voxels stay as they are."""
    values = mrml.image_array(layer)
    faces = () if values is None else (values[0], values[-1], values[:, 0], values[:, -1], values[:, :, 0],
                                       values[:, :, -1])
    extent = [0] * 6
    if all(face.any() for face in faces) \
            or not slicer.vtkOrientedImageDataResample.CalculateEffectiveExtent(layer, extent):
        return  # tight already, or no voxels at all
    crop = vtk.vtkImageConstantPad()
    crop.SetInputData(layer)
    crop.SetOutputWholeExtent(extent)
    crop.Update()
    layer.ShallowCopy(crop.GetOutput())  # the layer's axes are kept, as in ShrinkSegmentToEffectiveExtent


def _block_of(image) -> mrml.Block:
    """An image's extent as a block of its grid's indices."""
    extent = image.GetExtent()
    return (extent[4], extent[5] + 1), (extent[2], extent[3] + 1), (extent[0], extent[1] + 1)


def _holds(outer: mrml.Block, inner: mrml.Block) -> bool:
    return all(start <= first and last <= stop for (start, stop), (first, last) in zip(outer, inner, strict=True))


def _grown(layer, block: mrml.Block):
    """A copy of a labelmap layer grown to hold ``block`` (of its grid's indices), zero where the layer has no
    voxels, as ``MergeImage`` grows a layer (``PadImageToContainImage``, OIDR 1160), each voxel written once."""
    have = _block_of(layer)
    union = tuple((min(a, b), max(c, d)) for (a, c), (b, d) in zip(have, block, strict=True))
    grown = mrml.geometry_image(slicer.util.arrayFromVTKMatrix(mrml.image_to_world(layer)), union)
    grown.AllocateScalars(layer.GetScalarType(), 1)
    values = mrml.image_array(grown)
    inside = mrml.block_index(have, within=union)
    for axis in range(3):  # the margins around the layer's voxels
        ahead, beyond = [slice(None)] * 3, [slice(None)] * 3
        ahead[axis], beyond[axis] = slice(0, inside[axis].start), slice(inside[axis].stop, None)
        values[tuple(ahead)] = 0
        values[tuple(beyond)] = 0
    values[inside] = mrml.image_array(layer)
    return grown


def _label_changed(label: int, was: np.ndarray, now: np.ndarray) -> bool:
    """Whether the voxels of ``label`` changed, given the changed voxels' values before and after."""
    return bool(np.any((was == label) != (now == label)))


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

    def write(self, segmentation_node, segment_id: str, volume_node, new_kji: np.ndarray, editor_node=None,
              save_state: Callable[[], None] | None = None, block: mrml.Block | None = None) -> Written:
        """Make the segment ``new_kji`` (KJI bool) within ``block`` of the volume's grid (the whole volume when
        None) as one undoable step, only adding the new voxels and removing the dropped ones, as far as the
        editor's masking lets it; the segment outside the block is not read or touched. Saves an undo state
        only when the segmentation changes."""
        block = mrml.whole_block(volume_node) if block is None else block
        new_kji = np.asarray(new_kji, dtype=bool)
        if new_kji.shape != tuple(stop - start for start, stop in block):
            raise ValueError(f"The mask's shape {new_kji.shape} is not the block's {block}.")
        old = mrml.segment_array(segmentation_node, segment_id, volume_node, block)
        differ = new_kji != old
        changed = mrml.mask_block(differ, within=block)
        if changed is None:
            return Written(0, block, old)
        inner = mrml.block_index(changed, within=block)
        differ, new_inner = differ[inner], new_kji[inner]
        editor_node = ensure_editor_node(self.scene, editor_node)
        self._point_at(editor_node, segmentation_node, segment_id, volume_node)
        modifiers = [(modifier, mode) for change, mode in ((differ & new_inner, self.logic.ModificationModeAdd),
                                                           (differ & ~new_inner, self.logic.ModificationModeRemove))
                     if change.any()
                     for modifier in [mrml.modifier_labelmap(segmentation_node, volume_node, change, changed)]
                     if modifier is not None]
        if not modifiers:
            return Written(0, block, old)
        replica = _Replica(segmentation_node, segment_id, self._extent_of(modifiers))
        self._modify(replica.node, segment_id, modifiers)
        layers, apart = replica.outcome()
        if not layers and not apart:
            return Written(0, block, old)
        copied = not apart and replica.copyable(layers, editor_node)
        for layer in layers if copied else ():
            _crop_to_voxels(layer)
        if save_state is not None:
            save_state()
        else:
            self.logic.SaveStateForUndo()
        if copied:
            replica.copy_into_segmentation(layers, segment_id)
        else:
            self._modify(segmentation_node, segment_id, modifiers)
        after = old.copy()
        after[inner] = mrml.segment_array(segmentation_node, segment_id, volume_node, changed)
        return Written(int(np.count_nonzero(after[inner] != old[inner])), block, after)

    @staticmethod
    def _extent_of(modifiers):
        """The smallest extent of the modifiers' grid (an image without voxels) that holds all of them."""
        extents = np.array([modifier.GetExtent() for modifier, _ in modifiers])
        extent = np.empty(6, int)
        extent[0::2], extent[1::2] = extents[:, 0::2].min(axis=0), extents[:, 1::2].max(axis=0)
        geometry = slicer.vtkOrientedImageData()
        geometry.SetExtent([int(v) for v in extent])
        geometry.SetImageToWorldMatrix(mrml.image_to_world(modifiers[0][0]))
        return geometry

    def undo(self) -> None:
        """Undo the last write saved in this object's own history."""
        self.logic.Undo()

"""Segment writes under the Segment Editor's masking on segmentations of other geometries, live-preview
requests from markups events, and install failures — the module's Slicer-side rules against real MRML
(``slicer-core``), no mocks of Slicer."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install -e .[test])")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not Slicer's core", allow_module_level=True)

from SegmentWithSAMLib.actions import Prompt  # noqa: E402
from SegmentWithSAMSlicerLib import dependencies, mrml  # noqa: E402
from SegmentWithSAMSlicerLib.editing import SegmentEditing, ensure_editor_node  # noqa: E402
from SegmentWithSAMSlicerLib.prompt_watch import PromptWatcher  # noqa: E402

SHAPE = (12, 16, 20)  # K, J, I of the phantom; 1 mm voxels at integer RAS positions


def phantom(scene):
    """A volume whose left half (i < 10) is 100 and right half 0, so an intensity range of 50–150 admits the
    left half only."""
    array = np.zeros(SHAPE, np.int16)
    array[:, :, :10] = 100
    return slicer.util.addVolumeFromArray(array, np.eye(4), name="phantom")


def segmentation_on(scene, volume_node, geometry: str):
    """A segmentation whose reference geometry is the volume's, a coarser (2 mm) or an oversampled (0.5 mm)
    grid over the same box, or the volume's under a 3 mm translation. Grids are aligned so that resampling
    between them is exact."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if geometry in ("coarse", "oversampled"):
        factor = 0.5 if geometry == "coarse" else 2.0
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(*(int(n * factor) for n in SHAPE[::-1]))
        image.SetSpacing(*([1 / factor] * 3))
        image.SetOrigin(*([(1 / factor - 1) / 2] * 3))  # voxel faces on the volume's voxel faces
        node.GetSegmentation().SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(image))
    elif geometry == "transformed":
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(
            np.array([[1, 0, 0, 3.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])))
        node.SetAndObserveTransformNodeID(transform.GetID())
    return node


def box(k0, k1, j0, j1, i0, i1) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[k0:k1, j0:j1, i0:i1] = True
    return mask


@pytest.mark.parametrize("geometry", ["same", "coarse", "oversampled", "transformed"])
def test_masked_writes_respect_masking_on_any_geometry_and_undo_exactly(scene, geometry):
    volume = phantom(scene)
    segmentation = segmentation_on(scene, volume, geometry)
    segments = segmentation.GetSegmentation()
    allowed_id = segments.AddEmptySegment("", "allowed")
    target_id = segments.AddEmptySegment("", "target")
    allowed = box(0, 12, 0, 8, 4, 20)  # "paint allowed inside" this segment: j < 8 (and within every geometry)
    editing = SegmentEditing(scene)
    editing.write(segmentation, allowed_id, volume, allowed)
    editing.logic.ClearUndoState()
    assert np.array_equal(mrml.segment_array(segmentation, allowed_id, volume), allowed)

    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(allowed_id)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(50, 150)
    before = {sid: mrml.segment_array(segmentation, sid, volume) for sid in (allowed_id, target_id)}

    # Entirely outside the editable area: nothing written, no undo step.
    assert editing.write(segmentation, target_id, volume, box(2, 10, 10, 14, 4, 8), editor).count == 0
    assert not editing.logic.CanUndo()

    wanted = box(2, 10, 2, 14, 4, 16)
    written = editing.write(segmentation, target_id, volume, wanted, editor).count
    expected = wanted & allowed & box(0, 12, 0, 16, 0, 10)  # inside "allowed" and the intensity range
    result = mrml.segment_array(segmentation, target_id, volume)
    assert np.array_equal(result, expected) and written == int(expected.sum())
    assert editing.logic.CanUndo()

    # The same write again changes nothing and leaves the history as it was: one undo restores the start.
    assert editing.write(segmentation, target_id, volume, wanted, editor).count == 0
    editing.undo()
    assert all(np.array_equal(mrml.segment_array(segmentation, sid, volume), before[sid]) for sid in before)
    assert not editing.logic.CanUndo()


MASK_MODES = {"everywhere": slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere,
              "inside all": slicer.vtkMRMLSegmentationNode.EditAllowedInsideAllSegments,
              "inside visible": slicer.vtkMRMLSegmentationNode.EditAllowedInsideVisibleSegments,
              "outside all": slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments,
              "outside visible": slicer.vtkMRMLSegmentationNode.EditAllowedOutsideVisibleSegments,
              "inside b": slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment}
OVERWRITE_MODES = {"all": slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments,
                   "visible": slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments,
                   "none (overlap allowed)": slicer.vtkMRMLSegmentEditorNode.OverwriteNone}
LAYERED = {"a": box(0, 12, 0, 8, 0, 10), "b": box(0, 12, 8, 16, 0, 10), "c": box(2, 10, 4, 12, 6, 16),
           "d": box(0, 12, 12, 16, 16, 20)}  # "c" overlaps "a" and "b": it lies on a layer of its own


def layered_segmentation(scene, volume, geometry: str):
    """Segments "a", "b", "d" sharing a labelmap layer and "c" on another, overlapping "a" and "b", with "c"
    hidden; written as the Segment Editor would, with overlap allowed."""
    node = segmentation_on(scene, volume, geometry)
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetOverwriteMode(OVERWRITE_MODES["none (overlap allowed)"])
    editing = SegmentEditing(scene)
    for segment_id, mask in LAYERED.items():
        node.GetSegmentation().AddEmptySegment(segment_id, segment_id)
        editing.write(node, segment_id, volume, mask, editor)
    node.GetDisplayNode().SetSegmentVisibility("c", False)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 2 and segmentation.GetLayerIndex("a") != segmentation.GetLayerIndex("c")
    return node


def editor_with(scene, mask: str, overwrite: str, intensity: bool):
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetMaskMode(MASK_MODES[mask])
    editor.SetMaskSegmentID("b")
    editor.SetOverwriteMode(OVERWRITE_MODES[overwrite])
    editor.SetSourceVolumeIntensityMask(intensity)
    editor.SetSourceVolumeIntensityMaskRange(50, 150)
    return editor


def slicers_own_write(scene, segmentation, segment_id: str, volume, new: np.ndarray, editor) -> None:
    """What an effect does: each change as a modifier over the whole reference geometry, given to
    ``ModifySegmentByLabelmap`` for the segmentation itself."""
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor)
    logic.SetSegmentationNode(segmentation)
    logic.SetSourceVolumeNode(volume)
    logic.SetCurrentSegmentID(segment_id)
    old = mrml.segment_array(segmentation, segment_id, volume)
    for change, mode in ((new & ~old, logic.ModificationModeAdd), (old & ~new, logic.ModificationModeRemove)):
        modifier = mrml.modifier_labelmap(segmentation, volume, change, mrml.whole_block(volume))
        if modifier is not None:
            logic.ModifySegmentByLabelmap(segmentation, segment_id, modifier, mode, False, False)


def segments_of(segmentation, volume) -> dict[str, np.ndarray]:
    ids = segmentation.GetSegmentation().GetSegmentIDs()
    return {segment_id: mrml.segment_array(segmentation, segment_id, volume) for segment_id in ids}


@pytest.mark.parametrize("overwrite", list(OVERWRITE_MODES))
@pytest.mark.parametrize("geometry", ["same", "coarse", "transformed"])
def test_a_write_leaves_every_segment_as_slicers_own_write_would(scene, geometry, overwrite, monkeypatch):
    """Writes run Slicer's code on a replica of the segmentation's layers over the changed extent and copy the
    outcome back: under every masking, overwrite and intensity setting each segment ends voxel for voxel as an
    effect's own ``ModifySegmentByLabelmap`` on the segmentation leaves it (the overwritten segments of the other
    layer, the hidden one spared, "a" moved to a layer of its own where it may not overwrite "b"), and one undo
    restores them all."""
    volume = phantom(scene)
    wanted = LAYERED["a"] | box(3, 9, 2, 14, 4, 14)  # over "b" (its layer), "c" (the other layer, hidden)
    wanted[:, :3] = False  # and less of "a"
    on_the_segmentation = []
    real_modify = SegmentEditing._modify
    monkeypatch.setattr(SegmentEditing, "_modify", lambda self, node, *args: on_the_segmentation.append(
        node.GetScene() is not None) or real_modify(self, node, *args))
    for mask in MASK_MODES:
        for intensity in (False, True):
            ours, theirs = (layered_segmentation(scene, volume, geometry) for _ in range(2))
            before = segments_of(ours, volume)
            editing = SegmentEditing(scene)
            on_the_segmentation.clear()
            written = editing.write(ours, "a", volume, wanted, editor_with(scene, mask, overwrite, intensity))
            slicers_own_write(scene, theirs, "a", volume, wanted, editor_with(scene, mask, overwrite, intensity))
            case = f"{mask}, intensity range {intensity}"
            expected = segments_of(theirs, volume)
            assert all(np.array_equal(result, expected[sid]) for sid, result in segments_of(ours, volume).items()), \
                case
            assert ours.GetSegmentation().GetNumberOfLayers() == theirs.GetSegmentation().GetNumberOfLayers(), case
            assert written.count == np.count_nonzero(expected["a"] != before["a"]), case
            if overwrite != "visible" and ours.GetSegmentation().GetNumberOfLayers() == 2:
                assert not any(on_the_segmentation), case  # the outcome was copied, not written again by Slicer
            if written.count:
                editing.undo()
            assert all(np.array_equal(result, before[sid]) for sid, result in segments_of(ours, volume).items()), \
                case
            for node in (ours, theirs):
                scene.RemoveNode(node)


def test_a_first_write_into_a_new_segment_and_into_a_segmentation_with_surfaces(scene):
    """A new segment's empty labelmap (a layer of its own in a new segmentation, else it shares one) takes the
    reference grid and grows to hold the write; where the segmentation also holds closed surfaces, Slicer writes
    it (and converts the changed segment again). Each ends as Slicer's own write leaves it, and undo restores it."""
    volume = phantom(scene)
    wanted = box(1, 5, 2, 12, 3, 16)  # the intensity range admits i < 10 only
    for case in ("alone", "beside others", "with surfaces"):
        if case == "alone":
            ours, theirs = (segmentation_on(scene, volume, "same") for _ in range(2))
        else:
            ours, theirs = (layered_segmentation(scene, volume, "same") for _ in range(2))
        for node in (ours, theirs):
            node.GetSegmentation().AddEmptySegment("new", "new")
            if case == "with surfaces":
                node.CreateClosedSurfaceRepresentation()
        before = segments_of(ours, volume)
        editing = SegmentEditing(scene)
        assert editing.write(ours, "new", volume, wanted, editor_with(scene, "everywhere", "all", True)).count \
            == 4 * 10 * 7, case
        # an editor node of its own: a logic given a node follows the segmentation that node points at (and
        # starts a new undo history for it)
        slicers_own_write(scene, theirs, "new", volume, wanted, editor_with(scene, "everywhere", "all", True))
        expected = segments_of(theirs, volume)
        assert all(np.array_equal(result, expected[sid]) for sid, result in segments_of(ours, volume).items()), case
        surface = ours.GetSegmentation().GetSegment("new").GetRepresentation(
            slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName())
        assert (surface is not None and surface.GetNumberOfPoints() > 0) == (case == "with surfaces")
        editing.undo()
        assert all(np.array_equal(result, before[sid]) for sid, result in segments_of(ours, volume).items()), case


def test_a_layer_spanning_the_volume_is_cropped_to_its_voxels_before_the_undo_state_is_saved(scene):
    """A segment imported from an array (or read from a file) spans the whole volume; as Slicer's own writes do,
    a write crops its layer to the voxels, before the undo state (a copy of the layer) is saved."""
    volume = phantom(scene)
    segmentation = segmentation_on(scene, volume, "same")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "imported")
    slicer.util.updateSegmentBinaryLabelmapFromArray(box(2, 6, 3, 9, 4, 8).astype(np.uint8), segmentation,
                                                     segment_id, volume)
    layer, _ = mrml.segment_labelmap(segmentation, segment_id)
    assert layer.GetExtent() == (0, 19, 0, 15, 0, 11)
    editing = SegmentEditing(scene)
    assert editing.write(segmentation, segment_id, volume, box(2, 6, 3, 9, 4, 10)).count == 4 * 6 * 2
    assert layer.GetExtent() == (4, 9, 3, 8, 2, 5)
    editing.undo()
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, volume), box(2, 6, 3, 9, 4, 8))
    restored, _ = mrml.segment_labelmap(segmentation, segment_id)
    assert restored.GetExtent() == (4, 7, 3, 8, 2, 5)  # the state saved: cropped


def test_a_write_beyond_a_layer_grows_it_on_every_side(scene):
    """A layer holds only the extent of its voxels; a write past it on every side grows it there, in place (the
    segment sharing it still does), and ends as Slicer's own write."""
    volume = phantom(scene)
    ours, theirs = (segmentation_on(scene, volume, "same") for _ in range(2))
    editing = SegmentEditing(scene)
    for node in (ours, theirs):
        for segment_id, mask in (("inner", box(4, 8, 5, 10, 6, 9)), ("beside", box(4, 8, 5, 10, 9, 12))):
            node.GetSegmentation().AddEmptySegment(segment_id, segment_id)
            editing.write(node, segment_id, volume, mask)
    layer, _ = mrml.segment_labelmap(ours, "inner")
    assert layer.GetExtent() == (6, 11, 5, 9, 4, 7) and mrml.segment_labelmap(ours, "beside")[0] is layer
    wanted = box(2, 10, 3, 12, 4, 13)  # over "beside", which it overwrites
    before = segments_of(ours, volume)
    assert editing.write(ours, "inner", volume, wanted, editor_with(scene, "everywhere", "all", False)).count \
        == int((wanted & ~before["inner"]).sum())
    slicers_own_write(scene, theirs, "inner", volume, wanted, editor_with(scene, "everywhere", "all", False))
    expected = segments_of(theirs, volume)
    assert all(np.array_equal(result, expected[sid]) for sid, result in segments_of(ours, volume).items())
    assert layer.GetExtent() == (4, 12, 3, 11, 2, 9) and mrml.segment_labelmap(ours, "beside")[0] is layer
    editing.undo()
    assert all(np.array_equal(result, before[sid]) for sid, result in segments_of(ours, volume).items())


def test_a_copied_write_tells_the_undo_history_and_the_views(scene):
    """The layer and each segment whose voxels changed report it: ``SourceRepresentationModified`` (the undo
    history and the node observe it) and ``SegmentModified`` (on which the slice views redraw a segment)."""
    import vtk

    volume = phantom(scene)
    segmentation = layered_segmentation(scene, volume, "same")
    heard = []

    @vtk.calldata_type(vtk.VTK_STRING)
    def on_segment(caller, event, segment_id):
        heard.append(segment_id)

    segmentation.GetSegmentation().AddObserver(slicer.vtkSegmentation.SegmentModified, on_segment)
    sources = []
    segmentation.GetSegmentation().AddObserver(slicer.vtkSegmentation.SourceRepresentationModified,
                                               lambda *args: sources.append(args))
    wanted = LAYERED["a"] | box(3, 9, 2, 14, 4, 14)
    assert SegmentEditing(scene).write(segmentation, "a", volume, wanted, editor_with(scene, "everywhere", "all",
                                                                                      False)).count
    assert sorted(heard) == ["a", "b", "c"] and sources  # once each, "d" untouched; the layers changed


@pytest.mark.parametrize("geometry", ["same", "coarse", "oversampled", "transformed"])
def test_blocks_of_a_segment_read_as_slicers_export_does(scene, geometry):
    """Reading a block of a segment (straight from its labelmap or resampled) gives, voxel for voxel, that block
    of what Slicer's export of the segment to the volume's grid gives."""
    volume = phantom(scene)
    segmentation = segmentation_on(scene, volume, geometry)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "blob")
    other_id = segmentation.GetSegmentation().AddEmptySegment("", "other")  # shares its labelmap layer
    editing = SegmentEditing(scene)
    rng = np.random.default_rng(1)
    editing.write(segmentation, segment_id, volume, rng.random(SHAPE) < 0.3)
    editing.write(segmentation, other_id, volume, box(0, 12, 0, 4, 0, 4))
    exported = np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)) > 0
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, volume), exported)
    block = ((3, 7), (2, 16), (5, 6))
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, volume, block),
                          exported[mrml.block_index(block)])
    assert mrml.segment_has_mask(segmentation, segment_id, volume)
    empty_id = segmentation.GetSegmentation().AddEmptySegment("", "empty")
    assert not mrml.segment_has_mask(segmentation, empty_id, volume)
    assert not mrml.segment_array(segmentation, empty_id, volume, block).any()


def test_a_write_within_a_block_leaves_the_rest_and_reads_back(scene):
    volume = phantom(scene)
    segmentation = segmentation_on(scene, volume, "same")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "slab")
    editing = SegmentEditing(scene)
    editing.write(segmentation, segment_id, volume, box(0, 12, 4, 12, 4, 12))
    block = ((5, 6), (0, 16), (0, 20))  # one slice: replace it by a smaller square
    written = editing.write(segmentation, segment_id, volume, box(5, 6, 6, 8, 6, 8)[5:6], block=block)
    expected = box(0, 12, 4, 12, 4, 12)
    expected[5] = box(5, 6, 6, 8, 6, 8)[5]
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, volume), expected)
    assert written.count == 64 - 4 and written.block == block and np.array_equal(written.segment, expected[5:6])
    with pytest.raises(ValueError, match="shape"):
        editing.write(segmentation, segment_id, volume, box(0, 12, 0, 16, 0, 20), block=block)


def test_a_moving_preview_point_and_the_click_order_request_no_preview(scene, controller, colin_node,
                                                                       monkeypatch):
    """Markups events as place mode fires them: only a placed, moved or removed prompt asks the backend."""
    volume = controller.volume(colin_node)
    centre = volume.to_ras(np.array(volume.shape_ijk) / 2)
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    preview = positive.AddControlPoint(*centre)  # the point place mode moves with the mouse
    positive.SetNthControlPointPositionWorld(preview, *centre, positive.PositionPreview)

    client = controller.engine()
    sent = []
    real_step = client.step  # a preview is one engine step in the backend
    monkeypatch.setattr(client, "step", lambda *args, **kwargs: sent.append(args) or real_step(*args, **kwargs))
    watcher = PromptWatcher(lambda: controller.request_preview(colin_node, positive, negative, roi, "axial"))
    watcher.watch([positive, negative, roi])
    try:
        for step in range(10):  # mouse moves in place mode
            positive.SetNthControlPointPositionWorld(preview, *(centre + [step * 0.3, 0, 0]), positive.PositionPreview)
        assert sent == []
        positive.SetNthControlPointPositionWorld(preview, *centre, positive.PositionDefined)  # the click
        assert len(sent) == 1  # one request, though the click and the click-order description fired events
        positive.SetNthControlPointDescription(preview, "a note")
        negative.AddControlPoint(*(centre + [6.0, 0, 0]))  # a negative click
        positive.SetNthControlPointPositionWorld(preview, *(centre + [1.0, 0, 0]))  # the positive point dragged
        assert len(sent) == 3
        actions = [args[4] for args in sent]  # (volume, view, key, state, action, window, target)
        assert all(isinstance(a, Prompt) and a.box is None for a in actions)
        assert [[positive for _, _, positive in a.clicks] for a in actions] == [[True], [True, False], [True, False]]
        with watcher.paused():  # Clear: all prompts at once, no preview of what is left in between
            positive.RemoveAllControlPoints()
            negative.RemoveAllControlPoints()
        assert len(sent) == 3
    finally:
        watcher.close()
        controller.wait()
        controller.clear_preview()


def test_a_failed_pip_install_reads_as_what_failed_and_where_the_log_is():
    error = subprocess.CalledProcessError(1, ["pip", "install"], output="Collecting timm\nERROR: No matching "
                                          "distribution found for timm>=0.9\n")
    message = str(dependencies._pip_failure("timm", error))
    assert message.startswith("Installing timm failed (pip exit status 1).")
    assert "No matching distribution found for timm>=0.9" in message and "retry" in message
    assert "Python console" in message  # slicer-core has no application log file
    stream = subprocess.CalledProcessError(2, ["pip"], output=object())  # logProcessOutput's stream, not text
    assert "exit status 2" in str(dependencies._pip_failure("sam2", stream))


def test_points_of_the_two_lists_are_each_sent_once_as_clicks_in_3d(scene):
    """Control point IDs are unique within a markups node only: a negative point whose ID equals a positive one's
    is still a new click."""
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    sent: set = set()
    positive.AddControlPoint(1.0, 2.0, 3.0)
    assert [(list(p), q) for p, q in mrml.new_clicks(positive, negative, sent)] == [([1.0, 2.0, 3.0], True)]
    negative.AddControlPoint(4.0, 5.0, 6.0)
    assert negative.GetNthControlPointID(0) == positive.GetNthControlPointID(0)  # the case this is about
    assert [(list(p), q) for p, q in mrml.new_clicks(positive, negative, sent)] == [([4.0, 5.0, 6.0], False)]
    assert mrml.new_clicks(positive, negative, sent) == []


def test_writes_after_a_scene_close_go_through_a_segment_editor_node_and_undo(scene):  # last: clears the scene
    """File → Close Scene (``Clear(0)``) removes nodes without a singleton tag: an editor node given to a write
    may be gone. The write uses the scene's Segment Editor node then (created as the Segment Editor module
    creates it), and stays one undoable step."""
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")  # e.g. the web app's own editor node
    assert ensure_editor_node(scene, editor) is editor
    editing = SegmentEditing(scene)
    scene.Clear(0)
    assert not scene.IsNodePresent(editor)
    node = ensure_editor_node(scene, editor)
    assert scene.IsNodePresent(node) and node.GetSingletonTag() == "SegmentEditor"
    assert ensure_editor_node(scene, None) is node  # one per scene, as the module keeps it
    scene.Clear(0)
    assert ensure_editor_node(scene, None) is node  # a singleton survives the close (its settings reset)

    volume = phantom(scene)
    segmentation = segmentation_on(scene, volume, "same")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "after close")
    assert editing.write(segmentation, segment_id, volume, box(2, 4, 2, 4, 2, 4), editor).count == 8
    assert editing.logic.GetSegmentEditorNode() is node and node.GetSegmentationNode() is segmentation
    editing.undo()
    assert not mrml.segment_array(segmentation, segment_id, volume).any()
    scene.RemoveNode(node)  # even that one gone: a new one
    assert scene.IsNodePresent(ensure_editor_node(scene, None))

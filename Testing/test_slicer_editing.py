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

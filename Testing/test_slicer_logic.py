"""The module's logic against real MRML (the ``slicer-core`` package): Colin27 loaded as a scalar volume node,
markups prompts in RAS, the backend process running LiteMedSAM, segments written through the segment editor
logic with undo. No mocks of MRML: the scene, nodes and logics are Slicer's own."""

from __future__ import annotations

import numpy as np
import pytest

from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.errors import PromptError
from SegmentWithSAMLib.geometry import View, slice_axes
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.state import Kind

from conftest import reoriented_volume

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install -e .[test])")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not Slicer's core", allow_module_level=True)

from SegmentWithSAMSlicerLib import mrml  # noqa: E402
from SegmentWithSAMSlicerLib.logic import PREVIEW_NODE_NAME  # noqa: E402

HIPPOCAMPUS = AAL_STRUCTURES["Hippocampus_L"]
# 2D Dice of the accepted slice vs AAL from a tight ROI: measured 0.59 on Colin27's middle axial slice (the same
# as the core in-process, with the display or the percentile window); the floor leaves room for noise.
DICE_FLOOR = 0.5


def hippocampus_roi(scene, atlas, volume, view="axial"):
    """An ROI around the left hippocampus on its middle slice of ``view``, in RAS, as a user would drag it."""
    axes = slice_axes(volume, view)
    oriented = axes.oriented(atlas.array == HIPPOCAMPUS)
    index = int(np.flatnonzero(oriented.any(axis=(1, 2))).mean())
    rows, cols = np.nonzero(oriented[index])
    corners = volume.to_ras(axes.pixel_to_ijk(index, np.array([[cols.min(), rows.min()], [cols.max(), rows.max()]])))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(*corners.mean(axis=0))
    roi.SetSize(*np.abs(corners[1] - corners[0]))
    return roi, index, oriented[index]


def new_segmentation(scene, volume_node):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


def test_roi_box_preview_and_accept_land_on_the_hippocampus(scene, controller, colin_node, atlas):
    volume = controller.volume(colin_node)
    roi, index, truth = hippocampus_roi(scene, atlas, volume)
    controller.request_preview(colin_node, None, None, roi, "axial")
    controller.wait()
    assert controller.preview_result is not None, controller.status
    assert list(controller.preview_result.changed) == [index]  # the preview's Update: the prompted slice only
    assert scene.GetFirstNodeByName(PREVIEW_NODE_NAME) is not None
    segmentation = new_segmentation(scene, colin_node)
    segment_id = controller.accept(segmentation, None)
    assert scene.GetFirstNodeByName(PREVIEW_NODE_NAME) is None
    mask = mrml.segment_array(segmentation, segment_id, colin_node)
    axes = slice_axes(volume, "axial")
    assert set(np.flatnonzero(axes.oriented(mask).any(axis=(1, 2)))) == {index}
    assert dice(axes.oriented(mask)[index], truth) >= DICE_FLOOR
    assert controller.last_accepted == (segmentation.GetID(), segment_id, View.AXIAL, index)
    assert controller.last_accepted_range is None  # a 2D box: no range across slices

    # A preview made for the segment is a step on its state: on Accept the state keeps the box for propagation
    # from this slice and for clicks: the ROI's box in slice pixels, around the hippocampus.
    controller.request_preview(colin_node, None, None, roi, "axial", segmentation_node=segmentation,
                               segment_id=segment_id)
    controller.wait()
    assert list(controller.preview_result.changed) == [index], controller.status
    assert controller.accept(segmentation, segment_id) == segment_id
    state = controller._remembered[(segmentation.GetID(), segment_id, View.AXIAL)]
    assert state.box is not None and state.box[0] == index
    box = state.box[1]
    rows, cols = np.nonzero(truth)
    assert abs(box[0] - cols.min()) <= 3 and abs(box[3] - rows.max()) <= 3
    assert state.kinds == {index: Kind.KEY} and state.slice_range == (0, axes.num_slices - 1)
    assert np.array_equal(state.masks[index], axes.oriented(mrml.segment_array(segmentation, segment_id,
                                                                               colin_node))[index])


@pytest.mark.parametrize(("perm", "flips"), [((0, 1, 2), (False, True, True)), ((1, 0, 2), (True, False, True))],
                         ids=["LPS", "permuted-flipped"])
def test_reoriented_volume_still_lands_on_the_hippocampus(scene, controller, colin, atlas, perm, flips):
    stored = reoriented_volume(colin, perm, flips)
    stored_atlas = reoriented_volume(atlas, perm, flips)
    node = slicer.util.addVolumeFromArray(stored.array, stored.ijk_to_ras, name="reoriented")
    roi, _, _ = hippocampus_roi(scene, atlas, colin)  # the same RAS box as on the original volume
    controller.request_preview(node, None, None, roi, "axial")
    controller.wait()
    segmentation = new_segmentation(scene, node)
    segment_id = controller.accept(segmentation, "")
    mask = mrml.segment_array(segmentation, segment_id, node)
    axes = slice_axes(stored, "axial")
    index = int(np.flatnonzero(axes.oriented(mask).any(axis=(1, 2)))[0])
    truth = axes.oriented(stored_atlas.array == HIPPOCAMPUS)[index]
    assert dice(axes.oriented(mask)[index], truth) >= DICE_FLOOR


def test_points_in_click_order_and_accept_then_undo_is_bit_identical(scene, controller, colin_node, atlas):
    volume = controller.volume(colin_node)
    _, index, truth = hippocampus_roi(scene, atlas, volume)
    axes = slice_axes(volume, "axial")
    rows, cols = np.nonzero(truth)
    inside = volume.to_ras(axes.pixel_to_ijk(index, [[cols.mean(), rows.mean()]]))[0]
    outside = volume.to_ras(axes.pixel_to_ijk(index, [[cols.max() + 3, rows.mean()]]))[0]
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    positive.AddControlPoint(*inside)
    negative.AddControlPoint(*outside)
    points, labels = mrml.ordered_clicks(positive, negative)
    assert labels.tolist() == [1, 0] and np.allclose(points, [inside, outside])

    segmentation = new_segmentation(scene, colin_node)
    segment_id = controller.ensure_segment(segmentation, None, colin_node)
    existing = np.zeros(colin_node.GetImageData().GetDimensions()[::-1], np.uint8)
    existing[index - 3:index + 4, 100:110, 80:90] = 1  # other slices and the same slice already have voxels
    slicer.util.updateSegmentBinaryLabelmapFromArray(existing, segmentation, segment_id, colin_node)
    before = mrml.segment_array(segmentation, segment_id, colin_node)

    controller.request_preview(colin_node, positive, negative, None, "axial")
    controller.wait()
    assert controller.preview_result is not None, controller.status
    controller.accept(segmentation, segment_id)
    after = mrml.segment_array(segmentation, segment_id, colin_node)
    changed = np.flatnonzero((axes.oriented(after) != axes.oriented(before)).any(axis=(1, 2)))
    assert changed.tolist() == [index]  # only the prompted slice, replaced by the preview
    assert axes.oriented(after)[index].any()
    controller.undo()
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, colin_node), before)


def test_propagation_applies_as_one_undoable_step_and_cancel_changes_nothing(scene, controller, colin_node, atlas):
    volume = controller.volume(colin_node)
    roi, index, _ = hippocampus_roi(scene, atlas, volume)
    controller.request_preview(colin_node, None, None, roi, "axial")
    controller.wait()
    segmentation = new_segmentation(scene, colin_node)
    segment_id = controller.accept(segmentation, None)
    seeded = mrml.segment_array(segmentation, segment_id, colin_node)

    controller.propagate(colin_node, segmentation, segment_id, direction="up", slice_range=(0, index + 20),
                         rules={"min_similarity": None})
    while controller.poll() and controller.progress[0] < 1:  # until the first slice arrives
        pass
    controller.cancel()
    controller.wait()
    assert "cancelled" in controller.status
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, colin_node), seeded)
    assert scene.GetFirstNodeByName(PREVIEW_NODE_NAME) is None

    controller.propagate(colin_node, segmentation, segment_id, "axial", index, "both", (index - 2, index + 2),
                         skip=1)
    controller.wait()
    assert controller.status.startswith("Propagated"), controller.status
    propagated = mrml.segment_array(segmentation, segment_id, colin_node)
    axes = slice_axes(volume, "axial")
    assert set(np.flatnonzero(axes.oriented(propagated).any(axis=(1, 2)))) <= set(range(index - 2, index + 3))
    assert np.array_equal(axes.oriented(propagated)[index], axes.oriented(seeded)[index])
    assert sorted(mrml.propagated_slices(segmentation, segment_id, View.AXIAL)) == \
        [i for i in range(index - 2, index + 3) if i != index and axes.oriented(propagated)[i].any()]
    controller.undo()
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, colin_node), seeded)


def test_repropagation_keeps_edited_slices_and_recomputes_only_beyond(scene, controller, colin_node, atlas):
    volume = controller.volume(colin_node)
    axes = slice_axes(volume, "axial")
    roi, index, _ = hippocampus_roi(scene, atlas, volume)
    controller.request_preview(colin_node, None, None, roi, "axial")
    controller.wait()
    segmentation = new_segmentation(scene, colin_node)
    segment_id = controller.accept(segmentation, None)
    no_stops = {"min_similarity": None, "min_score": None, "max_area_ratio": None, "min_overlap": None}
    controller.propagate(colin_node, segmentation, segment_id, direction="both", slice_range=(index - 3, index + 3),
                         rules=no_stops)
    controller.wait()
    first = mrml.segment_array(segmentation, segment_id, colin_node)
    # The user corrects slice index+1 (a smaller mask), then propagates up from it.
    corrected = first.copy()
    edited = axes.oriented(corrected)[index + 1]
    edited[:] = edited & (np.arange(edited.shape[1]) < np.flatnonzero(edited.any(axis=0)).mean())
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8), segmentation, segment_id, colin_node)
    controller.propagate(colin_node, segmentation, segment_id, "axial", index + 1, "up", (index - 3, index + 3),
                         rules=no_stops)
    controller.wait()
    second = mrml.segment_array(segmentation, segment_id, colin_node)
    for i in range(index - 3, index + 2):  # the other side and the corrected slice itself: untouched
        assert np.array_equal(axes.oriented(second)[i], axes.oriented(corrected)[i]), i
    assert any(not np.array_equal(axes.oriented(second)[i], axes.oriented(first)[i]) for i in (index + 2, index + 3))


def test_bad_inputs_give_clear_errors_and_change_nothing(scene, controller, colin_node, atlas):
    segmentation = new_segmentation(scene, colin_node)
    segment_id = controller.ensure_segment(segmentation, None, colin_node)
    before = mrml.segment_array(segmentation, segment_id, colin_node)
    far = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    far.AddControlPoint(400.0, 0.0, 0.0)
    controller.clear_preview()
    with pytest.raises(PromptError, match="input volume"):
        controller.request_preview(None, far, None, None, "axial")
    with pytest.raises(PromptError, match="outside the volume"):
        controller.request_preview(colin_node, far, None, None, "axial")
    negative_only = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    negative_only.AddControlPoint(0.0, 0.0, 0.0)
    with pytest.raises(PromptError, match="negative points alone"):
        controller.request_preview(colin_node, None, negative_only, None, "axial")
    with pytest.raises(PromptError, match="Nothing to accept"):
        controller.accept(segmentation, segment_id)
    with pytest.raises(PromptError, match="segmentation"):
        controller.ensure_segment(None, None, colin_node)
    with pytest.raises(PromptError, match="empty on axial slice"):
        controller.propagate(colin_node, segmentation, segment_id, "axial", 50)
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, colin_node), before)
    assert scene.GetFirstNodeByName(PREVIEW_NODE_NAME) is None


def test_slice_views_decide_the_plane_and_oblique_views_are_refused(scene, colin_node, controller):
    volume = controller.volume(colin_node)
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    yellow = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Yellow")
    red.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(
        np.array([[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 12.0], [0, 0, 0, 1]])))
    yellow.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(
        np.array([[0, 0, 1, -30.0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])))
    node, view = mrml.view_of_prompts([[5.0, 3.0, 12.0]], [red, yellow], volume)
    assert node is red and view is View.AXIAL
    node, view = mrml.view_of_prompts([[-30.0, 3.0, 12.0]], [red, yellow], volume, prefer=yellow)
    assert node is yellow and view is View.SAGITTAL
    with pytest.raises(PromptError, match="do not lie on the plane"):
        mrml.view_of_prompts([[5.0, 3.0, 40.0]], [red, yellow], volume)
    angle = np.radians(10)
    red.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(np.array(
        [[-1, 0, 0, 0], [0, np.cos(angle), -np.sin(angle), 0], [0, np.sin(angle), np.cos(angle), 12.0], [0, 0, 0, 1]])))
    with pytest.raises(PromptError, match="Red view: .*rotated 10.0°"):
        mrml.view_of_prompts([[5.0, 0.0, 12.0]], [red], volume)


def test_in_app_self_test_workflow_passes_on_slicer_core(scene, controller):
    """The workflow Slicer's SegmentWithSAMTest runs, here against the same real MRML, on the device it names."""
    from SegmentWithSAMSlicerLib.selftest import DICE_FLOOR, run_workflow

    measured = run_workflow(scene, controller, log=lambda message: None, device="cpu")
    assert measured["dice"] >= DICE_FLOOR and measured["propagated_voxels"] > measured["seed_voxels"]
    assert measured["click_changed_slices"] >= 1


def test_a_model_download_runs_in_the_background_after_consent(controller, tmp_path, monkeypatch):
    import hashlib
    from dataclasses import replace

    from SegmentWithSAMLib.models import registry
    from SegmentWithSAMLib.models.catalog import MODELS_ENV

    from conftest import FileServer

    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    assert controller.missing_model("litemedsam") is None
    entry = controller.missing_model("sam_vit_b")
    assert entry is not None and entry.path.parent == tmp_path
    with pytest.raises(PromptError, match="get medsam_vit_b.pth from "):
        controller.missing_model("medsam")
    payload = b"weights" * 300_000
    server = FileServer(payload)
    try:
        controller.start_download(replace(registry()["sam_vit_b"], sha256=hashlib.sha256(payload).hexdigest(),
                                          size=len(payload)), server.url)
        controller.wait(60)
    finally:
        server.close()
    assert controller.status == "sam_vit_b is installed." and entry.path.read_bytes() == payload
    assert controller.missing_model("sam_vit_b") is None

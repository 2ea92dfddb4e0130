"""The 3D flow of the module against real MRML (``slicer-core``) and the real backend: an ROI spanning slices,
previewed for the segment, gives the range of the segment's state for propagation and clicks; a click after
propagation corrects the segment in 3D as a preview, Accept writes it as one undoable step and one undo
restores the segment bit for bit; a click on a segment nobody edited sends only the action to the backend, and
after a hand edit the whole state, with the edited slice the user's."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install -e .[test])")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not Slicer's core", allow_module_level=True)

from test_slicer_logic import HIPPOCAMPUS, hippocampus_roi, new_segmentation  # noqa: E402

from SegmentWithSAMLib.engine import RANGE_RULES  # noqa: E402
from SegmentWithSAMLib.errors import PromptError  # noqa: E402
from SegmentWithSAMLib.geometry import View, Volume, slice_axes  # noqa: E402
from SegmentWithSAMLib.metrics import dice  # noqa: E402
from SegmentWithSAMLib.state import Kind  # noqa: E402
from SegmentWithSAMSlicerLib import mrml  # noqa: E402
from SegmentWithSAMSlicerLib.interactive import state_from_segment  # noqa: E402
from SegmentWithSAMSlicerLib.logic import PREVIEW_NODE_NAME  # noqa: E402

# What a click sends when the backend holds the segment's state: the action and the state's version (a JSON
# header of a few hundred bytes), against a few KB per mask when the state goes whole.
ACTION_ONLY_BYTES = 4096


def accepted_3d_box(scene, controller, colin_node, atlas):
    """The hippocampus ROI made 5 slices thick, previewed for a new segment and accepted: the segment's state
    keeps the ROI's range. Returns the segmentation, the segment ID and the ROI's middle slice."""
    volume = controller.volume(colin_node)
    roi, index, _ = hippocampus_roi(scene, atlas, volume)
    size = list(roi.GetSize())
    roi.SetSize(size[0], size[1], 4.0)  # 1 mm slices: the ROI spans index-2 … index+2
    assert mrml.roi_slice_range(roi, volume, View.AXIAL) == (index - 2, index + 2)
    segmentation = new_segmentation(scene, colin_node)
    segment_id = controller.ensure_segment(segmentation, None, colin_node)
    controller.request_preview(colin_node, None, None, roi, "axial", segmentation_node=segmentation,
                               segment_id=segment_id)
    controller.wait()
    assert controller.preview_result is not None, controller.status
    assert controller.accept(segmentation, segment_id) == segment_id
    return segmentation, segment_id, index


def state_bytes(state) -> int:
    """The bytes of a state's arrays as they go to the backend when it is sent whole (its 5 masks here)."""
    return sum(np.asarray(array).nbytes for array in state.to_message()[1].values())


def remembered(controller, segmentation, segment_id):
    return controller._remembered[(segmentation.GetID(), segment_id, View.AXIAL)]


def test_roi_range_then_a_click_in_3d_is_one_undoable_step(scene, controller, colin_node, atlas):
    volume = controller.volume(colin_node)
    axes = slice_axes(volume, "axial")
    segmentation, segment_id, index = accepted_3d_box(scene, controller, colin_node, atlas)
    assert controller.last_accepted_range == (index - 2, index + 2)
    state = remembered(controller, segmentation, segment_id)  # the 3D box: its range, only empty masks stop
    assert state.slice_range == (index - 2, index + 2) and state.rules == RANGE_RULES and state.box[0] == index
    controller.propagate(colin_node, segmentation, segment_id)  # no range given: the ROI's
    controller.wait()
    assert controller.status.startswith("Propagated"), controller.status
    propagated = mrml.segment_array(segmentation, segment_id, colin_node)
    filled = np.flatnonzero(axes.oriented(propagated).any(axis=(1, 2))).tolist()
    assert filled == list(range(index - 2, index + 3))  # the whole range, nothing past it

    truth = axes.oriented(atlas.array == HIPPOCAMPUS)
    missed = truth[index + 1] & ~axes.oriented(propagated)[index + 1]
    rows, cols = np.nonzero(missed)
    point = volume.to_ras(axes.pixel_to_ijk(index + 1, [[cols[len(cols) // 2], rows[len(rows) // 2]]]))[0]
    with pytest.raises(PromptError, match=r"outside the volume: click inside it"):  # refused at once
        controller.click_3d(colin_node, segmentation, segment_id, [400.0, 0, 0], True)
    assert controller.refinement is None
    # A negative click past the range (the state's, from the 3D box): the engine refuses it, as the step's
    # outcome; the segment and the preview stay as they were.
    far = volume.to_ras(axes.pixel_to_ijk(index + 20, [[90, 100]]))[0]
    handle = controller.click_3d(colin_node, segmentation, segment_id, far, False)
    assert handle is not None
    controller.wait()
    assert handle.state == "failed", handle.state
    assert controller.status.startswith("The 3D click failed:") and "nothing to remove" in controller.status, \
        controller.status
    assert controller.refinement is None
    assert scene.GetFirstNodeByName(PREVIEW_NODE_NAME) is None
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, colin_node), propagated)

    controller.click_3d(colin_node, segmentation, segment_id, point, True)
    controller.wait()
    assert controller.refinement is not None and "Accept writes" in controller.status, controller.status
    assert scene.GetFirstNodeByName(PREVIEW_NODE_NAME) is not None
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, colin_node), propagated)  # preview only
    controller.accept(segmentation, segment_id)
    corrected = mrml.segment_array(segmentation, segment_id, colin_node)
    changed = np.flatnonzero((axes.oriented(corrected) != axes.oriented(propagated)).any(axis=(1, 2))).tolist()
    assert index + 1 in changed and set(changed) <= set(range(index - 2, index + 3)) - {index}
    assert dice(axes.oriented(corrected)[index + 1], truth[index + 1]) > \
        dice(axes.oriented(propagated)[index + 1], truth[index + 1])
    controller.undo()
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, colin_node), propagated)


def test_a_click_sends_only_the_action_until_the_segment_is_edited_by_hand(scene, controller, colin_node, atlas):
    volume = controller.volume(colin_node)
    axes = slice_axes(volume, "axial")
    segmentation, segment_id, index = accepted_3d_box(scene, controller, colin_node, atlas)
    controller.propagate(colin_node, segmentation, segment_id)
    controller.wait()
    assert controller.status.startswith("Propagated"), controller.status
    propagated = mrml.segment_array(segmentation, segment_id, colin_node)
    after_propagation = remembered(controller, segmentation, segment_id)
    assert {i for i, kind in after_propagation.kinds.items() if kind is Kind.ENGINE} == \
        {index - 2, index - 1, index + 1, index + 2}

    # The segment is as the propagation left it: its state is the remembered one itself, which the backend
    # holds under a version, so the click goes out as the action alone.
    truth = axes.oriented(atlas.array == HIPPOCAMPUS)
    missed = truth[index + 1] & ~axes.oriented(propagated)[index + 1]
    rows, cols = np.nonzero(missed)
    point = volume.to_ras(axes.pixel_to_ijk(index + 1, [[cols[len(cols) // 2], rows[len(rows) // 2]]]))[0]
    handle = controller.click_3d(colin_node, segmentation, segment_id, point, True)
    assert controller.refinement.state is after_propagation
    controller.wait()
    assert handle.state == "done", controller.status
    assert 0 < handle.sent <= ACTION_ONLY_BYTES < state_bytes(after_propagation), handle.sent
    controller.accept(segmentation, segment_id)
    clicked = mrml.segment_array(segmentation, segment_id, colin_node)
    assert not np.array_equal(clicked, propagated)

    # The user edits slice index+2 (an engine slice) with another tool: half of its mask erased.
    edited = clicked.copy()
    mask = axes.oriented(edited)[index + 2]
    assert mask.any()
    mask &= np.arange(mask.shape[1]) < np.flatnonzero(mask.any(axis=0)).mean()
    user_slice = mask.copy()
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), segmentation, segment_id, colin_node)
    assert np.array_equal(mrml.segment_array(segmentation, segment_id, colin_node), edited)

    # The next click (next to it, where the segment misses the hippocampus) is a step on a state rebuilt from the
    # segment, which goes whole; the edited slice is the user's and stays as the user left it.
    missed = truth[index + 1] & ~axes.oriented(edited)[index + 1]
    rows, cols = np.nonzero(missed)
    point = volume.to_ras(axes.pixel_to_ijk(index + 1, [[cols[len(cols) // 2], rows[len(rows) // 2]]]))[0]
    handle = controller.click_3d(colin_node, segmentation, segment_id, point, True)
    rebuilt = controller.refinement.state
    assert rebuilt is not remembered(controller, segmentation, segment_id)
    assert rebuilt.kinds[index + 2] is Kind.USER and np.array_equal(rebuilt.masks[index + 2], user_slice)
    controller.wait()
    assert handle.state == "done", controller.status
    assert handle.sent >= state_bytes(rebuilt) > ACTION_ONLY_BYTES, handle.sent  # the state's masks went along
    after = controller.refinement.state
    assert after.kinds[index + 2] is Kind.USER and np.array_equal(after.masks[index + 2], user_slice)
    controller.accept(segmentation, segment_id)
    final = axes.oriented(mrml.segment_array(segmentation, segment_id, colin_node))
    assert np.array_equal(final[index + 2], user_slice)
    assert remembered(controller, segmentation, segment_id).kinds[index + 2] is Kind.USER


@pytest.mark.parametrize("directions", [np.diag([1.0, 1, 1]), np.diag([-1.0, -1, 1]), np.diag([1.0, -1, -1]),
                                        np.array([[0, 0, -1.0], [1, 0, 0], [0, -1, 0]])])
def test_a_segment_matches_its_remembered_state_only_voxel_for_voxel_in_any_orientation(directions):
    """The remembered state is taken back only while the segment is exactly its masks, whichever way the view
    reads the segment's memory (slices are compared forwards, flipped rows or columns included); a voxel off is
    an edit of the user's."""
    rng = np.random.default_rng(3)
    segment = np.zeros((12, 16, 24), bool)  # K, J, I: rows of 16 or 24 voxels, or 12 (not a multiple of 8)
    segment[2:10, 3:13, 4:20] = rng.random((8, 10, 16)) < 0.6
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = directions
    for view in View:
        axes = slice_axes(Volume(segment.astype(np.int16), ijk_to_ras), view)
        oriented = axes.oriented(segment)
        remembered = state_from_segment(oriented, axes, {}, None)
        assert state_from_segment(oriented, axes, {}, remembered) is remembered, view
        edited = segment.copy()
        slice_index = sorted(remembered.masks)[len(remembered.masks) // 2]
        rows, cols = np.nonzero(remembered.masks[slice_index])
        axes.oriented(edited)[slice_index, rows[0], cols[0]] = False
        rebuilt = state_from_segment(axes.oriented(edited), axes, {}, remembered)
        assert rebuilt is not remembered and rebuilt.kinds[slice_index] is Kind.USER, view
        assert np.array_equal(rebuilt.masks[slice_index], axes.oriented(edited)[slice_index]), view
        assert all(rebuilt.masks[i] is remembered.masks[i] for i in remembered.masks if i != slice_index), view

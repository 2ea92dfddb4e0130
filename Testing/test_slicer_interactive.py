"""The 3D flow of the module against real MRML (``slicer-core``) and the real backend: an ROI spanning slices
gives the propagation range, a click after propagation corrects the segment in 3D as a preview, Accept writes it
as one undoable step and one undo restores the segment bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install -e .[test])")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not Slicer's core", allow_module_level=True)

from test_slicer_logic import HIPPOCAMPUS, hippocampus_roi, new_segmentation  # noqa: E402

from SegmentWithSAMLib.errors import PromptError  # noqa: E402
from SegmentWithSAMLib.geometry import View, slice_axes  # noqa: E402
from SegmentWithSAMLib.metrics import dice  # noqa: E402
from SegmentWithSAMSlicerLib import mrml  # noqa: E402
from SegmentWithSAMSlicerLib.logic import PREVIEW_NODE_NAME  # noqa: E402


def test_roi_range_then_a_click_in_3d_is_one_undoable_step(scene, controller, colin_node, atlas):
    volume = controller.volume(colin_node)
    axes = slice_axes(volume, "axial")
    roi, index, _ = hippocampus_roi(scene, atlas, volume)
    size = list(roi.GetSize())
    roi.SetSize(size[0], size[1], 4.0)  # 1 mm slices: the ROI spans index-2 … index+2
    assert mrml.roi_slice_range(roi, volume, View.AXIAL) == (index - 2, index + 2)
    controller.request_preview(colin_node, None, None, roi, "axial")
    controller.wait()
    segmentation = new_segmentation(scene, colin_node)
    segment_id = controller.accept(segmentation, None)
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
    with pytest.raises(PromptError, match="outside Colin27"):
        controller.click_3d(colin_node, segmentation, segment_id, [400.0, 0, 0], True)
    far = volume.to_ras(axes.pixel_to_ijk(index + 20, [[90, 100]]))[0]
    with pytest.raises(PromptError, match="nothing to remove"):
        controller.click_3d(colin_node, segmentation, segment_id, far, False)
    assert controller.refinement is None

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

"""The front-end rules both the desktop panel and the web app follow (``SegmentWithSAMSlicerLib.front_end``) and
their one settings object, on real MRML (``slicer-core``) with a real backend process: which prompts preview and
which correct in 3D, the status line (an error stays until the next action), the propagation range. (The desktop
panel's bindings to the settings: Testing/test_packaging.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from SegmentWithSAMLib.geometry import slice_axes

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install -e .[test])")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not Slicer's core", allow_module_level=True)

from test_slicer_logic import hippocampus_roi, new_segmentation  # noqa: E402

from SegmentWithSAMSlicerLib import mrml  # noqa: E402
from SegmentWithSAMSlicerLib.front_end import FrontEnd, Status, add_prompt_nodes  # noqa: E402
from SegmentWithSAMSlicerLib.settings import Settings, coerce, stop_rules  # noqa: E402


class Host:
    """A front end's host as the web app and the desktop panel are: selected nodes, an axial slice view, and
    the editor a write goes through (the controller's own here)."""

    def __init__(self, scene, volume_node) -> None:
        self.volume_node = volume_node
        self.segmentation_node = new_segmentation(scene, volume_node)
        self.segment_id = ""
        self.prompts = add_prompt_nodes(scene)
        self.red = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")

    def show_axial(self, z: float) -> None:
        self.red.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(
            np.array([[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z], [0, 0, 0, 1.0]])))

    def slice_nodes(self) -> list:
        return [self.red]

    def edit_target(self):
        return None, None


@pytest.fixture
def front(scene, controller, colin_node):
    host = Host(scene, colin_node)
    front = FrontEnd(controller, Settings(model_window="auto"), host)
    yield front
    front.clear_prompts()
    for node in (*host.prompts.values(), host.segmentation_node, host.red):
        scene.RemoveNode(node)


def test_settings_from_a_page_are_checked_and_name_the_field():
    assert coerce("skip", "2") == 2 and coerce("live_preview", 1) is True
    for name, value, message in (("model", "sam9", "must be one of litemedsam"), ("min_score", 1.5, "between 0.0"),
                                 ("skip", "many", "must be a int"), ("colour", 1, "no setting 'colour'")):
        with pytest.raises(ValueError, match=message):
            coerce(name, value)
    rules = stop_rules(Settings(min_score=0.0))
    assert rules["min_score"] is None and rules["min_similarity"] == Settings().min_similarity


def test_an_error_stays_until_the_next_action_and_a_failure_replaces_it(front, controller):
    host = front.host
    host.show_axial(0.0)
    host.prompts["positive"].AddControlPoint(0.0, 0.0, 40.0)  # not on the red view's plane
    front.prompts_changed()
    assert front.status.error and "do not lie on the plane" in front.status.text
    shown = front.status
    controller.status = "Preview: 12 pixels on axial slice 3."  # a background result arrives
    front.poll()
    assert front.status == shown  # the error is not hidden by it
    controller.fail("Propagation failed; the segment is unchanged.")
    front.poll()
    assert front.status == Status("Propagation failed; the segment is unchanged.", True)
    front.act(front.clear_prompts)  # the next action clears it
    assert front.status == Status()
    controller.status = ""


def test_a_box_previews_points_on_a_segment_with_voxels_correct_it_in_3d(front, controller, colin_node, atlas):
    host, volume = front.host, controller.volume(colin_node)
    roi, index, truth = hippocampus_roi(controller.scene, atlas, volume)
    center = [0.0] * 3
    roi.GetCenter(center)
    host.show_axial(center[2])
    host.prompts["box"].SetCenter(*center)
    host.prompts["box"].SetSize(*roi.GetSize())
    controller.scene.RemoveNode(roi)
    front.settings.live_preview = False  # a box previews all the same
    front.prompts_changed()
    controller.wait()
    assert front.poll() is False and controller.preview_result is not None, front.status
    assert list(controller.preview_result.changed) == [index] and not front.status.error
    host.segment_id = front.accept()
    assert mrml.segment_has_mask(host.segmentation_node, host.segment_id, colin_node)
    assert not any(n.GetNumberOfControlPoints() for n in host.prompts.values())  # accept cleared the prompts

    # a point on the segment, which has voxels now: a click in 3D, sent once however often the prompts change
    axes = slice_axes(volume, "axial")
    rows, cols = np.nonzero(truth)
    point = volume.to_ras(axes.pixel_to_ijk(index, np.array([[cols.mean(), rows.mean()]])))[0]
    host.prompts["positive"].AddControlPoint(*point)
    assert front.corrects_in_3d()
    front.prompts_changed()
    front.prompts_changed()
    assert controller.refinement is not None and len(front._sent_clicks) == 1
    controller.wait()
    front.poll()
    assert "3D click" in front.status.text, front.status
    front.act(front.clear_prompts)
    assert controller.refinement is None


def test_the_propagation_range_is_the_panels_then_the_whole_volume_then_the_boxs(front, controller, colin_node):
    count = slice_axes(controller.volume(colin_node), "axial").num_slices
    assert front.propagation_range() is None  # the accepted box's range (the controller keeps it)
    front.all_slices = True
    assert front.propagation_range() == (0, count - 1)
    front.settings.range_start = 20
    assert front.propagation_range() == (20, count - 1)
    front.settings.range_end = 10_000
    assert front.propagation_range() == (20, count - 1)

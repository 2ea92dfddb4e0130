"""The front-end rules both the desktop panel and the web app follow (``SegmentWithSAMSlicerLib.front_end``) and
their one settings object, on real MRML (``slicer-core``) with a real backend process: which prompts preview and
which correct in 3D, the status line (an error stays until the next action), the propagation range, and the
backend: this computer or a real `segmentwithsam serve` process. (The desktop panel's bindings to the
settings: Testing/test_packaging.py.)"""

from __future__ import annotations

import re
from dataclasses import fields

import numpy as np
import pytest

from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.errors import BackendError, PromptError
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.release import RELEASE

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install -e .[test])")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not Slicer's core", allow_module_level=True)

from test_remote import KEY, Server  # noqa: E402
from test_slicer_logic import hippocampus_roi, new_segmentation  # noqa: E402

from SegmentWithSAMSlicerLib import mrml  # noqa: E402
from SegmentWithSAMSlicerLib.front_end import FrontEnd, Status, add_prompt_nodes  # noqa: E402
from SegmentWithSAMSlicerLib.settings import Settings, choice_labels, coerce, device_of, stop_rules  # noqa: E402
from SegmentWithSAMSlicerLib.suggestion_marker import MARKER_NAME  # noqa: E402


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


def place_hippocampus_box(front, atlas) -> tuple[int, np.ndarray]:
    """A box around the left hippocampus on its middle axial slice, placed as a user drags it in the red view;
    returns that slice and the structure on it (2D truth)."""
    host, scene = front.host, front.controller.scene
    roi, index, truth = hippocampus_roi(scene, atlas, front.controller.volume(host.volume_node))
    center = [0.0] * 3
    roi.GetCenter(center)
    host.show_axial(center[2])
    host.prompts["box"].SetCenter(*center)
    host.prompts["box"].SetSize(*roi.GetSize())
    scene.RemoveNode(roi)
    return index, truth


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
    index, truth = place_hippocampus_box(front, atlas)
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


def test_a_suggestion_marks_where_to_click_moves_the_view_and_taking_it_clicks_there(front, controller, colin_node,
                                                                                     atlas):
    host, scene = front.host, controller.scene
    place_hippocampus_box(front, atlas)
    front.prompts_changed()
    settle(front, controller)
    host.segment_id = front.accept()
    front.settings.suggest_next = True
    try:
        assert front.poll() is True and controller.suggestion is not None  # the accepted mask: a new state
        settle(front, controller)
        marker = scene.GetFirstNodeByName(MARKER_NAME)
        panel, found = front.panel(), controller.suggested
        assert marker is not None and marker.GetNumberOfControlPoints() == 1, panel["suggestion"]
        assert panel["can_take_suggestion"] and panel["suggestion"].startswith("Next: a ")
        point = np.array(marker.GetNthControlPointPositionWorld(0))
        assert np.allclose(point, found["ras"]) and marker.GetLocked()
        assert host.red.GetSliceToRAS().GetElement(2, 3) == pytest.approx(point[2])  # the view moved to it
        assert not any(n.GetNumberOfControlPoints() for n in host.prompts.values())  # a marker is no prompt

        front.act(front.take_suggestion)
        placed = host.prompts["positive" if found["hint"] == "add" else "negative"]
        assert placed.GetNumberOfControlPoints() == 1
        assert np.allclose(placed.GetNthControlPointPositionWorld(0), point)
        front.prompts_changed()  # the markups event: the point is a click in 3D, and the suggestion is stale
        assert controller.refinement is not None and scene.GetFirstNodeByName(MARKER_NAME) is None
        assert front.panel()["suggestion"] == ""
        settle(front, controller)  # the click's result, then the next suggestion on the corrected state
        assert "3D click" in front.status.text and controller.suggestion is not None
        settle(front, controller)
        assert controller.suggested is not None and not front.status.error
        front.act(front.clear_prompts)
        assert controller.suggested is None and scene.GetFirstNodeByName(MARKER_NAME) is None
    finally:
        front.settings.suggest_next = False


def test_a_suggestion_needs_a_segment_with_a_mask(front, controller):
    front.host.segment_id = ""
    front.act(front.suggest)
    assert front.status.error and "Select the segment" in front.status.text
    front.act(front.take_suggestion)
    assert front.status.error and "no suggestion" in front.status.text


def place_structure_roi(front, atlas, structure: str, grow_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """An ROI over ``structure``'s voxels (every slice it spans, grown in-plane by ``grow_mm``), centred on its
    middle axial slice as a user drags a 3D box; returns the structure (KJI bool) and its ROI's centre."""
    host, controller = front.host, front.controller
    volume = controller.volume(host.volume_node)
    truth = atlas.array == AAL_STRUCTURES[structure]
    ijk = np.argwhere(truth)[:, ::-1]
    corners = volume.to_ras(np.stack([ijk.min(axis=0) - 0.5, ijk.max(axis=0) + 0.5]))
    low, high = corners.min(axis=0) - [grow_mm, grow_mm, 0], corners.max(axis=0) + [grow_mm, grow_mm, 0]
    axes = slice_axes(volume, "axial")
    middle = int(np.median(np.flatnonzero(axes.oriented(truth).any(axis=(1, 2)))))
    centre = (low + high) / 2
    centre[2] = volume.to_ras(axes.pixel_to_ijk(middle, np.array([[0.0, 0.0]])))[0][2]
    host.show_axial(centre[2])
    size = high - low
    size[2] = 2 * max(centre[2] - low[2], high[2] - centre[2])  # centred on the middle slice, spanning them all
    host.prompts["box"].SetCenter(*centre)
    host.prompts["box"].SetSize(*size)
    return truth, centre


def test_a_finished_segment_stays_put_bit_for_bit_and_undo_restores_the_other_alone(front, controller, colin_node,
                                                                                      atlas):
    host = front.host
    place_structure_roi(front, atlas, "Putamen_L")
    front.prompts_changed()
    settle(front, controller)
    host.segment_id = first = front.accept()
    front.act(front.propagate)
    settle(front, controller)
    assert "Propagated" in front.status.text, front.status
    front.act(lambda: front.set_finished(True))
    assert front.panel()["finished"] and "is finished" in front.status.text
    kept = mrml.segment_array(host.segmentation_node, first, colin_node).copy()
    assert kept.sum() > 1000

    host.segment_id = ""  # a new segment next to it, with a box that overlaps it by 6 mm
    truth, centre = place_structure_roi(front, atlas, "Pallidum_L", grow_mm=6.0)
    front.prompts_changed()
    settle(front, controller)
    host.segment_id = second = front.accept()
    front.act(front.propagate)
    settle(front, controller)
    volume = controller.volume(colin_node)
    into = np.argwhere(kept & ~truth)[:, ::-1]  # (i, j, k)
    near = into[np.argmin(np.linalg.norm(into - volume.to_ijk(centre[None])[0], axis=1))]
    host.prompts["positive"].AddControlPoint(*volume.to_ras(near[None].astype(float))[0])
    front.prompts_changed()  # a positive click inside the finished segment: it may not take it
    settle(front, controller)
    front.accept()
    steps = mrml.segment_array(host.segmentation_node, second, colin_node)
    assert steps.any() and not (steps & kept).any()  # the second has no voxel inside the first
    assert np.array_equal(mrml.segment_array(host.segmentation_node, first, colin_node), kept)  # bit for bit
    for _ in range(3):  # the click (if it wrote anything), the propagation, the accept: undone one by one
        if not mrml.segment_array(host.segmentation_node, second, colin_node).any():
            break
        controller.undo()
        assert np.array_equal(mrml.segment_array(host.segmentation_node, first, colin_node), kept)
    assert not mrml.segment_array(host.segmentation_node, second, colin_node).any()
    front.act(lambda: front.set_finished(False))
    assert not front.panel()["finished"]


def test_a_lasso_starts_a_segment_and_a_scribble_corrects_it_each_sent_when_placed(front, controller, colin_node,
                                                                                   atlas):
    from SegmentWithSAMLib.strokes import fill_lasso

    host = front.host
    volume = controller.volume(colin_node)
    axes = slice_axes(volume, "axial")
    oriented = axes.oriented(atlas.array == AAL_STRUCTURES["Thalamus_L"])
    index = int(np.median(np.flatnonzero(oriented.any(axis=(1, 2)))))
    rows, cols = np.nonzero(oriented[index])
    corners = np.array([[cols.min(), rows.min()], [cols.max(), rows.min()], [cols.max(), rows.max()],
                        [cols.min(), rows.max()]], float)
    outline = volume.to_ras(axes.pixel_to_ijk(index, corners))
    host.show_axial(outline[0][2])
    host.segment_id = ""
    for point in outline:  # a lasso as a closed curve is placed: its points, then the user stops placing
        host.prompts["lasso"].AddControlPoint(*point)
    host.segment_id = front.act(front.send_strokes)
    assert host.segment_id and host.prompts["lasso"].GetNumberOfControlPoints() == 0, front.status
    settle(front, controller)
    assert front.panel()["can_accept"] and "3D click" in front.status.text, front.status
    front.act(front.accept)
    segment = axes.oriented(mrml.segment_array(host.segmentation_node, host.segment_id, colin_node))
    inside = fill_lasso(corners, axes.image_shape)
    assert segment[index].any() and np.flatnonzero(segment.any(axis=(1, 2))).tolist() == [index]
    assert (segment[index] & ~inside).sum() <= 0.1 * segment[index].sum()  # the outline

    rows, cols = np.nonzero(segment[index])  # a negative scribble across the middle of that slice
    stroke = volume.to_ras(axes.pixel_to_ijk(index, np.array([[cols.min(), rows.mean()], [cols.max(), rows.mean()]])))
    for point in stroke:
        host.prompts["negative_scribble"].AddControlPoint(*point)
    front.act(front.send_strokes)
    settle(front, controller)
    front.act(front.accept)
    after = axes.oriented(mrml.segment_array(host.segmentation_node, host.segment_id, colin_node))
    assert after[index].sum() < segment[index].sum() and not front.status.error, front.status
    row = int(round(rows.mean()))
    assert not after[index, row, int(cols.mean())]  # the stroke's middle is gone
    host.prompts["lasso"].AddControlPoint(*outline[0])  # too few points: refused, nothing changes, node emptied
    front.act(front.send_strokes)
    assert front.status.error and "at least 3" in front.status.text
    assert np.array_equal(axes.oriented(mrml.segment_array(host.segmentation_node, host.segment_id, colin_node)),
                          after) and host.prompts["lasso"].GetNumberOfControlPoints() == 0


def test_the_propagation_range_is_the_panels_then_the_whole_volume_then_the_boxs(front, controller, colin_node):
    count = slice_axes(controller.volume(colin_node), "axial").num_slices
    assert front.propagation_range() is None  # the accepted box's range (the controller keeps it)
    front.all_slices = True
    assert front.propagation_range() == (0, count - 1)
    front.settings.range_start = 20
    assert front.propagation_range() == (20, count - 1)
    front.settings.range_end = 10_000
    assert front.propagation_range() == (20, count - 1)
    front.host.volume_node = None  # the panel polls with a range set and no volume: it shows none, raises nothing
    with pytest.raises(PromptError, match="Select a volume"):
        front.propagation_range()
    assert front.shown_range() is None and front.panel()["range"] is None


# ---- the backend: this computer or a server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `segmentwithsam serve` process on 127.0.0.1 for the module: the server a desktop reaches through an SSH
    tunnel. (Over TLS, Testing/test_remote.py; here the certificate part is the CA file's checks.)"""
    folder = tmp_path_factory.mktemp("backend")
    served = Server(folder)
    yield served.address
    served.close()


def settle(front, controller) -> None:
    """Wait for what the backend (or the connection test) sends, then poll once as the panel's timer does."""
    controller.wait(300)
    front.poll()


def test_the_backend_is_a_setting_shown_with_labels_and_the_key_is_none(front, tmp_path):
    assert Settings().backend == "local" and choice_labels("backend") == ["this computer", "a server"]
    assert choice_labels("direction") == ["both", "up", "down"]  # a choice without labels shows its value
    assert not any("key" in f.name for f in fields(Settings))  # settings go into the scene file; the key must not
    with pytest.raises(ValueError, match="must be one of local, server"):
        coerce("backend", "this computer")
    panel = front.panel()
    assert panel["server"] is False and panel["can_test_connection"] is False
    front.settings.backend = "server"
    panel = front.panel()
    assert panel["server"] is True and panel["can_test_connection"] is True
    choice = front.controller.backend
    assert choice.chosen("local", "not an address") is None  # the server's fields matter only for a server
    choice.key, certificate = KEY, tmp_path / "server.pem"
    certificate.write_text("-----BEGIN CERTIFICATE-----\n")
    chosen = choice.chosen("server", " tls://gpu-host:8765 ", str(certificate))
    assert (chosen.address, chosen.cafile) == ("tls://gpu-host:8765", str(certificate)) and KEY not in repr(chosen)
    with pytest.raises(BackendError, match="one of local, server"):
        choice.chosen("elsewhere")


def test_a_server_previews_tests_refuses_bad_input_and_this_computer_takes_over_again(front, controller, colin_node,
                                                                                       atlas, server):
    """Settings on a server (address, key): a box previews through it and is accepted; the connection test says
    what it serves; a wrong key, a malformed or empty address, no key or a missing CA file are red errors that
    change nothing; back on this computer, the same box gives the server's mask."""
    s, host = front.settings, front.host
    local = controller.engine(s.model, device_of(s))  # this computer's backend, as the tests before used it
    s.backend, s.server_address = "server", server
    controller.backend.key = KEY
    index, _ = place_hippocampus_box(front, atlas)
    front.prompts_changed()
    settle(front, controller)
    remote = controller.client
    assert str(remote.address) == server and controller.preview_result is not None, front.status
    assert list(controller.preview_result.changed) == [index] and front.status.text.startswith("Preview:")
    assert remote.wait(remote.status(), 60)["volumes"] == [controller.volume(colin_node).identity]  # it went there
    with pytest.raises(BackendError, match="closed"):
        local.status()  # switching closed this computer's backend
    served = controller.preview_result.changed[index].copy()
    host.segment_id = front.accept()
    segment = mrml.segment_array(host.segmentation_node, host.segment_id, colin_node)
    assert segment.any()

    front.act(front.test_connection)  # in the background: the status says so at once
    assert front.status == Status(f"Testing the connection to {server}…")
    assert front.panel()["can_test_connection"] is False
    settle(front, controller)
    pattern = (rf"Connected to {re.escape(server)}: SegmentWithSAM {re.escape(RELEASE)}, litemedsam on cpu, "
               r"round trip \d+\.\d ms\.")
    assert re.fullmatch(pattern, front.status.text) and not front.status.error, front.status
    assert controller.client is remote  # the test has a connection of its own

    controller.backend.key = "not-the-key-at-all"
    front.act(front.test_connection)
    settle(front, controller)
    assert front.status.error and "Wrong or missing key" in front.status.text, front.status
    place_hippocampus_box(front, atlas)  # Accept cleared the prompts
    front.prompts_changed()
    settle(front, controller)
    # The status names the refusal, or, when the client's writer hits the connection the server closed (while it
    # sends the volume) before its reader hands over the refusal, the broken connection: a race in the client.
    assert front.status.error and "Nothing from this request was applied" in front.status.text, front.status
    assert controller.preview is None and controller.client is not remote  # the session with the key was closed
    refused = controller.client
    unchanged = mrml.segment_array(host.segmentation_node, host.segment_id, colin_node)
    assert np.array_equal(unchanged, segment)

    chosen = controller.backend.server
    for given, key, cafile, message in ((server.replace("tcp://", ""), KEY, "", "tcp://HOST:PORT or tls://HOST:PORT"),
                                        ("", KEY, "", "Enter the server's address"),
                                        (server, " ", "", "Enter the server's access key"),
                                        (server, KEY, "/no/such/ca.pem", "does not exist")):
        s.server_address, s.server_cafile, controller.backend.key = given, cafile, key
        front.prompts_changed()
        assert front.status.error and message in front.status.text, (given, front.status)
        assert controller.client is refused and controller.backend.server == chosen and controller.preview is None
        front.act(front.test_connection)  # the connection test checks the same, at once
        assert front.status.error and message in front.status.text and not controller.backend.testing

    s.backend = "local"  # the server's fields no longer matter, wrong as they are
    host.segment_id = ""  # a preview on no segment, as the first one was
    front.prompts_changed()
    settle(front, controller)
    assert controller.client.address is None and controller.preview_result is not None, front.status
    with pytest.raises(BackendError, match="closed"):
        refused.status()
    assert np.array_equal(controller.preview_result.changed[index], served)  # the same model on the same CPU


def test_a_cleared_box_is_placed_with_two_clicks_again():
    """Slicer keeps a placed ROI at one control point; a cleared box prompt (Clear, Accept, a new box in the web
    app) must take two clicks again, or its next placement ends at the first with an empty box."""
    scene = slicer.vtkMRMLScene()
    box = add_prompt_nodes(scene)["box"]
    box.AddControlPoint(0.0, 0.0, 0.0)  # the two corners, as dragging it in a view places them
    box.AddControlPoint(10.0, 20.0, 0.0)
    mrml.empty_prompt(box)
    assert box.GetNumberOfControlPoints() == 0
    box.AddControlPoint(5.0, 5.0, 0.0)
    assert not box.GetControlPointPlacementComplete()
    box.AddControlPoint(15.0, 25.0, 0.0)
    assert box.GetControlPointPlacementComplete() and np.allclose(box.GetSize()[:2], (10.0, 20.0))


def test_new_prompt_nodes_and_the_suggestion_marker_leave_the_node_being_placed():
    """The markups logic makes each new markups node the one placed into; ours must not take the user's clicks."""
    from SegmentWithSAMSlicerLib import suggestion_marker

    scene = slicer.vtkMRMLScene()
    selection = slicer.vtkMRMLSelectionNode()
    scene.AddNode(selection)
    markups = slicer.vtkSlicerMarkupsLogic()
    markups.SetMRMLScene(scene)
    try:
        placing = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "the user's points")
        assert selection.GetActivePlaceNodeID() == placing.GetID()  # as Slicer does for any new markups node
        assert len(add_prompt_nodes(scene)) == 7
        again = add_prompt_nodes(scene, ["box"])  # the one the user deleted, made again: no duplicates of the others
        assert list(again) == ["box"] and scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == 2
        marker = suggestion_marker.show(scene, (1.0, 2.0, 3.0), "add")
        assert marker.GetNumberOfControlPoints() == 1
        assert selection.GetActivePlaceNodeID() == placing.GetID()
        assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsFiducialNode"
    finally:  # the logic lets go of the scene before either is freed
        markups.SetMRMLScene(None)
        scene.Clear(True)

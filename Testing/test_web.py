"""The web app in a real browser: Debian's Chromium driven by Selenium (headless), real mouse events on the
views that Slicer renders on the server, and every outcome checked on the server's scene.

One app (on a free loopback port, with an access key) and one browser serve the whole module, but no test
continues from another: each starts from the same state (the ``page`` fixture: Colin27 loaded afresh, an empty
segment, no prompts, an empty undo stack, the page's choices at their defaults, the page loaded again), and one
that needs an accepted box on the hippocampus gets it through the app's own calls (``accepted_box``), so each
runs alone. Covered: first frame (the slice planes in 3D), box → preview (Dice against AAL at least the CLI's for
the same box), accept/undo/redo, cancelled and completed propagation (the 3D view centred on the segment), no
control cut off at 1280 × 760 or 1920 × 1080, a click in the coronal view, save/reload/download, refused uploads
and keys, and a backend killed while propagating. Each waits for what the page or the app shows, not for a set
time. A screenshot of each step goes to ``.pytest_cache/web-screenshots``. (The server's own refusals: no key,
another site's page, a foreign Host, no TLS off loopback: ``test_web_security.py``.)
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import distance_transform_edt

from SegmentWithSAMLib.cli import main as cli
from SegmentWithSAMLib.data import AAL_STRUCTURES, colin27
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.io import read_volume
from SegmentWithSAMLib.metrics import dice

from conftest import structure_box_ras

pytest.importorskip("trame_slicer", reason="needs the web extra (pip install -e .[web])")
pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e .[test])")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh --dev installs them)",
                allow_module_level=True)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from SegmentWithSAMSlicerLib import mrml  # noqa: E402
from SegmentWithSAMSlicerLib.settings import Settings  # noqa: E402
from SegmentWithSAMSlicerLib.suggestion_marker import MARKER_NAME  # noqa: E402
from SegmentWithSAMWeb.app import WebOptions  # noqa: E402
from SegmentWithSAMWeb.browser import Page, chromium, show_slice  # noqa: E402
from SegmentWithSAMWeb.embedded import EmbeddedApp  # noqa: E402

KEY = "test-key-1234"
SHOTS = Path(__file__).resolve().parents[1] / ".pytest_cache" / "web-screenshots"
HIPPOCAMPUS = AAL_STRUCTURES["Hippocampus_L"]
MAX_UPLOAD_MB = 20
PAGE_SETTINGS = ("auto_accept", "direction", "skip", "model_window")  # the settings the page's controls change


def _segment(app) -> np.ndarray:
    workflow = app.workflow
    return mrml.segment_array(workflow.segmentation_node, workflow.editor.active_segment_id, workflow.volume_node)


def _wait_enabled(page, element_id: str, timeout: float = 30.0) -> None:
    """Wait until the page has enabled a button (it follows the server within a poll or so)."""
    deadline = time.monotonic() + timeout
    while not page.by_id(element_id).is_enabled():
        if time.monotonic() > deadline:
            app = page.running.app  # what the server's side shows and holds, to tell a page lagging from a state
            shown = page.running.call(lambda app=app: (app.workflow.snapshot(), app.state.sam))
            raise AssertionError(f"{element_id} is still disabled after {timeout:g} s; the page's status line: "
                                 f"{page.by_id('swsam-message').text!r}; the server's snapshot and state: {shown}")
        time.sleep(0.05)


def _segment_on_screen(app, volume) -> tuple[np.ndarray, tuple[int, int]]:
    """The corners of the active segment's voxel box (RAS, from its KJI mask on ``volume``'s grid) where the 3D
    view's camera puts them: (8, 2) pixels, and the view's width and height."""
    import vtk

    mask = _segment(app)
    ranges = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in (2, 1, 0)]
    corners = volume.to_ras(np.array(list(itertools.product(*[(r[0] - 0.5, r[-1] + 0.5) for r in ranges]))))
    view = app.slicer_app.view_manager.get_threed_views()[0]
    coordinate = vtk.vtkCoordinate()
    coordinate.SetCoordinateSystemToWorld()
    pixels = []
    for corner in corners:
        coordinate.SetValue(*corner)
        pixels.append(coordinate.GetComputedDoubleDisplayValue(view.renderer()))
    return np.array(pixels), tuple(view.render_window().GetSize())


def _off_background(image) -> float:
    """The fraction of a view's <img> that differs from its background (a gradient from top to bottom: each
    row's colour at its left edge)."""
    pixels = np.asarray(Image.open(io.BytesIO(image.screenshot_as_png)).convert("L"), dtype=float)
    return float((np.abs(pixels - pixels[:, :1]) > 30).mean())


def _segment_rows(page, count: int, timeout: float = 30.0) -> list:
    """The segment list's rows once the page shows ``count`` of them (it follows the server's list)."""
    deadline = time.monotonic() + timeout
    while len(rows := page.driver.find_elements(By.CSS_SELECTOR, "#swsam-segments .v-list-item")) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the page lists {len(rows)} segments, not {count}")
        time.sleep(0.05)
    return rows


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("web-data")


@pytest.fixture(scope="module")
def running(data_folder, engine_cache):
    if colin27().shipped:
        pytest.skip("needs Debian's mricron-data package (Colin27 and AAL)")
    app = EmbeddedApp(WebOptions(host="127.0.0.1", port=0, key=KEY, data=str(data_folder),
                                max_upload_mb=MAX_UPLOAD_MB, device="cpu"))
    yield app
    app.close()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("web-downloads")


@pytest.fixture(scope="module")
def browser(running, downloads):
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    with chromium(downloads) as driver:
        yield Page(driver, running, SHOTS)


def _start_afresh(running, browser: Page, volume) -> Page:
    """The state every test starts from: ``volume`` loaded afresh as "Colin27" (None: no volume), which also
    drops the last test's segmentation, prompts, preview, undo steps and any work in the backend; the page's
    settings and choices at their defaults; then the page loaded again and showing the views."""
    app = running.app
    defaults = Settings()

    def reset() -> None:
        workflow = app.workflow
        if volume is None:
            workflow.close_volume()
            workflow.front.begin()  # no status line left from the last test
        else:
            workflow.load_volume(volume, "Colin27")
        with app.state:
            app.state.update({**{name: getattr(defaults, name) for name in PAGE_SETTINGS}, "place_kind": None,
                              "display_window": "volume", "data_choice": None, "upload_refused": "",
                              "save_name": "Colin27-segment.seg.nrrd" if volume is not None else ""})
        app.push()

    running.call(reset)
    browser.driver.get(app.url)
    browser.wait_text("swsam-volume", "Colin27" if volume is not None else "No volume")
    browser.wait_for_frames()
    return browser


@pytest.fixture
def page(running, browser, colin):
    return _start_afresh(running, browser, colin)


@pytest.fixture
def empty_page(running, browser):
    return _start_afresh(running, browser, None)


@pytest.fixture(scope="module")
def hippocampus(colin, atlas):
    """The hippocampus's middle axial slice, the tight box around it there (2 RAS corners) and its truth."""
    axes = slice_axes(colin, "axial")
    index, corners = structure_box_ras(colin, atlas, axes, "Hippocampus_L")
    return index, corners, axes.oriented(atlas.array == HIPPOCAMPUS)


def accepted_box(running, page, corners: np.ndarray, depth_mm: float | None = None) -> np.ndarray:
    """What a user's box around ``corners`` (2 RAS corners on an axial slice) and Accept leave, made through
    the app's own calls: the box node as two clicks in the axial view place it (as deep as its shorter side,
    unless ``depth_mm`` is given: the slices propagation and 3D clicks stay in), its preview, then the page's
    Accept. Returns the segment (KJI); the page shows Propagate enabled."""
    app = running.app

    def place() -> None:
        show_slice(app, "Red", corners[0])
        size = np.abs(corners[1] - corners[0])
        size[size == 0] = depth_mm or size[size > 0].min()
        app.workflow.prompts["box"].SetCenter(*corners.mean(axis=0))
        app.workflow.prompts["box"].SetSize(*size)

    running.call(place)
    running.until(lambda: app.workflow.controller.preview_result, 180, "the preview")
    running.call(app.accept)
    _wait_enabled(page, "swsam-propagate")
    return running.call(lambda: _segment(app))


def test_page_shows_the_first_frame_of_colin27(running, empty_page):
    page = empty_page
    assert "secret=" not in page.driver.current_url  # the page takes the key out of the address bar
    page.click("swsam-sample")
    page.wait_text("swsam-volume", "Colin27")
    page.wait_text("swsam-message", "Loaded Colin27")
    app = running.app
    assert running.call(lambda: [v.is_visible_in_3d() for v in app.slicer_app.view_manager.get_slice_views()]) \
        == [True] * 3
    deadline = time.monotonic() + 30  # the 3D view shows the slice planes: no longer a plain grey gradient
    while (shown := _off_background(page.view_image("ThreeD"))) < 0.05 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert shown >= 0.05, shown
    own = running.call(lambda: mrml.display_window(app.workflow.volume_node))
    page.choose("swsam-display-window", "brain")  # a CT preset, then the volume's own window again
    running.until(lambda: mrml.display_window(app.workflow.volume_node) == (100.0, 50.0), what="the preset")
    page.choose("swsam-display-window", "volume")
    running.until(lambda: mrml.display_window(app.workflow.volume_node) == own, what="the volume's own window")
    page.shot("colin27")


def test_a_box_on_the_hippocampus_previews_at_least_as_well_as_the_cli(running, page, hippocampus, tmp_path):
    index, corners, truth = hippocampus
    app = running.app
    running.call(lambda: show_slice(app, "Red", corners[0]))
    page.click("swsam-box")
    running.until(lambda: app.workflow.placing == "box", what="box mode")
    page.click_ras("Red", corners[0], corners[1])
    result = running.until(lambda: app.workflow.controller.preview_result, 180, "the preview")  # its Update
    view = running.call(lambda: app.workflow.controller.preview.view)
    page.wait_text("swsam-message", "Preview:")
    page.shot("box-preview")
    (preview_index, mask2d), = result.changed.items()
    assert view.value == "axial" and preview_index == index
    web_dice = dice(mask2d, truth[index])
    box = running.call(lambda: mrml.roi_box(app.workflow.prompts["box"], app.workflow.controller.volume(
        app.workflow.volume_node), view))
    width, level = running.call(lambda: mrml.display_window(app.workflow.volume_node))
    out = tmp_path / "cli.nii.gz"
    assert cli(["segment", str(colin27().image), "--view", "axial", "--box", ",".join(f"{v:.4f}" for v in box.ravel()),
                "--window", f"{width},{level}", "--device", "cpu", "--out", str(out), "--json"]) == 0
    cli_mask = slice_axes(read_volume(out), "axial").oriented(read_volume(out).array > 0)[index]
    cli_dice = dice(cli_mask, truth[index])
    assert web_dice >= cli_dice - 0.01 and web_dice > 0.5, (web_dice, cli_dice)
    # A second box takes two clicks again (a placed ROI keeps one required control point: mrml.empty_prompt)
    page.click("swsam-box")
    running.until(lambda: app.workflow.placing == "box", what="box mode again")
    wider = corners + np.array([[-2.0, -2.0, 0.0], [2.0, 2.0, 0.0]]) * np.sign(corners[1] - corners[0])
    page.click_ras("Red", wider[0], wider[1])
    again = running.call(lambda: mrml.roi_box(app.workflow.prompts["box"], app.workflow.controller.volume(
        app.workflow.volume_node), view))
    assert again is not None and np.all(np.ptp(again, axis=0)[:2] > np.ptp(box, axis=0)[:2] + 2), (box, again)


def test_accept_undo_redo_restore_the_segment_bit_for_bit(running, page, hippocampus):
    index, corners, _ = hippocampus
    app = running.app
    empty = running.call(lambda: _segment(app))
    running.call(lambda: show_slice(app, "Red", corners[0]))
    page.click("swsam-box")
    running.until(lambda: app.workflow.placing == "box", what="box mode")
    page.click_ras("Red", corners[0], corners[1])
    running.until(lambda: app.workflow.controller.preview_result, 180, "the preview")
    _wait_enabled(page, "swsam-accept")
    page.click("swsam-accept")
    running.until(lambda: _segment(app).any(), what="the accept")
    accepted = running.call(lambda: _segment(app))
    axes = slice_axes(running.call(lambda: app.workflow.controller.volume(app.workflow.volume_node)), "axial")
    assert set(np.flatnonzero(axes.oriented(accepted).any(axis=(1, 2)))) == {index}
    page.shot("accepted")
    _wait_enabled(page, "swsam-undo")
    page.click("swsam-undo")
    running.until(lambda: not _segment(app).any(), what="the undo")
    assert np.array_equal(running.call(lambda: _segment(app)), empty)
    _wait_enabled(page, "swsam-redo")
    page.click("swsam-redo")
    running.until(lambda: _segment(app).any(), what="the redo")
    assert np.array_equal(running.call(lambda: _segment(app)), accepted)
    page.shot("redone")


def test_suggest_marks_where_to_click_and_click_there_corrects_in_3d(running, page, hippocampus):
    app = running.app
    accepted_box(running, page, hippocampus[1], depth_mm=6.0)
    page.click("swsam-suggest")
    page.wait_text("swsam-suggestion", "Next: a ")
    marker = running.call(lambda: app.workflow.scene.GetFirstNodeByName(MARKER_NAME).GetNumberOfControlPoints())
    assert marker == 1
    page.shot("suggestion")
    _wait_enabled(page, "swsam-take-suggestion")
    page.click("swsam-take-suggestion")
    page.wait_text("swsam-message", "3D click")
    assert running.call(lambda: app.workflow.scene.GetFirstNodeByName(MARKER_NAME)) is None  # the click made it stale
    running.call(app.clear_prompts)


def test_a_lasso_drawn_with_the_mouse_in_the_axial_view_segments_its_outline(running, page, hippocampus):
    from SegmentWithSAMLib.strokes import fill_lasso

    index, corners, truth = hippocampus
    app = running.app
    running.call(lambda: show_slice(app, "Red", corners[0]))
    rows, cols = np.nonzero(truth[index])
    centre, radius = np.array([cols.mean(), rows.mean()]), 0.5 * max(np.ptp(cols), np.ptp(rows)) + 2
    angles = np.linspace(0, 2 * np.pi, 9)[:-1]
    outline = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # an octagon around it
    axes = running.call(lambda: slice_axes(app.workflow.controller.volume(app.workflow.volume_node), "axial"))
    volume = running.call(lambda: app.workflow.controller.volume(app.workflow.volume_node))
    page.click("swsam-lasso")
    running.until(lambda: app.workflow.placing == "lasso", what="lasso mode")
    page.click_ras("Red", *volume.to_ras(axes.pixel_to_ijk(index, outline)), settle=0.2)
    page.click("swsam-lasso")  # stop placing: the lasso is sent
    running.until(lambda: app.workflow.controller.refinement is not None and
                  app.workflow.controller.refinement.update is not None, 180, "the lasso's preview")
    _wait_enabled(page, "swsam-accept")
    page.click("swsam-accept")
    running.until(lambda: _segment(app).any(), what="the accept")
    segment = axes.oriented(running.call(lambda: _segment(app)))
    inside = fill_lasso(outline, axes.image_shape)
    assert np.flatnonzero(segment.any(axis=(1, 2))).tolist() == [index]
    assert (segment[index] & inside).sum() >= 0.8 * segment[index].sum() and segment[index].sum() > 50
    page.shot("lasso")


def test_a_cancelled_propagation_changes_nothing(running, page, hippocampus):
    app = running.app
    before = accepted_box(running, page, hippocampus[1])
    steps = running.call(lambda: app.workflow.undo_stack.index())
    page.click("swsam-propagate")
    running.until(lambda: app.workflow.controller.propagation is not None, what="the propagation to start")
    _wait_enabled(page, "swsam-cancel")
    page.click("swsam-cancel")
    running.until(lambda: app.workflow.controller.propagation is None, what="the cancel")
    page.wait_text("swsam-message", "cancelled")
    page.shot("cancelled")
    assert np.array_equal(running.call(lambda: _segment(app)), before)
    assert running.call(lambda: app.workflow.undo_stack.index()) == steps


def test_a_propagation_to_the_end_is_one_undo_step(running, page, hippocampus, colin):
    index, corners, truth = hippocampus
    app = running.app
    seeded = accepted_box(running, page, corners)
    steps = running.call(lambda: app.workflow.undo_stack.index())
    page.choose("swsam-direction", "up")  # within the box's extent across slices, one way: a short range
    running.until(lambda: app.workflow.settings.direction == "up", what="the direction")
    page.click("swsam-propagate")
    running.until(lambda: app.workflow.controller.propagation is not None, what="the propagation to start")
    running.until(lambda: app.workflow.controller.propagation is None, 300, "the propagation to end")
    propagated = running.call(lambda: _segment(app))
    page.wait_text("swsam-message", "Propagated")
    centre = colin.to_ras(np.argwhere(propagated).mean(axis=0)[::-1])[0]
    for tag in ("Green", "Yellow"):  # the other slice views through the hippocampus, for the screenshot
        running.call(lambda t=tag: show_slice(app, t, centre))
    # the write centred the 3D view on the segment: all of it in sight, neither a speck nor filling the view
    corners, (width, height) = running.call(lambda: _segment_on_screen(app, colin))
    assert np.all((corners >= 0) & (corners <= (width, height))), (corners, width, height)
    spans = np.ptp(corners, axis=0) / (width, height)
    assert 0.05 <= spans.max() <= 0.8, spans
    ActionChains(page.driver).move_to_element(page.by_id("swsam-volume")).perform()
    page.wait_text("swsam-backend", "ready")
    page.shot("propagated")  # README's Resources/Screenshots/web.png
    assert running.call(lambda: app.workflow.undo_stack.index()) == steps + 1
    axes = slice_axes(running.call(lambda: app.workflow.controller.volume(app.workflow.volume_node)), "axial")
    first, last = running.call(app.workflow.front.shown_range)
    slices = np.flatnonzero(axes.oriented(propagated).any(axis=(1, 2)))
    assert first < index == slices.min() and index + 3 < slices.max() <= last
    # Dice over the slices done (benchmarks/propagation.py: 0.195 over the whole hippocampus, axial)
    done = slice(slices.min(), slices.max() + 1)
    assert dice(axes.oriented(propagated)[done], truth[done]) > 0.5
    page.click("swsam-undo")
    running.until(lambda: np.array_equal(_segment(app), seeded), what="the undo of the propagation")
    _wait_enabled(page, "swsam-redo")
    page.click("swsam-redo")
    running.until(lambda: np.array_equal(_segment(app), propagated), what="the redo of the propagation")


def test_no_control_is_cut_off_at_1280x760_or_1920x1080(running, page, hippocampus):
    """Every button, select, text field, checkbox, chip and slider lies whole within its area (the side drawer,
    the toolbar, the views) and the page's width, and no label is cut short; the drawer may scroll vertically
    (at 760 px it does), so only its width counts there. Checked after an Accept, with every part shown."""
    accepted_box(running, page, hippocampus[1])
    original = page.driver.execute_script("return [innerWidth, innerHeight]")
    try:
        for width, height in ((1280, 760), (1920, 1080)):
            page.set_viewport(width, height)
            page.wait_for_view_sizes()
            assert page.clipped_controls() == [], (width, height)
            page.shot(f"layout-{width}x{height}")
    finally:
        page.set_viewport(*original)
        page.wait_for_view_sizes()


def test_killing_the_backend_mid_propagation_leaves_the_segment_and_the_page(running, page, hippocampus, colin):
    index, corners, truth = hippocampus
    app = running.app
    before = accepted_box(running, page, corners, depth_mm=3.0)  # the 3D click below: 3 slices on a new backend
    steps = running.call(lambda: app.workflow.undo_stack.index())
    page.click("swsam-all-slices")  # beyond the box, down to where the hippocampus ends
    page.choose("swsam-direction", "down")
    running.until(lambda: app.workflow.settings.direction == "down" and app.workflow.front.all_slices,
                  what="the direction and range")
    page.click("swsam-propagate")
    running.until(lambda: (p := app.workflow.controller.progress) is not None and p[0] > 0, 300,
                  "the first propagated slice")
    os.kill(running.call(lambda: app.workflow.controller.client.pid), signal.SIGKILL)
    running.until(lambda: app.workflow.controller.propagation is None, 60, "the failed propagation")
    message = page.wait_text("swsam-message", "unchanged")
    page.shot("backend-killed")
    assert "failed" in message
    assert np.array_equal(running.call(lambda: _segment(app)), before)
    assert running.call(lambda: app.workflow.undo_stack.index()) == steps
    page.wait_text("swsam-backend", "next request starts a fresh backend")
    axes = slice_axes(colin, "axial")
    rows, cols = np.nonzero(truth[index])
    point = colin.to_ras(axes.pixel_to_ijk(index, np.array([[np.median(cols), np.median(rows)]])))[0]
    running.call(lambda: show_slice(app, "Red", point))
    page.click("swsam-positive")
    page.click_ras("Red", point)  # a click in 3D on the segment: the next request, on a fresh backend
    page.click("swsam-positive")
    page.wait_text("swsam-message", "3D click:", timeout=300)  # a fresh backend: the model is loaded again
    page.wait_text("swsam-backend", "restarted 1×")
    page.shot("backend-restarted")
    page.click("swsam-clear")  # the correction is dropped: the segment stays as it was
    running.until(lambda: app.workflow.controller.refinement is None, what="the clear")
    assert np.array_equal(running.call(lambda: _segment(app)), before)


def test_a_click_in_the_coronal_view_on_an_accepted_box_corrects_in_3d(running, page, hippocampus, colin, atlas):
    _, corners, truth = hippocampus
    app = running.app
    axial = slice_axes(colin, "axial")
    seeded = accepted_box(running, page, corners, depth_mm=5.0)  # 7 slices: those the 3D click below carries to
    below = int(np.flatnonzero(axial.oriented(seeded).any(axis=(1, 2))).min()) - 2  # hippocampus, no segment
    row, col = np.unravel_index(np.argmax(distance_transform_edt(truth[below])), truth[below].shape)
    point = colin.to_ras(axial.pixel_to_ijk(below, np.array([[col, row]], float)))[0]
    running.call(lambda: show_slice(app, "Green", point))
    steps = running.call(lambda: app.workflow.undo_stack.index())
    page.click("swsam-positive")
    running.until(lambda: app.workflow.placing == "positive", what="point mode")
    page.click_ras("Green", point)
    page.click("swsam-positive")  # point mode off
    running.until(lambda: (r := app.workflow.controller.refinement) is not None and r.handle is None
                  and r.update is not None, 300, "the 3D click's result")
    page.wait_text("swsam-message", "3D click:")
    _wait_enabled(page, "swsam-accept")
    page.shot("coronal-click")
    assert running.call(lambda: app.workflow.controller.refinement.view.value) == "axial"
    assert np.array_equal(running.call(lambda: _segment(app)), seeded)  # shown as the preview, not yet written
    page.click("swsam-accept")
    running.until(lambda: app.workflow.undo_stack.index() == steps + 1, what="the accept of the 3D correction")
    corrected = running.call(lambda: _segment(app))
    page.wait_text("swsam-message", "in 3D")
    page.shot("coronal-accepted")
    assert axial.oriented(corrected)[below, row, col] and not axial.oriented(seeded)[below].any()
    truth_3d = atlas.array == AAL_STRUCTURES["Hippocampus_L"]
    assert dice(corrected, truth_3d) >= dice(seeded, truth_3d) - 0.01
    page.click("swsam-undo")
    running.until(lambda: np.array_equal(_segment(app), seeded), what="the undo of the 3D correction")
    _wait_enabled(page, "swsam-redo")
    page.click("swsam-redo")
    running.until(lambda: np.array_equal(_segment(app), corrected), what="the redo of the 3D correction")


def test_save_reload_and_download_keep_voxels_and_geometry(running, page, data_folder, downloads, colin,
                                                          hippocampus):
    app = running.app
    saved = accepted_box(running, page, hippocampus[1])
    for old in downloads.iterdir():
        old.unlink()
    page.type_into("swsam-save-name", "hippocampus.seg.nrrd")
    running.until(lambda: app.state.save_name == "hippocampus.seg.nrrd", what="the file name")
    page.click("swsam-save")
    page.wait_text("swsam-message", "Saved")
    written = read_volume(data_folder / "hippocampus.seg.nrrd")
    np.testing.assert_allclose(written.ijk_to_ras, colin.ijk_to_ras, atol=1e-4)
    assert np.array_equal(written.array > 0, saved)
    page.choose("swsam-data-choice", "hippocampus.seg.nrrd")
    page.click("swsam-open")
    page.wait_text("swsam-message", "Opened hippocampus.seg.nrrd")
    assert running.call(lambda: app.workflow.segmentation_node.GetName()) == "hippocampus"
    assert np.array_equal(running.call(lambda: _segment(app)), saved)
    page.shot("reloaded")
    page.click("swsam-download")
    deadline = time.monotonic() + 30
    while not (files := list(downloads.glob("*.seg.nrrd"))) or list(downloads.glob("*.crdownload")):
        assert time.monotonic() < deadline, f"nothing was downloaded: {list(downloads.iterdir())}"
        time.sleep(0.1)  # Chromium writes a .crdownload file, then renames it
    downloaded = read_volume(files[0])
    assert np.array_equal(downloaded.array > 0, saved)
    np.testing.assert_allclose(downloaded.ijk_to_ras, colin.ijk_to_ras, atol=1e-4)


def test_uploads_that_are_not_volumes_or_too_large_change_nothing(running, page, tmp_path):
    app = running.app
    volume_id = running.call(lambda: app.workflow.volume_node.GetID())
    segment = running.call(lambda: _segment(app))
    junk = tmp_path / "notes.nii.gz"
    junk.write_text("this is not a volume\n")
    page.by_id("swsam-upload").send_keys(str(junk))
    message = page.wait_text("swsam-message", "notes.nii.gz")
    assert "could not be read" in message and str(tmp_path) not in message, message
    page.shot("upload-refused")
    big = tmp_path / "big.nii.gz"
    with big.open("wb") as file:
        file.truncate((MAX_UPLOAD_MB + 1) * 2**20)
    page.by_id("swsam-upload").send_keys(str(big))
    page.wait_text("swsam-message", f"at most {MAX_UPLOAD_MB} MB")
    assert running.call(lambda: app.workflow.volume_node.GetID()) == volume_id
    assert np.array_equal(running.call(lambda: _segment(app)), segment)


def test_a_wrong_access_key_is_refused(running, page):
    main = page.driver.current_window_handle
    page.driver.get_log("browser")  # what the page logged so far
    page.driver.switch_to.new_window("tab")
    try:
        page.driver.get(running.app.url.replace(KEY, "wrong-key"))
        logs, deadline = "", time.monotonic() + 30
        while not ("Authentication failed" in logs or "Connection error" in logs):  # the hello refused, logged
            assert time.monotonic() < deadline, f"the page never logged the refusal: {logs}"
            time.sleep(0.1)
            logs += " ".join(entry["message"] for entry in page.driver.get_log("browser"))
        assert not page.driver.find_elements(By.ID, "swsam-volume"), "the page was served to a wrong key"
        page.shot("wrong-key")
    finally:
        page.driver.close()
        page.driver.switch_to.window(main)
    assert page.text("swsam-volume") == "Colin27"  # the right key's page goes on working


def test_the_segment_list_adds_renames_recolours_hides_and_deletes_on_the_undo_stack(running, page):
    app = running.app
    segments = lambda: running.call(app.workflow.segments)  # noqa: E731
    first = segments()[0]["id"]
    page.click("swsam-add-segment")
    running.until(lambda: len(app.workflow.segments()) == 2, what="the new segment")
    added = segments()[1]["id"]
    rows = _segment_rows(page, 2)
    name = rows[1].find_element(By.CSS_SELECTOR, "input:not([type=color])")
    name.send_keys(Keys.CONTROL, "a")
    name.send_keys(Keys.BACKSPACE, "Amygdala", Keys.ENTER)
    running.until(lambda: app.workflow.segments()[1]["name"] == "Amygdala", what="the rename")
    colour = rows[1].find_element(By.CSS_SELECTOR, "input[type=color]")
    page.driver.execute_script("arguments[0].value = '#00ff00'; arguments[0].dispatchEvent(new Event('change'))",
                               colour)
    running.until(lambda: app.workflow.segments()[1]["color"].lower() == "#00ff00", what="the colour")
    rows[1].find_elements(By.CSS_SELECTOR, "button")[0].click()  # the eye
    running.until(lambda: not app.workflow.segments()[1]["visible"], what="hiding")
    page.shot("segments")
    # one stack: rename and recolour of one segment merge into one step (trame-slicer's rule), then the add
    page.click("swsam-undo")
    running.until(lambda: app.workflow.segments()[1]["name"] != "Amygdala", what="the undo of the edits")
    assert segments()[1]["color"].lower() != "#00ff00"
    page.click("swsam-undo")
    running.until(lambda: len(app.workflow.segments()) == 1, what="the undo of the add")
    page.click("swsam-redo")
    running.until(lambda: len(app.workflow.segments()) == 2, what="the redo of the add")
    rows = _segment_rows(page, 2)
    rows[1].find_elements(By.CSS_SELECTOR, "button")[1].click()  # the lock: finished
    running.until(lambda: app.workflow.segments()[1]["finished"], what="finishing")
    rows = _segment_rows(page, 2)
    rows[1].find_elements(By.CSS_SELECTOR, "button")[2].click()  # delete
    running.until(lambda: [s["id"] for s in app.workflow.segments()] == [first], what="the delete")
    assert added not in [s["id"] for s in segments()]

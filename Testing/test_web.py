"""The web app in a real browser: Debian's Chromium driven by Selenium (headless), real mouse events on the
views that Slicer renders on the server, and every outcome checked on the server's scene.

One app (on a free loopback port, with an access key) and one browser serve the whole module; the tests run in
order, each continuing from the last: first frame (the slice planes in 3D), box → preview (Dice against AAL at
least the CLI's for the same box), accept/undo/redo, cancelled and completed propagation (the 3D view centred
on the segment), no control cut off at 1280 × 760 or 1920 × 1080, a click in the coronal view afterwards,
save/reload/download, refused uploads and keys, and a backend killed while propagating. A screenshot of each
step goes to ``.pytest_cache/web-screenshots``.
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
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
from SegmentWithSAMWeb.app import WebOptions  # noqa: E402
from SegmentWithSAMWeb.browser import Page, chromium, show_slice  # noqa: E402
from SegmentWithSAMWeb.embedded import EmbeddedApp  # noqa: E402

KEY = "test-key-1234"
SHOTS = Path(__file__).resolve().parents[1] / ".pytest_cache" / "web-screenshots"
HIPPOCAMPUS = AAL_STRUCTURES["Hippocampus_L"]
MAX_UPLOAD_MB = 20


def _segment(app) -> np.ndarray:
    workflow = app.workflow
    return mrml.segment_array(workflow.segmentation_node, workflow.editor.active_segment_id, workflow.volume_node)


def _wait_enabled(page, element_id: str, timeout: float = 30.0) -> None:
    """Wait until the page has enabled a button (it follows the server within a poll or so)."""
    deadline = time.monotonic() + timeout
    while not page.by_id(element_id).is_enabled():
        if time.monotonic() > deadline:
            raise AssertionError(f"{element_id} is still disabled after {timeout:g} s")
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
def page(running, downloads):
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    with chromium(downloads) as driver:
        yield Page(driver, running, SHOTS)


@pytest.fixture(scope="module")
def hippocampus(colin, atlas):
    """The hippocampus's middle axial slice, the tight box around it there (2 RAS corners) and its truth."""
    axes = slice_axes(colin, "axial")
    index, corners = structure_box_ras(colin, atlas, axes, "Hippocampus_L")
    return index, corners, axes.oriented(atlas.array == HIPPOCAMPUS)


def test_page_shows_the_first_frame_of_colin27(running, page):
    page.driver.get(running.app.url)
    assert "secret=" not in page.driver.current_url  # the page takes the key out of the address bar
    page.wait_for_frames()
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


def test_accept_undo_redo_restore_the_segment_bit_for_bit(running, page, hippocampus):
    index = hippocampus[0]
    app = running.app
    empty = running.call(lambda: _segment(app))
    page.click("swsam-accept")
    running.until(lambda: _segment(app).any(), what="the accept")
    accepted = running.call(lambda: _segment(app))
    axes = slice_axes(running.call(lambda: app.workflow.controller.volume(app.workflow.volume_node)), "axial")
    assert set(np.flatnonzero(axes.oriented(accepted).any(axis=(1, 2)))) == {index}
    page.shot("accepted")
    page.click("swsam-undo")
    running.until(lambda: not _segment(app).any(), what="the undo")
    assert np.array_equal(running.call(lambda: _segment(app)), empty)
    page.click("swsam-redo")
    running.until(lambda: _segment(app).any(), what="the redo")
    assert np.array_equal(running.call(lambda: _segment(app)), accepted)
    page.shot("redone")


def test_a_cancelled_propagation_changes_nothing(running, page):
    app = running.app
    before = running.call(lambda: _segment(app))
    steps = running.call(lambda: app.workflow.undo_stack.index())
    page.click("swsam-propagate")
    running.until(lambda: app.workflow.controller.propagation is not None, what="the propagation to start")
    page.click("swsam-cancel")
    running.until(lambda: app.workflow.controller.propagation is None, what="the cancel")
    page.wait_text("swsam-message", "cancelled")
    page.shot("cancelled")
    assert np.array_equal(running.call(lambda: _segment(app)), before)
    assert running.call(lambda: app.workflow.undo_stack.index()) == steps


def test_a_propagation_to_the_end_is_one_undo_step(running, page, hippocampus, colin):
    index, _, truth = hippocampus
    app = running.app
    seeded = running.call(lambda: _segment(app))
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
    time.sleep(1.0)
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
    page.click("swsam-redo")
    running.until(lambda: np.array_equal(_segment(app), propagated), what="the redo of the propagation")


def test_no_control_is_cut_off_at_1280x760_or_1920x1080(running, page):
    """Every button, select, text field, checkbox, chip and slider lies whole within its area (the side drawer,
    the toolbar, the views) and the page's width, and no label is cut short; the drawer may scroll vertically
    (at 760 px it does), so only its width counts there. Checked after a propagation, with every part shown."""
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
    index, _, truth = hippocampus
    app = running.app
    before = running.call(lambda: _segment(app))
    steps = running.call(lambda: app.workflow.undo_stack.index())
    page.click("swsam-all-slices")  # beyond the box, down to where the hippocampus ends
    page.choose("swsam-direction", "down")
    running.until(lambda: app.workflow.settings.direction == "down" and app.workflow.front.all_slices,
                  what="the direction and range")
    page.click("swsam-propagate")
    running.until(lambda: (p := app.workflow.controller.progress) is not None and p[0] > 0, 120,
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
    page.wait_text("swsam-message", "3D click:", timeout=180)
    page.wait_text("swsam-backend", "restarted 1×")
    page.shot("backend-restarted")
    page.click("swsam-clear")  # the correction is dropped: the segment stays as it was
    running.until(lambda: app.workflow.controller.refinement is None, what="the clear")
    assert np.array_equal(running.call(lambda: _segment(app)), before)


def test_a_click_in_the_coronal_view_after_propagation_corrects_in_3d(running, page, hippocampus, colin, atlas):
    index, _, truth = hippocampus
    app = running.app
    axial = slice_axes(colin, "axial")
    seeded = running.call(lambda: _segment(app))
    below = int(np.flatnonzero(axial.oriented(seeded).any(axis=(1, 2))).min()) - 2  # hippocampus, no segment
    row, col = np.unravel_index(np.argmax(distance_transform_edt(truth[below])), truth[below].shape)
    point = colin.to_ras(axial.pixel_to_ijk(below, np.array([[col, row]], float)))[0]
    running.call(lambda: show_slice(app, "Green", point))
    steps = running.call(lambda: app.workflow.undo_stack.index())
    page.click("swsam-positive")
    running.until(lambda: app.workflow.placing == "positive", what="point mode")
    page.click_ras("Green", point)
    page.click("swsam-positive")  # point mode off
    # The message may still read "3D click: …" from the click dropped in the test before: wait for this click's
    # result on the server, then for the page to offer Accept.
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
    page.click("swsam-redo")
    running.until(lambda: np.array_equal(_segment(app), corrected), what="the redo of the 3D correction")


def test_save_reload_and_download_keep_voxels_and_geometry(running, page, data_folder, downloads, colin):
    app = running.app
    saved = running.call(lambda: _segment(app))
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
    while not (files := [f for f in downloads.glob("*.seg.nrrd")]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert files, "nothing was downloaded"
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
    page.driver.switch_to.new_window("tab")
    try:
        page.driver.get(running.app.url.replace(KEY, "wrong-key"))
        time.sleep(5)
        assert not page.driver.find_elements(By.ID, "swsam-volume"), "the page was served to a wrong key"
        logs = " ".join(entry["message"] for entry in page.driver.get_log("browser"))
        assert "Authentication failed" in logs or "onnection" in logs, logs
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
    rows[1].find_elements(By.CSS_SELECTOR, "button")[1].click()  # delete
    running.until(lambda: [s["id"] for s in app.workflow.segments()] == [first], what="the delete")
    assert added not in [s["id"] for s in segments()]


def test_the_command_on_another_address_prints_its_url_with_a_generated_key_once(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "SEGMENTWITHSAM_WEB_KEY"}
    process = subprocess.Popen([sys.executable, "-m", "SegmentWithSAMLib.cli", "web", "--host", "0.0.0.0", "--port",
                                "0", "--data", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any(line.startswith("Files are opened") for line in lines) and time.monotonic() < deadline:
            assert process.poll() is None, lines
            time.sleep(0.2)
        url = next(line.split(" at ", 1)[1].strip() for line in lines if " running at " in line)
        key = next(line.rsplit(": ", 1)[1].strip() for line in lines if line.startswith("Access key"))
        assert url.startswith("http://0.0.0.0:") and url.endswith(f"/?secret={key}") and len(key) >= 32
        assert sum(key in line for line in lines) == 2  # the URL and the key line: printed once
        port = int(url.split(":")[2].split("/")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()

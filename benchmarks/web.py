"""The web app (``segmentwithsam web``) on Colin27 in headless Chromium: page load → first frame, prompt → preview
(on the server and as the browser sees it), slice change with and without multisampling (server render, and
wheel → new frame in the browser), memory with one and two clients.

    python benchmarks/web.py [--repeat 8]

The app runs in this process (``SegmentWithSAMWeb.embedded``), so its memory is this process's; the model runs
in the backend child process, reported apart.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import numpy as np
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from slicer import vtkMRMLLayerDisplayableManager
from vtkmodules.vtkCommonDataModel import vtkImageData

from SegmentWithSAMLib.data import AAL_STRUCTURES, colin27
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMWeb.app import WebOptions
from SegmentWithSAMWeb.browser import Page, chromium, show_slice
from SegmentWithSAMWeb.embedded import EmbeddedApp

from common import load_colin27, print_table, tight_box, write_json


def rss_mb(pid: int | str = "self") -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def hippocampus_box(volume, atlas) -> np.ndarray:
    """Two RAS corners of the tight box around the left hippocampus on its middle axial slice."""
    axes = slice_axes(volume, "axial")
    oriented = axes.oriented(atlas.array == AAL_STRUCTURES["Hippocampus_L"])
    index = int(np.flatnonzero(oriented.any(axis=(1, 2))).mean())
    return volume.to_ras(axes.pixel_to_ijk(index, tight_box(oriented[index]).reshape(2, 2)))


def preview_once(running: EmbeddedApp, page: Page, corners: np.ndarray) -> tuple[float, float]:
    """Place a box with real clicks; (server ms from request to preview shown, browser ms from the last click to
    the page showing the preview)."""
    app = running.app

    def reset() -> None:
        app.workflow.clear_prompts()
        app.workflow.front.begin()

    running.call(reset)
    while page.text("swsam-message"):  # the last preview's message is gone from the page
        time.sleep(0.02)
    time.sleep(3.0)  # the backend prefetches neighbouring slices when idle: let it finish, as a user would
    page.click("swsam-box")
    running.until(lambda: app.workflow.placing == "box", what="box mode")
    page.click_ras("Red", corners[0])
    clicked = page.click_ras("Red", corners[1], settle=0.0)
    running.until(lambda: app.workflow.controller.preview_result, 300, "the preview")
    page.wait_text("swsam-message", "Preview:", timeout=60)
    seen = (time.perf_counter() - clicked) * 1e3
    # Slicer ends place mode at the next mouse event after the box's second click, as a user's hand gives it
    ActionChains(page.driver).move_to_element(page.view_image("Red")).perform()
    running.until(lambda: app.workflow.placing is None, what="the end of box placement")
    status = running.call(lambda: app.workflow.controller.status)
    return float(re.search(r"(\d+) ms\.", status).group(1)), seen


def slice_change(running: EmbeddedApp, page: Page, samples: int, repeat: int) -> tuple[float, float]:
    """(server render ms, browser ms from a wheel step to the new frame) for the axial view at ``samples``."""
    view = running.call(lambda: running.app.slicer_app.view_manager.get_view("Red"))
    running.call(lambda: view.render_window().SetMultiSamples(samples))

    def render_ms() -> float:
        """One slice step as the remote view makes a frame of it: render, then read the window back."""
        began = time.perf_counter()
        view.set_slice_value(view.get_slice_value() + 1.0)
        view.render_window().Render()
        vtkMRMLLayerDisplayableManager.RenderWindowBufferToImage(view.render_window(), vtkImageData())
        return (time.perf_counter() - began) * 1e3

    server = [running.call(render_ms) for _ in range(repeat)]
    image = page.view_image("Red")
    seen = []
    for step in range(repeat):
        before = image.get_attribute("src")
        began = time.perf_counter()
        ActionChains(page.driver).scroll_from_origin(ScrollOrigin.from_element(image), 0,
                                                     120 if step % 2 else -120).perform()
        while image.get_attribute("src") == before and time.perf_counter() - began < 10:
            time.sleep(0.002)
        seen.append((time.perf_counter() - began) * 1e3)
        time.sleep(0.3)  # let the scheduler settle (it renders a final high-quality frame)
    return statistics.median(server), statistics.median(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8)
    args = parser.parse_args()
    volume, atlas = load_colin27()
    corners = hippocampus_box(volume, atlas)
    baseline = rss_mb()
    running = EmbeddedApp(WebOptions(port=0, volumes=[str(colin27().image)], device="cpu"))
    app = running.app
    running.until(lambda: app.workflow.volume_node is not None, what="Colin27")
    results: dict = {"rss_before_app_mb": round(baseline, 1)}
    try:
        with chromium() as driver:
            page = Page(driver, running)
            began = time.perf_counter()
            driver.get(running.url)
            page.wait_for_frames()
            results["first_frame_s"] = round(time.perf_counter() - began, 2)
            driver.refresh()
            began = time.perf_counter()
            page.wait_for_frames()
            results["first_frame_reload_s"] = round(time.perf_counter() - began, 2)
            running.call(lambda: show_slice(app, "Red", corners[0]))
            cold = preview_once(running, page, corners)
            warm = [preview_once(running, page, corners + [[0.5 * (i % 3), 0, 0]] * 2) for i in range(args.repeat)]
            results.update({"preview_cold_server_ms": cold[0], "preview_cold_browser_ms": round(cold[1]),
                            "preview_server_ms": statistics.median(w[0] for w in warm),
                            "preview_browser_ms": round(statistics.median(w[1] for w in warm))})
            results["backend_rss_mb"] = round(rss_mb(running.call(lambda: app.workflow.controller.client.pid)), 1)
            for samples in (8, 0):
                server, seen = slice_change(running, page, samples, args.repeat)
                results[f"slice_render_ms_msaa{samples}"] = round(server, 1)
                results[f"slice_frame_browser_ms_msaa{samples}"] = round(seen, 1)
            results["rss_one_client_mb"] = round(rss_mb(), 1)
            with chromium() as second:
                began = time.perf_counter()
                second.get(running.url)
                Page(second, running).wait_for_frames()
                results["first_frame_second_client_s"] = round(time.perf_counter() - began, 2)
                time.sleep(2)
                results["rss_two_clients_mb"] = round(rss_mb(), 1)
    finally:
        running.close()
    print_table(["measure", "value"], [[k, v] for k, v in results.items()])
    write_json("web", results)


if __name__ == "__main__":
    main()

"""Driving the page in a headless Chromium with Selenium (the browser tests, ``benchmarks/web.py``, scripted
screenshots): element lookups by the page's ``swsam-…`` ids, real mouse events on the views at RAS positions,
and waits on what the page shows. Needs selenium and Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from .embedded import EmbeddedApp

# headless Chromium as root, with nothing reaching out to the network
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
VIEW_TAGS = ("Red", "Green", "Yellow", "ThreeD")  # axial, coronal, sagittal, 3D
# The page's controls that lie outside their area (the drawer's content box without its scroll bar, the toolbar,
# the views) or the viewport, and the labels cut short inside them ("…"); the drawer scrolls, so only its
# horizontal extent counts, while the toolbar and the views must hold their controls whole both ways.
CLIPPED_CONTROLS_JS = """
const controls = '.v-btn, .v-select, .v-text-field, .v-file-input, .v-checkbox, .v-chip, .v-slider, '
    + 'input[type=color]';
const areas = '.v-navigation-drawer__content, .v-toolbar__content, .v-main';
const labels = '.v-btn__content, .v-field-label, .v-label, .v-chip__content, .v-select__selection-text';
const shown = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden';
const name = (e) => e.id || e.querySelector('[id]')?.id || (e.innerText || e.getAttribute('aria-label') || '')
    .trim().split('\\n')[0] || e.className;
const found = [];
for (const control of document.querySelectorAll(controls)) {
  const area = control.closest(areas);
  if (!area || !shown(control)) continue;
  const r = control.getBoundingClientRect(), a = area.getBoundingClientRect();
  const left = Math.max(0, a.left + area.clientLeft), right = Math.min(innerWidth, left + area.clientWidth);
  const top = Math.max(0, a.top + area.clientTop), bottom = Math.min(innerHeight, top + area.clientHeight);
  const vertical = !area.matches('.v-navigation-drawer__content');
  if (r.left < left - 0.5 || r.right > right + 0.5 || (vertical && (r.top < top - 0.5 || r.bottom > bottom + 0.5)))
    found.push(`${name(control)}: ${r.left.toFixed(0)}–${r.right.toFixed(0)} × ${r.top.toFixed(0)}–`
      + `${r.bottom.toFixed(0)} outside ${left.toFixed(0)}–${right.toFixed(0)} × ${top.toFixed(0)}–`
      + `${bottom.toFixed(0)}`);
}
for (const label of document.querySelectorAll(labels)) {
  if (label.closest(areas) && shown(label) && label.scrollWidth > label.clientWidth)
    found.push(`${name(label)}: cut short (${label.scrollWidth} px in ${label.clientWidth})`);
}
return found;
"""


def chromium_available() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


@contextmanager
def chromium(downloads: Path | None = None, size: tuple[int, int] = (1500, 950)) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a fresh profile (removed afterwards), saving downloads to ``downloads``."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    profile = tempfile.mkdtemp(prefix="segmentwithsam-chromium-")
    for argument in (*CHROMIUM_ARGS, f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    try:
        if downloads is not None:
            driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Page:
    """A browser on an :class:`~.embedded.EmbeddedApp`'s page; screenshots go to ``shots`` (numbered)."""

    def __init__(self, driver, running: EmbeddedApp, shots: Path | None = None) -> None:
        self.driver, self.running, self.shots, self._shot = driver, running, shots, 0

    def by_id(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def click(self, element_id: str) -> None:
        self.by_id(element_id).click()

    def text(self, element_id: str) -> str:
        return self.by_id(element_id).text

    def wait_text(self, element_id: str, part: str, timeout: float = 30.0) -> str:
        """Wait until the element is on the page (a page just loaded builds it once connected) and shows ``part``
        (it follows the server within one poll, ~50 ms)."""
        deadline = time.monotonic() + timeout
        while part not in (text := " ".join(e.text for e in self.driver.find_elements(By.ID, element_id))):
            if time.monotonic() > deadline:
                raise AssertionError(f"the page shows {text!r} in {element_id}, not {part!r}")
            time.sleep(0.05)
        return text

    def wait_for_frames(self, timeout: float = 60.0) -> float:
        """Seconds until every view has drawn a frame from the server."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            markers = self.driver.find_elements(By.CSS_SELECTOR, ".swsam-view")
            images = [self.view_image(tag) for tag in VIEW_TAGS] if len(markers) == len(VIEW_TAGS) else []
            if images and all((i.get_attribute("src") or "").startswith(("blob:", "data:")) for i in images):
                return time.monotonic() - began
            time.sleep(0.02)
        raise AssertionError("the views never showed a frame")

    def wait_for_view_sizes(self, timeout: float = 30.0) -> None:
        """After a resize: wait until every view shows a frame drawn at its new width on the page."""
        images = [self.view_image(tag) for tag in VIEW_TAGS]
        fitted = "return arguments[0].every(i => Math.abs(i.naturalWidth - i.clientWidth) <= 2)"
        deadline = time.monotonic() + timeout
        while not self.driver.execute_script(fitted, images):
            if time.monotonic() > deadline:
                raise AssertionError("the views were not drawn again at their new size")
            time.sleep(0.05)

    def choose(self, select_id: str, item: str, timeout: float = 10.0) -> None:
        """Pick ``item`` in one of the page's drop-down lists, as a user does: open it, and click the entry once
        the list has slid in (the entry stands still)."""
        self.by_id(select_id).find_element(By.XPATH, "./ancestor::div[contains(@class, 'v-field')][1]").click()
        entry = f"//div[@role='option'][.//div[contains(@class, 'v-list-item-title')][.='{item}']]"
        deadline, last = time.monotonic() + timeout, None
        while True:
            found = self.driver.find_elements(By.XPATH, entry)
            where = found[0].rect if found else None
            if where is not None and where == last:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{item!r} never stood still in the list {select_id}")
            last = where
            time.sleep(0.05)
        found[0].click()

    def type_into(self, element_id: str, text: str) -> None:
        field = self.by_id(element_id)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.BACKSPACE, text, Keys.TAB)

    def set_viewport(self, width: int, height: int) -> None:
        """Resize the browser's window so that the page itself is ``width`` × ``height`` CSS pixels."""
        self.driver.set_window_size(width, height)
        inner_width, inner_height = self.driver.execute_script("return [innerWidth, innerHeight]")
        self.driver.set_window_size(2 * width - inner_width, 2 * height - inner_height)
        deadline = time.monotonic() + 10
        while self.driver.execute_script("return [innerWidth, innerHeight]") != [width, height]:
            if time.monotonic() > deadline:
                raise AssertionError(f"the page is not {width} × {height} after resizing the window")
            time.sleep(0.05)

    def clipped_controls(self) -> list[str]:
        """Each button, select, text field, checkbox, chip or slider cut off by its area or the viewport, and each
        label cut short, in words (see ``CLIPPED_CONTROLS_JS``); empty when everything fits."""
        return self.driver.execute_script(CLIPPED_CONTROLS_JS)

    def view_image(self, tag: str):
        """The <img> the server's frames of view ``tag`` (see ``VIEW_TAGS``) are drawn into."""
        marker = self.by_id(f"swsam-view-{tag}")
        return marker.find_element(By.XPATH, "./ancestor::div[.//img][1]//img")

    def click_ras(self, tag: str, *points_ras: np.ndarray, settle: float = 0.5) -> float:
        """Real clicks at RAS points in slice view ``tag``: each point mapped to the view's pixels by its slice
        node's XY → RAS matrix, then onto the view's image on the page; ``settle`` s after each. Returns the
        ``time.perf_counter()`` when the last click was sent."""
        image = self.view_image(tag)
        actions = ActionChains(self.driver)
        for ras in points_ras:
            x, y, width, height = self.running.call(lambda r=ras: ras_to_xy(self.running.app, tag, r))
            scale_x, scale_y = image.rect["width"] / width, image.rect["height"] / height
            actions.move_to_element_with_offset(image, (x - width / 2) * scale_x, (height / 2 - y) * scale_y)
            actions.pause(0.3).click().pause(settle)
        actions.perform()
        return time.perf_counter() - settle

    def shot(self, step: str) -> Path | None:
        if self.shots is None:
            return None
        self._shot += 1
        path = self.shots / f"{self._shot:02d}-{step}.png"
        self.driver.save_screenshot(str(path))
        return path


def ras_to_xy(app, tag: str, ras) -> tuple[float, float, int, int]:
    """Where RAS point ``ras`` is in slice view ``tag``: pixel x, y (origin bottom left), view width, height.
    Runs on the app's loop."""
    import slicer

    view = app.slicer_app.view_manager.get_view(tag)
    xy_to_ras = slicer.util.arrayFromVTKMatrix(view.get_view_node().GetXYToRAS())
    x, y = (np.linalg.inv(xy_to_ras) @ np.append(ras, 1.0))[:2]
    width, height = view.render_window().GetSize()
    return float(x), float(y), int(width), int(height)


def show_slice(app, tag: str, ras) -> None:
    """Move slice view ``tag`` to the slice through ``ras`` (what dragging its slider does). Runs on the loop."""
    import slicer

    view = app.slicer_app.view_manager.get_view(tag)
    slice_to_ras = slicer.util.arrayFromVTKMatrix(view.get_view_node().GetSliceToRAS())
    normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    view.set_slice_value(view.get_slice_value() + float(np.dot(np.asarray(ras) - slice_to_ras[:3, 3], normal)))

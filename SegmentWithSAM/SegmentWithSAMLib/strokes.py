"""Scribbles and lassos on one slice: their checks, their pixels and the clicks a scribble is made of.

A stroke is a sequence of points (N, 2) in pixel XY = (col, row) of one slice (:mod:`.geometry`): a scribble
is an open polyline, a lasso a closed outline (the last point joins the first). Rasterising is Pillow's
(``ImageDraw``), on pixel centres.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .errors import PromptError

MIN_POINTS = {False: 2, True: 3}  # a scribble, a lasso
SAMPLE_MM = 2.0  # a scribble's clicks: one this far apart along it, and both ends (benchmarks/scribbles.py)


def check_stroke(points, image_shape: tuple[int, int], closed: bool) -> np.ndarray:
    """``points`` as (N, 2) float pixel XY, checked: enough points, finite, on a slice of ``image_shape`` (rows,
    cols); a lasso (``closed``) encloses an area and does not cross itself. :class:`PromptError` says which."""
    what = "lasso" if closed else "scribble"
    try:
        xy = np.asarray(points, dtype=float).reshape(-1, 2)
    except (TypeError, ValueError):
        raise PromptError(f"A {what} is a list of (x, y) pixel points, not {points!r:.80}.") from None
    xy = xy[np.r_[True, np.any(np.diff(xy, axis=0) != 0, axis=1)]]  # a point placed twice counts once
    if closed and len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    if len(xy) < MIN_POINTS[closed]:
        raise PromptError(f"A {what} needs at least {MIN_POINTS[closed]} different points, not {len(xy)}.")
    rows, cols = image_shape
    if not np.all(np.isfinite(xy)) or np.any(xy < -0.5) or np.any(xy > [cols - 0.5, rows - 0.5]):
        raise PromptError(f"The {what} leaves the slice ({cols}×{rows} pixels): draw it on the image.")
    if closed:
        if _crosses_itself(xy):
            raise PromptError("The lasso crosses itself: draw one outline that does not cross its own path.")
        if abs(_signed_area(xy)) < 1.0:
            raise PromptError("The lasso encloses no area: draw a closed outline around the region.")
    return xy


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _crosses_itself(xy: np.ndarray) -> bool:
    """Whether two non-adjacent edges of the closed outline ``xy`` (N, 2) intersect (proper crossings and
    touching both count)."""
    a, b = xy, np.roll(xy, -1, axis=0)
    n = len(xy)
    i, j = np.triu_indices(n, k=2)
    keep = ~((i == 0) & (j == n - 1))  # the last edge meets the first at the first point
    i, j = i[keep], j[keep]
    p1, p2, q1, q2 = a[i], b[i], a[j], b[j]
    d1, d2, d3, d4 = _orient(q1, q2, p1), _orient(q1, q2, p2), _orient(p1, p2, q1), _orient(p1, p2, q2)
    proper = (d1 * d2 < 0) & (d3 * d4 < 0)

    def on(p, q, r, d):  # r on segment p-q, given it is collinear (d == 0)
        return (d == 0) & (np.minimum(p[:, 0], q[:, 0]) <= r[:, 0]) & (r[:, 0] <= np.maximum(p[:, 0], q[:, 0])) \
            & (np.minimum(p[:, 1], q[:, 1]) <= r[:, 1]) & (r[:, 1] <= np.maximum(p[:, 1], q[:, 1]))

    touching = on(q1, q2, p1, d1) | on(q1, q2, p2, d2) | on(p1, p2, q1, d3) | on(p1, p2, q2, d4)
    return bool(np.any(proper | touching))


def _orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The side of each line p→q each r lies on (rows of (K, 2) arrays): +1 left, -1 right, 0 on it."""
    return np.sign((q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0]))


def _draw(image_shape: tuple[int, int], paint) -> np.ndarray:
    rows, cols = image_shape
    image = Image.new("1", (cols, rows), 0)
    paint(ImageDraw.Draw(image))
    return np.array(image, dtype=bool)


def fill_lasso(xy: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """The pixels (rows, cols) inside or on the closed outline ``xy`` (N, 2)."""
    return _draw(image_shape, lambda draw: draw.polygon([tuple(p) for p in xy], fill=1, outline=1))


def draw_stroke(xy: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """The pixels (rows, cols) the polyline ``xy`` (N, 2) passes through."""
    return _draw(image_shape, lambda draw: draw.line([tuple(p) for p in xy], fill=1, width=1))


def sample_polyline(points: np.ndarray, every: float) -> np.ndarray:
    """Points (M, D) along the polyline ``points`` (N, D): its first point, one each ``every`` along it (in its
    own units), and its last point."""
    along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    at = np.unique(np.concatenate([np.arange(0.0, along[-1], every), [along[-1]]]))
    return np.stack([np.interp(at, along, points[:, d]) for d in range(points.shape[1])], axis=1)


def sample_stroke(xy: np.ndarray, pixel_spacing: tuple[float, float], every_mm: float = SAMPLE_MM) -> np.ndarray:
    """Points (M, 2) along the polyline ``xy`` (N, 2) pixel XY every ``every_mm`` (``pixel_spacing`` = (row, col)
    mm), as :func:`sample_polyline` places them."""
    scale = np.array([pixel_spacing[1], pixel_spacing[0]])
    return sample_polyline(np.asarray(xy, float) * scale, every_mm) / scale

"""Pictures for people: a slice with the mask outline (and the box) drawn on it, as PNG."""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage as ndi

from .io import atomic_write


def save_overlay_png(image01: np.ndarray, mask2d: np.ndarray, path: str | os.PathLike, *,
                     pixel_spacing: tuple[float, float] = (1.0, 1.0), box: np.ndarray | None = None,
                     reference: np.ndarray | None = None, zoom: int = 3) -> None:
    """Save the slice ``image01`` (rows, cols) in [0, 1] with ``mask2d``'s outline in orange, an optional
    ``reference`` mask outline in cyan and ``box`` (x0, y0, x1, y1) in yellow; pixels drawn to scale."""
    from pathlib import Path

    from PIL import Image, ImageDraw

    rgb = np.repeat((np.clip(image01, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    for mask, colour in ((reference, (0, 220, 255)), (mask2d, (255, 140, 0))):
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            rgb[mask & ~ndi.binary_erosion(mask)] = colour
    rows, cols = image01.shape
    sy, sx = zoom * pixel_spacing[0] / min(pixel_spacing), zoom * pixel_spacing[1] / min(pixel_spacing)
    picture = Image.fromarray(rgb).resize((round(cols * sx), round(rows * sy)), Image.NEAREST)
    if box is not None:
        x0, y0, x1, y1 = np.asarray(box, dtype=float)
        ImageDraw.Draw(picture).rectangle([x0 * sx, y0 * sy, (x1 + 1) * sx, (y1 + 1) * sy], outline=(255, 230, 0))
    path = Path(path)
    atomic_write(path, ".png", lambda tmp: picture.save(tmp, format="PNG"))

"""A positive click beside a small object's propagated mask, apart from it, re-anchors the object there.

A chain of box prompts can drift onto the tissue beside a small object: Colin27's hippocampus moves by half its
width within a few slices, and the chained masks stay behind on the tissue next to it. A positive click outside such
a slice's mask whose addition does not touch it says the object lies at the click, not where propagation put it: the
slice keeps only the parts of its mask that hold what the click added, and the engine's slices the click's change is
carried to keep only what the propagation from the re-anchored slice covers, with what it adds there
(:meth:`~.engine.Engine._walk`). Elsewhere a positive click only adds.

Only where the user has not spoken for the mask and the click lies beside the object: a slice whose mask is the
engine's (propagated, never clicked or drawn), clicked for the first time, on an object smaller than
``click_scale.LARGE_FROM_MM`` there (a large object's box grows towards the click instead:
``click_scale.grown_by_box``), the click within ``BESIDE_SIZES`` × the object's size near the slice. The slice's
mask before the click loses the dropped parts too, so its clicks replay without them; a later click there (a key
slice then) only adds. Masks are (rows, cols) bool arrays of one view; points are (x, y) pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .click_scale import LARGE_FROM_MM
from .geometry import equivalent_radius_mm

NEAR_PX = 2  # a part of a mask holds what a click added when that lies within this many pixels of it
# A drifted chain lies beside the object: the clicks that re-anchored Colin27's hippocampi and caudates (the
# challenge's box and five clicks: AAL after five .704 -> .716, the other 9 structures identical) lay 0.3-2.2 × the
# object's size near the slice from its mask. Unlimited, clicks 3.2-3.6 × from right patches of the head CT's skull
# (a ring started by clicks alone) dropped them (.076 -> .073), and a click on another lesion would drop the first
# (docs/interaction.md, "Session 36").
BESIDE_SIZES = 2.5


def reanchored(mask: np.ndarray, base: np.ndarray, xy: tuple[float, float], engine_slice: bool, size_mm: float,
               pixel_spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A slice's ``mask`` after a positive click at ``xy`` and its mask before the click, ``base``, both without the
    parts that hold nothing the click added (within ``NEAR_PX``; None for a base with nothing left: the slice's
    clicks then replay as an object's first), where the click re-anchors the object; None where it does not.
    ``engine_slice``: ``base`` is the engine's and no click was made on the slice before; ``size_mm``: the object's
    size near the slice (:func:`~.click_scale.size_near_mm`); ``pixel_spacing``: (row, col) mm."""
    row, col = int(round(xy[1])), int(round(xy[0]))
    if not engine_slice or not base.any() or base[row, col]:
        return None
    if equivalent_radius_mm(base, pixel_spacing) >= LARGE_FROM_MM:
        return None
    if ndi.distance_transform_edt(~base, sampling=pixel_spacing)[row, col] > BESIDE_SIZES * size_mm:
        return None
    added = mask & ~base
    if not added.any():  # nothing to anchor to (the addition lay in a locked segment): the mask stays
        return None
    parts, _ = ndi.label(mask)
    held = set(np.unique(parts[ndi.binary_dilation(added, iterations=NEAR_PX)])) | {int(parts[row, col])}
    kept = np.isin(parts, list(held - {0}))
    if np.array_equal(kept, mask):
        return None
    return kept, base & kept if (base & kept).any() else None


def trimmed(old: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """``old`` (an engine slice's mask) where the propagation from the re-anchored slice, ``fresh``, covers it
    (within ``NEAR_PX``)."""
    return old & ndi.binary_dilation(fresh, iterations=NEAR_PX)

"""A click's scale on its slice, from the object's size around it: the widest box a positive prompt on an empty
slice may start from, how far a click reaches on its slice, and how a large object's box grows towards a positive
click outside its mask. Masks are (rows, cols) bool arrays of one view; ``masks`` maps a slice index to its mask;
``pixel_spacing`` is (row, col) mm. The engine (:mod:`.engine`) reads these rules; the measurements behind each
constant are in docs/interaction.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .actions import clip_box
from .geometry import bounding_box, equivalent_radius_mm
from .refinement import MAX_RADIUS_MM, MIN_RADIUS, edge_distance

# A click's reach on a slice is capped at refinement.MAX_RADIUS_MM (tuned on small structures), or for large
# objects at LARGE_REACH x (the mask's equivalent radius - LARGE_FROM_MM): the head CT gained nothing from five
# clicks under the fixed cap, +0.05 under this one, and the AAL structures (radius < 20 mm) are unchanged.
LARGE_FROM_MM, LARGE_REACH = 16.0, 0.75
# On such a large object (a slice mask's equivalent radius at least LARGE_FROM_MM) a positive click outside the
# mask also moves the prompt LiteMedSAM was trained on, the box: the mask's box with the object's offset, grown to
# take in the click and as far again beyond it as the click lies from the mask (a user clicks in the middle of
# what is missing); the part of the model's mask for that box beyond the mask that holds the click joins the mask
# before the click moves the threshold around itself. The challenge's 3D box with one side drawn 30 % short on the
# development set's organs and tumours: one protocol click from 0.676 to 0.741 (0.710 without); the protocol's box
# and five clicks: the MR organs 0.915 -> 0.917 (NSD5 0.815 -> 0.823), the others within 0.002; without the size
# limit the AAL structures (all smaller) lost 0.004 (docs/interaction.md, "Session 26").
# ... and for small objects at their size (the equivalent radius of the largest mask within NEARBY_SLICES, at least
# SMALL_REACH_MM): a positive click on a wrong 17-pixel mask at the amygdala's end added 104 pixels for a 38-pixel
# object under the fixed cap (-0.010 3D Dice), +0.008 under this one.
SMALL_REACH_MM = 2.0
NEARBY_SLICES = 2  # the object's size near a slice: its largest mask within this many slices
WIDEST_BOX_RADII = 4.0  # a prompt on an empty slice: boxes up to this many radii of the nearest slice's mask


def widest_box_mm(masks: dict[int, np.ndarray], index: int, pixel_spacing) -> float:
    """The widest box a positive prompt on the empty slice ``index`` may start from (see
    :func:`~.prompts.click_logits`): twice the equivalent diameter of the object's mask on the nearest slice that
    has one, as an object changes little from slice to slice (no limit for a new object). Unbounded, a click past an
    MR spleen's last slice chose a box four times its width there (DSC −0.12 in one click)."""
    filled = [i for i, mask in masks.items() if i != index and mask.any()]
    if not filled:
        return np.inf
    nearest = masks[min(filled, key=lambda i: abs(i - index))]
    return WIDEST_BOX_RADII * equivalent_radius_mm(nearest, pixel_spacing)


def size_near_mm(masks: dict[int, np.ndarray], index: int, base: np.ndarray, pixel_spacing) -> float:
    """The object's size near slice ``index`` whose mask before a click is ``base``: the largest equivalent radius
    (mm) of ``base`` and of the masks within ``NEARBY_SLICES``."""
    return max(equivalent_radius_mm(mask, pixel_spacing) for mask in [base, *(
        masks[i] for i in range(index - NEARBY_SLICES, index + NEARBY_SLICES + 1) if i != index and i in masks)])


def reach_cap_mm(masks: dict[int, np.ndarray], index: int, base: np.ndarray | None, pixel_spacing) -> float:
    """The cap on a click's reach on slice ``index`` whose mask before the click is ``base`` (None: none; see
    ``LARGE_REACH`` and ``SMALL_REACH_MM``)."""
    if base is None:
        return MAX_RADIUS_MM
    own = equivalent_radius_mm(base, pixel_spacing)
    size = max(SMALL_REACH_MM, size_near_mm(masks, index, base, pixel_spacing))
    return max(min(MAX_RADIUS_MM, size), LARGE_REACH * (own - LARGE_FROM_MM))


def grown_by_box(predictor, base: np.ndarray, offset: np.ndarray, positives: list[tuple[float, float]],
                 pixel_spacing) -> np.ndarray:
    """``base`` (rows, cols) of the predictor's current slice, on a large object, with what the model finds beyond
    it towards the positive clicks ``positives`` ((x, y) pixels) outside it, in the box (``offset``: the object's
    box around its mask, x0 y0 x1 y1) grown to take them in (see ``LARGE_FROM_MM``); ``base`` itself otherwise."""
    pixels = np.array([(int(y), int(x)) for x, y in positives], int).reshape(-1, 2)
    outside = pixels[~base[pixels[:, 0], pixels[:, 1]]] if base.any() else pixels[:0]
    if not len(outside) or equivalent_radius_mm(base, pixel_spacing) < LARGE_FROM_MM:
        return base
    box = bounding_box(base) + offset
    for row, col in outside:
        beyond = max(MIN_RADIUS, edge_distance(base, row, col))
        box = np.concatenate([np.minimum(box[:2], (col - beyond, row - beyond)),
                              np.maximum(box[2:], (col + beyond, row + beyond))])
    box, _ = clip_box(box, base.shape)
    found = (predictor.predict(box=box).logits[0] > 0) & ~base
    parts, _ = ndi.label(found)
    held = {int(parts[row, col]) for row, col in outside} - {0}
    return base | np.isin(parts, list(held)) if held else base

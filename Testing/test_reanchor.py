"""A positive click beside a small object's propagated mask, apart from it, re-anchors the object (reanchor): when it
does and when it leaves the mask alone. The engine on real data: Testing/test_engine.py."""

from __future__ import annotations

import numpy as np
import pytest

from SegmentWithSAMLib import reanchor
from SegmentWithSAMLib.click_scale import LARGE_FROM_MM

SPACING = (0.5, 0.5)  # mm (row, col)
SHAPE = (300, 300)


def disk(radius_mm: float, centre: tuple[int, int]) -> np.ndarray:
    rows, cols = np.ogrid[: SHAPE[0], : SHAPE[1]]
    return np.hypot((rows - centre[0]) * SPACING[0], (cols - centre[1]) * SPACING[1]) <= radius_mm


BASE = disk(5.0, (150, 100))  # the engine's mask: a 5 mm object the chain left 15 mm beside where it is
ADDED = disk(5.0, (150, 130))  # what the click at (130, 150) added: the object, 10 mm from the mask
MASK = BASE | ADDED
CLICK = (130.0, 150.0)  # (x, y)


def test_a_click_beside_an_engine_mask_keeps_only_the_parts_that_hold_its_addition():
    moved = reanchor.reanchored(MASK, BASE, CLICK, True, 5.0, SPACING)
    assert moved is not None
    mask, base = moved
    assert np.array_equal(mask, ADDED) and base is None  # nothing of it is left: its clicks replay as a first's
    right = disk(3.0, (150, 142))  # a part of the mask the click's addition joins stays in the base
    mask, base = reanchor.reanchored(MASK | right, BASE | right, CLICK, True, 5.0, SPACING)
    assert np.array_equal(mask, ADDED | right) and np.array_equal(base, right)


@pytest.mark.parametrize("case", ["a key slice", "inside the mask", "a large object", "far away", "touching",
                                  "nothing added"])
def test_a_click_leaves_the_mask_alone_where_the_user_or_the_object_speaks_for_it(case):
    mask, base, xy, engine_slice, size = MASK, BASE, CLICK, True, 5.0
    if case == "a key slice":  # the box's slice, a slice clicked before or drawn: the user's
        engine_slice = False
    elif case == "inside the mask":
        xy = (100.0, 150.0)
    elif case == "a large object":  # its box grows towards the click instead (click_scale.grown_by_box)
        base = disk(LARGE_FROM_MM + 1.0, (150, 80))
        mask = base | ADDED
    elif case == "far away":  # a ring's other side, another lesion on the slice
        size = 10.0 / (reanchor.BESIDE_SIZES + 0.5)  # the click lies 10 mm from the mask's edge
    elif case == "touching":  # the click's addition joins the mask: a missed part of the same object
        mask = BASE | disk(5.0, (150, 118))
        xy = (118.0, 150.0)
    elif case == "nothing added":  # the click's addition lay in a locked segment: the slice must not be emptied
        mask = BASE
    assert reanchor.reanchored(mask, base, xy, engine_slice, size, SPACING) is None


def test_the_slices_carried_to_keep_what_the_new_propagation_covers():
    old = disk(5.0, (150, 100)) | disk(5.0, (150, 160))
    fresh = disk(4.0, (150, 160))
    kept = reanchor.trimmed(old, fresh)
    assert not kept[:, :130].any() and kept[150, 160]
    assert kept.sum() < old.sum() and not (kept & ~old).any()

"""A click's scale from the object's size around it (click_scale): the widest box on an empty slice, the reach cap."""

from __future__ import annotations

import numpy as np
import pytest

from SegmentWithSAMLib import click_scale as cs
from SegmentWithSAMLib.geometry import equivalent_radius_mm
from SegmentWithSAMLib.refinement import MAX_RADIUS_MM

SPACING = (0.5, 0.5)  # mm (row, col)
SHAPE = (400, 400)


def disk(radius_mm: float, centre=(200, 200)) -> np.ndarray:
    rows, cols = np.ogrid[: SHAPE[0], : SHAPE[1]]
    return np.hypot((rows - centre[0]) * SPACING[0], (cols - centre[1]) * SPACING[1]) <= radius_mm


def test_a_new_object_has_no_widest_box_and_a_later_one_follows_the_nearest_filled_slice():
    assert cs.widest_box_mm({}, 5, SPACING) == np.inf
    assert cs.widest_box_mm({5: disk(10)}, 5, SPACING) == np.inf  # the slice itself does not count
    masks = {2: disk(4), 9: disk(20), 7: np.zeros(SHAPE, bool)}  # slice 7 is empty: slice 9 is the nearest filled
    radius = equivalent_radius_mm(masks[9], SPACING)
    assert cs.widest_box_mm(masks, 6, SPACING) == pytest.approx(cs.WIDEST_BOX_RADII * radius)
    radius = equivalent_radius_mm(masks[2], SPACING)
    assert cs.widest_box_mm(masks, 3, SPACING) == pytest.approx(cs.WIDEST_BOX_RADII * radius)


def test_the_reach_cap_follows_the_objects_size_small_and_large():
    assert cs.reach_cap_mm({}, 0, None, SPACING) == MAX_RADIUS_MM  # no mask before the click: the fixed cap
    tiny = disk(0.5)
    assert cs.reach_cap_mm({}, 0, tiny, SPACING) == pytest.approx(cs.SMALL_REACH_MM)  # never below cs.SMALL_REACH_MM
    small = disk(3.0)
    assert cs.reach_cap_mm({}, 0, small, SPACING) == pytest.approx(equivalent_radius_mm(small, SPACING))
    # a larger mask within NEARBY_SLICES counts; one further away does not
    near = cs.reach_cap_mm({2: disk(5.0)}, 0, small, SPACING)
    assert near == pytest.approx(min(MAX_RADIUS_MM, equivalent_radius_mm(disk(5.0), SPACING)))
    assert cs.reach_cap_mm({3: disk(5.0)}, 0, small, SPACING) == pytest.approx(equivalent_radius_mm(small, SPACING))
    large = disk(60.0)
    expected = cs.LARGE_REACH * (equivalent_radius_mm(large, SPACING) - cs.LARGE_FROM_MM)
    assert expected > MAX_RADIUS_MM
    assert cs.reach_cap_mm({}, 0, large, SPACING) == pytest.approx(expected)

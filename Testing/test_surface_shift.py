"""A click near an object's surface moves the surface around it (surface_shift.py): on a ball a few millimetres
too large or too small, a click in the middle of the band of error moves the near side of the surface towards the
truth, never the far side, and a deep click moves nothing."""

from __future__ import annotations

import numpy as np
import pytest

from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.surface_shift import (
    SHIFT_GAIN,
    SHIFT_MAX_DEPTH_MM,
    SHIFT_MIN_RADIUS_MM,
    moved_by_click,
    surface_shift,
)

SPACING = (2.0, 1.0, 1.0)  # thicker slices than pixels, as on most CT and MR
SHAPE = (24, 64, 64)
CENTRE = np.array([12, 32, 32])


def ball(radius_mm: float) -> np.ndarray:
    grid = np.meshgrid(*((np.arange(n) - c) * s for n, c, s in zip(SHAPE, CENTRE, SPACING, strict=True)),
                       indexing="ij", sparse=True)
    return np.sqrt(sum(axis**2 for axis in grid)) <= radius_mm


@pytest.mark.parametrize(("mask_mm", "truth_mm"), [(16.0, 13.0), (13.0, 16.0)])
def test_a_click_in_a_band_of_error_moves_the_near_surface_towards_the_truth(mask_mm, truth_mm):
    mask, truth = ball(mask_mm), ball(truth_mm)
    voxel = (int(CENTRE[0]), int(CENTRE[1]), int(CENTRE[2]) + 14)  # in the band, on the +x side
    depth = abs(mask_mm - 14.0) + 1.0  # its distance to the surface, within a voxel
    moved = surface_shift(mask, SPACING, voxel, radius_mm=15.0)
    positive = truth_mm > mask_mm
    assert moved.any() and not (moved & (mask if positive else ~mask)).any()  # adds outside, or removes inside
    shifted = mask | moved if positive else mask & ~moved
    assert dice(shifted, truth) > dice(mask, truth)
    assert not moved[..., : CENTRE[2]].any()  # the far side of the ball stays
    # no further from the surface than SHIFT_GAIN x the click's own distance to it
    assert not (moved & (~ball(mask_mm + SHIFT_GAIN * depth) if positive else ball(mask_mm - SHIFT_GAIN * depth))).any()


def test_a_deep_click_moves_nothing_and_bad_input_is_refused():
    mask = ball(16.0)
    deep = tuple(int(v) for v in CENTRE)  # 16 mm deep
    assert 16.0 > SHIFT_MAX_DEPTH_MM and surface_shift(mask, SPACING, deep, radius_mm=15.0) is None
    with pytest.raises(ValueError, match="3D block"):
        surface_shift(mask[0], SPACING[1:], deep[1:], radius_mm=15.0)


def test_moved_by_click_reads_the_masks_around_the_click_and_keeps_its_radius_in_bounds():
    mask = ball(16.0)
    masks = {index: mask[index] for index in range(SHAPE[0]) if mask[index].any()}
    voxel = (int(CENTRE[0]), int(CENTRE[1]), int(CENTRE[2] + 15))
    moved, low = moved_by_click(masks, SPACING, voxel, radius_mm=1.0)  # a tiny size: SHIFT_MIN_RADIUS_MM holds
    whole = np.zeros(SHAPE, bool)
    ends = np.minimum(np.array(low) + moved.shape, SHAPE)
    whole[low[0]: ends[0], low[1]: ends[1], low[2]: ends[2]] = moved[: ends[0] - low[0], : ends[1] - low[1],
                                                                    : ends[2] - low[2]]
    assert np.array_equal(whole, surface_shift(mask, SPACING, voxel, SHIFT_MIN_RADIUS_MM))

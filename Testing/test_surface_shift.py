"""A click near an object's surface moves the surface around it (surface_shift.py): on a ball a few millimetres
too large or too small, a click in the middle of the band of error moves the near side of the surface towards the
truth, never the far side, and a deep click moves nothing; a click's depth in 3D is the whole stack's distance
transform's, read from a block around it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.surface_shift import (
    SHIFT_GAIN,
    SHIFT_MAX_DEPTH_MM,
    SHIFT_MIN_RADIUS_MM,
    click_depth_mm,
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


def by_slice(mask: np.ndarray) -> dict[int, np.ndarray]:
    return {index: mask[index] for index in range(SHAPE[0]) if mask[index].any()}


def depth_at(mask: np.ndarray, voxel: tuple[int, int, int], limit_mm: float = np.inf) -> float:
    return click_depth_mm(by_slice(mask), SPACING, voxel[0], np.array([[voxel[2], voxel[1]]]), limit_mm)


@pytest.mark.parametrize(("mask_mm", "truth_mm"), [(16.0, 13.0), (13.0, 16.0)])
def test_a_click_in_a_band_of_error_moves_the_near_surface_towards_the_truth(mask_mm, truth_mm):
    mask, truth = ball(mask_mm), ball(truth_mm)
    voxel = (int(CENTRE[0]), int(CENTRE[1]), int(CENTRE[2]) + 14)  # in the band, on the +x side
    positive = truth_mm > mask_mm
    depth = depth_at(mask, voxel)
    assert (depth < 0) == positive and abs(abs(depth) - abs(mask_mm - 14.0)) <= 1.0  # within a voxel
    moved = surface_shift(mask, SPACING, voxel, 15.0, depth)
    assert moved.any() and not (moved & (mask if positive else ~mask)).any()  # adds outside, or removes inside
    shifted = mask | moved if positive else mask & ~moved
    assert dice(shifted, truth) > dice(mask, truth)
    assert not moved[..., : CENTRE[2]].any()  # the far side of the ball stays
    # no further from the surface than SHIFT_GAIN x the click's own distance to it
    reach = SHIFT_GAIN * abs(depth)
    assert not (moved & (~ball(mask_mm + reach) if positive else ball(mask_mm - reach))).any()


def test_a_deep_click_moves_nothing_and_bad_input_is_refused():
    mask = ball(16.0)
    deep = tuple(int(v) for v in CENTRE)
    depth = depth_at(mask, deep)
    assert depth > SHIFT_MAX_DEPTH_MM and moved_by_click(by_slice(mask), SPACING, deep, 15.0, depth) is None
    with pytest.raises(ValueError, match="3D block"):
        surface_shift(mask[0], SPACING[1:], deep[1:], 15.0, depth)


def test_moved_by_click_reads_the_masks_around_the_click_and_keeps_its_radius_in_bounds():
    mask = ball(16.0)
    voxel = (int(CENTRE[0]), int(CENTRE[1]), int(CENTRE[2] + 15))
    depth = depth_at(mask, voxel)
    moved, low = moved_by_click(by_slice(mask), SPACING, voxel, 1.0, depth)  # a tiny size: SHIFT_MIN_RADIUS_MM holds
    whole = np.zeros(SHAPE, bool)
    ends = np.minimum(np.array(low) + moved.shape, SHAPE)
    whole[low[0]: ends[0], low[1]: ends[1], low[2]: ends[2]] = moved[: ends[0] - low[0], : ends[1] - low[1],
                                                                    : ends[2] - low[2]]
    assert np.array_equal(whole, surface_shift(mask, SPACING, voxel, SHIFT_MIN_RADIUS_MM, depth))


def test_a_clicks_depth_is_the_whole_stacks_distance_read_from_a_block_around_it():
    mask = ball(9.0) | np.roll(ball(6.0), (3, 10, -9), axis=(0, 1, 2))  # two balls: not one convex shape
    inside = ndi.distance_transform_edt(np.pad(mask, 1), sampling=SPACING)[1:-1, 1:-1, 1:-1]
    outside = ndi.distance_transform_edt(~mask, sampling=SPACING)
    rng = np.random.default_rng(0)
    for voxel in [tuple(int(v) for v in rng.integers(0, SHAPE)) for _ in range(60)]:
        if not mask[voxel[0]].any():
            assert depth_at(mask, voxel) == -np.inf  # no mask on its slice: nothing to measure from
            continue
        assert depth_at(mask, voxel) == pytest.approx(inside[voxel] if mask[voxel] else -outside[voxel])
        if not mask[voxel]:  # beyond the limit, only that it is further
            limited = depth_at(mask, voxel, limit_mm=3.0)
            assert limited == (-outside[voxel] if outside[voxel] <= 3.0 else -np.inf)
    points = np.array([[32, 32], [40, 32], [63, 0]])  # a scribble: its deepest point inside counts
    assert click_depth_mm(by_slice(mask), SPACING, 12, points) == pytest.approx(inside[12, 32, 32])

"""A click near an object's surface says where the surface lies around it, in 3D.

A user (and the CVPR 2025 protocol) clicks in the middle of what is wrong. Where the error is a band along the
surface (a mask a few pixels too wide or too narrow over many slices: the propagated masks' commonest error on
the development set), the click lies about halfway across the band, so the surface there is off by about twice
the click's distance to it, and it is off the same way on the surface that faces the same side nearby. The
model refines the clicked slice; this moves the surface of the other slices around the click by ``SHIFT_GAIN`` x
that distance, tapering to nothing at the shift's radius, on the part of the surface facing the way it faces at
the click. Without it a click fixed the band only within a few millimetres of itself (the CT spleen's 34,000
voxel band over 20 slices: 100-1,600 voxels a click). Measured with the protocol's box and five clicks
(docs/interaction.md, "Session 31").
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage as ndi

# The surface moves by SHIFT_GAIN x the click's distance to it (at the click; less further away). In the middle of
# a band the surface is off by twice that; 2 overshot where the band thins (the tumours' worst click -0.010).
SHIFT_GAIN = 1.5
# Only a click this close to the surface (mm, in 3D) moves it: deeper, the error is a missing or wrong part
# (the model's refinement of the clicked slice and its carry deal with it), not a band. 3 mm moved none of the
# development set's organs and tumours, whose clicks lie 3-8 mm from the surface; 12 mm lost .003 on the MR organs.
SHIFT_MAX_DEPTH_MM = 8.0
# The shift reaches as far as the object's equivalent radius on the clicked slice, at least SHIFT_MIN_RADIUS_MM
# (10 mm moved the amygdalae most; 25 mm there moved their far side too) and at most SHIFT_MAX_RADIUS_MM (the
# block's distance transforms take 0.7 s at that radius on 0.5 mm pixels and 1.5 mm slices, 0.1 s on the CT spleen).
SHIFT_MIN_RADIUS_MM, SHIFT_MAX_RADIUS_MM = 10.0, 50.0
# ... on the surface facing within about 60 degrees of the way it faces at the click (cosine of the angle between
# the normals): without it a click at one side of a small object moved its other side too (Colin27's amygdala
# -0.032 in one click).
SHIFT_FACING = 0.5


def mask_block(masks: Mapping[int, np.ndarray], shape: tuple[int, int], centre: tuple[int, int, int],
               reach: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object's masks (slice -> (rows, cols) bool, slices of ``shape``) as one boolean block (slices, rows,
    cols) of ``reach`` (3 voxels) on each side of ``centre`` = (slice, row, col); slices without a mask (past the
    object's ends too) are empty, rows and cols are cut at the slice's edges. Returns the block and its origin."""
    low, high = np.subtract(centre, reach), np.add(centre, reach) + 1
    low[1:], high[1:] = np.maximum(low[1:], 0), np.minimum(high[1:], shape)
    block = np.zeros(high - low, bool)
    for index, mask in masks.items():
        if low[0] <= index < high[0]:
            block[index - low[0]] = mask[low[1]: high[1], low[2]: high[2]]
    return block, low


def click_depth_mm(masks: Mapping[int, np.ndarray], spacing: tuple[float, float, float], index: int,
                   points: np.ndarray, limit_mm: float = np.inf) -> float:
    """How deep (mm, in 3D) the pixels ``points`` (K, 2) XY on slice ``index`` lie in the object's masks (slice ->
    (rows, cols) bool; ``spacing``: mm between slices, rows and cols): when any lies inside the mask there, the
    deepest one's depth (> 0); else minus the nearest one's distance to the masks (< 0; -inf when slice ``index``
    has no mask or that distance exceeds ``limit_mm``)."""
    mask = masks.get(index)
    if mask is None or not mask.any():
        return -np.inf
    cols, rows = points[:, 0].astype(int), points[:, 1].astype(int)
    inside = bool(mask[rows, cols].any())
    if inside:
        cols, rows = cols[mask[rows, cols]], rows[mask[rows, cols]]
    # The distance in the slice's own plane bounds the one in 3D: only the block within it (or ``limit_mm``) of the
    # points can hold the nearest voxel across the surface (a whole stack's transform took 1.4 s on the head CT).
    plane = ndi.distance_transform_edt(mask if inside else ~mask, sampling=spacing[1:])[rows, cols]
    reach_mm = min(float(plane.max()), limit_mm)
    centre = np.array([index, (rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2])
    spread = np.array([0, rows.max() - centre[1], cols.max() - centre[2]])  # the points' own extent about it
    reach = np.ceil(reach_mm / np.asarray(spacing)).astype(int) + 1 + spread
    block, low = mask_block(masks, mask.shape, tuple(centre), reach)
    at = (index - low[0], rows - low[1], cols - low[2])
    if inside:
        return float(ndi.distance_transform_edt(block, sampling=spacing)[at].max())
    distance = float(ndi.distance_transform_edt(~block, sampling=spacing)[at].min())
    return -distance if distance <= reach_mm else -np.inf


def surface_shift(block: np.ndarray, spacing: tuple[float, float, float], at: tuple[int, int, int],
                  radius_mm: float, depth_mm: float) -> np.ndarray:
    """The voxels of ``block`` (slices, rows, cols: the object's mask before a click) that a click at voxel ``at``,
    ``depth_mm`` from the surface (:func:`click_depth_mm`'s magnitude), moves: for a click outside the mask, the
    voxels outside within ``SHIFT_GAIN`` x that distance of the surface (tapering linearly to nothing at
    ``radius_mm`` from the click); inside, those inside within that depth of it; in both only where the surface
    faces the way it faces at the click (``SHIFT_FACING``; nothing where it has no one direction there).
    ``spacing``: mm between slices, rows and cols."""
    if block.ndim != 3 or len(at) != 3:
        raise ValueError(f"A 3D block and a voxel are needed, got shapes {block.shape} and {at}.")
    inside = ndi.distance_transform_edt(block, sampling=spacing)
    outside = ndi.distance_transform_edt(~block, sampling=spacing)
    grid = np.meshgrid(*((np.arange(n) - a) * s for n, a, s in zip(block.shape, at, spacing, strict=True)),
                       indexing="ij", sparse=True)
    distance = np.sqrt(sum(axis**2 for axis in grid))
    amount = SHIFT_GAIN * abs(depth_mm) * np.clip(1.0 - distance / radius_mm, 0.0, None)
    moved = (block & (inside < amount)) if block[at] else (~block & (outside < amount))
    # The surface's outward normal: the signed distance's gradient points inwards.
    gradient = np.gradient(inside - outside, *spacing)
    norm = np.sqrt(sum(g**2 for g in gradient))
    at_click = np.array([g[at] for g in gradient])
    length = float(np.linalg.norm(at_click))
    if length == 0.0:  # the middle of a symmetric gap
        return np.zeros_like(block)
    facing = sum(g * (c / length) for g, c in zip(gradient, at_click, strict=True))
    return moved & (norm > 0) & (facing >= SHIFT_FACING * norm)


def moved_by_click(masks: Mapping[int, np.ndarray], spacing: tuple[float, float, float],
                   voxel: tuple[int, int, int], radius_mm: float,
                   depth_mm: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The voxels a click at ``voxel`` (slice, row, col), ``depth_mm`` from the surface of the object's masks
    before it (slice -> (rows, cols) bool; ``spacing``: mm between slices, rows and cols), moves: None when it lies
    further than ``SHIFT_MAX_DEPTH_MM`` (its error is not a band along the surface), else :func:`surface_shift` on
    the block around it, out to ``radius_mm`` (the object's size there) kept within [SHIFT_MIN_RADIUS_MM,
    SHIFT_MAX_RADIUS_MM]: the block of moved voxels and its origin (slice, row, col)."""
    if not abs(depth_mm) <= SHIFT_MAX_DEPTH_MM:
        return None
    radius = float(np.clip(radius_mm, SHIFT_MIN_RADIUS_MM, SHIFT_MAX_RADIUS_MM))
    shape = next(iter(masks.values())).shape
    reach = np.ceil(max(radius, SHIFT_MAX_DEPTH_MM) / np.asarray(spacing)).astype(int) + 1
    block, low = mask_block(masks, shape, voxel, reach)
    moved = surface_shift(block, spacing, tuple(int(v) for v in np.subtract(voxel, low)), radius, depth_mm)
    return moved, low

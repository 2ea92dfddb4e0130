"""Slice geometry: every axis permutation and flip, oblique matrices, anisotropic pixels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from SegmentWithSAMLib.errors import PromptError, VolumeError
from SegmentWithSAMLib.geometry import Reach, View, Volume, prompts_to_slice, slice_axes, slice_image
from SegmentWithSAMLib.preprocessing import SliceTransform

from conftest import reoriented_volume

SHAPE_KJI = (5, 6, 7)
SPACING_IJK = np.array([0.8, 1.1, 2.5])
CANONICAL = Volume(np.arange(np.prod(SHAPE_KJI), dtype=np.int32).reshape(SHAPE_KJI),
                   np.diag([*SPACING_IJK, 1.0]) + np.array([[0, 0, 0, -3.0], [0, 0, 0, 4.0], [0, 0, 0, 9.0], [0] * 4]))


def reoriented(perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Volume:
    return reoriented_volume(CANONICAL, perm, flips)


ORIENTATIONS = list(itertools.product(itertools.permutations(range(3)), itertools.product([False, True], repeat=3)))


def test_there_are_48_orientations():
    assert len(ORIENTATIONS) == 48
    assert len({tuple(reoriented(p, f).ijk_to_ras.ravel()) for p, f in ORIENTATIONS}) == 48


def test_canonical_slices_are_oriented_as_slicer_displays_them():
    array = CANONICAL.array  # I → R, J → A, K → S
    axial = slice_image(CANONICAL, slice_axes(CANONICAL, "axial"), 2)
    np.testing.assert_array_equal(axial, array[2, ::-1, ::-1])  # top = anterior, left of screen = patient right
    coronal = slice_image(CANONICAL, slice_axes(CANONICAL, "coronal"), 3)
    np.testing.assert_array_equal(coronal, array[::-1, 3, ::-1])  # top = superior, left = right
    sagittal = slice_image(CANONICAL, slice_axes(CANONICAL, "sagittal"), 4)
    np.testing.assert_array_equal(sagittal, array[::-1, ::-1, 4])  # top = superior, left = anterior


@pytest.mark.parametrize("perm,flips", ORIENTATIONS)
def test_every_orientation_shows_the_same_anatomy(perm, flips):
    volume = reoriented(perm, flips)
    for view in View:
        reference_axes, axes = slice_axes(CANONICAL, view), slice_axes(volume, view)
        assert axes.num_slices == reference_axes.num_slices
        assert axes.pixel_spacing == pytest.approx(reference_axes.pixel_spacing)
        for index in range(axes.num_slices):
            # Slice indices count along each volume's own axis: find this slice's index through RAS.
            ras = CANONICAL.to_ras(reference_axes.pixel_to_ijk(index, [[0.0, 0.0]]))
            own_index, xy, _ = prompts_to_slice(volume, axes, ras)
            np.testing.assert_allclose(xy, [[0.0, 0.0]], atol=1e-9)
            np.testing.assert_array_equal(slice_image(volume, axes, own_index),
                                          slice_image(CANONICAL, reference_axes, index))
            # A slice mask goes back into each volume's grid on the same voxels (array values are voxel ids).
            mask2d = np.random.default_rng(index).random(axes.image_shape) > 0.5
            ours, reference = np.zeros(volume.array.shape, bool), np.zeros(CANONICAL.array.shape, bool)
            axes.oriented(ours)[own_index] = mask2d
            reference_axes.oriented(reference)[index] = mask2d
            assert sorted(volume.array[ours]) == sorted(CANONICAL.array[reference])
        # The same RAS prompt lands on the same pixel.
        ras = CANONICAL.to_ras([[3.2, 2.0, 1.0]])
        np.testing.assert_allclose(prompts_to_slice(volume, axes, ras)[1],
                                   prompts_to_slice(CANONICAL, reference_axes, ras)[1], atol=1e-9)


def _rotation(angles):
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@settings(max_examples=60, deadline=None)
@given(st.tuples(*[st.floats(-np.pi, np.pi)] * 3), st.tuples(*[st.floats(0.3, 4.0)] * 3),
       st.sampled_from(ORIENTATIONS), st.sampled_from(list(View)))
def test_ras_pixel_round_trip_for_any_matrix(angles, spacing, orientation, view):
    base = reoriented(*orientation)
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation(angles) @ (base.ijk_to_ras[:3, :3] / base.spacing) * np.array(spacing)
    volume = Volume(base.array, matrix)
    axes = slice_axes(volume, view)
    ijk = np.random.default_rng(0).uniform(0, np.array(volume.shape_ijk) - 1, size=(20, 3))
    slice_coord, xy = axes.ijk_to_pixel(volume.to_ijk(volume.to_ras(ijk)))
    np.testing.assert_allclose(volume.to_ras(axes.pixel_to_ijk(slice_coord, xy)), volume.to_ras(ijk), atol=1e-9)


def test_oblique_volume_uses_the_closest_axis():
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation((np.radians(25), np.radians(-15), np.radians(10)))
    volume = Volume(CANONICAL.array, matrix)
    assert slice_axes(volume, "axial").slice_axis == 2
    assert slice_axes(volume, "coronal").slice_axis == 1
    assert slice_axes(volume, "sagittal").slice_axis == 0


def test_anisotropic_pixels_are_made_square_for_the_model():
    # A sagittal slice of a 0.8 × 0.8 × 5 mm CT: rows are 5 mm apart, columns 0.8 mm.
    transform = SliceTransform.for_slice((40, 300), (5.0, 0.8), 256)
    assert transform.resized_shape == (213, 256)  # 200 mm × 240 mm, longest side → 256
    last_pixel_centre = [[255.5 - 0.5 * 256 / 300, 212.5 - 0.5 * 213 / 40]]
    np.testing.assert_allclose(transform.points_to_model([[299, 39]]), last_pixel_centre)


def test_prompts_must_be_on_one_slice_and_inside():
    axes = slice_axes(CANONICAL, "axial")
    with pytest.raises(PromptError, match="different axial slices"):
        prompts_to_slice(CANONICAL, axes, CANONICAL.to_ras([[1, 1, 1], [1, 1, 3]]))
    with pytest.raises(PromptError, match="outside the volume"):
        prompts_to_slice(CANONICAL, axes, CANONICAL.to_ras([[1, 1, 9]]))


@pytest.mark.parametrize("array,message", [
    (np.zeros((2, 3, 4, 5)), "4 dimensions"),
    (np.zeros((2, 3, 4, 3)), "RGB"),
    (np.zeros((0, 3, 4)), "empty"),
    (np.array([["a"]]), "dimensions"),
])
def test_bad_volumes_are_refused(array, message):
    with pytest.raises(VolumeError, match=message):
        Volume(array, np.eye(4))


def test_a_clicks_reach_is_a_ball_with_thick_slices_counted_at_the_pixel_size():
    # 1 x 1 mm pixels, 4 mm slices: a 3 mm ball reaches 3 slices each way (counted at 1 mm), not 0.
    volume = Volume(np.zeros((9, 11, 11), np.int16), np.diag([1.0, 1.0, 4.0, 1.0]))
    axes = slice_axes(volume, "axial")
    reach = Reach(axes, 4, np.array([[5, 5], [6, 5]]), radius_mm=3.0)  # two points: the nearest counts
    rows, cols = np.indices(axes.image_shape)
    nearest = np.minimum(np.hypot(rows - 5, cols - 5), np.hypot(rows - 5, cols - 6))
    for index in range(9):
        expected = nearest**2 <= 3.0**2 - (index - 4) ** 2
        np.testing.assert_array_equal(reach.on(index), expected)
    assert reach.on(7).any() and not reach.on(8).any()

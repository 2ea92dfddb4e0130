"""The CVPR 2025 protocol's rules (SegmentWithSAMLib.challenge) against the official evaluator's, on small arrays
where another reading of them would give other numbers. Each expected value is derived from the scripts
(``CVPR25_iter_eval.py``, ``get_boxes.py``) as the docstrings say; the scripts themselves run in
test_cvpr25.py's slow test."""

from __future__ import annotations

import numpy as np
import pytest

from SegmentWithSAMLib.challenge import auc, box_from_truth, score, simulate_click_3d
from SegmentWithSAMLib.errors import PromptError
from SegmentWithSAMLib.metrics import dice

# Two slabs 20 voxels along W, 0.1 mm apart along W: a shift of s voxels is s / 10 mm.
SPACING = (1.0, 1.0, 0.1)


def _two_slabs(shift_1: int | None, shift_2: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Truth: classes 1 and 2, slabs 4 × 6 × 20 in rows 2–7 and 12–17; the prediction the same slabs moved by
    ``shift_*`` voxels along W (None: that class not predicted). A shift of s leaves 20 − s of 20 columns, so the
    Dice is (20 − s) / 20, and every surface point is s / 10 mm from the other surface."""
    truth, segs = np.zeros((6, 20, 60), np.uint8), np.zeros((6, 20, 60), np.uint8)
    for label, rows, shift in ((1, slice(2, 8), shift_1), (2, slice(12, 18), shift_2)):
        truth[1:5, rows, 5:25] = label
        if shift is not None:
            segs[1:5, rows, 5 + shift: 25 + shift] = label
    return truth, segs


def test_the_nsd_cut_applies_to_the_case_mean_not_to_each_object():
    # Class 1: Dice 0.1 (shifted 1.8 mm, NSD 1), class 2: Dice 0.9 (0.2 mm, NSD 1). The script averages the
    # Dice (0.5 > 0.2) and then every class's NSD: 1.0. A cut per object would have given (0 + 1) / 2.
    truth, segs = _two_slabs(18, 2)
    assert dice(truth == 1, segs == 1) == pytest.approx(0.1) and dice(truth == 2, segs == 2) == pytest.approx(0.9)
    assert score(truth, segs, SPACING) == (pytest.approx(0.5), 1.0)
    # Class 1 at Dice 0.35 (NSD 1), class 2 not predicted (Dice 0): the mean 0.175 ≤ 0.2 makes the step's NSD 0,
    # where a cut per object would have kept class 1's 1.0 and given 0.5.
    truth, segs = _two_slabs(13, None)
    assert score(truth, segs, SPACING) == (pytest.approx(0.175), 0.0)


def test_the_cut_is_at_or_below_a_dice_of_0_2():
    truth, segs = _two_slabs(16, None)
    truth, segs = truth == 1, segs == 1  # one object: Dice 4 / 20 = 0.2 exactly, NSD would be 1
    assert score(truth, segs, SPACING) == (0.2, 0.0)
    truth, segs = _two_slabs(15, None)
    assert score(truth == 1, segs == 1, SPACING) == (0.25, 1.0)


def test_only_the_truth_s_classes_are_scored():
    truth, segs = _two_slabs(18, 2)
    segs[5, :, 40:] = 3  # a label the truth lacks: not a class
    assert score(truth, segs, SPACING) == (pytest.approx(0.5), 1.0)
    # A class of the truth the prediction misses counts 0 in both means (here the Dice mean 0.45 > 0.2).
    truth, segs = _two_slabs(2, None)
    assert score(truth, segs, SPACING) == (pytest.approx(0.45), pytest.approx(0.5))
    with pytest.raises(ValueError, match="no object"):
        score(np.zeros((2, 3, 4), np.uint8), np.ones((2, 3, 4), np.uint8), SPACING)
    with pytest.raises(ValueError, match="shape"):
        score(truth, segs[:, :, 1:], SPACING)


def test_the_nsd_spacing_is_in_array_order():
    truth = np.zeros((10, 20, 20), bool)
    truth[2:8, 5:15, 5:15] = True
    assert score(truth, truth, (1.0, 1.0, 1.0)) == (1.0, 1.0)
    shifted = np.roll(truth, 1, axis=2)  # one voxel along W: 1 mm with W's spacing 1 (within 2 mm), 3 mm with 3
    assert score(truth, shifted, (3.0, 1.0, 1.0)) == (pytest.approx(0.9), 1.0)
    assert score(truth, shifted, (1.0, 1.0, 3.0))[1] == pytest.approx(0.905, abs=1e-3)


def test_the_auc_integrates_the_last_five_steps():
    # The script: cumulative_trapezoid(values[-5:], arange(5))[-1]: the box step (first of six) is left out.
    assert auc([0.1, 0.5, 0.6, 0.7, 0.8, 0.9]) == pytest.approx(2.8)
    assert auc([0.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == 4.0 and auc([0.9]) == 0.0
    assert auc([0.1, 0.5, 0.6, 0.7], clicks=3) == pytest.approx(1.2)


def test_the_box_is_on_the_middle_one_of_the_object_s_slices():
    truth = np.zeros((30, 200, 300), bool)
    truth[5:9, 50:60, 100:140] = True  # 1600 voxels on slices 5–8
    truth[9:20, 52:58, 110:120] = True  # 660 on slices 9–19
    box = box_from_truth(truth)
    # get_boxes.py: z_mid = unique(z)[len // 2] = 5 + 15 // 2 = 12 (the voxels' median z would be 7).
    assert (box.z_min, box.z_max, box.z_mid) == (5, 19, 12)
    grow_x, grow_y = int(3 * 300 / 256), int(3 * 200 / 256)  # 3 and 2
    assert (box.z_mid_x_min, box.z_mid_x_max) == (110 - grow_x, 119 + grow_x)
    assert (box.z_mid_y_min, box.z_mid_y_max) == (52 - grow_y, 57 + grow_y)


def test_the_box_of_an_object_with_a_gap_and_at_the_border():
    truth = np.zeros((12, 40, 600), bool)
    truth[2:4, 0:5, 590:600] = True
    truth[10, 38:40, 0:3] = True
    box = box_from_truth(truth, shift=5)
    # Slices {2, 3, 10}: z_mid = 3; grown by int(5 · 600 / 256) = 11 columns and int(5 · 40 / 256) = 0 rows.
    assert (box.z_min, box.z_mid, box.z_max) == (2, 3, 10)
    assert (box.z_mid_x_min, box.z_mid_x_max, box.z_mid_y_min, box.z_mid_y_max) == (579, 599, 0, 4)
    assert box_from_truth(truth, shift=0).z_mid_x_min == 590
    with pytest.raises(PromptError):
        box_from_truth(np.zeros((3, 4, 4), bool))


def _reference_click(truth, prediction):
    """The protocol computed the plain way: the EDT of the largest error component in the volume padded by one
    voxel of background, ties drawn with seed 42. Below 60 million voxels the script's crop and 25 % padding
    change nothing."""
    import cc3d
    from scipy.ndimage import distance_transform_edt

    labels = cc3d.connected_components((truth != prediction).astype(np.uint8), connectivity=26)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    distances = distance_transform_edt(np.pad(labels == np.argmax(sizes), 1))[1:-1, 1:-1, 1:-1]
    ties = np.argwhere(distances == distances.max())
    index = tuple(int(v) for v in ties[np.random.RandomState(42).choice(len(ties))])
    return index, bool(truth[index])


def test_the_click_simulator_follows_the_protocol():
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(3)
    for trial in range(12):
        truth = binary_dilation(rng.random((12, 24, 24)) > 0.985, iterations=2)
        prediction = truth.copy()
        prediction[: 6 + trial % 4] = binary_dilation(truth[: 6 + trial % 4], iterations=trial % 3)
        prediction[:, :, : 3 + trial] = False
        if trial == 0:
            prediction[:] = False  # an empty prediction: a foreground click in the object
        click = simulate_click_3d(truth, prediction)
        assert click == _reference_click(truth, prediction)
        index, positive = click
        assert truth[index] != prediction[index] and positive == truth[index]
    assert simulate_click_3d(truth, truth) is None  # perfect: no click (the script's None in clicks_order)
    with pytest.raises(PromptError):
        simulate_click_3d(truth, truth[1:])


def test_the_click_goes_to_the_largest_error_not_the_deepest():
    truth, prediction = np.zeros((10, 12, 40), bool), np.zeros((10, 12, 40), bool)
    truth[2:5, 2:5, 2:5] = True  # missed: 27 voxels, 2 deep at its centre
    prediction[7, 9, 5:35] = True  # false positive: 30 voxels in a line, each 1 deep
    # The larger component wins; its 30 voxels tie at depth 1, and the draw with seed 42 picks one in C order.
    expected = (7, 9, 5 + int(np.random.RandomState(42).choice(30)))
    assert simulate_click_3d(truth, prediction) == (expected, False)
    prediction[7, 9, 20:] = False  # now 15 voxels: the missed cube's centre, a foreground click
    assert simulate_click_3d(truth, prediction) == ((3, 3, 3), True)


def test_equal_components_are_chosen_in_c_order_whatever_the_memory_layout():
    truth = np.zeros((6, 6, 6), bool)
    truth[4:6, 0:2, 0:2] = True  # first in Fortran order
    truth[0:2, 4:6, 4:6] = True  # first in C order (the script's files), so cc3d numbers it 1
    tie = np.unravel_index(np.random.RandomState(42).choice(8), (2, 2, 2))  # all 8 voxels are 1 deep
    expected = (int(tie[0]), 4 + int(tie[1]), 4 + int(tie[2]))
    assert simulate_click_3d(np.asfortranarray(truth), np.zeros((6, 6, 6), bool, order="F")) == (expected, True)


def test_a_huge_error_is_measured_at_half_resolution():
    """A missed cube of 263³ voxels: its box padded by int(263 / 4) = 65 voxels a side is 393³ > 60 million
    voxels, so the script halves it (blocks of 2 from the padded box's corner) before the EDT. The cube covers
    blocks 32–163 of each axis (padded voxels 65–327); the deepest are blocks 97 and 98 (66 blocks from the
    outside), padded voxels 194–197, i.e. the cube's voxels 129–132 on each axis: 64 voxels tie, and the draw with
    seed 42 picks the 38th, (2, 1, 2) among them. At full resolution the one deepest voxel would be the centre,
    131 on each axis."""
    truth = np.zeros((266, 267, 268), bool)
    origin = np.array([1, 2, 3])
    truth[1:264, 2:265, 3:266] = True
    assert np.random.RandomState(42).choice(64) == 38
    index, positive = simulate_click_3d(truth, np.zeros_like(truth))
    assert index == tuple(int(v) for v in origin + [131, 130, 131]) and positive

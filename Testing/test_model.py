"""LiteMedSAM through the core on real data: Colin27 + AAL, and the InVesalius head CT."""

from __future__ import annotations

import numpy as np
import pytest

from SegmentWithSAMLib.api import Segmenter
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.preprocessing import resolve_window
from SegmentWithSAMLib.session import Session

from conftest import middle_slice, tight_box

# Measured with benchmarks/quality.py (tight AAL box, plain pipeline): axial 0.633, coronal 0.788,
# sagittal 0.325 (the atlas's sagittal hippocampus is a thin, coarse band; the model follows the grey matter).
BOX_DICE_FLOOR = {"axial": 0.58, "coronal": 0.73, "sagittal": 0.28}
# One click at the interior point through the 14–40 mm box ensemble: measured axial 0.686, coronal 0.680,
# sagittal 0.472 (the floors hold for prompts.click_logits too).
CLICK_DICE_FLOOR = {"axial": 0.62, "coronal": 0.62, "sagittal": 0.42}


@pytest.fixture(scope="module")
def session(colin, model, cache):
    return Session(colin, model, cache=cache)


def _ras(volume, axes, index, xy):
    return volume.to_ras(axes.pixel_to_ijk(index, np.asarray(xy, dtype=float).reshape(-1, 2)))


def _prompt(session, view, points_ras=None, labels=None, box_ras=None) -> tuple[int, np.ndarray, Segmenter]:
    """A 2D prompt through the engine on a new object: its slice, its mask there, and the segmenter holding it."""
    seg = Segmenter(session.volume, session.model, view, session=session)
    update = seg.prompt("object", points_ras, labels, box_ras)
    (index, mask), = update.changed.items()
    return index, mask, seg


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_box_on_left_hippocampus(session, colin, atlas, view):
    axes = slice_axes(colin, view)
    index, truth = middle_slice(atlas, axes, "Hippocampus_L")
    found, mask, seg = _prompt(session, view, box_ras=_ras(colin, axes, index, tight_box(truth)))
    assert found == index
    assert dice(mask, truth) >= BOX_DICE_FLOOR[view]
    volume_mask = seg.mask("object")
    assert volume_mask.shape == colin.array.shape
    assert volume_mask.sum() == mask.sum()
    np.testing.assert_array_equal(axes.oriented(volume_mask)[index], mask)


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_one_click_on_left_hippocampus(session, colin, atlas, view):
    from scipy import ndimage as ndi

    axes = slice_axes(colin, view)
    index, truth = middle_slice(atlas, axes, "Hippocampus_L")
    distance = ndi.distance_transform_edt(np.pad(truth, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(np.argmax(distance), truth.shape)
    found, mask, _ = _prompt(session, view, points_ras=_ras(colin, axes, index, [col, row]), labels=[1])
    assert found == index and dice(mask, truth) >= CLICK_DICE_FLOOR[view]


def test_negative_click_removes_the_region_it_falls_in(session, colin, atlas):
    axes = slice_axes(colin, "axial")
    index, truth = middle_slice(atlas, axes, "Hippocampus_L")
    box = _ras(colin, axes, index, tight_box(truth))
    mask = _prompt(session, "axial", box_ras=box)[1]
    row, col = np.argwhere(mask)[0]
    cut = _prompt(session, "axial", points_ras=_ras(colin, axes, index, [col, row]), labels=[0], box_ras=box)[1]
    assert not cut[row, col] and cut.sum() < mask.sum()


def test_second_prediction_on_a_slice_runs_no_encoder(session, colin, atlas):
    axes = slice_axes(colin, "coronal")
    index, truth = middle_slice(atlas, axes, "Putamen_L")
    box = _ras(colin, axes, index, tight_box(truth))
    _prompt(session, "coronal", box_ras=box)
    runs = session.model.encoder_runs
    hits = session.cache.hits
    _prompt(session, "coronal", box_ras=box)
    session.set_slice("axial", 10)  # move away, then come back: the cache must serve it
    runs_after_away = session.model.encoder_runs
    _prompt(session, "coronal", box_ras=box)
    assert runs_after_away == runs + 1
    assert session.model.encoder_runs == runs_after_away
    assert session.cache.hits > hits


def test_ct_windows_and_thick_slices(cranium, model, cache):
    assert resolve_window(cranium.array, "brain").lower == pytest.approx(0.0)
    assert resolve_window(cranium.array, "400,40").upper == pytest.approx(240.0)
    session = Session(cranium, model, window="brain", cache=cache)
    axes = slice_axes(cranium, "sagittal")  # 0.96 mm columns × 1.5 mm rows
    assert axes.pixel_spacing == pytest.approx((1.5, 0.957), abs=1e-3)
    index = axes.num_slices // 2
    box_xy = np.array([60.0, 30.0, 200.0, 90.0])
    found, mask, _ = _prompt(session, "sagittal", box_ras=_ras(cranium, axes, index, box_xy.reshape(2, 2)))
    transform = session.predictor.transform
    assert found == index and transform.resized_shape == (round(108 * 1.5 * 256 / (256 * 0.957)), 256)
    rows, cols = np.nonzero(mask)
    assert len(rows) > 500  # the brain inside the box
    assert cols.min() >= 55 and cols.max() <= 205 and rows.min() >= 25 and rows.max() <= 95

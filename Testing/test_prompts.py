"""The boxes a first positive click decodes (``prompts.click_logits``), on one slice of an organ from each of the
development set's CT and MR cases (``Testing/data``, with their sources and licences)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from SegmentWithSAMLib.actions import Prompt
from SegmentWithSAMLib.cvpr25 import WINDOW
from SegmentWithSAMLib.engine import Engine
from SegmentWithSAMLib.geometry import Volume, slice_axes
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.prompts import ENSEMBLE_BOX_MM, boxes_around, click_logits
from SegmentWithSAMLib.session import Session

ORGANS = np.load(Path(__file__).parent / "data" / "organ_slices.npz")


@pytest.fixture(scope="module", params=["ct_spleen", "mr_kidney_left"])
def organ(request, default_model, cache):
    """(session, its axial axes, the organ's mask, a click at its deepest pixel (1, 2) XY) on a one-slice volume
    of the organ's slice (0–255, the challenge's range, so the identity window)."""
    image, truth = ORGANS[f"{request.param}_image"], ORGANS[f"{request.param}_truth"]
    rows_mm, cols_mm = ORGANS[f"{request.param}_spacing"]
    volume = Volume(image[None], np.diag([-cols_mm, -rows_mm, 5.0, 1.0]))
    session = Session(volume, default_model, window=WINDOW, cache=cache)
    session.set_slice("axial", 0)
    depth = ndi.distance_transform_edt(truth)
    row, col = np.unravel_index(np.argmax(depth), truth.shape)
    return session, slice_axes(volume, "axial"), truth, np.array([[col, row]], float)


def test_a_click_in_an_organ_segments_the_organ_not_a_patch_of_it(organ):
    # The ensemble alone (14–40 mm, sized for the brain's structures) gave a patch of the spleen (149 mm across on
    # this slice) or of the kidney (42 mm); the larger box the click chooses gives the organ, through the engine's
    # one prompt as every front end sends it.
    session, axes, truth, xy = organ
    ensemble = session.predictor.predict_boxes(boxes_around(xy, axes.pixel_spacing)).logits.mean(axis=0) > 0
    _, update = Engine(session, "axial").step(None, Prompt(0, None, ((*xy[0], True),)))
    assert dice(ensemble, truth) < 0.3
    assert dice(update.changed[0], truth) > 0.8


def test_a_negative_click_the_wide_mask_holds_sends_the_first_click_back_to_the_ensemble(organ):
    session, axes, truth, xy = organ
    wide = click_logits(session.predictor, xy, axes.pixel_spacing) > 0
    depth = ndi.distance_transform_edt(wide)
    inside = np.argwhere(depth >= depth.max() / 2)  # (row, col) well inside the wide mask, far from the click
    row, col = inside[np.argmax(np.hypot(*(inside - xy[0, ::-1]).T))]
    logits = click_logits(session.predictor, xy, axes.pixel_spacing, np.array([[col, row]], float))
    ensemble = session.predictor.predict_boxes(boxes_around(xy, axes.pixel_spacing)).logits.mean(axis=0)
    np.testing.assert_array_equal(logits, ensemble)


def test_the_widest_box_bounds_the_choice(organ):
    session, axes, _, xy = organ
    bounded = click_logits(session.predictor, xy, axes.pixel_spacing, widest_mm=max(ENSEMBLE_BOX_MM))
    ensemble = session.predictor.predict_boxes(boxes_around(xy, axes.pixel_spacing)).logits.mean(axis=0)
    np.testing.assert_array_equal(bounded, ensemble)

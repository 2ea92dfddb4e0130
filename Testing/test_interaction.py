"""3D interaction on real data: a 3D box fills its range, clicks anywhere correct the 3D mask without touching key
or user slices, a negative click on an over-segmented end slice removes it for good, a positive click past the
extent extends it (real LiteMedSAM on Colin27 + AAL and on the head CT)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.errors import PromptError
from SegmentWithSAMLib.geometry import bounding_box
from SegmentWithSAMLib.interaction import Interaction, Kind, ObjectState
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.propagation import Cancelled
from SegmentWithSAMLib.session import Session

STRUCTURE = "Thalamus_L"
HALF = 3  # slices on each side of the box's slice: a 7-slice range keeps the encoder's work small


@pytest.fixture(scope="module")
def session(colin, model, cache):
    return Session(colin, model, cache=cache)


@pytest.fixture(scope="module")
def truth(session, atlas):
    """The structure in the axial view's (slice, rows, cols) orientation and its middle slice."""
    oriented = session.axes("axial").oriented(atlas.array == AAL_STRUCTURES[STRUCTURE])
    slices = np.flatnonzero(oriented.any(axis=(1, 2)))
    return oriented, int(slices[len(slices) // 2])


def boxed(session, truth, half=HALF) -> Interaction:
    oriented, mid = truth
    interaction = Interaction(session, "axial")
    update = interaction.set_box("thalamus", mid, bounding_box(oriented[mid]), (mid - half, mid + half))
    assert set(update.changed) == set(range(mid - half, mid + half + 1)) and update.stopped == {
        "up": "range end", "down": "range end"}
    return interaction


def centre(mask: np.ndarray) -> tuple[float, float]:
    """The deepest pixel (col, row) of a 2D mask."""
    row, col = np.unravel_index(np.argmax(ndi.distance_transform_edt(mask)), mask.shape)
    return float(col), float(row)


def test_a_3d_box_fills_its_range_and_lands_on_the_structure(session, truth):
    oriented, mid = truth
    interaction = boxed(session, truth)
    state = interaction.objects["thalamus"]
    assert state.kinds[mid] is Kind.KEY and all(state.kinds[i] is Kind.ENGINE for i in state.masks if i != mid)
    band = slice(mid - HALF, mid + HALF + 1)
    assert dice(interaction.oriented_mask("thalamus")[band], oriented[band]) >= 0.7  # 0.82 measured
    label = interaction.labelmap()
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
    assert np.array_equal(label > 0, interaction.mask("thalamus"))


def test_a_click_corrects_its_slice_and_neighbours_but_not_past_key_or_user_slices(session, truth):
    oriented, mid = truth
    interaction = boxed(session, truth)
    user = np.zeros_like(oriented[mid])
    user[100:110, 80:90] = True
    interaction.set_user_slice("thalamus", mid - 2, user)
    before = {i: m.copy() for i, m in interaction.objects["thalamus"].masks.items()}
    # A positive click in the largest missed part of slice mid - 1.
    missed = oriented[mid - 1] & ~before[mid - 1]
    labels, _ = ndi.label(missed)
    largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    update = interaction.click("thalamus", mid - 1, centre(largest), True)
    after = interaction.objects["thalamus"].masks
    assert set(update.changed) <= {mid - 1}  # mid (the box's key slice) and mid - 2 (the user's) bound it
    assert np.array_equal(after[mid - 2], user) and np.array_equal(after[mid], before[mid])
    assert interaction.objects["thalamus"].kinds[mid - 1] is Kind.KEY
    assert dice(after[mid - 1], oriented[mid - 1]) > dice(before[mid - 1], oriented[mid - 1])
    # A second click on the same slice accumulates with the first.
    update = interaction.click("thalamus", mid - 1, centre(largest), True)
    assert len(interaction.objects["thalamus"].clicks[mid - 1]) == 2


def test_a_negative_click_removes_an_over_segmented_end_slice_for_good(session, truth, atlas):
    oriented, mid = truth
    last = int(np.flatnonzero(oriented.any(axis=(1, 2)))[-1])
    interaction = Interaction(session, "axial")
    interaction.set_box("thalamus", last - 2, bounding_box(oriented[last - 2]), (last - 2, last + 2))
    state = interaction.objects["thalamus"]
    past = [i for i in (last + 2, last + 1) if state.masks.get(i, np.zeros(1, bool)).any()]
    assert last + 1 in past and not oriented[last + 1].any()  # the range goes past the structure
    for index in past:  # the outermost first: each is the end slice when it is clicked
        interaction.click("thalamus", index, centre(interaction.objects["thalamus"].masks[index]), False)
        state = interaction.objects["thalamus"]
        assert not state.masks[index].any() and state.kinds[index] is Kind.KEY
        assert not any(m.any() for i, m in state.masks.items() if i > index)  # nothing beyond it either
    # A later click between the box and those slices propagates up to them and stops there: nothing grows back.
    interaction.click("thalamus", last, centre(state.masks[last]), True)
    state = interaction.objects["thalamus"]
    assert not any(state.masks[i].any() for i in past)


def test_a_negative_click_inside_the_object_trims_it_and_never_empties_slices(session, truth):
    """The centre of the largest 3D error can lie deep in a slice's mask that is mostly right (Colin27's putamen):
    inside the object's extent a negative click trims around itself, it never removes the slice's mask whole."""
    oriented, mid = truth
    interaction = boxed(session, truth)
    before = {i: m.copy() for i, m in interaction.objects["thalamus"].masks.items()}
    update = interaction.click("thalamus", mid + 1, centre(before[mid + 1]), False)
    after = interaction.objects["thalamus"].masks
    assert after[mid + 1].any() and after[mid + 1].sum() < before[mid + 1].sum()
    assert all(after[i].any() and not (after[i] & ~before[i]).any() for i in update.changed)  # only removed


def test_a_positive_click_adds_to_the_engines_slices_and_takes_nothing_away(session, truth):
    oriented, mid = truth
    interaction = boxed(session, truth)
    before = {i: m.copy() for i, m in interaction.objects["thalamus"].masks.items()}
    missed = oriented[mid + 2] & ~before[mid + 2]
    labels, _ = ndi.label(missed)
    largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    col, row = centre(largest)
    update = interaction.click("thalamus", mid + 2, (col, row), True)
    after = interaction.objects["thalamus"].masks
    assert mid + 2 in update.changed and after[mid + 2][int(row), int(col)] and np.array_equal(after[mid], before[mid])
    assert all(not (before[i] & ~after[i]).any() for i in update.changed if i != mid + 2)


def test_a_positive_click_past_the_extent_extends_it(session, truth):
    oriented, mid = truth
    interaction = boxed(session, truth, half=1)
    beyond = mid + 3  # outside the range mid-1 … mid+1, the structure goes on there
    update = interaction.click("thalamus", beyond, centre(oriented[beyond]), True)
    state = interaction.objects["thalamus"]
    assert state.slice_range == (mid - 1, beyond) and any("now spans" in n for n in update.notices)
    assert state.masks[beyond].any() and state.masks[mid + 2].any()  # the gap is filled from the click
    assert dice(state.masks[beyond], oriented[beyond]) >= 0.5


def test_bad_prompts_are_refused_and_a_cancelled_click_changes_nothing(session, truth):
    oriented, mid = truth
    interaction = boxed(session, truth, half=1)
    before = interaction.oriented_mask("thalamus")
    with pytest.raises(PromptError, match="outside .* range"):
        interaction.click("thalamus", mid + 5, (90, 100), False)
    with pytest.raises(PromptError, match="outside the slice"):
        interaction.click("thalamus", mid, (-40, 100), True)
    with pytest.raises(PromptError, match="outside the volume"):
        interaction.click_ras("thalamus", [400.0, 0, 0], True)
    with pytest.raises(PromptError, match="misses the slice"):
        interaction.set_box("other", mid, [-50, -50, -10, -10], (mid - 1, mid + 1))
    with pytest.raises(PromptError, match="outside the volume"):
        interaction.set_box("other", mid, [10, 10, 50, 50], (500, 510))
    with pytest.raises(Cancelled):
        interaction.set_box("other", mid, bounding_box(oriented[mid]), (mid - 1, mid + 1), cancel=lambda: True)
    assert np.array_equal(interaction.oriented_mask("thalamus"), before) and "other" not in interaction.objects
    header, arrays = interaction.objects["thalamus"].to_message()
    restored = ObjectState.from_message(header, arrays, interaction.axes.image_shape)
    assert restored.kinds == interaction.objects["thalamus"].kinds and restored.slice_range == (mid - 1, mid + 1)
    assert all(np.array_equal(restored.masks[i], m) for i, m in interaction.objects["thalamus"].masks.items())
    with pytest.raises(PromptError, match="malformed"):
        ObjectState.from_message({"range": [1]}, arrays, interaction.axes.image_shape)


def test_a_box_past_the_head_cts_edge_is_clipped_with_a_notice(cranium, model, cache):
    """Users draw ROIs generously near borders: the head touches the CT's field of view."""
    session = Session(cranium, model, window="brain", cache=cache)
    interaction = Interaction(session, "axial")
    axes = interaction.axes
    head = axes.oriented(cranium.array > -300)
    index = axes.num_slices // 2
    box = bounding_box(head[index]) + [-30, -30, 30, 30]  # past every edge of the 256² slice
    update = interaction.set_box("head", index, box, (index - 1, index + 1))
    assert any("clipped" in notice for notice in update.notices)
    assert dice(interaction.objects["head"].masks[index], head[index]) >= 0.5  # 0.58 in the brain window
    # The same box in RAS through the 2D path (segment --box, the Slicer preview): clipped too, not refused.
    corners = cranium.to_ras(axes.pixel_to_ijk(index, box.reshape(2, 2)))
    result = session.segment("axial", box_ras=corners)
    assert any("clipped" in notice for notice in result.notices) and result.index == index
    assert np.array_equal(result.mask2d, interaction.objects["head"].masks[index])
    with pytest.raises(PromptError, match="misses the volume"):
        session.segment("axial", box_ras=corners + [600.0, 0, 0])
    # A positive click in the largest missed part of the head reaches as far as the object is large: more than
    # the 4 mm cap of small structures could ever add (a disk of twice that radius).
    before = interaction.objects["head"].masks[index].copy()
    labels, _ = ndi.label(head[index] & ~before)
    missed = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    interaction.click("head", index, centre(missed), True)
    added = interaction.objects["head"].masks[index] & ~before
    assert added.sum() > np.pi * (2 * 4.0 / min(axes.pixel_spacing)) ** 2
    assert dice(interaction.objects["head"].masks[index], head[index]) > dice(before, head[index]) + 0.02

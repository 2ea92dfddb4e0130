"""Where to click next, on real data: a suggestion lies on the object's slices inside the volume and maps to RAS
and back; a slice emptied or shifted in the state is suggested with the right hint; an earlier click's place is
not suggested again; an object without a mask is refused (real LiteMedSAM on the default engine, Colin27 + AAL)."""

from __future__ import annotations

import numpy as np
import pytest

from SegmentWithSAMLib.actions import Box3D, click_from_ras
from SegmentWithSAMLib.api import Segmenter
from SegmentWithSAMLib.data import AAL_STRUCTURES
from SegmentWithSAMLib.errors import PromptError
from SegmentWithSAMLib.geometry import bounding_box
from SegmentWithSAMLib.session import Session
from SegmentWithSAMLib.state import ObjectState
from SegmentWithSAMLib.suggest import ADD, CLICKED_MM, REMOVE, suggest

STRUCTURE = "Thalamus_L"
HALF = 3  # slices on each side of the box's slice: a 7-slice range keeps the encoder's work small


@pytest.fixture(scope="module")
def boxed(colin, atlas, default_model, cache) -> Segmenter:
    """The thalamus after a 3D box on its middle axial slice over 7 slices."""
    session = Session(colin, default_model, cache=cache)
    seg = Segmenter(colin, default_model, "axial", session=session)
    oriented = seg.axes.oriented(atlas.array == AAL_STRUCTURES[STRUCTURE])
    slices = np.flatnonzero(oriented.any(axis=(1, 2)))
    mid = int(slices[len(slices) // 2])
    seg.step("thalamus", Box3D(mid, tuple(float(v) for v in bounding_box(oriented[mid])), (mid - HALF, mid + HALF)))
    return seg


def planted(seg: Segmenter, index: int, mask: np.ndarray) -> ObjectState:
    """The thalamus's state with slice ``index``'s mask replaced by ``mask``."""
    state = seg.states["thalamus"].copy()
    state.masks[index] = mask
    return state


def test_a_suggestion_lies_on_the_object_and_maps_to_ras_and_back(boxed):
    state = boxed.states["thalamus"]
    found = boxed.suggest("thalamus")
    assert state.slice_range[0] <= found.index <= state.slice_range[1]
    rows, cols = boxed.axes.image_shape
    assert 0 <= found.xy[0] < cols and 0 <= found.xy[1] < rows
    assert found.hint in (ADD, REMOVE) and found.reason.endswith(".") and 0 < found.confidence <= 1
    inside = bool(state.masks[found.index][int(found.xy[1]), int(found.xy[0])])
    assert inside == (found.hint == REMOVE)  # "remove" points into the mask, "add" next to it
    click = click_from_ras(boxed.volume, boxed.axes, found.ras(boxed.volume, boxed.axes), found.hint == ADD)
    assert (click.index, click.xy) == (found.index, found.xy)


def test_an_emptied_slice_is_suggested_with_add(boxed):
    state = boxed.states["thalamus"]
    index = state.slice_range[0] + 2
    found = suggest(boxed.session, boxed.axes, planted(boxed, index, np.zeros(boxed.axes.image_shape, bool)))
    assert (found.index, found.hint) == (index, ADD)
    assert str(index) in found.reason
    assert state.masks[index - 1][int(found.xy[1]), int(found.xy[0])]  # where the neighbours have the object


def test_a_shifted_slice_is_suggested(boxed):
    state = boxed.states["thalamus"]
    index = state.slice_range[1] - 2
    shifted = np.roll(state.masks[index], 12, axis=1)  # 12 pixels to the right: off the object
    found = suggest(boxed.session, boxed.axes, planted(boxed, index, shifted))
    assert found.index == index
    x, y = int(found.xy[0]), int(found.xy[1])
    wrong = (shifted & ~state.masks[index]) if found.hint == REMOVE else (state.masks[index] & ~shifted)
    assert wrong[y, x]


def test_the_place_of_an_earlier_click_is_not_suggested_again(boxed):
    seg = Segmenter(boxed.volume, boxed.session.model, "axial", session=boxed.session)
    seg.states["thalamus"] = boxed.states["thalamus"]
    first = seg.suggest("thalamus")
    seg.click("thalamus", first.ras(seg.volume, seg.axes), first.hint == ADD)
    second = seg.suggest("thalamus")
    spacing = np.array(seg.axes.spacing_ijk)
    apart = [seg.axes.pixel_to_ijk(s.index, np.array([s.xy]))[0] * spacing for s in (first, second)]
    assert np.linalg.norm(apart[0] - apart[1]) >= CLICKED_MM


def test_an_object_without_a_mask_is_refused(boxed):
    with pytest.raises(PromptError, match="no mask"):
        boxed.suggest("nothing yet")
    with pytest.raises(PromptError, match="no mask"):
        suggest(boxed.session, boxed.axes, ObjectState((0, 10)))
    empty = ObjectState((0, 10), masks={5: np.zeros(boxed.axes.image_shape, bool)})
    with pytest.raises(PromptError, match="no mask"):
        suggest(boxed.session, boxed.axes, empty)


def test_the_backend_suggests_what_the_model_here_suggests(boxed, colin):
    from SegmentWithSAMLib.backend.client import BackendClient
    from SegmentWithSAMLib.errors import BackendError

    state = boxed.states["thalamus"]
    with BackendClient(device="cpu", prefetch=0) as client:
        remote = Segmenter(colin, backend=client)
        remote.step("thalamus", Box3D(state.box[0], tuple(float(v) for v in state.box[1]), state.slice_range))
        assert remote.suggest("thalamus") == boxed.suggest("thalamus")  # the state went as a version: the same
        index = state.slice_range[0] + 2
        emptied = planted(boxed, index, np.zeros(boxed.axes.image_shape, bool))
        remote.states["thalamus"] = emptied  # edited here: it goes whole
        assert remote.suggest("thalamus") == suggest(boxed.session, boxed.axes, emptied)
        with pytest.raises(BackendError, match="no mask"):
            remote.suggest("nothing yet")

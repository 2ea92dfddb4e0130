"""Scribbles and lassos (issue #31): their checks and pixels, then on real data (LiteMedSAM on the default
engine, Colin27 + AAL's left thalamus, 7 axial slices): a lasso makes its slice and propagates through its
range, a negative lasso cuts its inside and what continues it, a scribble starts an object or corrects one in 3D
as clicks along it would, never over a key slice; bad strokes are refused and change nothing; the CLI and a
batch manifest take them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_engine
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from test_engine import HALF, assert_same, boxed, checked_step, largest_part

from SegmentWithSAMLib.actions import Box3D, Lasso, Scribble, from_message, stroke_from_ras, to_message
from SegmentWithSAMLib.engine import LASSO_AGREE, SNAP_MM, Engine
from SegmentWithSAMLib.errors import PromptError
from SegmentWithSAMLib.geometry import bounding_box
from SegmentWithSAMLib.metrics import dice
from SegmentWithSAMLib.state import Kind
from SegmentWithSAMLib.strokes import check_stroke, draw_stroke, fill_lasso, sample_stroke

session, truth = test_engine.session, test_engine.truth  # the thalamus's fixtures


def outline(mask: np.ndarray) -> list[tuple[float, float]]:
    """A closed outline (x, y) around ``mask``'s largest part: its boundary pixels in angular order about its
    centre (the part is convex enough for that on the thalamus's slices)."""
    part = largest_part(mask)
    edge = part & ~ndi.binary_erosion(part)
    rows, cols = np.nonzero(edge)
    angle = np.arctan2(rows - rows.mean(), cols - cols.mean())
    order = np.argsort(angle)
    return [(float(c), float(r)) for c, r in zip(cols[order][::2], rows[order][::2], strict=True)]


# ---- the strokes themselves ----------------------------------------------------------------------------------
def test_a_lasso_fills_its_inside_and_bad_strokes_are_refused():
    square = check_stroke([(10, 10), (30, 10), (30, 30), (10, 30), (10, 10)], (64, 64), closed=True)
    assert len(square) == 4  # the closing point is the first
    inside = fill_lasso(square, (64, 64))
    assert inside[10:31, 10:31].all() and inside.sum() == 21 * 21
    for points, closed, message in (([(5, 5)], False, "at least 2"), ([(1, 1), (2, 2)], True, "at least 3"),
                                    ([(10, 10), (30, 30), (30, 10), (10, 30)], True, "crosses itself"),
                                    ([(1, 1), (2, 2), (3, 3)], True, "no area"),
                                    ([(1, 1), (100, 1), (5, 5)], True, "leaves the slice"),
                                    ([(1, 1), (np.nan, 1)], False, "leaves the slice"), ("abc", False, "list")):
        with pytest.raises(PromptError, match=message):
            check_stroke(points, (64, 64), closed)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 63), st.floats(0, 63)), min_size=2, max_size=12),
       st.floats(0.3, 2.0), st.floats(0.5, 5.0))
def test_a_scribbles_clicks_follow_it_no_farther_apart_than_asked(points, pixel_mm, every_mm):
    xy = np.array(points)
    if not np.any(np.diff(xy, axis=0)):
        return
    samples = sample_stroke(xy, (pixel_mm, pixel_mm), every_mm)
    assert np.allclose(samples[0], xy[0]) and np.allclose(samples[-1], xy[-1])
    gaps = np.linalg.norm(np.diff(samples, axis=0), axis=1) * pixel_mm
    assert np.all(gaps <= every_mm + 1e-6)


def test_strokes_travel_as_the_backend_sends_them():
    for action in (Scribble(3, ((1.0, 2.0), (3.5, 4.0)), False), Lasso(2, ((1.0, 1.0), (5.0, 1.0), (5.0, 5.0))),
                   Lasso(2, ((1.0, 1.0), (5.0, 1.0), (5.0, 5.0)), True, (0, 4))):
        header, arrays = to_message(action)
        assert from_message(json.loads(json.dumps(header)), arrays) == action


def test_a_stroke_off_its_slice_or_outside_the_volume_is_refused(colin):
    from SegmentWithSAMLib.geometry import slice_axes

    axes = slice_axes(colin, "axial")
    centre = colin.to_ras(np.array(colin.shape_ijk)[None] / 2.0)[0]
    on_slice = centre + np.array([[0, 0, 0], [10, 0, 0], [10, 10, 0]])
    lasso = stroke_from_ras(colin, axes, on_slice, closed=True, slice_range=(3, 9))
    assert isinstance(lasso, Lasso) and lasso.slice_range == (3, 9) and len(lasso.points) == 3
    for points, closed, message in ((on_slice + [[0, 0, 0], [0, 0, 0], [0, 0, 5]], True, "different axial slices"),
                                    (on_slice[:1], False, "at least 2"),
                                    (on_slice + [[0, 0, 0], [0, 0, 0], [900, 0, 0]], False, "outside the volume")):
        with pytest.raises(PromptError, match=message):
            stroke_from_ras(colin, axes, points, closed=closed)


# ---- on real data ----------------------------------------------------------------------------------------------
def test_a_lasso_is_its_slice_and_propagates_through_its_range(session, truth):
    oriented, mid = truth
    engine = Engine(session, "axial")
    state, update = checked_step(engine, None, Lasso(mid, tuple(outline(oriented[mid])), True,
                                                     (mid - HALF, mid + HALF)))
    assert set(update.changed) == set(range(mid - HALF, mid + HALF + 1)) and state.kinds[mid] is Kind.KEY
    inside = fill_lasso(check_stroke(outline(oriented[mid]), oriented[mid].shape, closed=True), oriented[mid].shape)
    spacing = engine.axes.pixel_spacing
    band = (ndi.distance_transform_edt(~inside, sampling=spacing) <= SNAP_MM) & \
        (ndi.distance_transform_edt(inside, sampling=spacing) <= SNAP_MM)
    assert np.array_equal(state.masks[mid][~band], inside[~band])  # the outline (near it the model, if SNAP_MM)
    assert dice(state.masks[mid], oriented[mid]) > 0.8
    box = boxed(session, truth).states["thalamus"]
    lasso_3d = dice(state.oriented_mask(*_shape(engine)), oriented)
    assert lasso_3d >= dice(box.oriented_mask(*_shape(engine)), oriented) - 0.01, lasso_3d


def test_a_lasso_with_a_range_is_the_box_around_it_then_its_outline_while_they_disagree(session, truth):
    """The box around the outline is propagated through the range as a 3D box is (its masks keep the object's
    size from slice to slice); the outline's own walk replaces them only up to where it agrees with them."""
    oriented, mid = truth
    engine = Engine(session, "axial")
    points = tuple(outline(oriented[mid]))
    inside = fill_lasso(check_stroke(points, oriented[mid].shape, closed=True), oriented[mid].shape)
    box, _ = checked_step(engine, None, Box3D(mid, tuple(bounding_box(inside).astype(float)),
                                              (mid - HALF, mid + HALF)))
    state, update = checked_step(engine, None, Lasso(mid, points, True, (mid - HALF, mid + HALF)))
    assert set(update.changed) == set(range(mid - HALF, mid + HALF + 1)) and state.kinds[mid] is Kind.KEY
    assert update.stopped, "the outline's walk stops where it agrees with the box's masks"
    same = [i for i in range(mid - HALF, mid + HALF + 1) if i != mid and np.array_equal(state.masks[i], box.masks[i])]
    agreeing = [i for i in range(mid - HALF, mid + HALF + 1)
                if i != mid and dice(state.masks[i], box.masks[i]) >= LASSO_AGREE]
    assert same and set(same) <= set(agreeing), (same, agreeing)
    with pytest.raises(PromptError, match="outside its range"):
        engine.step(None, Lasso(mid, points, True, (mid + 1, mid + HALF)))


def _shape(engine: Engine) -> tuple[int, tuple[int, int]]:
    return engine.axes.num_slices, engine.axes.image_shape


def test_a_negative_lasso_cuts_its_inside_and_what_continues_it_but_no_key_slice(session, truth):
    oriented, mid = truth
    engine = Engine(session, "axial")
    state = boxed(session, truth).states["thalamus"]
    state, _ = checked_step(engine, state, Lasso(mid + 2, tuple(outline(oriented[mid + 2])), True))  # a key slice
    mask = state.masks[mid]
    rows, cols = np.nonzero(mask)
    cut_x = float(np.median(cols))  # the lasso takes the mask's right half on the middle slice
    region = ((cut_x, rows.min() - 3.0), (cols.max() + 3.0, rows.min() - 3.0), (cols.max() + 3.0, rows.max() + 3.0),
              (cut_x, rows.max() + 3.0))
    new, update = checked_step(engine, state, Lasso(mid, region, False))
    inside = fill_lasso(np.array(region), mask.shape)
    assert np.array_equal(new.masks[mid], mask & ~inside) and new.kinds[mid] is Kind.KEY
    assert all((new.masks[i] <= state.masks[i]).all() for i in new.masks)  # it only removes,
    assert all(np.array_equal(new.masks[i] & ~inside, state.masks[i] & ~inside) for i in new.masks)  # inside it
    assert (state.masks[mid - 1] & ~new.masks[mid - 1]).any()  # and what continues the cut on the engine's slices
    assert np.array_equal(new.masks[mid + 2], state.masks[mid + 2])  # a key slice is never cut
    with pytest.raises(PromptError, match="removes nothing"):
        engine.step(None, Lasso(mid, region, False))


def test_a_scribble_starts_an_object_covering_its_stroke(session, truth):
    oriented, mid = truth
    engine = Engine(session, "axial")
    rows, cols = np.nonzero(ndi.binary_erosion(oriented[mid], iterations=3))
    stroke = ((float(cols.min()), float(rows[cols.argmin()])), (float(cols.max()), float(rows[cols.argmax()])))
    state, update = checked_step(engine, None, Scribble(mid, stroke, True))
    drawn = draw_stroke(np.array(stroke), oriented[mid].shape)
    assert state.masks[mid][drawn].mean() > 0.9 and dice(state.masks[mid], oriented[mid]) > 0.6
    assert state.kinds[mid] is Kind.KEY and state.base[mid] is not None and state.clicks[mid] == []
    assert state.slice_range[0] < mid < state.slice_range[1] and len(update.changed) > 1
    with pytest.raises(PromptError, match="start it with a box, a lasso or a positive scribble"):
        engine.step(None, Scribble(mid, stroke, False))


def test_a_negative_scribble_removes_what_it_covers_in_3d_but_never_a_key_slice(session, truth):
    oriented, mid = truth
    engine = Engine(session, "axial")
    state = boxed(session, truth).states["thalamus"]
    state, _ = checked_step(engine, state, Lasso(mid + 1, tuple(outline(oriented[mid + 1])), True))  # a key slice
    wrong = state.masks[mid - 1] & ~oriented[mid - 1]
    part = largest_part(wrong if wrong.sum() > 20 else state.masks[mid - 1])
    rows, cols = np.nonzero(part)
    step = max(1, len(cols) // 6)
    stroke = tuple((float(c), float(r)) for c, r in zip(cols[::step], rows[::step], strict=True))
    new, update = checked_step(engine, state, Scribble(mid - 1, stroke, False))
    covered = np.zeros_like(part)
    for x, y in stroke:
        covered[int(y), int(x)] = True
    assert not (new.masks[mid - 1] & covered).any() and new.kinds[mid - 1] is Kind.KEY
    assert len(new.clicks[mid - 1]) >= len(stroke) - 1 and not any(p for *_, p in new.clicks[mid - 1])
    assert np.array_equal(new.masks[mid + 1], state.masks[mid + 1])  # the key slice stays
    assert new.masks[mid - 1].sum() < state.masks[mid - 1].sum()
    assert all(new.masks[i].sum() <= state.masks[i].sum() for i in update.changed)  # a negative one only removes


def test_bad_strokes_change_nothing(session, truth):
    oriented, mid = truth
    engine = Engine(session, "axial")
    state = boxed(session, truth).states["thalamus"]
    frozen = state.copy()
    for action, message in ((Scribble(mid, ((5.0, 5.0),), True), "at least 2"),
                            (Lasso(mid, ((10.0, 10.0), (30.0, 30.0), (30.0, 10.0), (10.0, 30.0))), "crosses itself"),
                            (Scribble(mid, ((5.0, 5.0), (5000.0, 5.0)), True), "leaves the slice"),
                            (Lasso(10_000, ((1.0, 1.0), (5.0, 1.0), (5.0, 5.0))), "outside the volume")):
        with pytest.raises(PromptError, match=message):
            engine.step(state, action)
    assert_same(state, frozen)


# ---- the command line and a batch manifest -------------------------------------------------------------------
def _ras_text(points) -> str:
    return ";".join(",".join(f"{v:.4f}" for v in p) for p in points)


def test_the_cli_and_a_batch_row_take_a_lasso_and_scribbles_as_the_api_does(tmp_path, capsys, colin, atlas,
                                                                           default_model, cache):
    import types

    from SegmentWithSAMLib.api import Segmenter
    from SegmentWithSAMLib.batch.manifest import ManifestError, parse_rows
    from SegmentWithSAMLib.batch.tasks import ModelCache, TaskVolume, segment_row
    from SegmentWithSAMLib.cli import main
    from SegmentWithSAMLib.data import AAL_STRUCTURES, colin27
    from SegmentWithSAMLib.io import read_volume

    seg = Segmenter(colin, default_model, "axial", cache=cache)
    oriented = seg.axes.oriented(atlas.array == AAL_STRUCTURES["Thalamus_L"])
    mid = int(np.flatnonzero(oriented.any(axis=(1, 2))).mean())
    xy = np.array(outline(oriented[mid]))
    lasso = colin.to_ras(seg.axes.pixel_to_ijk(mid, xy))
    rows, cols = np.nonzero(ndi.binary_erosion(oriented[mid + 1], iterations=2))
    stroke = colin.to_ras(seg.axes.pixel_to_ijk(mid + 1, np.array([[cols.min(), rows[cols.argmin()]],
                                                                    [cols.max(), rows[cols.argmax()]]], float)))
    seg.step("thalamus", stroke_from_ras(colin, seg.axes, lasso, closed=True))
    seg.propagate("thalamus", mid, "both", (mid - 2, mid + 2))
    seg.step("thalamus", stroke_from_ras(colin, seg.axes, stroke, False))
    expected = seg.mask("thalamus")

    out = tmp_path / "lasso.nii.gz"
    assert main(["segment", str(colin27().image), "--view", "axial", f"--lasso={_ras_text(lasso)}", "--propagate",
                 "both", "--range", f"{mid - 2}:{mid + 2}", f"--scribble-negative={_ras_text(stroke)}",
                 "--window", "auto", "--device", "cpu", "--out", str(out), "--json"]) == 0
    assert np.array_equal(read_volume(out).array > 0, expected)
    capsys.readouterr()

    cells = {"volume": str(colin27().image), "name": "thalamus", "view": "axial", "lasso": _ras_text(lasso),
             "range": f"{mid - 2}:{mid + 2}", "scribbles": "negative:" + _ras_text(stroke), "window": "auto",
             "device": "cpu"}
    row, = parse_rows([cells], tmp_path, tmp_path / "out")
    assert row.lasso is not None and row.scribbles[0][1] is False and len(row.scribbles[0][0]) == 2
    models = ModelCache()
    models.setup(types.SimpleNamespace(name=None))
    mask, entry = segment_row(TaskVolume(str(colin27().image)), row, models)
    assert np.array_equal(mask, expected) and entry["voxels"] == int(expected.sum())

    bad = tmp_path / "bad.nii.gz"
    crossing = lasso[[0, len(lasso) // 2, len(lasso) // 4, 3 * len(lasso) // 4]]
    assert main(["segment", str(colin27().image), "--view", "axial", f"--lasso={_ras_text(crossing)}",
                 "--out", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "crosses itself" in err and err.count("\n") == 1 and not bad.exists()
    for value, message in (("1,2,3;4,5", "needs 3 comma-separated numbers"),
                           ("sideways:1,2,3;4,5,6", "a stroke starts")):
        with pytest.raises(ManifestError, match=message):
            parse_rows([{**cells, "scribbles": value}], tmp_path, tmp_path / "out")
    json_row, = parse_rows([{**cells, "scribbles": [{"points": stroke.tolist(), "positive": False}]}], tmp_path,
                           tmp_path / "out")
    assert json_row.scribbles == row.scribbles or np.allclose(json_row.scribbles[0][0], row.scribbles[0][0])


def test_keep_labels_of_a_labelmap_out_of_a_new_object_from_the_cli_and_a_batch_row(tmp_path, capsys, colin, atlas):
    import types

    from SegmentWithSAMLib.batch.manifest import parse_rows
    from SegmentWithSAMLib.batch.tasks import ModelCache, TaskVolume, segment_row
    from SegmentWithSAMLib.cli import main
    from SegmentWithSAMLib.data import AAL_STRUCTURES, colin27
    from SegmentWithSAMLib.geometry import bounding_box, slice_axes
    from SegmentWithSAMLib.io import read_volume

    axes = slice_axes(colin, "axial")
    putamen, pallidum = (atlas.array == AAL_STRUCTURES[n] for n in ("Putamen_L", "Pallidum_L"))
    oriented = axes.oriented(pallidum)
    slices = np.flatnonzero(oriented.any(axis=(1, 2)))
    mid = int(slices[len(slices) // 2])
    box = bounding_box(oriented[mid]) + np.array([-6, -6, 6, 6])  # reaching well into the putamen
    corners = colin.to_ras(axes.pixel_to_ijk(mid, box.reshape(2, 2)))
    box_text = ",".join(f"{v:.3f}" for v in corners.ravel())
    common = ["segment", str(colin27().image), "--view", "axial", "--box", box_text, "--propagate", "both",
              "--range", f"{slices[0]}:{slices[-1]}", "--window", "auto", "--device", "cpu"]
    free, kept = tmp_path / "free.nii.gz", tmp_path / "kept.nii.gz"
    label = f"{colin27().atlas}:{AAL_STRUCTURES['Putamen_L']}"
    assert main([*common, "--out", str(free)]) == 0
    assert main([*common, "--keep", label, "--out", str(kept)]) == 0
    free_mask, kept_mask = (read_volume(p).array > 0 for p in (free, kept))
    assert (free_mask & putamen).any() and not (kept_mask & putamen).any()  # the finished label stays out
    assert np.array_equal(kept_mask, free_mask & ~putamen) or kept_mask.sum() > 0.5 * (free_mask & ~putamen).sum()
    capsys.readouterr()
    assert main([*common, "--keep", f"{colin27().atlas}:9999", "--out", str(tmp_path / "bad.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "no voxel labelled 9999" in err and not (tmp_path / "bad.nii.gz").exists()

    cells = {"volume": str(colin27().image), "name": "pallidum", "view": "axial",
             "box": box_text, "range": f"{slices[0]}:{slices[-1]}",
             "window": "auto", "device": "cpu", "keep": label}
    row, = parse_rows([cells], tmp_path, tmp_path / "out")
    assert row.options.keep.endswith(f":{AAL_STRUCTURES['Putamen_L']}")
    models = ModelCache()
    models.setup(types.SimpleNamespace(name=None))
    mask, _ = segment_row(TaskVolume(str(colin27().image)), row, models)
    assert np.array_equal(mask, kept_mask)  # the same engine steps as the command line

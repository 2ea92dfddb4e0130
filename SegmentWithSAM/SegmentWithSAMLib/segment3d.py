"""One object in 3D: its mask on one slice, from prompts or a seed labelmap, propagated through the volume.

The single-case pipeline that ``segmentwithsam segment --propagate``, ``segmentwithsam propagate`` and the
batch (:mod:`.batch`) share, so that a row of a cohort gives exactly what the command gives for its prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import PromptError
from .geometry import SliceAxes, paste_slice_mask, slices_with
from .interaction import RANGE_RULES
from .propagation import Propagator, SliceStep, StopRules


def stop_rules(min_similarity: float, min_score: float, max_area_ratio: float, min_overlap: float,
               max_empty: int) -> StopRules:
    """The stop rules from the command line's values, where a negative threshold (0 for ``max_area_ratio``)
    switches that rule off."""
    return StopRules(min_similarity=None if min_similarity < 0 else min_similarity,
                     min_score=None if min_score < 0 else min_score,
                     max_area_ratio=None if max_area_ratio <= 0 else max_area_ratio,
                     min_overlap=None if min_overlap < 0 else min_overlap,
                     max_empty=max_empty)


def parse_slice_range(text: str | None, what: str = "--range") -> tuple[int, int] | None:
    """``"A:B"`` → (A, B), slice numbers along the view's slice axis; None for None."""
    if text is None:
        return None
    try:
        low, high = (int(v) for v in text.split(":"))
    except ValueError:
        raise PromptError(f"{what} needs A:B with two slice numbers, not {text!r}.") from None
    return low, high


def segment_prompts(session, view: str, points_ras: Sequence, negatives_ras: Sequence, box_ras=None):
    """The :class:`~.session.SliceResult` of ``session`` for positive points (N, 3), negative points (M, 3) and
    a box (6,): two opposite corners, all in RAS millimetres on one slice of ``view``."""
    points = np.array([*points_ras, *negatives_ras], dtype=float).reshape(-1, 3)
    labels = np.array([1] * len(points_ras) + [0] * len(negatives_ras))
    box = None if box_ras is None else np.asarray(box_ras, dtype=float).reshape(2, 3)
    return session.segment(view, points, labels, box)


def seed_slice(axes: SliceAxes, selected: np.ndarray, source: str, label: int | None = None) -> tuple[int, np.ndarray]:
    """The slice index and its 2D mask (rows, cols) of a seed, ``selected`` (bool, KJI) read from ``source``;
    :class:`PromptError` unless it is non-empty and on one slice of ``axes``' view."""
    slices = slices_with(axes, selected)
    if not len(slices):
        raise PromptError(f"The seed mask {source} is empty" + (f" for label {label}." if label else "."))
    if len(slices) > 1:
        raise PromptError(f"The seed mask lies on {axes.view.value} slices {slices.min()} to {slices.max()}; it "
                          "must be on one slice of that view.")
    return int(slices[0]), axes.oriented(selected)[slices[0]]


def propagate_seed(session, view: str, index: int, mask2d: np.ndarray, direction: str, rules: StopRules,
                   slice_range: tuple[int, int] | None = None, skip: int = 0, box: np.ndarray | None = None,
                   on_slice: Callable[[SliceStep], None] | None = None) -> tuple[np.ndarray, dict]:
    """Propagate ``mask2d`` (rows, cols) on slice ``index`` of ``view`` (made from ``box``, x0, y0, x1, y1 in
    slice pixels, if given) ``direction`` within ``slice_range``: the 3D mask (bool, KJI, seed included) and a
    report (``slices`` propagated, ``stopped`` reason per direction, ``slices_per_s``). A box with a range is a
    3D box: the user said where the object is, so within it only empty masks stop (as in :mod:`.interaction`)
    instead of ``rules``."""
    if box is not None and slice_range is not None:
        rules = RANGE_RULES
    propagator = Propagator(session, view, rules, skip=skip)
    result = propagator.run({"mask": (index, mask2d)}, direction, slice_range, on_slice=on_slice,
                            boxes={"mask": box} if box is not None else None)
    seed = paste_slice_mask(session.volume.array.shape, propagator.axes, index, mask2d)
    volume = result.apply(seed.astype(np.uint8), {"mask": 1}) > 0
    return volume, {"slices": result.slice_count, "stopped": result.stopped["mask"],
                    "slices_per_s": round(result.slice_count / max(result.seconds, 1e-9), 2)}

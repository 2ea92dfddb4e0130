"""Shared helpers for the benchmark scripts: Colin27 + AAL setup, tables, JSON output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from SegmentWithSAMLib.data import AAL_STRUCTURES, colin27
from SegmentWithSAMLib.geometry import bounding_box as tight_box  # noqa: F401 (the benchmarks' name)
from SegmentWithSAMLib.io import read_volume
from SegmentWithSAMLib.propagation import Propagator, StopRules

RESULTS = Path(__file__).with_name("results")
VIEWS = ("axial", "coronal", "sagittal")
NO_STOPS = StopRules(min_similarity=None, min_score=None, max_area_ratio=None, min_overlap=None)


def load_colin27():
    data = colin27()
    return read_volume(data.image), read_volume(data.atlas)


def structure_slices(atlas, axes, structures=AAL_STRUCTURES):
    """(name, middle slice index, 2D truth) for each structure present in ``atlas`` along ``axes``."""
    for name, label in structures.items():
        oriented = axes.oriented(atlas.array == label)
        slices = np.flatnonzero(oriented.any(axis=(1, 2)))
        if len(slices):
            index = int(slices[len(slices) // 2])
            yield name, index, oriented[index]


def timed_ms(fn: Callable[[], object], repeat: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Milliseconds of each of ``repeat`` calls of ``fn``; ``sync`` (e.g. torch.cuda.synchronize) is called
    around each so that GPU work is counted."""
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def write_json(name: str, payload: dict, one_line: bool = False) -> Path:
    """Write ``payload`` to results/NAME.json; with ``one_line`` also print it as one JSON line (``--json``)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}")
    if one_line:
        print(json.dumps(payload, separators=(",", ":")))
    return path


def box_masks(session, cases) -> list[np.ndarray]:
    """The session's mask (rows, cols) for each of ``cases`` [(view, slice index, box (4,))]."""
    masks = []
    for view, index, box in cases:
        session.set_slice(view, index)
        masks.append(session.predictor.predict(box=box).masks[0])
    return masks


def propagation_rate(session, view: str, index: int, seed: np.ndarray, last: int, skip: int,
                     sync: Callable[[], None] = lambda: None) -> float:
    """Slices per second propagating ``seed`` from slice ``index`` up to ``last`` with no stop rule, encoding
    included (the seed slice is encoded first, as after an Accept); ``sync`` waits for a GPU's work."""
    session.cache.clear()
    session.set_slice(view, index)
    sync()
    began = time.perf_counter()
    count = len({step.index for step in Propagator(session, view, NO_STOPS, skip=skip).steps((index, seed), "up",
                                                                                          (index, last))})
    sync()
    return count / (time.perf_counter() - began)

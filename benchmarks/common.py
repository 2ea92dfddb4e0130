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

RESULTS = Path(__file__).with_name("results")
VIEWS = ("axial", "coronal", "sagittal")


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


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}")
    return path

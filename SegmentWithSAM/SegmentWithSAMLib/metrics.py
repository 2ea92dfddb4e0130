"""Overlap measures between masks."""

from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays of one shape (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"Masks of different shapes {a.shape} and {b.shape} cannot be compared.")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def clicks_to_reach(dices: list[float], threshold: float) -> int:
    """NoC@threshold: the number of clicks after which Dice first reaches ``threshold`` (budget + 1 if never)."""
    for count, value in enumerate(dices, start=1):
        if value >= threshold:
            return count
    return len(dices) + 1

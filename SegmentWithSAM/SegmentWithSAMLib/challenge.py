"""The CVPR 2025 interactive 3D segmentation protocol ("Foundation Models for Interactive 3D Biomedical Image
Segmentation", evaluation script ``CVPR25_iter_eval.py``): the initial box, the click simulator and the metrics.

Arrays are in the challenge's layout: (D, H, W), D the slice axis (z), H the rows (y), W the columns (x).

- Step 0, the box (:func:`box_from_truth`): the 2D bounding box on the slice ``z_mid`` — the z of the middle
  voxel of the object in C order, as the challenge's ``get_boxes.py`` picks it — grown on each side by
  ``int(shift · W / 256)`` columns and ``int(shift · H / 256)`` rows (the challenge draws ``shift`` from 0–5;
  here it is fixed, default 3, the rounded mean, so every run is the same), with the first and last labelled
  slices ``z_min`` and ``z_max``.
- Steps 1–5, one click per object (:func:`simulate_click_3d`): at the voxel farthest inside (Euclidean
  distance transform, in voxels, the component's bounding box surrounded by background) the largest
  26-connected component of the error (prediction ≠ truth); ties broken as the script does, by a draw from
  NumPy's legacy generator seeded with 42 among the tied voxels in C order. Foreground where the truth is
  there (under-segmented), background where it is not.
- Metrics (:func:`score`): Dice, and the normalized surface Dice at 2 mm (DeepMind's ``surface-distance``,
  spacing in array order as the script passes it), computed only when the Dice is above 0.2 (else 0);
  :func:`auc`: the trapezoid over the click steps only (unit spacing: 5 steps give at most 4.0).

Optional dependencies, imported when used: ``connected-components-3d`` and ``surface-distance``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import PromptError
from .metrics import dice

NSD_TOLERANCE_MM = 2.0
NSD_MIN_DICE = 0.2  # the script sets NSD to 0 at or below this Dice
BOX_SHIFT = 3  # of the challenge's random 0–5 (pixels at a 256-pixel image)
CLICK_STEPS = 5  # clicks per object after the box


@dataclass(frozen=True)
class ChallengeBox:
    """A 3D box as the challenge stores it: the 2D box (inclusive pixel indices, x = column, y = row) on slice
    ``z_mid`` and the slice range ``z_min``..``z_max`` (inclusive)."""

    z_min: int
    z_max: int
    z_mid: int
    z_mid_x_min: int
    z_mid_y_min: int
    z_mid_x_max: int
    z_mid_y_max: int

    def as_dict(self) -> dict[str, int]:
        """The box as the challenge's dict (plain ints)."""
        return asdict(self)


def box_from_truth(truth: np.ndarray, shift: int = BOX_SHIFT) -> ChallengeBox:
    """The step-0 box of a non-empty boolean object ``truth`` (D, H, W), as the challenge makes it."""
    truth = np.asarray(truth, dtype=bool)
    if truth.ndim != 3 or not truth.any():
        raise PromptError(f"A box needs a non-empty 3D object, not an array of shape {truth.shape} with "
                          f"{int(truth.sum())} voxels.")
    z, _, _ = np.nonzero(truth)
    z_mid = int(z[len(z) // 2])
    rows, cols = np.nonzero(truth[z_mid])
    height, width = truth.shape[1:]
    grow_x, grow_y = int(shift * width / 256), int(shift * height / 256)
    return ChallengeBox(
        z_min=int(z.min()), z_max=int(z.max()), z_mid=z_mid,
        z_mid_x_min=max(0, int(cols.min()) - grow_x), z_mid_y_min=max(0, int(rows.min()) - grow_y),
        z_mid_x_max=min(width - 1, int(cols.max()) + grow_x), z_mid_y_max=min(height - 1, int(rows.max()) + grow_y))


def _inner_distances(component: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The Euclidean distance transform of ``component`` (bool, 3D) on its bounding box padded by one voxel of
    background, and the box's origin: distances to the nearest voxel outside the component, the volume's
    border counting as outside (as the script computes them)."""
    from scipy.ndimage import distance_transform_edt

    coords = np.argwhere(component)
    low, high = coords.min(axis=0), coords.max(axis=0) + 1
    crop = np.pad(component[tuple(slice(a, b) for a, b in zip(low, high, strict=True))], 1)
    return distance_transform_edt(crop)[1:-1, 1:-1, 1:-1], tuple(int(v) for v in low)


def simulate_click_3d(truth: np.ndarray, prediction: np.ndarray) -> tuple[tuple[int, int, int], bool] | None:
    """The challenge's next click on boolean ``truth`` and ``prediction`` (D, H, W): the voxel index (d, h, w)
    and whether it is a foreground click; None when the prediction is perfect."""
    import cc3d

    truth, prediction = np.asarray(truth, dtype=bool), np.asarray(prediction, dtype=bool)
    if truth.shape != prediction.shape or truth.ndim != 3:
        raise PromptError(f"Truth {truth.shape} and prediction {prediction.shape} must be 3D arrays of one shape.")
    error = truth != prediction
    if not error.any():
        return None
    labels = cc3d.connected_components(error.astype(np.uint8), connectivity=26)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    distances, origin = _inner_distances(labels == int(np.argmax(sizes)))
    ties = np.argwhere(distances == distances.max())
    chosen = ties[np.random.RandomState(42).choice(len(ties))] + np.asarray(origin)
    index = (int(chosen[0]), int(chosen[1]), int(chosen[2]))
    return index, bool(truth[index])


def normalized_surface_dice(truth: np.ndarray, prediction: np.ndarray, spacing: tuple[float, float, float],
                            tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """The normalized surface Dice of boolean (D, H, W) masks at ``tolerance_mm``; ``spacing`` in array order."""
    from surface_distance import compute_surface_dice_at_tolerance, compute_surface_distances

    distances = compute_surface_distances(np.asarray(truth, bool), np.asarray(prediction, bool),
                                          spacing_mm=tuple(float(s) for s in spacing))
    return float(compute_surface_dice_at_tolerance(distances, tolerance_mm))


def score(truth: np.ndarray, prediction: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, float]:
    """(DSC, NSD) of one object as the challenge scores a step: NSD at 2 mm, 0 when DSC ≤ 0.2."""
    value = dice(truth, prediction)
    return value, normalized_surface_dice(truth, prediction, spacing) if value > NSD_MIN_DICE else 0.0


def auc(click_step_values: list[float]) -> float:
    """The challenge's area under a metric's curve over the click steps (steps 1–5, the box step left out, as
    the script integrates the last five of six): the trapezoid with unit spacing; 0 with fewer than two."""
    values = np.asarray(click_step_values, dtype=float)
    return float(np.sum((values[1:] + values[:-1]) / 2.0)) if len(values) > 1 else 0.0

"""The CVPR 2025 interactive 3D segmentation protocol ("Foundation Models for Interactive 3D Biomedical Image
Segmentation") as its official evaluator ``CVPR25_iter_eval.py`` runs it and its ``get_boxes.py`` makes the boxes
(repository JunMa11/CVPR-MedSegFMCompetition): the initial box, the click simulator and the metrics.

Arrays are in the challenge's layout: (D, H, W), D the slice axis (z), H the rows (y), W the columns (x).

- Step 0, the box (:func:`box_from_truth`): ``z_min``/``z_max`` the first and last slices holding the object,
  ``z_mid`` the middle one of those slices (the distinct slice indices, sorted, at position n // 2), and the 2D
  bounding box on ``z_mid`` grown on each side by ``int(shift · W / 256)`` columns and ``int(shift · H / 256)``
  rows, clipped to the image. ``get_boxes.py`` draws ``shift`` from 0–5 per object; here it is fixed (default 3,
  the rounded mean), so every run is the same.
- Steps 1–5, one click per object (:func:`simulate_click_3d`), from the previous step's prediction: the largest
  26-connected component of the error (prediction ≠ truth; cc3d's numbering in C order breaks ties in size); its
  Euclidean distance transform (voxel units) on its bounding box padded on each side by max(1, int(size / 4))
  voxels of background — at half resolution when that padded box holds more than 60 million voxels (2 × 2 × 2
  maximum, zero-padded at the far end to even sizes, repeated back; the distances then in coarse voxels), and 0
  outside the component; the click at a voxel of the largest distance, ties drawn by NumPy's legacy generator
  seeded with 42 among them in C order. Foreground where the truth is there (under-segmented), background where it
  is not. An object without error gets no click that round (the script puts None in its ``clicks_order``). The
  script's GPU path (cuCIM's transform, never at half resolution) gives the same distances; its fallback for an
  all-zero transform cannot happen (a component voxel is at least 1 from the outside), so it is not repeated here.
- Metrics (:func:`score`), per step and case: the classes are the truth's labels but the lowest (the background);
  DSC is the mean over them of each class's Dice; NSD the mean of each class's normalized surface Dice at 2 mm
  (DeepMind's surface distances, as the script's ``SurfaceDice.py``; spacing in array order, as the script passes
  the case's ``spacing``), computed only when that mean DSC is above 0.2, else 0 for the step. Labels of the
  prediction that the truth lacks are not scored. :func:`auc`: the trapezoid over the last five steps (the
  clicks; the box step is left out), unit spacing, so at most 4.0; the final values are the last step's.

Optional dependencies, imported when used: ``connected-components-3d`` and ``surface-distance``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import PromptError
from .metrics import dice

NSD_TOLERANCE_MM = 2.0
NSD_MIN_DICE = 0.2  # the script sets a step's NSD to 0 when its mean DSC is at or below this
BOX_SHIFT = 3  # of get_boxes.py's random 0–5 (pixels at a 256-pixel image)
CLICK_STEPS = 5  # clicks per object after the box
EDT_HALF_RESOLUTION_VOXELS = 60_000_000  # a padded error box larger than this gets its EDT at half resolution


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
    """The step-0 box of a non-empty boolean object ``truth`` (D, H, W), as ``get_boxes.py`` makes it."""
    truth = np.asarray(truth, dtype=bool)
    if truth.ndim != 3 or not truth.any():
        raise PromptError(f"A box needs a non-empty 3D object, not an array of shape {truth.shape} with "
                          f"{int(truth.sum())} voxels.")
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    z_mid = int(slices[len(slices) // 2])
    rows, cols = np.nonzero(truth[z_mid])
    height, width = truth.shape[1:]
    grow_x, grow_y = int(shift * width / 256), int(shift * height / 256)
    return ChallengeBox(
        z_min=int(slices[0]), z_max=int(slices[-1]), z_mid=z_mid,
        z_mid_x_min=max(0, int(cols.min()) - grow_x), z_mid_y_min=max(0, int(rows.min()) - grow_y),
        z_mid_x_max=min(width - 1, int(cols.max()) + grow_x), z_mid_y_max=min(height - 1, int(rows.max()) + grow_y))


def _component_distances(component: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The script's distance transform of ``component`` (bool, 3D) on its bounding box: distances to the nearest
    voxel outside it (the box's padding counting as outside), 0 outside the component; and the box's origin."""
    from scipy.ndimage import distance_transform_edt

    bounds = [np.flatnonzero(component.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))]
    low = np.array([b[0] for b in bounds])
    size = np.array([b[-1] + 1 for b in bounds]) - low
    crop = component[tuple(slice(a, a + n) for a, n in zip(low, size, strict=True))]
    pad = np.maximum((size * 0.25).astype(int), 1)
    padded = np.pad(crop, [(p, p) for p in pad])
    if padded.size > EDT_HALF_RESOLUTION_VOXELS:
        even = np.pad(padded, [(0, n % 2) for n in padded.shape])
        d, h, w = (n // 2 for n in even.shape)
        coarse = distance_transform_edt(even.reshape(d, 2, h, 2, w, 2).any(axis=(1, 3, 5)))
        # Repeating each coarse voxel 2 × 2 × 2 and cutting the padding away is this look-up of voxel // 2.
        distances = coarse[np.ix_(*((np.arange(p, p + n) // 2) for p, n in zip(pad, size, strict=True)))]
    else:
        distances = distance_transform_edt(padded)[tuple(slice(p, p + n) for p, n in zip(pad, size, strict=True))]
    return distances * crop, low


def simulate_click_3d(truth: np.ndarray, prediction: np.ndarray) -> tuple[tuple[int, int, int], bool] | None:
    """The challenge's next click on one object's boolean ``truth`` and ``prediction`` (D, H, W) — the script's
    ``gts == class`` and ``segs == class``: the voxel index (d, h, w) and whether it is a foreground click; None
    when the prediction is perfect."""
    import cc3d

    truth, prediction = np.asarray(truth, dtype=bool), np.asarray(prediction, dtype=bool)
    if truth.shape != prediction.shape or truth.ndim != 3:
        raise PromptError(f"Truth {truth.shape} and prediction {prediction.shape} must be 3D arrays of one shape.")
    error = np.ascontiguousarray(truth != prediction, dtype=np.uint8)  # cc3d numbers components in memory order
    if not error.any():
        return None
    labels = cc3d.connected_components(error, connectivity=26)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    distances, origin = _component_distances(labels == int(np.argmax(sizes)))
    ties = np.argwhere(distances == distances.max())
    chosen = ties[np.random.RandomState(42).choice(len(ties))] + origin
    index = (int(chosen[0]), int(chosen[1]), int(chosen[2]))
    return index, bool(truth[index])


def normalized_surface_dice(truth: np.ndarray, prediction: np.ndarray, spacing: tuple[float, float, float],
                            tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """The normalized surface Dice of boolean (D, H, W) masks at ``tolerance_mm``; ``spacing`` in array order. 0
    when a mask is empty (no surface point is near the other's), as the script's arithmetic gives."""
    from surface_distance import compute_surface_dice_at_tolerance, compute_surface_distances

    truth, prediction = np.asarray(truth, bool), np.asarray(prediction, bool)
    if not truth.any() or not prediction.any():
        return 0.0  # surface-distance 0.1 fails on an empty mask under NumPy 2 (np.Inf), so it is not asked
    distances = compute_surface_distances(truth, prediction, spacing_mm=tuple(float(s) for s in spacing))
    return float(compute_surface_dice_at_tolerance(distances, tolerance_mm))


def score(truth: np.ndarray, segs: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, float]:
    """(DSC, NSD) of one case at one step, as the script scores it. ``truth`` and ``segs`` are labelmaps (D, H, W)
    of one shape (boolean: one object); ``spacing`` in mm, in array order. DSC: the mean over the truth's classes
    (its labels but the lowest) of their Dice; NSD: the mean of their NSD at 2 mm when that DSC is above 0.2,
    else 0. Raises ValueError when the truth has no class to score."""
    truth, segs = np.asarray(truth), np.asarray(segs)
    if truth.shape != segs.shape or truth.ndim != 3:
        raise ValueError(f"Truth {truth.shape} and prediction {segs.shape} must be 3D labelmaps of one shape.")
    truth, segs = (a.astype(np.uint8) if a.dtype == bool else a for a in (truth, segs))
    classes = np.unique(truth)[1:]
    if not len(classes):
        raise ValueError("The truth holds one label only: there is no object to score.")
    masks = [(truth == label, segs == label) for label in classes]
    value = float(np.mean([dice(t, p) for t, p in masks]))
    if value <= NSD_MIN_DICE:
        return value, 0.0
    return value, float(np.mean([normalized_surface_dice(t, p, spacing) for t, p in masks]))


def auc(step_values: list[float], clicks: int = CLICK_STEPS) -> float:
    """The challenge's area under a metric's curve over a case's steps (the box step, then the click steps): the
    trapezoid with unit spacing over the last ``clicks`` values, as the script integrates the last five of six
    (the box is optional in the challenge); 0 with fewer than two."""
    values = np.asarray(step_values[-clicks:], dtype=float)
    return float(np.sum((values[1:] + values[:-1]) / 2.0)) if len(values) > 1 else 0.0

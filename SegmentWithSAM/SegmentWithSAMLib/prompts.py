"""A first positive click as calls a box-trained model (LiteMedSAM) handles well; removing negative-click parts.

LiteMedSAM's point embeddings were never trained (a click as a point prompt: mean 2D Dice 0.02 on Colin27 +
AAL); square boxes 14–40 mm wide centred on the click, their low-res logits averaged ("box ensemble"), reach
0.65, as good as a tight ground-truth box (``benchmarks/quality.py``, docs/measurements.md).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .predictor import Prediction, SlicePredictor

# Side lengths (mm) of the candidate boxes around positive clicks, chosen by the benchmark above.
ENSEMBLE_BOX_MM = (14.0, 20.0, 28.0, 40.0)


def ensemble_boxes(positive_xy: np.ndarray, pixel_spacing: tuple[float, float]) -> np.ndarray:
    """Boxes (B, 4) around the positive points' (N, 2) bounding box, one per size in ``ENSEMBLE_BOX_MM``."""
    low, high = positive_xy.min(axis=0), positive_xy.max(axis=0)
    half_px = np.array(ENSEMBLE_BOX_MM)[:, None] / 2.0 / np.array([pixel_spacing[1], pixel_spacing[0]])
    return np.concatenate([low - half_px, high + half_px], axis=1)


def predict_box_ensemble(predictor: SlicePredictor, boxes: np.ndarray) -> Prediction:
    """One mask from several boxes (B, 4): decoded in one batch, logits averaged (upsampling is linear, so the
    slice-grid logits are the average's too)."""
    prediction = predictor.predict_boxes(boxes)
    logits = prediction.logits.mean(axis=0, keepdims=True)
    return Prediction(masks=logits > 0, scores=prediction.scores.mean(keepdims=True),
                      low_res_logits=prediction.low_res_logits.mean(axis=0, keepdims=True), logits=logits)


def remove_clicked_regions(mask: np.ndarray, negative_xy: np.ndarray, keep_xy: np.ndarray = ()) -> np.ndarray:
    """Drop the connected parts of ``mask`` (rows, cols) that contain a negative click, except parts that also
    contain a point of ``keep_xy`` (the positive clicks)."""
    if not len(negative_xy) or not mask.any():
        return mask
    components, _ = ndi.label(mask)
    rows, cols = mask.shape

    def labels_at(points) -> set[int]:
        return {int(components[int(np.clip(round(y), 0, rows - 1)), int(np.clip(round(x), 0, cols - 1))])
                for x, y in points} - {0}

    hit = labels_at(negative_xy) - labels_at(keep_xy)
    return mask & ~np.isin(components, list(hit)) if hit else mask

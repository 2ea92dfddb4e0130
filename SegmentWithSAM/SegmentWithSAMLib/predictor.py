"""Prediction on one 2D slice: ``set_image`` computes (or fetches) the embedding, ``predict`` is cheap per click.

All coordinates are slice pixels, XY = (column, row), pixel centres at integers, as in :mod:`.geometry`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from .cache import EmbeddingCache
from .errors import PromptError
from .models.base import SamLikeAdapter
from .preprocessing import SliceTransform


@dataclass
class Prediction:
    """Masks (M, rows, cols) bool, ``scores`` (M,) predicted IoU, ``low_res_logits`` (M, h, w) float32 —
    pass one of those back as ``mask_input`` (1, h, w) to refine with the next click — and ``logits``
    (M, rows, cols) float32, the low-res logits on the slice grid (``masks`` is ``logits > 0``)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    logits: np.ndarray

    def take(self, index: int) -> Prediction:
        """Mask ``index`` alone (M = 1), as :meth:`SlicePredictor.predict` gives one: e.g. one box's of
        :meth:`SlicePredictor.predict_boxes`."""
        part = slice(index, index + 1)
        return Prediction(self.masks[part], self.scores[part], self.low_res_logits[part], self.logits[part])

    def best(self) -> int:
        """Index of the mask with the highest predicted quality."""
        return int(np.argmax(self.scores))


def normalize_slice(image: np.ndarray) -> np.ndarray:
    """Min-max normalise a windowed slice to [0, 1] (as LiteMedSAM was trained); constant slices give 0."""
    image = np.asarray(image, dtype=np.float32)
    low, high = float(image.min()), float(image.max())
    if high - low < 1e-8:
        return np.zeros_like(image)
    return (image - low) / (high - low)


class SlicePredictor:
    """``set_image`` then ``predict`` for one slice at a time, like segment-anything's ``SamPredictor``."""

    def __init__(self, model: SamLikeAdapter, cache: EmbeddingCache | None = None) -> None:
        self.model = model
        self.cache = cache
        self.transform: SliceTransform | None = None
        self._embedding = None

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    def set_image(self, image: np.ndarray, pixel_spacing: tuple[float, float] = (1.0, 1.0),
                  cache_key: Hashable | None = None) -> None:
        """Prepare a windowed slice ``image`` (rows, cols), values in [0, 1], with pixel size (row, col) mm.

        With a ``cache_key`` the embedding comes from (or goes to) the cache, so the encoder runs once per key.
        """
        self.transform, self._embedding = self.embed(image, pixel_spacing, cache_key)

    def embed(self, image: np.ndarray, pixel_spacing: tuple[float, float] = (1.0, 1.0),
              cache_key: Hashable | None = None):
        """The transform and embedding of ``image`` (as for :meth:`set_image`), without making it current."""
        image = np.asarray(image)
        if image.ndim != 2 or min(image.shape) < 2:
            raise PromptError(f"A slice image must be 2D with at least 2×2 pixels, not shape {image.shape}.")
        transform = SliceTransform.for_slice(image.shape, pixel_spacing, self.model.input_size)
        key = self._key(transform, cache_key)
        embedding = self.cache.get(key) if key is not None else None
        if embedding is None:
            embedding = self.model.encode(transform.image_to_model(normalize_slice(image)))
            if key is not None:
                self.cache.put(key, embedding)
        return transform, embedding

    def embed_many(self, images: list[np.ndarray], pixel_spacing: tuple[float, float],
                   cache_keys: list[Hashable]) -> None:
        """Encode same-shaped slice images (B of them) in one batch and put each embedding in the cache under
        its key; the current image stays. On a GPU this is much faster per slice than one at a time."""
        if self.cache is None:
            raise ValueError("embed_many fills the embedding cache; this predictor has none.")
        transform = SliceTransform.for_slice(np.shape(images[0]), pixel_spacing, self.model.input_size)
        batch = np.concatenate([transform.image_to_model(normalize_slice(np.asarray(image))) for image in images])
        embeddings = self.model.encode(batch)
        for i, key in enumerate(cache_keys):
            self.cache.put(self._key(transform, key), embeddings[i: i + 1])

    def is_cached(self, image_shape: tuple[int, int], pixel_spacing: tuple[float, float], cache_key: Hashable) -> bool:
        """Whether a slice of this shape and spacing under ``cache_key`` has its embedding in the cache."""
        transform = SliceTransform.for_slice(image_shape, pixel_spacing, self.model.input_size)
        key = self._key(transform, cache_key)
        return key is not None and key in self.cache

    def _key(self, transform: SliceTransform, cache_key: Hashable | None):
        if cache_key is None or self.cache is None:
            return None
        return self.model.name, self.model.engine, transform, cache_key

    def _require_image(self) -> SliceTransform:
        if self._embedding is None or self.transform is None:
            raise RuntimeError("Call set_image() before predict().")
        return self.transform

    def _model_prompts(self, point_coords, point_labels, boxes):
        transform = self._require_image()
        points = labels = None
        if point_coords is not None and len(point_coords):
            point_coords = np.asarray(point_coords, dtype=float).reshape(-1, 2)
            point_labels = np.asarray(point_labels if point_labels is not None else np.ones(len(point_coords)))
            if point_labels.shape != (len(point_coords),):
                raise PromptError(f"{len(point_coords)} points need as many labels, not {point_labels.shape}.")
            points = transform.points_to_model(point_coords)[None]
            labels = point_labels.astype(int)[None]
        model_boxes = None
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
            if np.any(boxes[:, 2:] < boxes[:, :2]):
                raise PromptError("A box needs x0 <= x1 and y0 <= y1.")
            model_boxes = np.stack([transform.box_to_model(b) for b in boxes])
        return points, labels, model_boxes

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                multimask_output: bool = False) -> Prediction:
        """Masks for the prompts on the current slice.

        ``point_coords`` (N, 2) XY with ``point_labels`` (N,) (1 = positive, 0 = negative); ``box`` (4,) as
        x0, y0, x1, y1; ``mask_input`` (1, h, w) low-res logits from an earlier :class:`Prediction`.
        """
        points, labels, boxes = self._model_prompts(point_coords, point_labels, box)
        masks = None
        if mask_input is not None:
            masks = np.asarray(mask_input, dtype=np.float32).reshape(1, 1, *np.shape(mask_input)[-2:])
        decoded = self.model.decode(self._embedding, points, labels, boxes, masks, multimask_output)
        return self._prediction(decoded.logits[0], decoded.scores[0])

    def _prediction(self, low_res_logits: np.ndarray, scores: np.ndarray) -> Prediction:
        """A :class:`Prediction` from the decoder's low-res logits (M, h, w) and scores (M,)."""
        logits = self.transform.logits_to_slice(low_res_logits[None])[0]
        return Prediction(masks=logits > 0, scores=scores, low_res_logits=low_res_logits, logits=logits)

    def _cells(self) -> np.ndarray:
        """The current slice's embedding (C, h, w) as NumPy (a PyTorch model's tensor is copied)."""
        embedding = self._embedding[0]
        return embedding if isinstance(embedding, np.ndarray) else embedding.float().cpu().numpy()

    def region_feature(self, mask: np.ndarray) -> np.ndarray:
        """The unit-length mean embedding vector (C,) of the region ``mask`` (rows, cols) on the current slice:
        a cheap appearance signature for comparing regions across slices (cosine similarity)."""
        transform, embedding = self._require_image(), self._cells()
        weights = transform.to_grid(mask, embedding.shape[-2:])
        vector = np.tensordot(embedding, weights, axes=2) / max(float(weights.sum()), 1e-6)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def similarity_map(self, signature: np.ndarray) -> np.ndarray:
        """The cosine similarity (rows, cols) float32 of the current slice's embedding, cell by cell, to a unit
        vector ``signature`` (C,) such as :meth:`region_feature` gives, resampled to the slice like the logits."""
        transform, embedding = self._require_image(), self._cells()
        cells = np.tensordot(signature, embedding, axes=1) / np.maximum(np.linalg.norm(embedding, axis=0), 1e-12)
        return transform.logits_to_slice(cells[None, None].astype(np.float32))[0, 0]

    def predict_boxes(self, boxes: np.ndarray, point_coords: np.ndarray | None = None,
                      point_labels: np.ndarray | None = None) -> Prediction:
        """One mask per candidate box: ``boxes`` (B, 4), each with the same points, in one batched decoder run.

        Returns a :class:`Prediction` whose M axis runs over the B boxes.
        """
        points, labels, model_boxes = self._model_prompts(point_coords, point_labels, boxes)
        count = len(model_boxes)
        if points is not None:
            points, labels = np.repeat(points, count, axis=0), np.repeat(labels, count, axis=0)
        decoded = self.model.decode(self._embedding, points, labels, model_boxes)
        return self._prediction(decoded.logits[:, 0], decoded.scores[:, 0])

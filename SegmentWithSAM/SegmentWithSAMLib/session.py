"""One volume, one model and one intensity window: the slices as the model sees them, encoded once through a
cache (the :class:`~.engine.Engine` steps on a session)."""

from __future__ import annotations

import numpy as np

from .cache import EmbeddingCache
from .geometry import (
    SliceAxes,
    View,
    Volume,
    check_segmentable,
    slice_axes,
    slice_image,
)
from .models.base import SamLikeAdapter
from .predictor import Prediction, SlicePredictor
from .preprocessing import resolve_window


class Session:
    """``volume``'s slices for ``model``: which slice is current in the predictor, which are encoded.

    ``window`` is an intensity window spec (see :func:`.preprocessing.resolve_window`), resolved once for the
    whole volume so neighbouring slices look alike to the model.
    """

    def __init__(self, volume: Volume, model: SamLikeAdapter, window=None,
                 cache: EmbeddingCache | None = None) -> None:
        check_segmentable(volume)
        self.volume = volume
        self.model = model
        self.window = resolve_window(volume.array, window)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.predictor = SlicePredictor(model, self.cache)
        self._current: tuple[View, int] | None = None

    def axes(self, view: View | str) -> SliceAxes:
        return slice_axes(self.volume, view)

    def windowed_slice(self, axes: SliceAxes, index: int) -> np.ndarray:
        """Slice ``index`` of ``axes`` (rows, cols) through the session's intensity window, as the model sees it."""
        return self.window.apply(slice_image(self.volume, axes, index))

    def _slice_key(self, axes: SliceAxes, index: int) -> tuple:
        return self.volume.identity, axes.view.value, index, self.window.key

    def set_slice(self, view: View | str, index: int) -> SliceAxes:
        """Make slice ``index`` of ``view`` current (encoding it unless its embedding is cached)."""
        axes = self.axes(view)
        if self._current != (axes.view, index):
            image = self.windowed_slice(axes, index)
            self.predictor.set_image(image, axes.pixel_spacing, cache_key=self._slice_key(axes, index))
            self._current = (axes.view, index)
        return axes

    def is_cached(self, view: View | str, index: int) -> bool:
        """Whether slice ``index`` of ``view`` has its embedding in the cache."""
        axes = self.axes(view)
        return self.predictor.is_cached(axes.image_shape, axes.pixel_spacing, self._slice_key(axes, index))

    def prefetch(self, view: View | str, index: int) -> bool:
        """Encode slice ``index`` of ``view`` into the cache unless it is there; the current slice stays.
        Returns whether the encoder ran."""
        return self.prefetch_many(view, [index]) > 0

    def prefetch_many(self, view: View | str, indices) -> int:
        """Encode those of the given slices of ``view`` that are not cached, in one batch (propagation encodes
        ahead this way); the current slice stays. Returns how many were encoded."""
        axes = self.axes(view)
        todo = [i for i in dict.fromkeys(int(i) for i in indices)
                if 0 <= i < axes.num_slices and not self.is_cached(axes.view, i)]
        if not todo:
            return 0
        images = [self.windowed_slice(axes, i) for i in todo]
        self.predictor.embed_many(images, axes.pixel_spacing, [self._slice_key(axes, i) for i in todo])
        return len(todo)

    def predict_boxes_on(self, view: View | str, indices, boxes: np.ndarray) -> list[Prediction]:
        """``boxes`` (B, 4) decoded on each of the slices ``indices`` of ``view`` that lie in the volume (those not
        cached encoded in one batch); the current slice is current again afterwards."""
        axes = self.axes(view)
        inside = [int(i) for i in indices if 0 <= int(i) < axes.num_slices]
        self.prefetch_many(axes.view, inside)
        current, found = self._current, []
        for index in inside:
            self.set_slice(axes.view, index)
            found.append(self.predictor.predict_boxes(boxes))
        if current is not None:
            self.set_slice(*current)
        return found

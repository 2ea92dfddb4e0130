"""One volume and one model: segment a slice from RAS prompts, with embeddings shared through a cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .cache import EmbeddingCache
from .errors import PromptError
from .geometry import (
    SliceAxes,
    View,
    Volume,
    check_segmentable,
    clip_box,
    paste_slice_mask,
    prompts_to_slice,
    slice_axes,
    slice_image,
)
from .models.base import SamLikeAdapter
from .predictor import SlicePredictor
from .preprocessing import resolve_window
from .prompts import PointStrategy, predict_prompts
from .refinement import Refiner


@dataclass
class SliceResult:
    """A mask on one slice: ``mask2d`` (rows, cols) in display orientation, its slice ``index`` along the
    view's slice axis, the predicted quality and the box it was prompted with (propagation uses it).
    :meth:`volume_mask` gives it in the volume's KJI grid."""

    view: View
    index: int
    axes: SliceAxes
    mask2d: np.ndarray
    score: float
    low_res_logits: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)
    box: np.ndarray | None = None  # the box prompt (x0, y0, x1, y1) in slice pixels, if there was one
    notices: list[str] = field(default_factory=list)  # e.g. that the box was clipped to the volume

    def volume_mask(self) -> np.ndarray:
        """The mask as a boolean KJI array on the volume's grid (False off this slice)."""
        k, j, i = self.axes.shape_ijk[2], self.axes.shape_ijk[1], self.axes.shape_ijk[0]
        return paste_slice_mask((k, j, i), self.axes, self.index, self.mask2d)


class Session:
    """Segment ``volume`` with ``model``: prompts in RAS millimetres in, masks on the volume's grid out.

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

    def _place(self, view: View | str, points_ras, box_ras) -> tuple[SliceAxes, int, np.ndarray, np.ndarray | None,
                                                                        list[str]]:
        """The axes and slice index the prompts lie on, the points as pixels (N, 2) XY, the box (4,) clipped to the
        volume, and notices for the user."""
        axes = self.axes(view)
        points_ras = np.zeros((0, 3)) if points_ras is None else np.asarray(points_ras, dtype=float).reshape(-1, 3)
        corners, notices = np.zeros((0, 3)), []
        if box_ras is not None:
            corners, clipped = clip_box(self.volume, axes, box_ras)
            if clipped:
                notices.append("The box reached past the volume's edge; it was clipped to the volume.")
        index, xy = prompts_to_slice(self.volume, axes, np.concatenate([points_ras, corners]))
        box = None
        if len(corners):
            box_xy = xy[len(points_ras):]
            box = np.concatenate([box_xy.min(axis=0), box_xy.max(axis=0)])
        return axes, index, xy[: len(points_ras)], box, notices

    def segment(self, view: View | str, points_ras: np.ndarray | None = None, labels: np.ndarray | None = None,
                box_ras: np.ndarray | None = None,
                strategy: PointStrategy | str = PointStrategy.BOX_ENSEMBLE) -> SliceResult:
        """Segment the slice of ``view`` that the prompts lie on, all prompts at once.

        ``points_ras`` (N, 3) with ``labels`` (N,) (1 positive, 0 negative); ``box_ras`` (2, 3): two opposite
        corners of the box. All prompts must lie on one slice of the view.
        """
        axes, index, xy, box, notices = self._place(view, points_ras, box_ras)
        start = time.perf_counter()
        self.set_slice(axes.view, index)
        encoded = time.perf_counter()
        prediction = predict_prompts(self.predictor, xy, labels, box, axes.pixel_spacing, strategy)
        done = time.perf_counter()
        return SliceResult(
            view=axes.view, index=index, axes=axes, mask2d=prediction.masks[0], score=float(prediction.scores[0]),
            low_res_logits=prediction.low_res_logits[0],
            timings_ms={"encode": (encoded - start) * 1e3, "decode": (done - encoded) * 1e3}, box=box,
            notices=notices,
        )

    def refine(self, view: View | str, points_ras: np.ndarray | None = None, labels: np.ndarray | None = None,
               box_ras: np.ndarray | None = None) -> SliceResult:
        """Segment like :meth:`segment`, taking the points as clicks in the order they were placed: the box
        (or the first positive click) gives the mask and each later click corrects it where it was placed
        (see :mod:`.refinement`). This is the interactive mode: fewer clicks to a good mask."""
        axes, index, xy, box, notices = self._place(view, points_ras, box_ras)
        labels = np.ones(len(xy), int) if labels is None else np.asarray(labels, dtype=int).ravel()
        if len(labels) != len(xy):
            raise PromptError(f"{len(xy)} points need as many labels, not {len(labels)}.")
        if box is None and not (labels == 1).any():
            raise PromptError("Give at least one positive point or a box: negative points alone select nothing.")
        start = time.perf_counter()
        self.set_slice(axes.view, index)
        encoded = time.perf_counter()
        refiner = Refiner(self.predictor, axes.pixel_spacing, box)
        for point, label in zip(xy, labels, strict=True):
            refiner.add_click(point, bool(label))
        done = time.perf_counter()
        return SliceResult(
            view=axes.view, index=index, axes=axes, mask2d=refiner.mask, score=float(refiner.first.scores[0]),
            low_res_logits=refiner.first.low_res_logits[0],
            timings_ms={"encode": (encoded - start) * 1e3, "decode": (done - encoded) * 1e3}, box=box,
            notices=notices,
        )

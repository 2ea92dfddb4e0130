"""Intensity windows and the mapping between a slice image and a model's square input.

A slice (rows, cols) with pixel size (row_mm, col_mm) is resampled so that its longest *physical* side fills
``input_size`` model pixels with square pixels, then padded at the bottom and right. This single resize
also makes anisotropic pixels (a sagittal slice of a 0.8×0.8×5 mm CT) square. Masks go back the other way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .errors import PromptError

# Window presets (width, level) in Hounsfield units, named as in Slicer's volume display presets.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (350.0, 40.0),
    "brain": (100.0, 50.0),
    "subdural": (215.0, 75.0),
    "bone": (1000.0, 400.0),
    "lung": (1400.0, -500.0),
    "mediastinum": (350.0, 50.0),
    "liver": (150.0, 30.0),
    "air": (1000.0, -426.0),
}
DEFAULT_PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLE = 2_000_000


@dataclass(frozen=True)
class Window:
    """Intensities from ``lower`` to ``upper`` map to 0..1; values outside are clipped."""

    lower: float
    upper: float

    @property
    def key(self) -> tuple[float, float]:
        """A hashable identity for caches."""
        return round(self.lower, 4), round(self.upper, 4)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Window an array to float32 in [0, 1]."""
        scale = 1.0 / max(self.upper - self.lower, 1e-6)
        return np.clip((np.asarray(image, dtype=np.float32) - self.lower) * scale, 0.0, 1.0)


def resolve_window(array: np.ndarray, spec: str | tuple[float, float] | None = None) -> Window:
    """The window for ``spec``: None/"auto" (0.5–99.5 percentiles of the volume), a CT preset name such as
    ``"brain"``, ``"W,L"`` as a string, or a (width, level) pair."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        flat = np.asarray(array).ravel()
        step = max(1, flat.size // _PERCENTILE_SAMPLE)
        lower, upper = np.percentile(flat[::step], DEFAULT_PERCENTILES)
        if upper <= lower:  # mostly-constant volume: fall back to the full range
            lower, upper = float(flat.min()), float(flat.max())
        return Window(float(lower), float(upper))
    if isinstance(spec, str):
        name = spec.strip().lower().removeprefix("ct-")
        if name in CT_PRESETS:
            width, level = CT_PRESETS[name]
        else:
            try:
                width, level = (float(v) for v in spec.split(","))
            except ValueError:
                raise PromptError(f"Unknown window {spec!r}: use auto, W,L (e.g. 400,40) or a preset "
                                  f"({', '.join(sorted(CT_PRESETS))}).") from None
    else:
        width, level = (float(v) for v in spec)
    if not width > 0:
        raise PromptError(f"The window width must be positive, not {width}.")
    return Window(level - width / 2.0, level + width / 2.0)


@dataclass(frozen=True)
class SliceTransform:
    """Maps between slice pixels (rows, cols) and a model input of ``input_size``² (content top-left)."""

    image_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    input_size: int

    @classmethod
    def for_slice(cls, image_shape: tuple[int, int], pixel_spacing: tuple[float, float],
                  input_size: int) -> SliceTransform:
        rows, cols = image_shape
        height_mm, width_mm = rows * pixel_spacing[0], cols * pixel_spacing[1]
        scale = input_size / max(height_mm, width_mm)
        resized = (max(1, min(input_size, round(height_mm * scale))), max(1, min(input_size, round(width_mm * scale))))
        return cls((int(rows), int(cols)), resized, int(input_size))

    @property
    def scale_xy(self) -> np.ndarray:
        """Model pixels per slice pixel along x (cols) and y (rows)."""
        return np.array([self.resized_shape[1] / self.image_shape[1], self.resized_shape[0] / self.image_shape[0]])

    def points_to_model(self, xy: np.ndarray) -> np.ndarray:
        """Slice pixel XY (N, 2) (pixel centres at integers) → model input XY (N, 2), pixel-centre aligned."""
        return (np.asarray(xy, dtype=float) + 0.5) * self.scale_xy - 0.5

    def box_to_model(self, box: np.ndarray) -> np.ndarray:
        """Slice box (x0, y0, x1, y1) in pixel centres → model box covering the same pixels' extent."""
        box = np.asarray(box, dtype=float).reshape(2, 2)
        return (box * self.scale_xy).ravel() + np.array([0.0, 0.0, self.scale_xy[0], self.scale_xy[1]]) - 0.5

    def image_to_model(self, image01: np.ndarray) -> np.ndarray:
        """Slice image (rows, cols) in [0, 1] → float32 (1, 3, S, S): resized (bilinear, antialiased), zero padded,
        3 channels."""
        resized = np.clip(resize(np.asarray(image01, dtype=np.float32), self.resized_shape, antialias=True), 0.0, 1.0)
        out = np.zeros((1, 3, self.input_size, self.input_size), dtype=np.float32)
        out[:, :, : self.resized_shape[0], : self.resized_shape[1]] = resized
        return out

    def logits_to_slice(self, low_res_logits: np.ndarray) -> np.ndarray:
        """Low-res logits (B, M, h, w) → float32 logits (B, M, rows, cols) on the slice grid: bilinear to the
        model's input size, cropped to the content, bilinear to the slice (one product per axis)."""
        return _resample(low_res_logits, *(self._to_slice(axis, low_res_logits.shape[axis - 2]) for axis in (0, 1)))

    def _to_slice(self, axis: int, low_res: int) -> np.ndarray:
        """The weights (slice pixels, low-res pixels) of :meth:`logits_to_slice` along ``axis`` (0 rows, 1 cols)."""
        to_input = resize_weights(low_res, self.input_size, antialias=False)[: self.resized_shape[axis]]
        return resize_weights(self.resized_shape[axis], self.image_shape[axis], antialias=False) @ to_input

    def to_grid(self, mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """A slice mask (rows, cols) as the share of each cell of the model's ``grid`` (h, w) it covers, float32:
        bilinear to the model's input frame, zero padded, averaged over each cell (an embedding's pixels)."""
        weights = [pool_weights(self.input_size, size)[:, : self.resized_shape[axis]]
                   @ resize_weights(self.image_shape[axis], self.resized_shape[axis], antialias=False)
                   for axis, size in enumerate(grid)]
        return _resample(np.asarray(mask, dtype=np.float32), *weights)


def _resample(array: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``array`` (..., r, c) → (..., R, C) float32 through per-axis weights ``rows`` (R, r) and ``cols`` (C, c)."""
    return (rows.astype(np.float32) @ np.asarray(array, dtype=np.float32) @ cols.T.astype(np.float32))


def resize(image: np.ndarray, shape: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """``image`` (..., rows, cols) bilinearly resized to ``shape``, float32: PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=antialias)`` in NumPy (tested against it)."""
    sizes = zip(np.shape(image)[-2:], shape, strict=True)
    return _resample(image, *(resize_weights(n, size, antialias) for n, size in sizes))


@functools.lru_cache(maxsize=64)
def resize_weights(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
    """The (size_out, size_in) float64 weights of a bilinear resize along one axis, pixel centres at i + 0.5: a
    triangle around each output centre, one input pixel wide, or with ``antialias`` and fewer output pixels as
    wide as an output pixel (PIL's and PyTorch's antialiasing); taps past the edges are dropped and each row
    renormalised (PyTorch's clamping at the edges does the same)."""
    scale = size_in / size_out
    width = max(scale, 1.0) if antialias else 1.0
    offsets = (np.arange(size_in) + 0.5)[None, :] - (np.arange(size_out) + 0.5)[:, None] * scale
    weights = np.clip(1.0 - np.abs(offsets) / width, 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=16)
def pool_weights(size_in: int, size_out: int) -> np.ndarray:
    """The (size_out, size_in) weights of PyTorch's adaptive average pooling along one axis: output i averages
    input pixels floor(i·n/m) to ceil((i+1)·n/m)."""
    starts = np.arange(size_out) * size_in // size_out
    ends = -((-(np.arange(size_out) + 1) * size_in) // size_out)
    pixels = np.arange(size_in)[None, :]
    weights = ((pixels >= starts[:, None]) & (pixels < ends[:, None])) / (ends - starts)[:, None]
    weights.setflags(write=False)
    return weights

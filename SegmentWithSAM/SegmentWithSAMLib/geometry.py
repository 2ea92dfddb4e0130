"""Volumes and slice geometry: KJI voxel arrays with an IJK→RAS matrix, and the slice a view shows. Conventions
(as in 3D Slicer):
- A :class:`Volume` holds ``array`` in KJI order (``array[k, j, i]``, as ``slicer.util.arrayFromVolume``
  returns it) and ``ijk_to_ras``, a 4×4 matrix from voxel (i, j, k) to RAS millimetres.
- A view (axial, coronal, sagittal) looks along the RAS normal S, A or R. Its slice axis is the IJK axis most
  aligned with that normal; :func:`slice_axes` is the one place that decides this.
- A slice image is a 2D array (rows, cols) oriented as Slicer's default slice views display it: columns run
  along the view's screen-right direction and rows run downwards on the screen. Pixel (col, row) = (x, y).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import numpy as np

from .errors import PromptError, VolumeError


class View(str, Enum):
    """A slice view, named as in Slicer (Red = axial, Green = coronal, Yellow = sagittal)."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"

    @classmethod
    def parse(cls, name: str | View) -> View:
        """Return the view for a name such as ``"axial"`` (also ``"red"``, ``"green"``, ``"yellow"``)."""
        if isinstance(name, View):
            return name
        key = str(name).strip().lower()
        aliases = {"red": "axial", "green": "coronal", "yellow": "sagittal"}
        try:
            return cls(aliases.get(key, key))
        except ValueError:
            raise PromptError(f"Unknown view {name!r}: use axial, coronal or sagittal.") from None


# Screen-right, screen-up and normal of each view as RAS unit vectors: the columns of Slicer's default
# SliceToRAS orientation for the Red, Green and Yellow views.
_VIEW_FRAMES = {
    View.AXIAL: ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    View.CORONAL: ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
    View.SAGITTAL: ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)),
}

# RAS = diag(-1, -1, 1) · LPS (homogeneous form), used to convert ITK (LPS) geometry at the io boundary.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Volume:
    """A scalar image volume: ``array`` (K, J, I) and ``ijk_to_ras`` (4, 4) in millimetres."""

    array: np.ndarray
    ijk_to_ras: np.ndarray

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim == 4 and array.shape[-1] in (3, 4):
            raise VolumeError(f"The volume has {array.shape[-1]} components per voxel (RGB); use a scalar volume.")
        if array.ndim != 3:
            raise VolumeError(f"The volume has {array.ndim} dimensions {array.shape}; a 3D scalar volume is needed.")
        if array.size == 0:
            raise VolumeError(f"The volume is empty (shape {array.shape}).")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
            raise VolumeError(f"The volume has voxel type {array.dtype}; a real-valued scalar type is needed.")
        matrix = np.asarray(self.ijk_to_ras, dtype=float)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise VolumeError("The IJK→RAS matrix must be a finite 4×4 matrix.")
        if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
            raise VolumeError("The IJK→RAS matrix is singular (a zero spacing or repeated axis).")
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "ijk_to_ras", matrix)

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along I, J, K."""
        k, j, i = self.array.shape
        return i, j, k

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along I, J, K in millimetres, shape (3,)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @cached_property
    def ras_to_ijk(self) -> np.ndarray:
        """Inverse of ``ijk_to_ras``, shape (4, 4)."""
        return np.linalg.inv(self.ijk_to_ras)

    @cached_property
    def identity(self) -> str:
        """A content hash of voxels, voxel type and geometry: equal volumes share embeddings in a cache."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(str((self.array.shape, self.array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(self.array).data)
        digest.update(np.round(self.ijk_to_ras, 6).tobytes())
        return digest.hexdigest()

    def to_ijk(self, ras: np.ndarray) -> np.ndarray:
        """Map RAS points (N, 3) to continuous IJK coordinates (N, 3); voxel centres are integers."""
        ras = np.atleast_2d(np.asarray(ras, dtype=float))
        return ras @ self.ras_to_ijk[:3, :3].T + self.ras_to_ijk[:3, 3]

    def to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """Map IJK points (N, 3) to RAS millimetres (N, 3)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]


def check_segmentable(volume: Volume) -> None:
    """Raise :class:`VolumeError` unless the volume has finite, non-constant intensities."""
    array = volume.array
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise VolumeError("The volume contains NaN or infinite voxel values; fix or mask them first.")
    if array.min() == array.max():
        raise VolumeError(f"The volume is constant (every voxel is {array.flat[0]}); there is nothing to segment.")


@dataclass(frozen=True)
class SliceAxes:
    """How a view cuts a volume: which IJK axis is normal to it and how the other two map to rows and columns.

    ``row_flip``/``col_flip`` are True where the IJK axis runs against the screen direction (rows run down
    the screen, columns to the right).
    """

    view: View
    slice_axis: int
    row_axis: int
    col_axis: int
    row_flip: bool
    col_flip: bool
    shape_ijk: tuple[int, int, int]
    spacing_ijk: tuple[float, float, float]

    @property
    def num_slices(self) -> int:
        return self.shape_ijk[self.slice_axis]

    @property
    def image_shape(self) -> tuple[int, int]:
        """(rows, cols) of a slice image."""
        return self.shape_ijk[self.row_axis], self.shape_ijk[self.col_axis]

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """(row, column) pixel size in millimetres."""
        return self.spacing_ijk[self.row_axis], self.spacing_ijk[self.col_axis]

    @property
    def oriented_spacing(self) -> tuple[float, float, float]:
        """(slice, row, column) spacing in millimetres: that of :meth:`oriented` arrays."""
        return self.spacing_ijk[self.slice_axis], *self.pixel_spacing

    def oriented(self, array: np.ndarray) -> np.ndarray:
        """A view of a KJI array as (slice, row, col) in display orientation; writes go to ``array``."""
        view = np.moveaxis(array, [2 - self.slice_axis, 2 - self.row_axis, 2 - self.col_axis], [0, 1, 2])
        return view[:, :: -1 if self.row_flip else 1, :: -1 if self.col_flip else 1]

    def _flip(self, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IJK row and column coordinates ⇄ pixel ones (the same map both ways)."""
        rows, cols = self.image_shape
        return rows - 1 - row if self.row_flip else row, cols - 1 - col if self.col_flip else col

    def ijk_to_pixel(self, ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IJK points (N, 3) → (slice coordinates (N,), pixel XY (N, 2) as (col, row)), all continuous."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        row, col = self._flip(ijk[:, self.row_axis], ijk[:, self.col_axis])
        return ijk[:, self.slice_axis], np.stack([col, row], axis=1)

    def pixel_to_ijk(self, slice_coord: np.ndarray | float, xy: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`ijk_to_pixel`: slice coordinate(s) and pixel XY (N, 2) → IJK (N, 3)."""
        xy = np.atleast_2d(np.asarray(xy, dtype=float))
        ijk = np.empty((len(xy), 3))
        ijk[:, self.slice_axis] = slice_coord
        ijk[:, self.row_axis], ijk[:, self.col_axis] = self._flip(xy[:, 1], xy[:, 0])
        return ijk


def slice_axes(volume: Volume, view: View | str) -> SliceAxes:
    """Decide how ``view`` cuts ``volume``: the IJK axis closest to the view normal is the slice axis.

    Works for any direction matrix (RAS, LPS, flipped, permuted, oblique): the in-plane axis closest to the
    screen-right direction becomes the columns, the other the rows, each flipped as needed.
    """
    view = View.parse(view)
    right, up, normal = (np.asarray(v) for v in _VIEW_FRAMES[view])
    directions = volume.ijk_to_ras[:3, :3] / volume.spacing  # unit IJK axes as columns, in RAS
    slice_axis = int(np.argmax(np.abs(normal @ directions)))
    in_plane = [a for a in range(3) if a != slice_axis]
    col_axis = max(in_plane, key=lambda a: abs(right @ directions[:, a]))
    row_axis = in_plane[0] if in_plane[1] == col_axis else in_plane[1]
    return SliceAxes(
        view=view,
        slice_axis=slice_axis,
        row_axis=row_axis,
        col_axis=col_axis,
        row_flip=bool(-up @ directions[:, row_axis] < 0),
        col_flip=bool(right @ directions[:, col_axis] < 0),
        shape_ijk=volume.shape_ijk,
        spacing_ijk=tuple(float(s) for s in volume.spacing),
    )


def slice_image(volume: Volume, axes: SliceAxes, index: int) -> np.ndarray:
    """The slice image (rows, cols) at ``index`` along the slice axis, in display orientation (a copy)."""
    if not 0 <= index < axes.num_slices:
        raise PromptError(f"Slice {index} is outside the volume: the {axes.view.value} view has "
                          f"slices 0 to {axes.num_slices - 1}.")
    return np.array(axes.oriented(volume.array)[index])


def slices_with(axes: SliceAxes, mask3d: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the slices of ``axes`` on which the KJI boolean ``mask3d`` has voxels."""
    return np.flatnonzero(axes.oriented(np.asarray(mask3d, dtype=bool)).any(axis=(1, 2)))


def bounding_box(mask2d: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """The box (x0, y0, x1, y1) in slice pixels around a non-empty 2D mask (rows, cols), grown by ``margin``
    pixels on every side."""
    rows, cols = np.nonzero(mask2d)
    return np.array([cols.min() - margin, rows.min() - margin, cols.max() + margin, rows.max() + margin], float)


def equivalent_radius_mm(mask2d: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """The radius (mm) of a disk as large as ``mask2d`` (rows, cols) with pixels ``pixel_spacing`` (row, col) mm."""
    return float(np.sqrt(np.count_nonzero(mask2d) * np.prod(pixel_spacing) / np.pi))


@dataclass(frozen=True)
class Reach:
    """A ball around a click's points (``points`` (K, 2) pixel XY on slice ``index`` of ``axes``) of ``radius_mm``,
    slices counted at the in-plane pixel size when they are thicker (a positive click's carry stays within it)."""

    axes: SliceAxes
    index: int
    points: np.ndarray
    radius_mm: float

    @cached_property
    def _distance_mm(self) -> np.ndarray:
        from scipy import ndimage as ndi

        seeds = np.ones(self.axes.image_shape, bool)
        seeds[self.points[:, 1].astype(int), self.points[:, 0].astype(int)] = False
        return ndi.distance_transform_edt(seeds, sampling=self.axes.pixel_spacing)

    def on(self, index: int) -> np.ndarray:
        """The pixels (rows, cols) of slice ``index`` within the ball."""
        row_mm, col_mm = self.axes.pixel_spacing
        dz = abs(index - self.index) * min(self.axes.spacing_ijk[self.axes.slice_axis], (row_mm + col_mm) / 2)
        return self._distance_mm**2 <= self.radius_mm**2 - dz**2


def prompts_to_slice(volume: Volume, axes: SliceAxes, ras_points: np.ndarray,
                     corners_ras: np.ndarray | None = None) -> tuple[int, np.ndarray, np.ndarray | None]:
    """Map RAS prompt points (N, 3) and a box's two opposite corners (2, 3) to one slice index, the points as
    pixel XY (N, 2) and the box (4,) x0, y0, x1, y1 in pixels (None without corners). The one home of "which
    slice do these prompts lie on".

    Raises :class:`PromptError` if a point is outside the volume, the box lies off the volume's slices (it may
    reach past the volume in-plane: the engine clips it) or the prompts are on different slices.
    """
    points = np.asarray(ras_points, dtype=float).reshape(-1, 3)
    corners = np.zeros((0, 3)) if corners_ras is None else np.asarray(corners_ras, dtype=float).reshape(2, 3)
    every = np.concatenate([points, corners])
    if not len(every) or not np.all(np.isfinite(every)):
        raise PromptError("Prompts need finite RAS coordinates (millimetres): give at least one point or a box.")
    ijk = volume.to_ijk(every)
    upper = np.asarray(volume.shape_ijk) - 0.5
    for ras, p in zip(points, ijk, strict=False):
        if np.any(p < -0.5) or np.any(p > upper):
            raise PromptError(
                f"The point R={ras[0]:.1f}, A={ras[1]:.1f}, S={ras[2]:.1f} mm is outside the volume "
                f"(voxel {np.round(p, 1).tolist()}, volume size {list(volume.shape_ijk)}).")
    slice_coords, xy = axes.ijk_to_pixel(ijk)
    xy = np.round(xy, 6)  # RAS round trips (a Slicer ROI, a command line) agree to the micro-pixel: one mask
    if np.any(slice_coords < -0.5) or np.any(slice_coords > axes.num_slices - 0.5):
        raise PromptError(f"The box lies off the volume's {axes.view.value} slices (0 to {axes.num_slices - 1}): "
                          "draw it on the image.")
    indices = np.clip(np.rint(slice_coords), 0, axes.num_slices - 1).astype(int)
    if np.any(indices != indices[0]):
        raise PromptError(
            f"The prompts are on different {axes.view.value} slices ({sorted(set(indices.tolist()))}); "
            "place all points and the box on one slice.")
    box = None
    if len(corners):
        box_xy = xy[len(points):]
        box = np.concatenate([box_xy.min(axis=0), box_xy.max(axis=0)])
    return int(indices[0]), xy[: len(points)], box


def view_for_normal(volume: Volume, normal_ras: np.ndarray, tolerance_deg: float = 1.0) -> View:
    """The view whose slices lie in the plane with RAS normal ``normal_ras`` (a slice view's plane).

    Raises :class:`PromptError` when that plane is oblique to the volume's voxel grid by more than
    ``tolerance_deg``: a model slice would then differ from what the user sees.
    """
    normal = np.asarray(normal_ras, dtype=float).ravel()[:3]
    if not np.linalg.norm(normal) > 0:
        raise PromptError("The slice plane has no normal direction.")
    normal = normal / np.linalg.norm(normal)
    view = max(View, key=lambda v: abs(normal @ np.asarray(_VIEW_FRAMES[v][2])))
    axes = slice_axes(volume, view)
    direction = volume.ijk_to_ras[:3, axes.slice_axis] / volume.spacing[axes.slice_axis]
    angle = float(np.degrees(np.arccos(np.clip(abs(direction @ normal), 0.0, 1.0))))
    if angle > tolerance_deg:
        raise PromptError(
            f"This slice view is rotated {angle:.1f}° away from the volume's {view.value} slices. Use the view's "
            "'Rotate to volume plane' (slice view menu) or reset its orientation, then place the prompts again.")
    return view


def box_on_slice(volume: Volume, view: View | str, corners_ras: np.ndarray, centre_ras: np.ndarray) -> np.ndarray:
    """Two opposite corners (2, 3) RAS of the in-plane extent of a 3D box, on the slice through ``centre_ras``.

    ``corners_ras`` (N, 3) are the box's corners (e.g. the 8 corners of a Slicer ROI); only their extent
    across the view's rows and columns counts, so a box drawn thin or thick in a slice view works alike.
    """
    axes = slice_axes(volume, view)
    slice_coord, _ = axes.ijk_to_pixel(volume.to_ijk(centre_ras))
    _, xy = axes.ijk_to_pixel(volume.to_ijk(corners_ras))
    extent = np.array([xy.min(axis=0), xy.max(axis=0)])
    return volume.to_ras(axes.pixel_to_ijk(np.rint(slice_coord[0]), extent))


def seed_slice(axes: SliceAxes, labels: np.ndarray, label: int | None, source: str) -> tuple[int, np.ndarray]:
    """The slice index and 2D mask (rows, cols) of a seed: the voxels of ``labels`` (KJI, read from ``source``)
    of value ``label`` (None: any non-zero); :class:`PromptError` unless it is non-empty and on one slice."""
    selected = labels != 0 if label is None else labels == label
    slices = slices_with(axes, selected)
    if not len(slices):
        raise PromptError(f"The seed mask {source} is empty" + (f" for label {label}." if label else "."))
    if len(slices) > 1:
        raise PromptError(f"The seed mask lies on {axes.view.value} slices {slices.min()} to {slices.max()}; it "
                          "must be on one slice of that view.")
    return int(slices[0]), axes.oriented(selected)[slices[0]]

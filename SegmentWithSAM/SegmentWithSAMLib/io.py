"""Reading volumes and writing labelmaps: the one place where files (LPS, via ITK) meet RAS volumes.

Every write is atomic: the file appears complete under its final name, or not at all.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import OutputError, VolumeError
from .geometry import LPS_TO_RAS, Volume

SEGMENTATION_SUFFIX = ".seg.nrrd"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def file_suffix(path: Path) -> str:
    """The known suffix that ends ``path``'s name (lower case), or ""."""
    name = path.name.lower()
    for suffix in (SEGMENTATION_SUFFIX, *IMAGE_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return ""


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VolumeError(f"{folder} is a folder with no DICOM series in it.")
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a scalar volume (NIfTI, NRRD, MHA, or a DICOM series folder) into RAS geometry."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path} does not exist.")
    try:
        image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise VolumeError(f"{path} could not be read as an image volume ({first_line}).") from None
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise VolumeError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or "
                          "vector); a scalar volume is needed.")
    if image.GetDimension() != 3:
        raise VolumeError(f"{path} is a {image.GetDimension()}D image; a 3D volume is needed.")
    return Volume(sitk.GetArrayFromImage(image), LPS_TO_RAS @ _ijk_to_lps(image))


def read_labelmap_on(path: str | os.PathLike, reference: Volume, reference_name: str = "the volume") -> Volume:
    """Read a labelmap that must lie on ``reference``'s grid (same size and geometry), else :class:`VolumeError`."""
    labels = read_volume(path)
    if labels.array.shape != reference.array.shape or not np.allclose(labels.ijk_to_ras, reference.ijk_to_ras,
                                                                       atol=1e-3):
        raise VolumeError(f"{path} is not on the grid of {reference_name} (size or geometry differ).")
    return labels


def read_kept_voxels(spec: str, reference: Volume, reference_name: str = "the volume") -> np.ndarray:
    """The voxels (bool KJI) to keep out of a new object: ``spec`` is ``LABELMAP`` (its non-zero voxels) or
    ``LABELMAP:L1,L2,…`` (those labels), the labelmap on ``reference``'s grid; :class:`VolumeError` otherwise."""
    path, _, labels = str(spec).rpartition(":")
    if not path or not labels.replace(",", "").strip().isdigit():
        path, labels = str(spec), ""
    values = read_labelmap_on(path, reference, reference_name).array
    if not labels:
        return values != 0
    wanted = [int(v) for v in labels.split(",") if v.strip()]
    missing = [v for v in wanted if not (values == v).any()]
    if missing:
        raise VolumeError(f"{path} has no voxel labelled {', '.join(map(str, missing))} to keep.")
    return np.isin(values, wanted)


def _ijk_to_lps(image) -> np.ndarray:
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _write_image(array: np.ndarray, ijk_to_ras: np.ndarray, path: Path, suffix: str) -> None:
    import SimpleITK as sitk

    ijk_to_lps = LPS_TO_RAS @ ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    atomic_write(path, suffix, lambda tmp: sitk.WriteImage(image, tmp, True))


def _check_output(path: Path) -> str:
    suffix = file_suffix(path)
    if not suffix:
        raise OutputError(f"Cannot write {path}: use a .nii.gz, .nii, .nrrd, .mha or {SEGMENTATION_SUFFIX} file name.")
    return suffix


def check_writable(path: str | os.PathLike, labelmap: bool = False) -> None:
    """Raise :class:`OutputError` unless ``path`` can be created (and, with ``labelmap``, has a known suffix)."""
    path = Path(path)
    if labelmap:
        _check_output(path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"Cannot write {path}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"Cannot write {path}: the folder {folder} is not writable.")
    if path.is_dir():
        raise OutputError(f"Cannot write {path}: it is a folder.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, suffix: str, write) -> None:
    """Call ``write(temporary_path)`` then move it onto ``path``; remove the temporary file on any failure.

    ``suffix`` ends the temporary file's name (writers choose the format by it).
    """
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the user's usual permissions
        os.replace(tmp, path)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError | RuntimeError):
            raise OutputError(f"Cannot write {path}: {exc}") from None
        raise


def clear_partial_writes(path: str | os.PathLike) -> int:
    """Remove the temporary files that :func:`atomic_write` calls for ``path`` left behind when their process
    was killed (SIGKILL, power loss) before it could; call it only while nothing else writes ``path``.
    Returns how many there were."""
    path = Path(path)
    leftovers = list(path.parent.glob(f".{glob.escape(path.name)}.*"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return len(leftovers)


def write_volume(volume: Volume, path: str | os.PathLike) -> None:
    """Write a volume with its geometry (NIfTI, NRRD or MHA by file name)."""
    path = Path(path)
    suffix = _check_output(path)
    if suffix == SEGMENTATION_SUFFIX:
        raise OutputError(f"Cannot write {path}: {SEGMENTATION_SUFFIX} is for labelmaps; use .nrrd or .nii.gz.")
    _write_image(volume.array, volume.ijk_to_ras, path, suffix)


def write_labelmap(mask: np.ndarray, reference: Volume, path: str | os.PathLike, *,
                   name: str = "Segment_1", color: tuple[float, float, float] = (0.9, 0.3, 0.2)) -> None:
    """Write a boolean KJI mask on ``reference``'s grid: 0/1 labelmap, or a Slicer segmentation (.seg.nrrd).

    A ``.seg.nrrd`` file holds one segment with ``name`` and ``color`` (RGB in 0..1), as Slicer saves it.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != reference.array.shape:
        raise OutputError(f"Cannot write {path}: the mask shape {mask.shape} differs from the volume's "
                          f"{reference.array.shape}.")
    write_labels(mask.astype(np.uint8), reference, path, {1: name}, {1: color})


# segment colours (RGB in 0..1) of a multi-label .seg.nrrd, by label value, cycled
_SEGMENT_COLORS = ((0.9, 0.3, 0.2), (0.2, 0.6, 0.9), (0.3, 0.8, 0.3), (0.9, 0.8, 0.2), (0.7, 0.4, 0.9),
                   (0.2, 0.8, 0.8), (0.9, 0.5, 0.7), (0.6, 0.6, 0.6))


def write_labels(labels: np.ndarray, reference: Volume, path: str | os.PathLike, names: dict[int, str],
                 colors: dict[int, tuple[float, float, float]] | None = None) -> None:
    """Write an integer KJI labelmap on ``reference``'s grid: a labelmap image by file name, or a Slicer
    segmentation (.seg.nrrd) with one segment per value of ``names`` (label value → segment name), coloured by
    ``colors`` (value → RGB in 0..1; default a palette)."""
    path = Path(path)
    suffix = _check_output(path)
    labels = np.asarray(labels)
    if labels.shape != reference.array.shape or not np.issubdtype(labels.dtype, np.integer):
        raise OutputError(f"Cannot write {path}: the labelmap (shape {labels.shape}, {labels.dtype}) must be "
                          f"integer with the volume's shape {reference.array.shape}.")
    if suffix == SEGMENTATION_SUFFIX:
        import slicerio

        segmentation = slicerio.create_segmentation(reference.shape_ijk, LPS_TO_RAS @ reference.ijk_to_ras)
        for value, name in names.items():
            color = (colors or {}).get(value, _SEGMENT_COLORS[(value - 1) % len(_SEGMENT_COLORS)])
            slicerio.add_segment(segmentation, (labels == value).transpose(2, 1, 0),
                                 {"id": name, "name": name, "color": list(color)})
        atomic_write(path, suffix, lambda tmp: slicerio.write_segmentation(tmp, segmentation))
    else:
        _write_image(labels, reference.ijk_to_ras, path, suffix)

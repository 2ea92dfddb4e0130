"""Reading and writing volumes: LPS files become RAS volumes, DICOM series folders, atomic labelmap writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentWithSAMLib.errors import VolumeError
from SegmentWithSAMLib.geometry import Volume
from SegmentWithSAMLib.io import read_volume, write_labelmap, write_volume


def _lps_image() -> sitk.Image:
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # permuted and flipped
    return image


def test_lps_file_becomes_ras_and_writes_back_identically(tmp_path):
    path = tmp_path / "v.nrrd"
    sitk.WriteImage(_lps_image(), str(path))
    volume = read_volume(path)
    # voxel (i=1, j=2, k=3): LPS = origin + D·diag(spacing)·ijk; RAS flips the first two coordinates.
    lps = np.array([10.0, -20.0, 30.0]) + np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]]) @ (np.array([1, 2, 3]) *
                                                                                       np.array([0.7, 0.8, 2.5]))
    np.testing.assert_allclose(volume.to_ras([[1, 2, 3]])[0], lps * [-1, -1, 1])
    out = tmp_path / "copy.nii.gz"
    write_volume(volume, out)
    again = sitk.ReadImage(str(out))
    np.testing.assert_allclose(again.GetDirection(), _lps_image().GetDirection(), atol=1e-6)
    np.testing.assert_allclose(again.GetOrigin(), _lps_image().GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(_lps_image()))


def test_dicom_series_folder(tmp_path):
    image = sitk.Cast(_lps_image(), sitk.sitkInt16)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        slice_.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        slice_.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        slice_.SetMetaData("0020|0013", str(k))
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    volume = read_volume(tmp_path)
    assert volume.shape_ijk == (6, 5, 4)
    np.testing.assert_allclose(volume.spacing, [0.7, 0.8, 2.5], atol=1e-4)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    with pytest.raises(VolumeError, match="no DICOM series"):
        read_volume(tmp_path / "..")  # a folder without DICOM files (only the test folders)


def test_failed_write_leaves_no_file(tmp_path):
    reference = Volume(np.zeros((3, 4, 5), np.int16), np.eye(4))
    with pytest.raises(Exception, match="mask shape"):
        write_labelmap(np.zeros((2, 2, 2), bool), reference, tmp_path / "m.nii.gz")
    assert list(tmp_path.iterdir()) == []
    write_labelmap(np.ones((3, 4, 5), bool), reference, tmp_path / "m.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.nii.gz").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_labelmap_must_be_on_the_volume_grid(tmp_path):
    from SegmentWithSAMLib.io import read_labelmap_on

    reference = Volume(np.zeros((3, 4, 5), np.int16), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    write_volume(Volume(np.ones((3, 4, 5), np.uint8), shifted), tmp_path / "l.nrrd")
    with pytest.raises(VolumeError, match="is not on the grid of ref.nrrd"):
        read_labelmap_on(tmp_path / "l.nrrd", reference, "ref.nrrd")
    write_volume(Volume(np.ones((3, 4, 5), np.uint8), np.eye(4)), tmp_path / "ok.nrrd")
    assert read_labelmap_on(tmp_path / "ok.nrrd", reference).array.sum() == 60

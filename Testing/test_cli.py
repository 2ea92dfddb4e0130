"""The command line: a real segmentation written with the input's geometry, and every bad input refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentWithSAMLib.cli import main
from SegmentWithSAMLib.data import colin27
from SegmentWithSAMLib.geometry import Volume, slice_axes
from SegmentWithSAMLib.io import read_volume, write_volume
from SegmentWithSAMLib.release import RELEASE

from conftest import structure_box_ras


@pytest.fixture(scope="module")
def hippocampus_box(colin, atlas):
    axes = slice_axes(colin, "axial")
    index, corners = structure_box_ras(colin, atlas, axes, "Hippocampus_L")
    return ",".join(f"{v:.3f}" for v in corners.ravel()), index


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd"])
def test_segment_writes_labelmap_on_the_input_grid(tmp_path, capsys, hippocampus_box, suffix):
    box, index = hippocampus_box
    out = tmp_path / f"mask{suffix}"
    code, stdout, _ = _run(capsys, "segment", colin27().image, "--view", "axial", "--box", box,
                           "--out", out, "--json", "--device", "cpu")
    assert code == 0
    report = json.loads(stdout)
    assert stdout.count("\n") == 1
    assert report["slice"] == index and report["model"] == "litemedsam" and report["device"] == "cpu"
    assert report["voxels"] > 100 and {"load_model", "segment", "total"} <= set(report["ms"])
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(colin27().image))
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    mask = sitk.GetArrayFromImage(written) > 0
    assert mask.sum() == report["voxels"] and set(np.flatnonzero(mask.any(axis=(1, 2)))) == {index}
    if suffix == ".seg.nrrd":
        import slicerio

        segmentation = slicerio.read_segmentation(str(out))
        assert [s["name"] for s in segmentation["segments"]] == ["Segment_1"]


def test_a_second_command_on_the_same_volume_encodes_nothing(tmp_path, capsys, monkeypatch, hippocampus_box):
    """The embeddings stay on disk, in a folder of the owner's only, for the next command: the same mask, bit for
    bit, with nothing encoded; ``$SEGMENTWITHSAM_DISK_CACHE_MB=0`` keeps nothing there."""
    from SegmentWithSAMLib.disk_cache import DISK_CACHE_DIR_ENV, DISK_CACHE_ENV

    box, _ = hippocampus_box
    folder = tmp_path / "embeddings"
    reports, masks = [], []
    for run, megabytes in enumerate(["2048", "2048", "0"]):
        monkeypatch.setenv(DISK_CACHE_ENV, megabytes)
        monkeypatch.setenv(DISK_CACHE_DIR_ENV, str(folder if megabytes != "0" else tmp_path / "none"))
        out = tmp_path / f"mask{run}.nii.gz"
        code, stdout, _ = _run(capsys, "segment", colin27().image, "--view", "axial", "--box", box,
                               "--out", out, "--json", "--device", "cpu")
        assert code == 0
        reports.append(json.loads(stdout))
        masks.append(read_volume(out).array)
    assert [r["encoded"] for r in reports] == [1, 0, 1]
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
    files = list(folder.glob("*.npy"))
    assert len(files) == 1 and folder.stat().st_mode & 0o777 == 0o700  # the folder is the owner's only
    assert not list((tmp_path / "none").glob("*.npy"))


def test_the_command_is_installed(tmp_path):
    done = subprocess.run([sys.executable, "-m", "SegmentWithSAMLib.cli", "segment", "--help"],
                          capture_output=True, text=True, check=True)
    assert "--view" in done.stdout


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    good = np.random.default_rng(0).integers(0, 100, (8, 9, 10)).astype(np.int16)
    write_volume(Volume(good, np.eye(4)), folder / "good.nii.gz")
    write_volume(Volume(np.full((8, 9, 10), 7, np.int16), np.eye(4)), folder / "constant.nii.gz")
    nan = good.astype(np.float32)
    nan[2, 3, 4] = np.nan
    write_volume(Volume(nan, np.eye(4)), folder / "nan.nrrd")  # ITK reads NIfTI NaN as 0
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), str(folder / "4d.nii.gz"))
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), str(folder / "rgb.nrrd"))
    (folder / "garbage.nii.gz").write_bytes(b"\x1f\x8bnot really gzip")
    (folder / "empty.nrrd").write_bytes(b"")
    (folder / "broken.pth").write_text("not a checkpoint\n" * 100)
    return folder


BAD_CASES = {
    "missing file": (["missing.nii.gz"], "does not exist"),
    "unreadable file": (["garbage.nii.gz"], "could not be read as an image volume"),
    "empty file": (["empty.nrrd"], "could not be read as an image volume"),
    "4D volume": (["4d.nii.gz"], "4D image"),
    "RGB volume": (["rgb.nrrd"], "components per voxel"),
    "constant volume": (["constant.nii.gz"], "constant"),
    "NaN volume": (["nan.nrrd"], "NaN"),
    "point outside": (["good.nii.gz", "--point", "50,2,2"], "outside the volume"),
    "not on one slice": (["good.nii.gz", "--point", "2,2,1", "--point", "2,2,5"], "different axial slices"),
    "no prompt": (["good.nii.gz", "--negative", "2,2,2"], "at least one --point, a --box, a --lasso"),
    "unknown model": (["good.nii.gz", "--model", "sam9"], "Unknown model 'sam9'"),
    "bad checkpoint": (["good.nii.gz", "--model", "{dir}/broken.pth"], "is not a PyTorch checkpoint"),
    "unwritable output": (["good.nii.gz", "--out", "{dir}/no/such/folder/out.nii.gz"], "does not exist"),
    "output is a folder": (["good.nii.gz", "--out", "{dir}.nii.gz"], "it is a folder"),
    "unknown output type": (["good.nii.gz", "--out", "{dir}/out.png"], "use a .nii.gz"),
    "bad window": (["good.nii.gz", "--window", "sunset"], "Unknown window 'sunset'"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_with_one_line_and_no_file(bad_inputs, capsys, case):
    extra, message = BAD_CASES[case]
    out = bad_inputs / "out.nii.gz"
    if case == "output is a folder":
        (bad_inputs.parent / f"{bad_inputs.name}.nii.gz").mkdir(exist_ok=True)
    args = [a.format(dir=bad_inputs) for a in extra]
    argv = ["segment", str(bad_inputs / args[0]), "--view", "axial", "--out", str(out), "--device", "cpu"]
    if "--point" not in args and "--negative" not in args:
        argv += ["--point", "2,2,2"]
    argv += args[1:]
    before = set(bad_inputs.iterdir())
    code, stdout, stderr = _run(capsys, *argv)
    assert code == 2
    assert stderr.startswith("segmentwithsam: error: ") and stderr.count("\n") == 1
    assert message in stderr
    assert stdout == ""
    assert set(bad_inputs.iterdir()) == before  # nothing written, no temporary left behind


def test_info_and_bad_arguments(capsys):
    code, stdout, _ = _run(capsys, "info", "--json")
    report = json.loads(stdout)
    assert code == 0 and report["device"] == "cpu" and "litemedsam" in report["models"]
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "x.nii.gz", "--view", "axial", "--out", "o.nii.gz", "--point", "1,2"])
    assert exit_info.value.code == 2
    assert "--point needs 3 comma-separated numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"segmentwithsam {RELEASE}\n"


def test_demo(tmp_path, capsys, colin):
    code, stdout, _ = _run(capsys, "demo", "--out-dir", tmp_path, "--json", "--device", "cpu")
    report = json.loads(stdout)
    assert code == 0 and report["dice"] > 0.5
    assert (tmp_path / "hippocampus_L.nii.gz").is_file() and (tmp_path / "hippocampus_L_axial.png").is_file()
    assert read_volume(tmp_path / "hippocampus_L.nii.gz").array.sum() == report["voxels"]


def test_a_3d_box_past_the_head_cts_edge_is_clipped_and_fills_its_range(tmp_path, capsys, cranium):
    """segment --box … --propagate both --range A:B: the box poking out of the field of view is clipped (a notice,
    not an error) and, as a 3D box, fills every slice of its range."""
    path = tmp_path / "head.nrrd"
    first = np.eye(4)
    first[2, 3] = 50  # three axial slices from slice 50 on: the box's and one on either side
    write_volume(Volume(cranium.array[50:53].copy(), cranium.ijk_to_ras @ first), path)
    volume = read_volume(path)
    axes = slice_axes(volume, "axial")
    rows, cols = np.nonzero(axes.oriented(volume.array > -300)[1])
    pixels = [[cols.min() - 40, rows.min() - 40], [cols.max() + 40, rows.max() + 40]]
    box = ",".join(f"{v:.2f}" for v in volume.to_ras(axes.pixel_to_ijk(1, pixels)).ravel())
    out = tmp_path / "head-mask.nii.gz"
    code, stdout, _ = _run(capsys, "segment", path, "--view", "axial", "--box", box, "--window", "brain",
                           "--propagate", "both", "--range", "0:2", "--out", out, "--json", "--device", "cpu")
    assert code == 0
    report = json.loads(stdout)
    assert any("clipped" in notice for notice in report["notices"]) and report["slice"] == 1
    assert report["stopped"] == {"up": "range end", "down": "range end"}
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0).any(axis=(1, 2)).all()  # all 3 slices

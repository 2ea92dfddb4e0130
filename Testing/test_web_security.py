"""The web app's rules on who may connect and which files it may touch (SegmentWithSAMWeb/security.py), and the
command's message when the web extra is missing. No browser and no trame needed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from SegmentWithSAMLib.errors import OutputError, VolumeError
from SegmentWithSAMLib.geometry import Volume
from SegmentWithSAMLib.io import write_volume
from SegmentWithSAMWeb.security import KEY_ENV, DataFolder, UploadedFile, Uploads, access_key, is_loopback, page_url

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                                 ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                                 ("::", False), ("example.org", False)])
def test_only_loopback_addresses_go_without_a_key(host, loopback, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert is_loopback(host) is loopback
    key, generated = access_key(host)
    assert (key is None and not generated) if loopback else (len(key) >= 32 and generated)


def test_a_given_key_wins_and_is_never_generated(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "from-the-environment")
    assert access_key("0.0.0.0") == ("from-the-environment", False)
    assert access_key("0.0.0.0", "given") == ("given", False)
    assert access_key("127.0.0.1") == ("from-the-environment", False)
    monkeypatch.delenv(KEY_ENV)
    assert access_key("0.0.0.0")[0] != access_key("0.0.0.0")[0]
    assert page_url("127.0.0.1", 8080, None) == "http://127.0.0.1:8080/"
    assert page_url("::1", 8080, "k") == "http://[::1]:8080/?secret=k"


def test_nothing_outside_the_data_folder_is_read_or_written(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (outside / "secret.nii.gz").write_bytes(b"x")
    (data / "in.nii.gz").write_bytes(b"x")
    (data / "link.nii.gz").symlink_to(outside / "secret.nii.gz")
    (data / "linked").symlink_to(outside)
    folder = DataFolder(data)
    assert folder.resolve("in.nii.gz") == (data / "in.nii.gz").resolve()
    for name in ("../outside/secret.nii.gz", str(outside / "secret.nii.gz"), "link.nii.gz", "linked/secret.nii.gz",
                 "in.nii.gz/../../outside/secret.nii.gz"):
        with pytest.raises(VolumeError, match="outside the data folder"):
            folder.resolve(name)
    for name in ("", "..", "sub/out.nii.gz", "../out.nii.gz", "/tmp/out.nii.gz"):
        with pytest.raises((OutputError, VolumeError)):
            folder.output(name)
    assert folder.output("out.seg.nrrd") == data.resolve() / "out.seg.nrrd"
    with pytest.raises(VolumeError, match="does not exist"):
        DataFolder(tmp_path / "missing")


def test_the_data_folder_lists_volumes_and_dicom_folders_but_no_links(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.nrrd").write_bytes(b"x")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"x")
    (tmp_path / "out.seg.nrrd").write_bytes(b"x")
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    assert DataFolder(tmp_path).volumes() == ["a.nii.gz", "out.seg.nrrd", "series/"]


def test_uploads_are_size_checked_read_by_the_core_and_never_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    volume = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.diag([0.5, 0.6, 2.0, 1.0]))
    write_volume(volume, tmp_path / "small.nrrd")
    content = (tmp_path / "small.nrrd").read_bytes()
    (tmp_path / "small.nrrd").unlink()
    uploads = Uploads(max_bytes=len(content))
    name, read = uploads.read([UploadedFile("C:\\Users\\me\\small.nrrd", content)])
    assert name == "small" and np.array_equal(read.array, volume.array)
    np.testing.assert_allclose(read.ijk_to_ras, volume.ijk_to_ras, atol=1e-6)
    with pytest.raises(VolumeError, match="at most"):
        Uploads(max_bytes=len(content) - 1).read([UploadedFile("small.nrrd", content)])
    with pytest.raises(VolumeError, match="could not be read") as refused:
        uploads.read([UploadedFile("notes.nii.gz", b"not a volume")])
    assert "segmentwithsam-upload" not in str(refused.value) and "notes.nii.gz" in str(refused.value)
    with pytest.raises(VolumeError, match="upload one volume file"):
        uploads.read([UploadedFile("notes.txt", b"text")])
    with pytest.raises(VolumeError, match="repeated"):
        uploads.read([UploadedFile("1.dcm", b"x"), UploadedFile("sub/1.dcm", b"x")])
    flat = Volume(np.zeros((3, 3, 3), np.int16), np.eye(4))
    write_volume(flat, tmp_path / "flat.nrrd")
    with pytest.raises(VolumeError, match="constant"):
        Uploads(2**20).read([UploadedFile("flat.nrrd", (tmp_path / "flat.nrrd").read_bytes())])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.nrrd"]  # no upload folder is left behind


def test_the_command_says_how_to_get_the_web_extra_when_it_is_missing():
    shim = ("import sys; sys.modules['trame'] = None; sys.modules['trame_slicer'] = None; "
            "from SegmentWithSAMLib.cli import main; sys.exit(main(['web']))")
    done = subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "SegmentWithSAM")})
    assert done.returncode == 2
    assert done.stderr.startswith("segmentwithsam: error:") and "pip install segmentwithsam[web]" in done.stderr


def test_the_core_never_imports_trame_and_imports_the_web_app_only_when_asked():
    for path in (ROOT / "SegmentWithSAM" / "SegmentWithSAMLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for top in (name.split(".")[0] for name in names):
                assert not top.startswith("trame"), f"{path.name} imports {top}"
                assert top != "SegmentWithSAMWeb" or node.col_offset > 0, f"{path.name} imports the web app at once"

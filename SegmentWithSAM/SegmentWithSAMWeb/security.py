"""Who may connect and which files the web app may touch: the access key, the data folder and uploads.

- The app binds 127.0.0.1 unless told otherwise. Any other address needs an access key (``--key``,
  ``$SEGMENTWITHSAM_WEB_KEY``, or one generated here and printed once). The key is wslink's secret: every
  websocket connection must present it in its hello (the page sends the ``?secret=`` of its URL), and a
  connection without it gets no state, no views and no calls (wslink answers "Authentication failed").
- Files are opened from one folder (``--data``) only: a name that resolves outside it (``..``, an absolute
  path, a link leading out) is refused before anything is read, and saved files go into the same folder.
- Uploads are limited in size, written under their base name into a private temporary folder (mode 0700) and
  read with the core's :func:`~SegmentWithSAMLib.io.read_volume` before anything enters the scene. Downloads are
  sent over the authenticated websocket; no HTTP route serves data.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from SegmentWithSAMLib.errors import OutputError, VolumeError
from SegmentWithSAMLib.geometry import Volume, check_segmentable
from SegmentWithSAMLib.io import IMAGE_SUFFIXES, read_volume

KEY_ENV = "SEGMENTWITHSAM_WEB_KEY"
MAX_LISTED = 500  # files offered from the data folder (the page lists them; a huge folder is cut)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_key(host: str, given: str | None = None) -> tuple[str | None, bool]:
    """The key connections must present and whether it was generated here (then print it once). None on a
    loopback address with no key given: only this machine can connect."""
    key = given or os.environ.get(KEY_ENV) or None
    if key is not None or is_loopback(host):
        return key, False
    return secrets.token_urlsafe(24), True


def page_url(host: str, port: int, key: str | None) -> str:
    """The address to open (with the key, which the page removes from the address bar once read)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?secret={key}" if key else "")


def is_volume_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def read_checked(path: Path, shown: str) -> Volume:
    """Read the volume at ``path`` and check that it can be segmented; errors name it ``shown`` (the name the
    user knows, never a server path they did not give)."""
    try:
        volume = read_volume(path)
        check_segmentable(volume)
    except VolumeError as error:
        raise VolumeError(str(error).replace(str(path), shown)) from None
    return volume


class DataFolder:
    """The one folder the app reads volumes from and saves results into."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise VolumeError(f"The data folder {root} does not exist: give --data an existing folder.")

    def resolve(self, name: str) -> Path:
        """The path of ``name`` (relative to the folder) if it stays inside the folder, links resolved; else a
        :class:`VolumeError` saying so (nothing is read)."""
        path = (self.root / name).resolve()
        if path != self.root and self.root not in path.parents:
            raise VolumeError(f"{name} is outside the data folder {self.root}; only files in it can be opened.")
        return path

    def output(self, name: str) -> Path:
        """Where a result called ``name`` is saved: a plain file name in the folder, else :class:`OutputError`."""
        if not name or Path(name).name != name or name in (".", ".."):
            raise OutputError(f"Save as a plain file name (no folders): {name!r} is not one.")
        return self.resolve(name)

    def volumes(self) -> list[str]:
        """Volume files and DICOM series folders (folders holding .dcm files) in the folder, as relative names."""
        found: list[str] = []
        for path in sorted(self.root.rglob("*")):
            if len(found) >= MAX_LISTED:
                break
            if path.is_symlink():
                continue
            relative = path.relative_to(self.root).as_posix()
            if path.is_file() and is_volume_name(path.name) and not path.name.startswith("."):
                found.append(relative)
            elif path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir()):
                found.append(relative + "/")
        return found


@dataclass
class UploadedFile:
    """One file from the page: its name as the browser gave it and its bytes."""

    name: str
    content: bytes


class Uploads:
    """Checks uploads and turns them into volumes (see the module docstring); ``max_bytes`` in total."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def check_sizes(self, sizes: list[int]) -> None:
        total = sum(sizes)
        if total > self.max_bytes:
            raise VolumeError(f"The upload is {total / 2**20:.1f} MB; this server takes at most "
                              f"{self.max_bytes / 2**20:.0f} MB (--max-upload-mb).")

    def read(self, files: list[UploadedFile]) -> tuple[str, Volume]:
        """The volume in ``files`` (one volume file, or the files of one DICOM series) and a name for it; a
        :class:`VolumeError` if they are too large or not a readable scalar 3D volume. Nothing is kept."""
        if not files:
            raise VolumeError("No file was uploaded.")
        self.check_sizes([len(f.content) for f in files])
        folder = Path(tempfile.mkdtemp(prefix="segmentwithsam-upload-"))  # 0700: this user only
        try:
            names = []
            for file in files:
                name = Path(file.name.replace("\\", "/")).name
                if not name or name.startswith(".") or name in names:
                    raise VolumeError(f"The upload has an unusable or repeated file name: {file.name!r}.")
                (folder / name).write_bytes(file.content)
                names.append(name)
            if len(names) == 1 and is_volume_name(names[0]):
                return _stem(names[0]), read_checked(folder / names[0], names[0])
            if any(is_volume_name(n) for n in names) or (len(names) == 1 and not names[0].lower().endswith(".dcm")):
                raise VolumeError(f"{', '.join(names)}: upload one volume file (NIfTI .nii/.nii.gz, NRRD, MHA) or "
                                  "the files of one DICOM series.")
            return _stem(names[0]), read_checked(folder, "the uploaded DICOM files")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _stem(name: str) -> str:
    lowered = name.lower()
    for suffix in (*IMAGE_SUFFIXES, ".dcm"):
        if lowered.endswith(suffix):
            return name[: -len(suffix)] or "volume"
    return name

"""Who may connect and which files the web app may touch: the access key, the page's own origin, TLS, the data
folder and uploads.

- **A key, always.** Every websocket connection must present the access key in its hello (the page sends the
  ``?secret=`` of its URL and then removes it from the address bar); a connection without it gets no state, no
  views and no calls (wslink answers "Authentication failed"). The key is read from ``--key-file`` or
  ``$SEGMENTWITHSAM_WEB_KEY`` (never from the command line, which other users of the machine can see), else a
  new one is made at each start and printed once, inside the URL to open (as Jupyter does).
- **Its own pages only.** Every HTTP request and websocket upgrade must name this server in its Host header,
  and, when the browser sends one, in its Origin: the address the connection arrived at (or ``localhost`` on a
  loopback connection, or this machine's own names when serving the network) and the port served. Anything else
  gets 403. This stops other web sites' pages (a cross-origin websocket) and DNS rebinding (a foreign name
  pointed at this address) from reaching the server through the user's browser.
- **TLS off this machine.** The app binds 127.0.0.1 unless told otherwise; any other address needs a TLS
  certificate (``--certfile``, ``--keyfile``), else it refuses to start: the key and the images would cross the
  network in clear.
- **One folder.** Files are opened from one folder (``--data``; by default a private folder of the user's,
  ``segmentwithsam/web`` in the data folder, made readable by its owner only) and saved into it: a name that
  resolves outside it (``..``, an absolute path, a link leading out) is refused before anything is read.
- Uploads are limited in size, written under their base name into a private temporary folder (mode 0700) and
  read with the core's :func:`~SegmentWithSAMLib.io.read_volume` before anything enters the scene. Downloads are
  sent over the authenticated websocket; no HTTP route serves data.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from SegmentWithSAMLib.backend.tls import server_context
from SegmentWithSAMLib.errors import BackendError, OutputError, SegmentWithSAMError, VolumeError
from SegmentWithSAMLib.folders import private_folder
from SegmentWithSAMLib.geometry import Volume, check_segmentable
from SegmentWithSAMLib.io import IMAGE_SUFFIXES, read_volume

KEY_ENV = "SEGMENTWITHSAM_WEB_KEY"
MAX_LISTED = 500  # files offered from the data folder (the page lists them; a huge folder is cut)
WILDCARDS = ("", "0.0.0.0", "::")  # every address of the machine
DEFAULT_PORTS = {"http": 80, "https": 443}


class ServeError(SegmentWithSAMError):
    """The web app cannot serve as asked: another address without TLS, an unusable certificate or key file."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_key(given: str | None = None, key_file: str | None = None) -> tuple[str, bool]:
    """The key connections must present (``given``, else the contents of ``key_file``, else ``$SEGMENTWITHSAM_WEB_KEY``,
    else a new one) and whether it is new (then it is printed once, in the URL)."""
    if not given and key_file:
        try:
            given = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ServeError(f"Cannot read the key file {key_file}: {error.strerror}.") from None
        if not given:
            raise ServeError(f"The key file {key_file} is empty: put the access key in it.")
    key = given or os.environ.get(KEY_ENV, "").strip()
    return (key, False) if key else (secrets.token_urlsafe(32), True)


def tls_context(host: str, certfile: str | None, keyfile: str | None = None) -> ssl.SSLContext | None:
    """The TLS context to serve ``host`` with (PEM files; the key may be inside ``certfile``); None on a loopback
    address without a certificate; a :class:`ServeError` on any other address without one."""
    if keyfile and not certfile:
        raise ServeError("--keyfile needs --certfile.")
    if not certfile:
        if is_loopback(host):
            return None
        raise ServeError(
            f"Refusing to serve {host or 'every address'} without TLS: anyone on the network could read the access "
            "key, the images and the masks. Give --certfile (and --keyfile), or serve on 127.0.0.1 and reach it "
            "through an SSH tunnel: ssh -N -L 8080:127.0.0.1:8080 you@this-machine, then open the printed URL "
            "on your computer.")
    try:
        return server_context(certfile, keyfile)
    except BackendError as error:  # the web app's own kind of start-up error, the same words
        raise ServeError(str(error)) from None


def page_url(host: str, port: int, key: str, tls: bool = False) -> str:
    """The address to open for a server bound to ``host`` (this machine's name when that is every address), with
    the key (which the page removes from the address bar once read)."""
    shown = socket.getfqdn() if host in WILDCARDS else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"{'https' if tls else 'http'}://{shown}:{port}/?secret={key}"


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # an IPv4 client on a dual-stack socket
    return mapped or address


@dataclass(frozen=True)
class OwnOrigin:
    """Which Host and Origin headers name this server (see the module docstring): ``scheme`` "http" or
    "https", and ``names``, the host names besides IP addresses and ``localhost`` that do (lower case)."""

    scheme: str
    names: frozenset[str]

    @classmethod
    def serving(cls, host: str, tls: bool) -> OwnOrigin:
        """For a server bound to ``host``: on loopback, no names but ``localhost``; on the network, this machine's
        host name and fully qualified name, and ``host`` itself when it is a name."""
        names: set[str] = set()
        if not is_loopback(host):
            names = {socket.gethostname(), socket.getfqdn()}
            if host not in WILDCARDS and _address(host) is None:
                names.add(host)
        return cls("https" if tls else "http", frozenset(n.lower() for n in names if n))

    def refusal(self, host: str | None, origin: str | None, local: tuple[str, int]) -> str | None:
        """Why a request with these Host and Origin headers (None: not sent), arriving at the local ``(address,
        port)``, is refused; None when it names this server."""
        if not host or not self._names_us(f"{self.scheme}://{host}", local):
            return f"Refused: the Host {host!r} is not this server's address ({local[0]} port {local[1]})."
        if origin is not None and not (origin.startswith(f"{self.scheme}://") and self._names_us(origin, local)):
            return f"Refused: a page from {origin} may not use this server; open the address it printed."
        return None

    def _names_us(self, url: str, local: tuple[str, int]) -> bool:
        try:
            parts = urlsplit(url)
            port = parts.port or DEFAULT_PORTS[self.scheme]
        except ValueError:
            return False
        name = parts.hostname or ""
        if port != local[1] or parts.path or parts.query or parts.username is not None:
            return False
        address, arrived = _address(name), _address(local[0])
        if address is not None:
            return address == arrived
        if name == "localhost":
            return arrived is not None and arrived.is_loopback
        return name in self.names


def default_data_folder() -> Path:
    """``segmentwithsam/web`` in the user's data folder (``$XDG_DATA_HOME``, else ~/.local/share), readable by its
    owner only: the folder files are opened from and saved to when no ``--data`` is given."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return private_folder(base / "segmentwithsam" / "web")


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

"""Downloading a model checkpoint, only when the user agreed: into the per-user model folder, resumable,
with a progress bar, and kept only when its SHA-256 equals the registry's full digest."""

from __future__ import annotations

import hmac
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from .checkpoints import sha256_of
from .errors import CheckpointError
from .models.catalog import ModelEntry

CHUNK = 1 << 20


def download(entry: ModelEntry, url: str | None = None, target: Path | None = None, progress: bool = True,
             on_progress: Callable[[int, int | None], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> Path:
    """Fetch ``entry``'s checkpoint (from ``url``, default the registry's) to ``target`` (default its path).
    ``on_progress(bytes, total)`` follows the transfer (e.g. for a GUI); ``cancel()`` stops it, keeping the
    partial file for a later resume.

    A partial ``.part`` file from an interrupted transfer is resumed with an HTTP range request. The file is
    moved into place only after its whole SHA-256 equals ``entry.sha256``; a mismatch deletes it and raises
    :class:`CheckpointError`. An entry without a digest (see :class:`ModelEntry`) is not downloaded.
    """
    url = url or entry.url
    if not url or not entry.sha256:
        raise CheckpointError(f"{entry.name} has no verified download; {entry.manual_install}, or give its path.")
    target = target or entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # the server ignored the range: start over
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length else entry.size
            with open(part, "ab" if have else "wb") as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=entry.checkpoint, file=sys.stderr,
                    disable=None if progress else True) as bar:
                while block := response.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
                    if on_progress is not None:
                        on_progress(bar.n, total)
                    if cancel is not None and cancel():
                        raise OSError("cancelled")
        if total and part.stat().st_size < total:
            raise OSError(f"the connection closed after {part.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise CheckpointError(f"Downloading {entry.name} stopped ({error}); run the download again to resume "
                              f"({part.stat().st_size if part.exists() else 0} bytes kept).") from None
    digest = sha256_of(part)
    if not hmac.compare_digest(digest, entry.sha256):
        part.unlink()
        raise CheckpointError(f"The download of {entry.name} has SHA-256 {digest}, not the expected "
                              f"{entry.sha256}: it was deleted. Try again, or check the URL.")
    os.replace(part, target)
    return target

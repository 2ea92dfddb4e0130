"""This installation's version of SegmentWithSAM, as records, reports and the backend's handshake name it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def release() -> str:
    """The installed distribution's version, or "source" when run from a source tree (as in Slicer)."""
    try:
        return version("segmentwithsam")
    except PackageNotFoundError:
        return "source"


RELEASE = release()

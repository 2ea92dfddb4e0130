"""The user's folders this package writes to: one home for where they are and how they are made."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(name: str, env: str | None = None) -> Path:
    """``$env`` if set, else ``name`` in the user's cache folder (``$XDG_CACHE_HOME``, else ~/.cache), under
    ``segmentwithsam``. Not created here."""
    override = os.environ.get(env) if env else None
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segmentwithsam" / name


def private_folder(path: Path) -> Path:
    """Create ``path`` (and missing parents) readable by its owner only; an existing one is narrowed to that
    if it is ours. Returns ``path``."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not hasattr(os, "getuid") or path.stat().st_uid == os.getuid():  # Windows: the profile folder is private
        os.chmod(path, 0o700)
    return path

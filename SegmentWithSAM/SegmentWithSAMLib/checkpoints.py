"""Loading model checkpoints safely: check the file first, then ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

from .errors import CheckpointError

_MIN_BYTES = 1024
_PICKLE_MAGIC = b"\x80"  # the legacy (pre-zip) torch.save format starts with a pickle protocol opcode


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: str | os.PathLike) -> dict:
    """Read a PyTorch state dict from ``path`` without executing code from the file.

    Accepts a plain state dict or one wrapped under ``"model"`` or ``"state_dict"``.
    Raises :class:`CheckpointError` naming the file and what is wrong with it.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist." if not path.exists()
                              else f"Checkpoint {path} is not a file.")
    size = path.stat().st_size
    if size < _MIN_BYTES:
        raise CheckpointError(f"Checkpoint {path} is only {size} bytes: it is empty or truncated.")
    with path.open("rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                if not any(n.endswith("data.pkl") for n in archive.namelist()):
                    raise CheckpointError(f"Checkpoint {path} is a zip file but not a PyTorch checkpoint.")
        except zipfile.BadZipFile:
            raise CheckpointError(f"Checkpoint {path} is truncated or corrupted (its zip directory is unreadable); "
                                  "download or copy it again.") from None
    elif not head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"Checkpoint {path} is not a PyTorch checkpoint (it does not start like one).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unsafe or damaged files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"Checkpoint {path} could not be loaded safely: {reason}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"Checkpoint {path} holds no model weights (expected a dict of tensors).")
    return state


def load_into(module, state: dict, path: str | os.PathLike, architecture: str) -> None:
    """Load ``state`` into ``module`` strictly, or raise :class:`CheckpointError` naming the mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(f"{len(wrong_shape)} tensors have other shapes (e.g. {k}: {tuple(state[k].shape)} "
                         f"instead of {tuple(expected[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} weights are missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} weights are unknown to it (e.g. {unexpected[0]})")
        raise CheckpointError(f"Checkpoint {path} does not fit the {architecture} architecture: "
                              + "; ".join(parts) + ".")
    module.load_state_dict(state, strict=True)

"""Model adapters and the registry that maps model names to loaders."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelError
from .base import Decoded, SamLikeAdapter
from .litemedsam import LiteMedSAM

DEFAULT_MODEL = "litemedsam"

# name → adapter class with a ``load(device, checkpoint=None)`` classmethod
REGISTRY: dict[str, type[SamLikeAdapter]] = {LiteMedSAM.name: LiteMedSAM}


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, device=None) -> SamLikeAdapter:
    """Load a model by registry name, or a LiteMedSAM-architecture checkpoint by file path."""
    from ..device import configure_cpu_threads, select_device

    device = select_device(device) if device is None or isinstance(device, str) else device
    if device.type == "cpu":
        configure_cpu_threads()
    key = str(spec).strip().lower()
    if key in REGISTRY:
        return REGISTRY[key].load(device)
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin") or path.exists():
        return LiteMedSAM.load(device, checkpoint=path)
    raise ModelError(f"Unknown model {str(spec)!r}: use one of {', '.join(sorted(REGISTRY))} "
                     "or the path of a checkpoint file.")


__all__ = ["DEFAULT_MODEL", "REGISTRY", "Decoded", "LiteMedSAM", "SamLikeAdapter", "load_model"]

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


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, device=None, engine: str | None = "auto") -> SamLikeAdapter:
    """Load a model by registry name, or a LiteMedSAM-architecture checkpoint by file path, on ``engine``
    ("auto": the fastest one available for the device, see :mod:`..engines`; "torch": the reference)."""
    from ..device import configure_cpu_threads, select_device
    from ..engines import accelerate, resolve_engine

    device = select_device(device) if device is None or isinstance(device, str) else device
    if device.type == "cpu":
        configure_cpu_threads()
    engine = resolve_engine(engine, device)
    key = str(spec).strip().lower()
    if key in REGISTRY:
        return accelerate(REGISTRY[key].load(device), engine)
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin") or path.exists():
        return accelerate(LiteMedSAM.load(device, checkpoint=path), engine)
    raise ModelError(f"Unknown model {str(spec)!r}: use one of {', '.join(sorted(REGISTRY))} "
                     "or the path of a checkpoint file.")


__all__ = ["DEFAULT_MODEL", "REGISTRY", "Decoded", "LiteMedSAM", "SamLikeAdapter", "load_model"]

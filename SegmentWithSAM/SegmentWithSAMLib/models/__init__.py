"""Model adapters and the registry (``registry.json``, see :mod:`.catalog`). Loading one is
:func:`..loading.load_model`'s."""

from __future__ import annotations

from .base import Decoded, SamLikeAdapter
from .catalog import ARCHITECTURES, Architecture, ModelEntry, registry
from .litemedsam import LiteMedSAM
from .sam import SAM, MedSAM
from .sam2 import SAM2

DEFAULT_MODEL = "litemedsam"

__all__ = ["ARCHITECTURES", "DEFAULT_MODEL", "SAM", "SAM2", "Architecture", "Decoded", "LiteMedSAM", "MedSAM",
           "ModelEntry", "SamLikeAdapter", "registry"]

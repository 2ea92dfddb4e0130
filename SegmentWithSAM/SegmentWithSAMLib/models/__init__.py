"""Model adapters, the registry (``registry.json``, see :mod:`.catalog`) and :func:`load_model`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError, ModelError
from .base import Decoded, SamLikeAdapter
from .catalog import ModelEntry, registry
from .litemedsam import LiteMedSAM, bundled_checkpoint

DEFAULT_MODEL = "litemedsam"


def _load(architecture: str, device, checkpoint, name: str | None, state: dict | None = None) -> SamLikeAdapter:
    """Build ``architecture`` with the weights of ``checkpoint`` (``state``: those weights, if already read)."""
    adapter = _architecture(architecture)
    if adapter is None:
        from .sam2 import SAM2

        return SAM2.load(device, checkpoint, architecture, name, state)
    if adapter is LiteMedSAM:
        return LiteMedSAM.load(device, checkpoint, state)
    from .sam import MedSAM

    if adapter is MedSAM:
        return MedSAM.load(device, checkpoint, "vit_b", name or "medsam", state)
    return adapter.load(device, checkpoint, architecture.removeprefix("sam_"), name, state)


def _load_file(path: Path, device) -> SamLikeAdapter:
    """A checkpoint file's model, its architecture read from its weights (a SAM ViT or SAM 2.1 Hiera variant,
    else LiteMedSAM); the file is read once."""
    from ..checkpoints import load_state_dict
    from . import sam, sam2

    state = load_state_dict(path)
    variant = sam.checkpoint_variant(state)
    architecture = f"sam_{variant}" if variant else sam2.checkpoint_variant(state) or "litemedsam"
    return _load(architecture, device, path, None, state)


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, device=None, engine: str | None = "auto",
               checkpoint: str | os.PathLike | None = None) -> SamLikeAdapter:
    """Load a registry model by name (with ``checkpoint`` instead of its default file, if given), or a
    checkpoint file by path (its architecture recognised from its weights), on ``engine`` ("auto": the
    fastest one available for the device, see :mod:`..engines`; "torch": the reference). On the CPU, sets
    PyTorch's threads for the engine it ends on (see :func:`..device.configure_cpu_threads`)."""
    from ..device import configure_cpu_threads, select_device
    from ..engines import accelerate, resolve_engine

    device = select_device(device) if device is None or isinstance(device, str) else device
    automatic = engine is None or str(engine).strip().lower() == "auto"
    engine = resolve_engine(engine, device)
    if device.type == "cpu":
        configure_cpu_threads()  # every core for loading (and exporting)
    model = (_from_cached_export(spec, device, checkpoint, engine)
             or accelerate(_load_spec(spec, device, checkpoint), engine, automatic))
    if device.type == "cpu":
        configure_cpu_threads(model.engine)
    return model


def _from_cached_export(spec, device, checkpoint, engine: str) -> SamLikeAdapter | None:
    """A registry model on an OpenVINO ``engine`` straight from its cached export, its PyTorch network built
    only if a click needs it (see :class:`..engines.OpenVINOModel`): a start without importing timm and
    torchvision or reading the weights (about 2.7 s of the command line's start here). None when there is no
    whole export for that checkpoint, or it does not compile: then the model loads the usual way."""
    from ..engines import DeferredModel, OpenVINOModel, export_folder, is_exported

    entry = registry().get(str(spec).strip().lower())
    if not engine.startswith("openvino") or entry is None:
        return None
    architecture = _architecture(entry.architecture)
    path = checkpoint or (bundled_checkpoint() if architecture is LiteMedSAM else entry.path)
    if architecture is None or path is None or not Path(path).is_file():
        return None
    name = architecture.name if architecture is LiteMedSAM else entry.name  # as the loaded model names itself
    folder = export_folder(name, path)
    if not is_exported(folder, len(architecture.stage_bf16)):
        return None
    deferred = DeferredModel(architecture, name, str(path), device, lambda: _load_spec(spec, device, checkpoint))
    try:
        return OpenVINOModel(deferred, folder, engine.partition("-")[2] or "mixed")
    except Exception:  # a compile failure: the usual path reports it, or falls back to PyTorch
        return None


def _architecture(architecture: str) -> type[SamLikeAdapter] | None:
    """The adapter class of a registry architecture, without building anything; None for SAM 2's (see
    :mod:`.sam2`, whose import needs the ``sam2`` package; the OpenVINO engine does not run them)."""
    if architecture == "litemedsam":
        return LiteMedSAM
    if architecture.startswith(("sam2", "medsam2")):
        return None
    from .sam import SAM, MedSAM

    return MedSAM if architecture == "medsam_vit_b" else SAM


def _load_spec(spec: str | os.PathLike, device, checkpoint: str | os.PathLike | None) -> SamLikeAdapter:
    """The PyTorch model for a registry name or a checkpoint path (see :func:`load_model`)."""
    key = str(spec).strip().lower()
    models = registry()
    if key in models:
        entry = models[key]
        if checkpoint is None and entry.architecture != "litemedsam":
            if not entry.installed:
                how = (f"run `segmentwithsam models --download {entry.name}`" if entry.url
                       else entry.manual_install)
                raise CheckpointError(f"{entry.name} is not installed: {how}, or give its checkpoint path.")
            checkpoint = entry.path
        return _load(entry.architecture, device, checkpoint, entry.name)
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin") or path.exists():
        return _load_file(path, device) if path.is_file() else _load("litemedsam", device, path, None)
    raise ModelError(f"Unknown model {str(spec)!r}: use one of {', '.join(sorted(models))} "
                     "or the path of a checkpoint file.")


__all__ = ["DEFAULT_MODEL", "Decoded", "LiteMedSAM", "ModelEntry", "SamLikeAdapter", "load_model", "registry"]

"""Loading a model: a registry name or a checkpoint path → the adapter that builds its architecture
(:data:`.models.ARCHITECTURES`) → the engine that runs it (:mod:`.engines`), straight from an OpenVINO export
when there is one for the checkpoint (the default model's ships with the package: no PyTorch needed). This
module sits above both: the adapters know nothing of engines, the engines nothing of the registry. Loading
sets no process-wide state (see :func:`configure_process_threads`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

from .errors import CheckpointError, ModelError
from .models import ARCHITECTURES, DEFAULT_MODEL, ModelEntry, SamLikeAdapter, registry

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")  # a spec with one of these is a path, even if missing


class Request(NamedTuple):
    """What a spec asks for: the ``architecture`` (a key of ``ARCHITECTURES``), the ``name`` the model gives
    itself (see :func:`model_name`), its ``checkpoint`` file (None: the bundled one, not installed), and the
    ``input_size`` its registry entry gives (None for a checkpoint given by path: nothing to check against)."""

    architecture: str
    name: str
    checkpoint: str | os.PathLike | None
    input_size: int | None


def model_name(architecture: str, entry: ModelEntry | None) -> str:
    """The name a loaded model gives itself, which is also the name its cached OpenVINO export is filed under:
    its registry name, or for a checkpoint given by path its architecture ("sam_vit_b", "litemedsam", …)."""
    return entry.name if entry is not None else architecture


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, device=None, engine: str | None = "auto",
               checkpoint: str | os.PathLike | None = None) -> SamLikeAdapter:
    """Load a registry model by name (with ``checkpoint`` instead of its default file, if given), or a
    checkpoint file by path (its architecture recognised from its weights), on ``engine`` ("auto": the
    fastest one available for the device, see :mod:`.engines`; "torch": the reference). ``device``: a torch
    device, its name, or None/"auto" (see :func:`.device.select_device`). An OpenVINO export of the checkpoint
    (shipped with the package, or cached) starts without PyTorch. Changes no process-wide setting (see
    :func:`configure_process_threads`)."""
    from .device import select_device
    from .engines import accelerate, resolve_engine

    device = select_device(device) if device is None or isinstance(device, str) else device
    automatic = engine is None or str(engine).strip().lower() == "auto"
    engine = resolve_engine(engine, device)
    entry = registry().get(str(spec).strip().lower())
    if entry is None:
        path = Path(spec).expanduser()
        if path.suffix not in CHECKPOINT_SUFFIXES and not path.exists():
            raise ModelError(f"Unknown model {str(spec)!r}: use one of {', '.join(sorted(registry()))} "
                             "or the path of a checkpoint file.")
        # a file is LiteMedSAM's unless its weights say otherwise (_load_file): an export of it starts unread
        request = Request("litemedsam", model_name("litemedsam", None), path, None)
        return _from_export(request, engine) or accelerate(_load_file(path, device), engine, automatic)
    request = _registry_request(entry, checkpoint)
    return _from_export(request, engine) or accelerate(_build(request, device), engine, automatic)


def configure_process_threads(model: SamLikeAdapter | None = None) -> int:
    """Set PyTorch's CPU thread count, a setting of the whole process: for a process's entry point only (the
    library never calls it). Without ``model``: every core the process may run on — call it once at start,
    before loading, so that loading and exporting use them all. With the model just loaded: the count for the
    engine it runs on (every core for PyTorch; one beside OpenVINO, if PyTorch is loaded at all: see
    :func:`.device.configure_cpu_threads`) — call it after each :func:`load_model`. A model on a GPU leaves the
    count as it is. Returns PyTorch's thread count (0 when PyTorch is not loaded)."""
    from .device import configure_cpu_threads

    if model is None:
        return configure_cpu_threads("torch")
    if model.engine != "torch":  # OpenVINO uses no PyTorch: set only a PyTorch something else loaded
        return configure_cpu_threads(model.engine) if "torch" in sys.modules else 0
    if model.device.type != "cpu":
        import torch

        return torch.get_num_threads()
    return configure_cpu_threads(model.engine)


def _registry_request(entry: ModelEntry, checkpoint: str | os.PathLike | None) -> Request:
    """The request for a registry model, with ``checkpoint`` instead of its own file if given. Its checkpoint
    is None for a bundled model whose checkpoint is not installed but whose export ships (see
    :attr:`.models.ModelEntry.path`)."""
    if checkpoint is None and not entry.installed:
        how = f"run `segmentwithsam models --download {entry.name}`" if entry.url else entry.manual_install
        raise CheckpointError(f"{entry.name} is not installed: {how}, or give its checkpoint path.")
    if checkpoint is None:
        checkpoint = entry.path
        if checkpoint == ARCHITECTURES[entry.architecture].adapter.shipped_export:
            checkpoint = None  # the bundled checkpoint is not installed: its shipped export stands for it
    return Request(entry.architecture, model_name(entry.architecture, entry), checkpoint, entry.input_size)


def _load_file(path: Path, device) -> SamLikeAdapter:
    """The PyTorch model of a checkpoint given by path: a file's architecture is read from its weights (a SAM
    ViT or SAM 2.1 Hiera variant, else LiteMedSAM; the file is read once); anything else is LiteMedSAM's."""
    from .checkpoints import load_state_dict

    _require_torch(path.name)
    state = load_state_dict(path) if path.is_file() else None
    architecture = _architecture_of(state) if state is not None else "litemedsam"
    return _build(Request(architecture, model_name(architecture, None), path, None), device, state)


def _architecture_of(state: dict) -> str:
    """The architecture (a key of ``ARCHITECTURES``) a checkpoint's weights were made for."""
    from .models import sam, sam2

    variant = sam.checkpoint_variant(state)
    return f"sam_{variant}" if variant else sam2.checkpoint_variant(state) or "litemedsam"


def _require_torch(what: str) -> None:
    from .engines import TORCH_EXTRA, has_torch

    if not has_torch():
        raise ModelError(f"{what} needs PyTorch here (only LiteMedSAM's shipped export runs without it): "
                         f"{TORCH_EXTRA}.")


def _build(request: Request, device, state: dict | None = None) -> SamLikeAdapter:
    """The PyTorch model of ``request`` (``state``: its checkpoint's weights, if already read), its input size
    checked against the registry's."""
    from .models.litemedsam import bundled_checkpoint

    _require_torch(request.name)
    adapter, variant = ARCHITECTURES[request.architecture]
    checkpoint = request.checkpoint if request.checkpoint is not None else bundled_checkpoint()  # says what's missing
    model = adapter.load(device, checkpoint, variant, request.name, state)
    if request.input_size is not None and model.input_size != request.input_size:
        raise ModelError(f"{request.name} takes {model.input_size}² images, but the registry says "
                         f"{request.input_size}²: its entry in registry.json is wrong.")
    return model


def _from_export(request: Request, engine: str) -> SamLikeAdapter | None:
    """``request`` on an OpenVINO ``engine`` straight from an export of its checkpoint, with no PyTorch: the one
    shipped with the package when made from that checkpoint (by SHA-256), else a cached one. None when there is
    none, or it does not read or compile: then the model loads the usual way, which meets the same failure and
    reports it (or falls back to PyTorch when the engine was automatic)."""
    from .engines import OpenVINOModel, export_folder, is_exported, shipped_export

    adapter = ARCHITECTURES[request.architecture].adapter
    if not engine.startswith("openvino") or not adapter.runs_in_openvino:
        return None
    folder = shipped_export(adapter, request.checkpoint)
    if folder is None and request.checkpoint is not None and Path(request.checkpoint).is_file():
        folder = export_folder(request.name, request.checkpoint)
    if folder is None or not is_exported(folder, len(adapter.stage_bf16)):
        return None
    try:
        return OpenVINOModel(folder, adapter, request.name, request.checkpoint, engine.partition("-")[2] or "mixed")
    except (RuntimeError, OSError, ValueError):  # OpenVINO's read/compile errors; a damaged no_mask.npy
        return None

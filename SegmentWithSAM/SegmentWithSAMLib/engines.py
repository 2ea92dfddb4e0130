"""Execution engines for a SAM-like model: eager PyTorch (the reference, and the one for CUDA/MPS) and
OpenVINO (the fast CPU path, about 3× PyTorch's encoder speed with masks faithful to it; figures and what was
tried and left out: docs/measurements.md).

The encoder is exported in stages (:meth:`~.models.base.SamLikeAdapter.encoder_stages`), each at its own
precision: ``openvino`` runs the stages flagged faithful in bf16 (``stage_bf16``) in bf16 where the CPU has it
and the rest in f32; ``openvino-f32`` all in f32; ``openvino-bf16`` (unfaithful) is never chosen. The decoder is
exported re-associated (:mod:`.models.factored_decoder`) in parts (``DECODER_GRAPHS``), run from NumPy.
LiteMedSAM's export ships with the package (:func:`shipped_export`, made by ``scripts/export_litemedsam.py``,
fp16 weights); any other checkpoint is exported once through ONNX (needs PyTorch) into a per-user cache keyed
by its SHA-256 and the runtime version.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .checkpoints import sha256_of
from .device import CPU
from .errors import ModelError
from .folders import private_folder, user_cache
from .models.base import Decoded, SamLikeAdapter, labelled_points

ENGINES = ("torch", "openvino", "openvino-f32", "openvino-bf16")
ENGINE_CACHE_ENV = "SEGMENTWITHSAM_ENGINE_CACHE"
EXPORT_FORMAT = 8  # bumped when the exported graphs change, so that cached exports are redone
NO_MASK = "no_mask.npy"  # the prompt encoder's dense embedding without a mask (1, C, 1, 1), saved with the export
MANIFEST = "export.json"  # what an export was made from: the checkpoint's SHA-256, the format, the tools' versions
TORCH_EXTRA = "pip install 'segmentwithsam[torch]'"


def has_openvino() -> bool:
    return importlib.util.find_spec("openvino") is not None


def openvino():
    """The ``openvino`` module, imported with OpenVINO's usage telemetry declined for this process. Importing
    openvino (2026.4) sends an event to Google Analytics and writes a client id in ``~/intel`` unless the user
    opted out (``openvino-telemetry`` takes a missing consent file as consent), and its sender, a forked process,
    hung for good under a backend whose stdin watcher held stdin's lock: one orphaned backend per test run. This
    tool asks no such consent, so it declines, for this process only (the user's own setting is left as it is)."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # a runtime without its telemetry package
        pass
    else:
        OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED
    import openvino as ov

    return ov


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def available_engines() -> list[str]:
    """The engines that can run here, fastest first."""
    fast = ["openvino", "openvino-f32", "openvino-bf16"] if has_openvino() else []
    return fast + (["torch"] if has_torch() else [])


def resolve_engine(name: str | None, device) -> str:
    """The engine for ``name`` ("auto"/None: OpenVINO on CPU when installed, else PyTorch) on ``device``."""
    key = (name or "auto").strip().lower()
    if key not in ("auto", *ENGINES):
        raise ModelError(f"Unknown engine {name!r}: use auto, {', '.join(ENGINES)}.")
    if key.startswith("openvino"):
        if not has_openvino():
            raise ModelError(f"The {key} engine was asked for, but OpenVINO is not installed (pip install openvino).")
        if device.type != "cpu":
            raise ModelError(f"The {key} engine runs on the CPU; the device is {device}. Use --device cpu.")
        return key
    if key == "auto" and device.type == "cpu" and has_openvino():
        return "openvino"
    if not has_torch():
        raise ModelError(f"The torch engine needs PyTorch, which is not installed: {TORCH_EXTRA}.")
    if key == "auto" and device.type == "cpu":
        print("segmentwithsam: OpenVINO is not installed; using PyTorch (slower on CPU).", file=sys.stderr)
    return "torch"


def engine_cache_dir() -> Path:
    return user_cache("engines", ENGINE_CACHE_ENV)


# the decoder's exported graphs (see models.factored_decoder): per image; per click, for one mask or for the
# multimask outputs; the upscaling of either; a mask prompt's dense embedding
DECODER_GRAPHS = ("prepare", "attend-single", "attend-multi", "upscale", "mask")


def export_folder(name: str, checkpoint: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """Where the model ``name`` exported from ``checkpoint`` is cached: keyed by the checkpoint's SHA-256, the
    runtime's version and ``EXPORT_FORMAT``."""
    ov = openvino()

    version = re.sub(r"[^\w.]+", "_", ov.__version__)
    return (cache_dir or engine_cache_dir()) / f"{name}-{_digest(checkpoint)[:16]}-ov{version}-x{EXPORT_FORMAT}"


def _digest(checkpoint: str | os.PathLike) -> str:
    """The checkpoint's SHA-256, read once per version of the file in this process: a start looks for an
    export before it exports (seconds for SAM ViT-H's 2.5 GB)."""
    stat = os.stat(checkpoint)
    return _file_digest(str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, modified_ns: int) -> str:
    return sha256_of(path)


def is_exported(folder: Path, stages: int) -> bool:
    """Whether ``folder`` holds a whole export of a model whose encoder has ``stages`` stages."""
    parts = [*DECODER_GRAPHS, *(f"encoder{i}" for i in range(stages))]
    return (all((folder / f"{part}.xml").is_file() for part in parts) and (folder / NO_MASK).is_file()
            and (folder / MANIFEST).is_file())


def shipped_export(architecture: type[SamLikeAdapter], checkpoint: str | os.PathLike | None) -> Path | None:
    """The export of ``architecture`` shipped with the package, if it is whole, of this ``EXPORT_FORMAT`` and
    made from ``checkpoint`` (compared by SHA-256; None: the bundled checkpoint, not installed here); else None."""
    folder = architecture.shipped_export
    if folder is None or not is_exported(folder, len(architecture.stage_bf16)):
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format") != EXPORT_FORMAT:
        return None
    if checkpoint is not None and (not Path(checkpoint).is_file() or _digest(checkpoint) != manifest.get("checkpoint")):
        return None
    return folder


def export_openvino(model: SamLikeAdapter, checkpoint: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """The cache folder holding ``model``'s export (see :func:`write_export`), exporting it if not cached."""
    folder = export_folder(model.name, checkpoint, cache_dir)
    if not is_exported(folder, len(model.stage_bf16)):
        write_export(model, folder)
    return folder


def write_export(model: SamLikeAdapter, folder: Path, compress_to_fp16: bool = True) -> None:
    """Export the PyTorch ``model`` into ``folder`` (built beside it, then renamed into place; a folder there
    already is kept if whole): ``encoder0.xml``, ``encoder1.xml``, … (the encoder's stages, see
    :meth:`~.models.base.SamLikeAdapter.encoder_stages`), the decoder's graphs (``DECODER_GRAPHS``), ``NO_MASK``
    and ``MANIFEST``; weights stored in fp16 (``compress_to_fp16``, computed in f32 or bf16) or f32."""
    import onnx
    import torch

    ov = openvino()

    from .models.factored_decoder import DecoderPart, FactoredMaskDecoder, image_tokens

    stages = model.encoder_stages()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
    try:
        size = model.input_size
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(model.device)
        boxes = np.array([[0.2, 0.2, 0.6, 0.6], [0.1, 0.1, 0.7, 0.7]]) * size
        coords, labels = (torch.from_numpy(a).to(model.device) for a in labelled_points(None, None, boxes))
        parts = [f"encoder{i}" for i in range(len(stages))]
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), torch.no_grad():
            warnings.simplefilter("ignore")
            features = image
            for part, stage in zip(parts, stages, strict=True):
                _export(stage, (features,), work / f"{part}.onnx", ["input"], ["output"], {})
                features = stage(features)  # the last stage's output is the embedding
            tokens, dense = image_tokens(features).contiguous(), model.no_mask_embedding()
            np.save(work / NO_MASK, dense.cpu().numpy())
            prepared_names = ["keys", "first_keys", "first_values", "first_queries"]
            batch = {name: {0: "bd"} for name in prepared_names}
            for masks in ("single", "multi"):
                decoder = FactoredMaskDecoder(model.prompt_encoder, model.mask_decoder, masks).eval()
                prepared = decoder.prepare(tokens, dense)
                if masks == "single":
                    _export(DecoderPart(decoder, "prepare"), (tokens, dense), work / "prepare.onnx",
                            ["tokens", "dense"], prepared_names, {"dense": {0: "bd", 2: "hd", 3: "wd"}, **batch})
                    hyper, _, keys = decoder.attend_points(*prepared, coords, labels)
                    _export(DecoderPart(decoder, "upscale"), (keys, hyper), work / "upscale.onnx",
                            ["keys", "hyper"], ["logits"], {"keys": {0: "b"}, "hyper": {0: "b", 2: "m"},
                                                            "logits": {0: "b", 1: "m"}})
                    mask = torch.zeros(2, 1, *model.prompt_encoder.mask_input_size, device=model.device)
                    _export(DecoderPart(decoder, "embed_mask"), (mask,), work / "mask.onnx", ["mask_logits"],
                            ["dense"], {"mask_logits": {0: "b"}, "dense": {0: "b"}})
                _export(DecoderPart(decoder, "attend_points"), (*prepared, coords, labels),
                        work / f"attend-{masks}.onnx", [*prepared_names, "coords", "labels"],
                        ["hyper", "scores", "image"],
                        {"coords": {0: "b", 1: "n"}, "labels": {0: "b", 1: "n"}, "hyper": {0: "b"},
                         "scores": {0: "b"}, "image": {0: "b"}, **batch})
        for part in (*parts, *DECODER_GRAPHS):
            ov.save_model(ov.convert_model(work / f"{part}.onnx"), work / f"{part}.xml", compress_to_fp16)
            (work / f"{part}.onnx").unlink()
        manifest = {"format": EXPORT_FORMAT, "model": model.name, "checkpoint": _digest(model.checkpoint),
                    "weights": "f16" if compress_to_fp16 else "f32",
                    "made_with": {"torch": torch.__version__, "onnx": onnx.__version__, "openvino": ov.__version__}}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        try:
            work.rename(folder)
        except OSError:  # another process exported it meanwhile
            if not is_exported(folder, len(stages)):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export(module, inputs: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict) -> None:
    import torch

    torch.onnx.export(module, inputs, path, input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes or None, dynamo=False, opset_version=17)


def _tokens(embedding: np.ndarray) -> np.ndarray:
    """An embedding (B, C, h, w) as row-major tokens (B, h·w, C), as SAM's transformer reads it."""
    return np.ascontiguousarray(embedding.reshape(*embedding.shape[:2], -1).transpose(0, 2, 1))


def _cache_compiled_graphs(core, precision: str) -> None:
    """Let OpenVINO keep each compiled graph in the user's engine cache (``compiled/<precision>``, owner-only),
    keyed by the graph, its options, the CPU and the runtime's version: a model loads in a third of the time from
    the second time on (docs/measurements.md). Without a writable cache it compiles every time, as before. One
    folder per precision: a graph's compiled form also depends on what the process compiled before it, which
    OpenVINO's key leaves out, and on a CPU with AMX (OpenVINO 2026.4) the bf16 encoder stage compiled by a mixed
    model crashed every later ``openvino-bf16`` load (a segmentation fault) that read it."""
    try:
        folder = private_folder(private_folder(engine_cache_dir() / "compiled") / precision)
        core.set_property({"CACHE_DIR": str(folder)})
    except OSError as error:
        print(f"segmentwithsam: no OpenVINO compile cache ({error}); models compile at each load.", file=sys.stderr)


class OpenVINOModel(SamLikeAdapter):
    """A model exported into ``folder`` (:func:`write_export`), run by OpenVINO on the CPU in NumPy, with no
    PyTorch: its encoder in stages, and SAM's decoder, re-associated (:mod:`.models.factored_decoder`), for every
    prompt type. ``architecture`` is the adapter class it was exported from (its stages' bf16 flags and low-res
    size), ``name`` and ``checkpoint`` (None for the shipped export of a checkpoint not installed) its own;
    ``precision``: "mixed" (see the module docstring), "f32" or "bf16" for every stage. Embeddings are NumPy
    arrays (B, C, h, w) float32."""

    engine = "openvino"
    device = CPU

    def __init__(self, folder: Path, architecture: type[SamLikeAdapter], name: str,
                 checkpoint: str | os.PathLike | None = None, precision: str = "mixed") -> None:
        ov = openvino()
        if precision not in ("mixed", "f32", "bf16"):
            raise ValueError(f"precision must be mixed, f32 or bf16, not {precision!r}")
        self.folder, self.name, self.checkpoint = folder, name, None if checkpoint is None else str(checkpoint)
        self.low_res_size, self.stage_bf16 = architecture.low_res_size, architecture.stage_bf16
        self.encoder_runs = self.decoder_runs = 0
        core = ov.Core()
        _cache_compiled_graphs(core, precision)
        native_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.stage_precisions = [precision if precision != "mixed" else "bf16" if faithful and native_bf16 else "f32"
                                 for faithful in self.stage_bf16]
        self._encoder = [core.compile_model(core.read_model(folder / f"encoder{i}.xml"), "CPU",
                                            {"INFERENCE_PRECISION_HINT": stage_precision})
                         for i, stage_precision in enumerate(self.stage_precisions)]
        self.input_size = int(self._encoder[0].inputs[0].shape[-1])
        self.engine = "openvino" if precision == "mixed" else f"openvino-{precision}"
        # The decoder's transformer stays f32 under every engine: in bf16 its masks move by whole structures
        # (measured); its upscaling is faithful in bf16 (measured), so it runs like the faithful encoder stages.
        self._decoder_precisions = {part: "f32" for part in DECODER_GRAPHS}
        self._decoder_precisions["upscale"] = self.stage_precisions[-1]
        self._core = core
        self._decoders = {}
        for part in ("prepare", "attend-single", "upscale"):  # the others, rarely asked for, on first use
            self._decoder(part)
        self._last_prepared = None
        self._no_mask = np.ascontiguousarray(np.load(folder / NO_MASK))

    def encode(self, images01: np.ndarray) -> np.ndarray:
        """Images (B, 3, S, S) float32 in [0, 1] → embeddings (B, C, h, w) float32."""
        images = np.ascontiguousarray(images01, dtype=np.float32)
        embeddings = []
        for i in range(len(images)):  # exported for one image
            features = images[i: i + 1]
            for stage in self._encoder:
                features = stage(features)[0]
            embeddings.append(np.array(features))
        self.encoder_runs += len(images)
        return np.concatenate(embeddings)

    def _decoder(self, part: str):
        """The compiled decoder graph ``part`` (one of ``DECODER_GRAPHS``), compiled on first use."""
        if part not in self._decoders:
            model = self._core.read_model(self.folder / f"{part}.xml")
            options = {"INFERENCE_PRECISION_HINT": self._decoder_precisions[part]}
            try:  # the decoder's small attention products run faster as plain matrix products (measured)
                compiled = self._core.compile_model(model, "CPU", {**options, "SNIPPETS_MODE": "DISABLE"})
            except RuntimeError as error:  # a runtime without the (unlisted) option
                if "SNIPPETS_MODE" not in str(error):
                    raise
                compiled = self._core.compile_model(model, "CPU", options)
            self._decoders[part] = compiled
        return self._decoders[part]

    def _prepared(self, embedding: np.ndarray, dense: np.ndarray) -> list[np.ndarray]:
        """The decoder's prompt-free part for the embedding (1, C, h, w) and the dense prompt embedding (1 or B,
        C, h or 1, w or 1). Without a mask prompt (``dense`` is then the no-mask vector) it is computed once per
        embedding: clicks on a slice reuse the last one."""
        reusable = dense.shape[-2:] == (1, 1)
        if reusable and self._last_prepared is not None and self._last_prepared[0] is embedding:
            return self._last_prepared[1]
        prepared = list(self._decoder("prepare")([_tokens(embedding), dense]).values())
        if reusable:
            self._last_prepared = embedding, prepared
        return prepared

    def decode(self, embedding: np.ndarray, points=None, labels=None, boxes=None, mask_logits=None,
               multimask: bool = False) -> Decoded:
        """As :meth:`SamLikeAdapter.decode`, in OpenVINO's graphs only (a mask alone: no sparse prompts)."""
        if boxes is not None or (points is not None and np.size(points)):
            coords, point_labels = labelled_points(points, labels, boxes)
        elif mask_logits is not None:
            coords, point_labels = np.zeros((len(mask_logits), 0, 2), np.float32), np.zeros((len(mask_logits), 0), int)
        else:
            raise ValueError("A decoder prompt needs points, a box or a mask.")
        dense = self._no_mask
        if mask_logits is not None:
            dense = self._decoder("mask")([np.ascontiguousarray(mask_logits, dtype=np.float32)])[0]
        attend = self._decoder("attend-multi" if multimask else "attend-single")
        # the image tokens go from one graph to the next without a copy
        hyper, scores, keys = attend([*self._prepared(embedding, dense), coords, point_labels],
                                     share_outputs=True).values()
        logits = self._decoder("upscale")([keys, hyper])[0]
        self.decoder_runs += len(coords)
        return Decoded(logits, np.array(scores))


def accelerate(model: SamLikeAdapter, engine: str, fallback: bool = False) -> SamLikeAdapter:
    """``model`` on ``engine`` (as :func:`resolve_engine` returned it). With ``fallback`` (the engine was
    chosen automatically), a failed export or compile leaves the PyTorch model, with a one-line notice."""
    if engine == "torch":
        return model
    if not model.runs_in_openvino:
        if not fallback:
            raise ModelError(f"The {engine} engine does not run {model.name} (SAM 2 models); use --engine torch.")
        return model
    try:
        folder = export_openvino(model, model.checkpoint)
        return OpenVINOModel(folder, type(model), model.name, model.checkpoint, engine.partition("-")[2] or "mixed")
    except Exception as error:  # export and compile raise many types; the reference path always works
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if not fallback:
            raise ModelError(f"The {engine} engine could not be prepared ({reason}); use --engine torch.") from None
        print(f"segmentwithsam: the {engine} engine could not be prepared ({reason}); using PyTorch.",
              file=sys.stderr)
        return model

"""Execution engines for a SAM-like model: eager PyTorch (the reference, and the one for CUDA/MPS) and
OpenVINO (the fast CPU path).

Measured on a 2-core AMD EPYC with AVX-512 BF16 (``benchmarks/speed.py``, README): OpenVINO f32 runs
LiteMedSAM's encoder about 3× faster than eager PyTorch fp32 with masks faithful to it (mean Dice ≥ 0.99,
checked in the tests). bf16 throughout is about 4–5× faster but moves mask edges (mean Dice 0.84–0.93 against
the PyTorch masks, a few slices far off), so it is offered, never chosen. The encoder is exported in stages
(:meth:`~.models.base.SamLikeAdapter.encoder_stages`), each compiled at its own precision: bf16 is faithful
for TinyViT's last stage and neck only, so the automatic engine (``openvino``) runs those in bf16 where the CPU
has it natively (about 15 % less encoder time, mean Dice 0.995) and the rest in f32; ``openvino-f32`` runs
all of it in f32. Also tried and left out: ONNX Runtime (1.7× in fp32; its dynamic int8 was slower and
unfaithful), NNCF int8 post-training quantisation of the encoder calibrated on Colin27 slices (4.6×, mean
Dice 0.88), and marking nodes to keep in f32 under bf16 (the CPU plugin ignores the marks set from Python).

The decoder is exported in the re-associated form of :mod:`.models.factored_decoder` (the same function with
a fraction of the products) and runs every prompt type (boxes, points, mask, multimask), in parts: the
prompt-free projections once per slice, then per click only what the prompts change, for the wanted masks only
(single or multimask), then the upscaling. Its transformer stays f32: in bf16 its masks lost whole structures on
some slices (measured: mean Dice 0.97, minimum 0.0); its upscaling, faithful in bf16 (mean Dice 0.999 on 36
Colin27 boxes, minimum 0.987), runs in bf16 where the encoder's last stage does. OpenVINO's fused attention
kernels ("snippets") are turned off for the decoder: its small products run faster as plain matrix products.

The OpenVINO model is exported once from the real checkpoint (through ONNX) and kept in a per-user cache,
keyed by the checkpoint's SHA-256 and the runtime version, so a changed checkpoint is exported again. A start
from a cached export builds no PyTorch network (:class:`DeferredModel`): the command line's start went from
9.1 to 4.7 s here, most of it timm's and torchvision's imports.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .checkpoints import sha256_of
from .errors import ModelError
from .models.base import Decoded, SamLikeAdapter

# openvino: faithful (mean Dice vs PyTorch ≥ 0.99): f32, with the encoder stages measured faithful in bf16 in
# bf16 where the CPU has it natively; openvino-f32: all f32; openvino-bf16: faster where the CPU has bf16, but
# not faithful (see above), so never chosen automatically.
ENGINES = ("torch", "openvino", "openvino-f32", "openvino-bf16")
ENGINE_CACHE_ENV = "SEGMENTWITHSAM_ENGINE_CACHE"
EXPORT_FORMAT = 7  # bumped when the exported graphs change, so that cached exports are redone
NO_MASK = "no_mask.npy"  # the prompt encoder's dense embedding without a mask (1, C, 1, 1), saved with the export


def has_openvino() -> bool:
    return importlib.util.find_spec("openvino") is not None


def available_engines() -> list[str]:
    """The engines that can run here, fastest first."""
    return (["openvino", "openvino-f32", "openvino-bf16"] if has_openvino() else []) + ["torch"]


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
    if key == "auto" and device.type == "cpu":
        if has_openvino():
            return "openvino"
        print("segmentwithsam: OpenVINO is not installed; using PyTorch (slower on CPU).", file=sys.stderr)
    return "torch"


def engine_cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segmentwithsam" / "engines"
    return Path(os.environ.get(ENGINE_CACHE_ENV) or default)


# the decoder's exported graphs (see models.factored_decoder): per image; per click, for one mask or for the
# multimask outputs; the upscaling of either
DECODER_GRAPHS = ("prepare", "attend-single", "attend-multi", "upscale")


def export_folder(name: str, checkpoint: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """Where the model ``name`` exported from ``checkpoint`` is cached: keyed by the checkpoint's SHA-256, the
    runtime's version and ``EXPORT_FORMAT``."""
    import openvino as ov

    version = re.sub(r"[^\w.]+", "_", ov.__version__)
    return (cache_dir or engine_cache_dir()) / f"{name}-{_digest(checkpoint)[:16]}-ov{version}-x{EXPORT_FORMAT}"


def _digest(checkpoint: str | os.PathLike) -> str:
    """The checkpoint's SHA-256, read once per version of the file in this process: a start looks for a cached
    export before it exports (seconds for SAM ViT-H's 2.5 GB)."""
    stat = os.stat(checkpoint)
    return _file_digest(str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, modified_ns: int) -> str:
    return sha256_of(path)


def is_exported(folder: Path, stages: int) -> bool:
    """Whether ``folder`` holds a whole export of a model whose encoder has ``stages`` stages."""
    parts = [*DECODER_GRAPHS, *(f"encoder{i}" for i in range(stages))]
    return all((folder / f"{part}.xml").is_file() for part in parts) and (folder / NO_MASK).is_file()


def export_openvino(model: SamLikeAdapter, checkpoint: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """The folder holding ``encoder0.xml``, ``encoder1.xml``, … (the encoder's stages, see
    :meth:`~.models.base.SamLikeAdapter.encoder_stages`) and the decoder's graphs (``DECODER_GRAPHS``:
    ``prepare.xml``, ``attend-single.xml``, …) for ``model``, exporting them if not cached."""
    import openvino as ov
    import torch

    from .models.factored_decoder import DecoderPart, FactoredMaskDecoder, image_tokens, labelled_points

    folder = export_folder(model.name, checkpoint, cache_dir)
    if is_exported(folder, len(model.stage_bf16)):
        return folder
    stages = model.encoder_stages()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
    try:
        size = model.input_size
        image = torch.rand(1, 3, size, size, device=model.device)
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
                _export(DecoderPart(decoder, "attend_points"), (*prepared, coords, labels),
                        work / f"attend-{masks}.onnx", [*prepared_names, "coords", "labels"],
                        ["hyper", "scores", "image"],
                        {"coords": {0: "b", 1: "n"}, "labels": {0: "b", 1: "n"}, "hyper": {0: "b"},
                         "scores": {0: "b"}, "image": {0: "b"}, **batch})
        for part in (*parts, *DECODER_GRAPHS):
            ov.save_model(ov.convert_model(work / f"{part}.onnx"), work / f"{part}.xml")
            (work / f"{part}.onnx").unlink()
        try:
            work.rename(folder)
        except OSError:  # another process exported it meanwhile
            if not is_exported(folder, len(stages)):
                raise
        return folder
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export(module, inputs: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict) -> None:
    import torch

    torch.onnx.export(module, inputs, path, input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes or None, dynamo=False, opset_version=17)


class DeferredModel(NamedTuple):
    """A PyTorch model not built yet: its class, name, checkpoint, device and input size, and how to build it."""

    architecture: type[SamLikeAdapter]
    name: str
    checkpoint: str
    device: object
    input_size: int
    load: Callable[[], SamLikeAdapter]


class OpenVINOModel(SamLikeAdapter):
    """A model whose encoder and mask decoder run in OpenVINO on the CPU. The decoder is SAM's, re-associated
    (:mod:`.models.factored_decoder`), and takes every prompt type, points and boxes embedded in its graphs.

    ``reference`` is the PyTorch model exported into ``folder``, or a :class:`DeferredModel` of it: then it is
    built on first need (a mask prompt goes through its prompt encoder, a mask prompt alone through its
    decoder), so that a start from a cached export builds no network and imports no timm or torchvision.
    """

    engine = "openvino"

    def __init__(self, reference: SamLikeAdapter | DeferredModel, folder: Path, precision: str = "mixed") -> None:
        import openvino as ov

        deferred = isinstance(reference, DeferredModel)
        self._reference, self._load_reference = (None, reference.load) if deferred else (reference, None)
        self.name, self.checkpoint, self.device = reference.name, reference.checkpoint, reference.device
        traits = reference.architecture if deferred else reference  # stages: the class's or the model's
        self.input_size, self.low_res_size = reference.input_size, traits.low_res_size
        self.encoder_runs = self.decoder_runs = 0
        core = ov.Core()
        # "mixed" (the faithful default) runs in bf16 the encoder stages measured faithful in it, where the CPU
        # computes bf16 natively, the others in f32; "f32" and "bf16" run every stage so.
        if precision not in ("mixed", "f32", "bf16"):
            raise ValueError(f"precision must be mixed, f32 or bf16, not {precision!r}")
        native_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.stage_precisions = [precision if precision != "mixed" else "bf16" if faithful and native_bf16 else "f32"
                                 for faithful in traits.stage_bf16]
        self._encoder = [core.compile_model(core.read_model(folder / f"encoder{i}.xml"), "CPU",
                                            {"INFERENCE_PRECISION_HINT": stage_precision})
                         for i, stage_precision in enumerate(self.stage_precisions)]
        self.engine = "openvino" if precision == "mixed" else f"openvino-{precision}"
        # The decoder's transformer stays f32 under every engine: in bf16 its masks move by whole structures
        # (measured); its upscaling is faithful in bf16 (measured), so it runs like the faithful encoder stages.
        self._decoder_precisions = {part: "f32" for part in DECODER_GRAPHS}
        self._decoder_precisions["upscale"] = self.stage_precisions[-1]
        self._core, self.folder = core, folder
        self._decoders = {}
        for part in ("prepare", "attend-single", "upscale"):  # attend-multi, rarely asked for, on first use
            self._decoder(part)
        self._last_prepared = None
        self._no_mask = np.ascontiguousarray(np.load(folder / NO_MASK))

    @property
    def reference(self) -> SamLikeAdapter:
        """The PyTorch model, built on first use when deferred."""
        if self._reference is None:
            self._reference = self._load_reference()
        return self._reference

    image_encoder = property(lambda self: self.reference.image_encoder)
    prompt_encoder = property(lambda self: self.reference.prompt_encoder)
    mask_decoder = property(lambda self: self.reference.mask_decoder)

    def encode(self, images01):
        import torch

        images = np.ascontiguousarray(images01.cpu().numpy(), dtype=np.float32)
        embeddings = []
        for i in range(len(images)):  # exported for one image
            features = images[i: i + 1]
            for stage in self._encoder:
                features = stage(features)[0]
            embeddings.append(np.array(features))
        self.encoder_runs += len(images)
        return torch.from_numpy(np.concatenate(embeddings))

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

    def _prepared(self, embedding, dense: np.ndarray) -> list[np.ndarray]:
        """The decoder's prompt-free part for the embedding (1, C, h, w) and the dense prompt embedding (1 or B,
        C, h or 1, w or 1). Without a mask prompt (``dense`` is then the no-mask vector) it is computed once per
        embedding: clicks on a slice reuse the last one."""
        from .models.factored_decoder import image_tokens

        reusable = dense.shape[-2:] == (1, 1)
        if reusable and self._last_prepared is not None and self._last_prepared[0] is embedding:
            return self._last_prepared[1]
        tokens = np.ascontiguousarray(image_tokens(embedding).cpu().numpy())
        prepared = list(self._decoder("prepare")([tokens, dense]).values())
        if reusable:
            self._last_prepared = embedding, prepared
        return prepared

    def decode(self, embedding, points=None, labels=None, boxes=None, mask_logits=None,
               multimask: bool = False) -> Decoded:
        """As :meth:`SamLikeAdapter.decode`, with no PyTorch work per click unless a mask prompt is given (its
        threads would compete with OpenVINO's)."""
        import torch

        from .models.factored_decoder import labelled_points

        if boxes is None and (points is None or not np.size(points)):  # a mask alone: rare, and no tokens to export
            return super().decode(embedding, points, labels, boxes, mask_logits, multimask)
        coords, point_labels = labelled_points(points, labels, boxes)
        if mask_logits is None:
            dense = self._no_mask
        else:
            dense = np.ascontiguousarray(self.prompt_embeddings(mask_logits=mask_logits)[1].cpu().numpy())
        attend = self._decoder("attend-multi" if multimask else "attend-single")
        # the image tokens go from one graph to the next without a copy
        hyper, scores, keys = attend([*self._prepared(embedding, dense), coords, point_labels],
                                     share_outputs=True).values()
        logits = self._decoder("upscale")([keys, hyper])[0]
        self.decoder_runs += len(coords)
        return Decoded(torch.from_numpy(logits), torch.from_numpy(np.array(scores)))


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
        return OpenVINOModel(model, folder, engine.partition("-")[2] or "mixed")
    except Exception as error:  # export and compile raise many types; the reference path always works
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if not fallback:
            raise ModelError(f"The {engine} engine could not be prepared ({reason}); use --engine torch.") from None
        print(f"segmentwithsam: the {engine} engine could not be prepared ({reason}); using PyTorch.",
              file=sys.stderr)
        return model

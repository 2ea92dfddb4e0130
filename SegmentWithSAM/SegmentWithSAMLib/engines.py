"""Execution engines for a SAM-like model: eager PyTorch (the reference, and the one for CUDA/MPS) and
OpenVINO (the fast CPU path).

Measured on a 2-core AMD EPYC with AVX-512 BF16 (``benchmarks/speed.py``, README): OpenVINO f32 runs
LiteMedSAM's encoder about 3× faster than eager PyTorch fp32 with masks faithful to it (mean Dice ≥ 0.99,
checked in the tests), so it is the automatic choice on a CPU. bf16 is about 5× faster but moves mask edges
(mean Dice 0.84–0.93 against the PyTorch masks, a few slices far off), so it is offered, never chosen. Also
tried and left out: ONNX Runtime (1.7× in fp32; its dynamic int8 was slower and unfaithful), NNCF int8
post-training quantisation of the encoder calibrated on Colin27 slices (4.6×, mean Dice 0.88), and keeping
parts of the encoder in f32 under bf16 (the CPU plugin ignores the marks set from Python).

The OpenVINO model is exported once from the real checkpoint (through ONNX) and kept in a per-user cache,
keyed by the checkpoint's SHA-256 and the runtime version, so a changed checkpoint is exported again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .checkpoints import sha256_of
from .errors import ModelError
from .models.base import Decoded, SamLikeAdapter

# openvino: f32, faithful (mean Dice vs PyTorch ≥ 0.99); openvino-bf16: faster where the CPU has bf16, but
# not faithful (see above), so never chosen automatically.
ENGINES = ("torch", "openvino", "openvino-bf16")
ENGINE_CACHE_ENV = "SEGMENTWITHSAM_ENGINE_CACHE"


def has_openvino() -> bool:
    return importlib.util.find_spec("openvino") is not None


def available_engines() -> list[str]:
    """The engines that can run here, fastest first."""
    return (["openvino", "openvino-bf16"] if has_openvino() else []) + ["torch"]


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


def _exportable(model: SamLikeAdapter):
    """The encoder (normalisation included) and the box-only prompt encoder + mask decoder as modules."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = model.image_encoder

        def forward(self, images01):
            return self.encoder(model.normalize(images01))

    class BoxDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.prompt_encoder, self.mask_decoder = model.prompt_encoder, model.mask_decoder

        def forward(self, embedding, boxes):
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
            return self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=False)

    return Encoder().eval(), BoxDecoder().eval()


def export_openvino(model: SamLikeAdapter, checkpoint: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """The folder holding ``encoder.xml`` and ``decoder.xml`` for ``model``, exporting them if not cached."""
    import openvino as ov
    import torch

    version = re.sub(r"[^\w.]+", "_", ov.__version__)
    folder = (cache_dir or engine_cache_dir()) / f"{model.name}-{sha256_of(checkpoint)[:16]}-ov{version}"
    if (folder / "decoder.xml").is_file() and (folder / "encoder.xml").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
    try:
        size = model.input_size
        image = torch.rand(1, 3, size, size, device=model.device)
        with torch.inference_mode():
            embedding = model.image_encoder(model.normalize(image))
        boxes = torch.tensor([[0.2, 0.2, 0.6, 0.6], [0.1, 0.1, 0.7, 0.7]], device=model.device) * size
        encoder, decoder = _exportable(model)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder, (image,), work / "encoder.onnx", input_names=["image"],
                              output_names=["embedding"], dynamo=False, opset_version=17)
            torch.onnx.export(decoder, (embedding, boxes), work / "decoder.onnx",
                              input_names=["embedding", "boxes"], output_names=["logits", "scores"],
                              dynamic_axes={"boxes": {0: "b"}, "logits": {0: "b"}, "scores": {0: "b"}},
                              dynamo=False, opset_version=17)
        for part in ("encoder", "decoder"):
            ov.save_model(ov.convert_model(work / f"{part}.onnx"), work / f"{part}.xml")
            (work / f"{part}.onnx").unlink()
        try:
            work.rename(folder)
        except OSError:  # another process exported it meanwhile
            if not (folder / "decoder.xml").is_file():
                raise
        return folder
    finally:
        shutil.rmtree(work, ignore_errors=True)


class OpenVINOModel(SamLikeAdapter):
    """A model whose encoder and box decoder run in OpenVINO on the CPU; point and mask prompts, which the
    export does not cover, fall back to the PyTorch modules it shares with the reference."""

    engine = "openvino"

    def __init__(self, reference: SamLikeAdapter, folder: Path, precision: str = "f32") -> None:
        import openvino as ov

        super().__init__(reference.image_encoder, reference.prompt_encoder, reference.mask_decoder, reference.device)
        self.name, self.input_size, self.low_res_size = reference.name, reference.input_size, reference.low_res_size
        self.checkpoint = reference.checkpoint
        core = ov.Core()
        self._encoder = core.compile_model(core.read_model(folder / "encoder.xml"), "CPU",
                                           {"INFERENCE_PRECISION_HINT": precision})
        self.engine = "openvino" if precision == "f32" else f"openvino-{precision}"
        self._decoder = core.compile_model(core.read_model(folder / "decoder.xml"), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "f32"})
        self.folder = folder

    def encode(self, images01):
        import torch

        images = np.ascontiguousarray(images01.cpu().numpy(), dtype=np.float32)
        embeddings = [np.array(self._encoder(images[i: i + 1])[0]) for i in range(len(images))]  # exported for 1
        self.encoder_runs += len(images)
        return torch.from_numpy(np.concatenate(embeddings))

    def decode(self, embedding, points=None, labels=None, boxes=None, mask_logits=None,
               multimask: bool = False) -> Decoded:
        has_points = points is not None and len(points) and np.asarray(points).shape[1]
        if has_points or boxes is None or mask_logits is not None or multimask:
            return super().decode(embedding, points, labels, boxes, mask_logits, multimask)
        import torch

        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        logits, scores = self._decoder([embedding.cpu().numpy(), boxes]).values()
        self.decoder_runs += len(boxes)
        return Decoded(torch.from_numpy(np.array(logits)), torch.from_numpy(np.array(scores)))


def accelerate(model: SamLikeAdapter, engine: str, fallback: bool = False) -> SamLikeAdapter:
    """``model`` on ``engine`` (as :func:`resolve_engine` returned it). With ``fallback`` (the engine was
    chosen automatically), a failed export or compile leaves the PyTorch model, with a one-line notice."""
    if engine == "torch":
        return model
    try:
        folder = export_openvino(model, model.checkpoint)
        return OpenVINOModel(model, folder, "bf16" if engine.endswith("bf16") else "f32")
    except Exception as error:  # export and compile raise many types; the reference path always works
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if not fallback:
            raise ModelError(f"The {engine} engine could not be prepared ({reason}); use --engine torch.") from None
        print(f"segmentwithsam: the {engine} engine could not be prepared ({reason}); using PyTorch.",
              file=sys.stderr)
        return model

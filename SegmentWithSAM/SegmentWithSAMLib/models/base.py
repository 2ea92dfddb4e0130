"""The model adapter interface: encode a prepared slice, decode prompts against its embedding.

Adapters see only the model's frame: images (B, 3, S, S) float32 NumPy in [0, 1] (content top-left, zero
padded) and prompts in model-input pixels, XY order; they return NumPy masks and scores. An embedding is the
adapter's own (a tensor on the model's device for PyTorch, a NumPy array for OpenVINO), passed back as it came.
They never see IJK, RAS or slice geometry.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..device import encoder_dtype


@dataclass
class Decoded:
    """Decoder output for B prompt sets: ``logits`` (B, M, h, w) low-res mask logits and ``scores`` (B, M)
    predicted mask quality (IoU), float32."""

    logits: np.ndarray
    scores: np.ndarray


def labelled_points(points: np.ndarray | None, labels: np.ndarray | None,
                    boxes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """SAM's sparse prompts as one set of labelled points, in its prompt encoder's order: the points (B, N, 2)
    with their labels (B, N) (1 positive, 0 negative, -1 padding), a padding point when there is no box, then
    the corners of each box (B, 4), labelled 2 (x0, y0) and 3 (x1, y1); model-input pixels, XY. Returns
    coordinates (B, N', 2) float32 and labels (B, N') int64 (see :func:`.factored_decoder.embed_labelled_points`)."""
    coords, kinds = [], []
    if points is not None and len(points) and np.shape(points)[1]:
        coords.append(np.asarray(points, dtype=np.float32))
        kinds.append(np.asarray(labels, dtype=np.int64))
        if boxes is None:
            coords.append(np.zeros((len(coords[0]), 1, 2), np.float32))
            kinds.append(np.full((len(coords[0]), 1), -1, np.int64))
    if boxes is not None:
        corners = np.asarray(boxes, dtype=np.float32).reshape(-1, 2, 2)
        coords.append(corners)
        kinds.append(np.broadcast_to(np.array([2, 3], np.int64), corners.shape[:2]))
    if not coords:
        raise ValueError("A decoder prompt needs points or a box.")
    return np.concatenate(coords, axis=1), np.concatenate(kinds, axis=1)


class SamLikeAdapter:
    """A SAM-architecture model (image encoder, prompt encoder, mask decoder) behind NumPy-friendly calls.

    Subclasses implement :meth:`load` and may override :meth:`normalize`. ``input_size`` (S) is what the prompt
    encoder was built for; ``name`` is set by :meth:`load` (see :func:`..loading.model_name`).
    """

    name = "sam-like"
    engine = "torch"  # what runs it (see ..engines)
    input_size: int
    low_res_size = 256
    checkpoint: str | None = None  # the weights file it was loaded from
    runs_in_openvino = True  # SAM's mask decoder and a plain image encoder: ..engines can export it
    # propagation tracks objects with the model's memory of earlier slices (..video_propagation): every slice, in
    # order, so nothing is skipped (..propagation's skip, ..cvpr25's budget)
    tracks_video = False
    # per stage of encoder_stages(): whether its output stays faithful in bf16 (measured; unmeasured: False)
    stage_bf16: tuple[bool, ...] = (False,)
    shipped_export: Path | None = None  # an OpenVINO export shipped with the package (see ..engines.shipped_export)

    def __init__(self, image_encoder, prompt_encoder, mask_decoder, device) -> None:
        import torch

        device = torch.device(device)  # also a device named without torch (..device.DeviceName)
        self.image_encoder = image_encoder.to(device).eval()
        self.prompt_encoder = prompt_encoder.to(device).eval()
        self.mask_decoder = mask_decoder.to(device).eval()
        self.device = device
        self.input_size = int(self.prompt_encoder.input_image_size[0])
        self.encoder_runs = 0  # images encoded so far (the expensive step; caches are judged by it)
        self.decoder_runs = 0  # prompt sets decoded so far

    @classmethod
    def load(cls, device, checkpoint: str | os.PathLike, variant: str | None, name: str,
             state: dict | None = None) -> SamLikeAdapter:
        """Build the architecture ``variant`` (None for an adapter with one architecture), load the weights of
        ``checkpoint`` (``state``: those weights, if already read) onto ``device``, and call the model ``name``.
        Raises :class:`~..errors.CheckpointError` when the weights are not for that architecture."""
        raise NotImplementedError

    def normalize(self, images01):
        """Model-specific normalisation of images (B, 3, S, S) in [0, 1] (a tensor)."""
        return images01

    def encoder_stages(self) -> list:
        """The image encoder, normalisation included, as consecutive modules for export (..engines), one per
        flag of ``stage_bf16``. Default: one stage."""
        import torch

        adapter = self

        class Encoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = adapter.image_encoder

            def forward(self, images01):
                return self.encoder(adapter.normalize(images01))

        return [Encoder().eval()]

    def encoder_precision(self):
        """The autocast context for the encoder (and SAM 2's tracking): bf16/fp16 on CUDA, fp32 elsewhere."""
        import torch

        dtype = encoder_dtype(self.device)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def encode(self, images01):
        """Images (B, 3, S, S) float32 in [0, 1] → embeddings (B, C, h, w), a float32 tensor on the model's device."""
        import torch

        with torch.inference_mode(), self.encoder_precision():
            embeddings = self.image_encoder(self.normalize(torch.from_numpy(images01).to(self.device)))
        self.encoder_runs += int(images01.shape[0])
        return embeddings.float()

    def decode(self, embedding, points: np.ndarray | None = None, labels: np.ndarray | None = None,
               boxes: np.ndarray | None = None, mask_logits=None, multimask: bool = False) -> Decoded:
        """Decode B prompt sets against one embedding (1, C, h, w).

        ``points`` (B, N, 2) XY and ``labels`` (B, N) (1 positive, 0 negative, -1 padding), ``boxes`` (B, 4)
        as x0, y0, x1, y1 — all in model-input pixels; ``mask_logits`` (B, 1, h, w) float32 low-res logits of an
        earlier prediction. Returns :class:`Decoded` with M = 3 masks if ``multimask`` else 1.
        """
        import torch

        with torch.inference_mode():
            sparse, dense = self.prompt_embeddings(points, labels, boxes, mask_logits)
            logits, scores = self.mask_decoder(
                image_embeddings=embedding,
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        self.decoder_runs += int(logits.shape[0])
        return Decoded(logits.float().cpu().numpy(), scores.float().cpu().numpy())

    def no_mask_embedding(self):
        """The prompt encoder's dense embedding when no mask is given, one vector (1, C, 1, 1): the same at every
        position (:meth:`prompt_embeddings` gives it expanded)."""
        return self.prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1)

    def prompt_embeddings(self, points=None, labels=None, boxes=None, mask_logits=None):
        """The prompt encoder's sparse (B, N, C) and dense (B, C, h, w) embeddings of the prompts of
        :meth:`decode` (same arguments)."""
        import torch

        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=self.device)  # noqa: E731
        point_prompt = None
        if points is not None and len(points) and np.asarray(points).shape[1]:
            point_prompt = (as_tensor(points), torch.as_tensor(np.asarray(labels), dtype=torch.int, device=self.device))
        box_prompt = as_tensor(boxes).reshape(-1, 4) if boxes is not None else None
        masks = as_tensor(mask_logits) if mask_logits is not None else None
        with torch.inference_mode():
            sparse, dense = self.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=masks)
        return sparse.detach(), dense.detach()  # the no-mask embedding is a view of a parameter

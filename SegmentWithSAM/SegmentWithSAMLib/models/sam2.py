"""SAM 2.1 (Hiera image encoder, the ``sam2`` package) and MedSAM2 (SAM 2.1 Hiera-T fine-tuned on medical
images at 512²) behind the same adapter interface as SAM and LiteMedSAM, plus the network itself for
:mod:`..video_propagation` (SAM 2's memory-based tracking through a volume).

SAM 2's decoder also reads two high-resolution maps, so :meth:`SAM2.encode` packs the three into one
(B, 1024, g, g) tensor per slice (g = input size / 16, ``pixel_unshuffle``; channels 0–255 the image embedding
with the "no memory" embedding added, 256–511 the 2g² map, 512–1023 the 4g² map) for the embedding cache and
batching; :meth:`SAM2.decode` unpacks them exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..checkpoints import load_into, load_state_dict
from ..errors import CheckpointError, ModelError
from .base import Decoded
from .sam import SAM


@dataclass(frozen=True)
class Sam2Variant:
    """One SAM 2 architecture: its ``sam2`` config, Hiera width and depth (how checkpoints are recognised),
    and the input size (MedSAM2 runs Hiera-T at 512²)."""

    config: str
    width: int
    depth: int
    input_size: int = 1024


VARIANTS = {
    "sam2.1_hiera_t": Sam2Variant("configs/sam2.1/sam2.1_hiera_t.yaml", 96, 12),
    "sam2.1_hiera_s": Sam2Variant("configs/sam2.1/sam2.1_hiera_s.yaml", 96, 16),
    "sam2.1_hiera_b+": Sam2Variant("configs/sam2.1/sam2.1_hiera_b+.yaml", 112, 24),
    "sam2.1_hiera_l": Sam2Variant("configs/sam2.1/sam2.1_hiera_l.yaml", 144, 48),
    "medsam2": Sam2Variant("configs/sam2.1/sam2.1_hiera_t.yaml", 96, 12, 512),
}
_WIDTH_KEY = "image_encoder.trunk.patch_embed.proj.weight"
_BLOCKS = "image_encoder.trunk.blocks."
# SAM 2's own inference settings (as its builders' post-processing), without hole filling, which needs the
# optional CUDA extension that is not built.
_OVERRIDES = [
    "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=0",
]


def checkpoint_variant(state: dict) -> str | None:
    """The SAM 2.1 Hiera variant ("sam2.1_hiera_t", …) a state dict was made for, or None if it is not SAM 2.
    MedSAM2's weights have Hiera-T's shapes, so they are recognised as Hiera-T."""
    weight = state.get(_WIDTH_KEY)
    if weight is None:
        return None
    depth = len({k[len(_BLOCKS):].split(".")[0] for k in state if k.startswith(_BLOCKS)})
    return next((name for name, v in VARIANTS.items() if name != "medsam2"
                 and weight.shape[0] == v.width and depth == v.depth), None)


def build_network(variant: str):
    """The untrained SAM 2 video predictor network of ``variant`` (a key of :data:`VARIANTS`), on the CPU."""
    try:
        import sam2  # noqa: F401  (registers its config module with hydra)
        from hydra import compose
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
    except ImportError:
        raise ModelError("SAM 2 models need the sam2 package: SAM2_BUILD_CUDA=0 pip install --no-build-isolation "
                         "--no-deps sam2 hydra-core iopath (beside PyTorch), or run scripts/setup.sh --sam2.") from None
    spec = VARIANTS[variant]
    overrides = list(_OVERRIDES)
    if spec.input_size != 1024:
        size = spec.input_size // 16
        overrides += [f"++model.image_size={spec.input_size}",
                      f"++model.memory_attention.layer.self_attention.feat_sizes=[{size},{size}]",
                      f"++model.memory_attention.layer.cross_attention.feat_sizes=[{size},{size}]"]
    config = compose(config_name=spec.config, overrides=overrides)
    OmegaConf.resolve(config)
    return instantiate(config.model, _recursive_=True)


class SAM2(SAM):
    """SAM 2.1 on single slices (``encode``/``decode``) and, through ``net``, for video propagation."""

    normalization = "imagenet"
    tracks_video = True  # propagation uses SAM 2's memory (see ..video_propagation)
    runs_in_openvino = False  # its decoder also reads high-resolution features; not exported (yet)

    def __init__(self, net, device, variant: str) -> None:
        self.net = net.to(device).eval()
        super().__init__(net.image_encoder, net.sam_prompt_encoder, net.sam_mask_decoder, device)
        self.variant = variant
        self.low_res_size = self.input_size // 4

    @classmethod
    def load(cls, device, checkpoint: str | os.PathLike, variant: str | None, name: str,
             state: dict | None = None) -> SAM2:
        """See :meth:`SamLikeAdapter.load`; ``variant`` is a key of :data:`VARIANTS`."""
        if variant not in VARIANTS:
            raise ValueError(f"SAM 2 variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        state = state if state is not None else load_state_dict(checkpoint)
        found = checkpoint_variant(state)
        if found is None:
            raise CheckpointError(f"Checkpoint {checkpoint} is not a SAM 2 checkpoint (no Hiera image encoder in it).")
        expected = "sam2.1_hiera_t" if variant == "medsam2" else variant
        if found != expected:
            raise CheckpointError(f"Checkpoint {checkpoint} looks like a {found} checkpoint; you chose {variant}.")
        net = build_network(variant)
        load_into(net, state, checkpoint, f"SAM 2 {variant}")
        model = cls(net, device, variant)
        model.name, model.checkpoint = name, str(checkpoint)
        return model

    def encode(self, images01):
        """Images (B, 3, S, S) float32 in [0, 1] → packed features (B, 1024, g, g), a float32 tensor (see the
        module doc)."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self.encoder_precision():
            out = self.net.forward_image(self.normalize(torch.from_numpy(images01).to(self.device)))
        quarter, half, embed = (level.float() for level in out["backbone_fpn"])
        if self.net.directly_add_no_mem_embed:
            embed = embed + self.net.no_mem_embed.float().view(1, -1, 1, 1)
        packed = torch.cat([embed, F.pixel_unshuffle(half, 2), F.pixel_unshuffle(quarter, 4)], dim=1)
        self.encoder_runs += int(images01.shape[0])
        return packed

    def unpack(self, packed):
        """Packed features (1, 1024, g, g) → (image embedding (1, 256, g, g), [4g² map, 2g² map])."""
        import torch.nn.functional as F

        embed, half, quarter = packed[:, :256], packed[:, 256:512], packed[:, 512:]
        return embed, [F.pixel_shuffle(quarter, 4), F.pixel_shuffle(half, 2)]

    def decode(self, embedding, points: np.ndarray | None = None, labels: np.ndarray | None = None,
               boxes: np.ndarray | None = None, mask_logits=None, multimask: bool = False) -> Decoded:
        """As :meth:`SamLikeAdapter.decode`; a box goes in as SAM 2's two corner points (labels 2 and 3)."""
        import torch

        as_tensor = lambda a, t=torch.float32: torch.as_tensor(np.asarray(a), dtype=t, device=self.device)  # noqa: E731
        coords, codes = [], []
        if boxes is not None:
            corners = as_tensor(boxes).reshape(-1, 2, 2)
            coords.append(corners)
            codes.append(torch.tensor([[2, 3]], dtype=torch.int, device=self.device).expand(len(corners), 2))
        if points is not None and len(points) and np.asarray(points).shape[1]:
            coords.append(as_tensor(points))
            codes.append(as_tensor(labels, torch.int))
        if len(coords) == 2 and coords[0].shape[0] != coords[1].shape[0]:
            coords[1], codes[1] = coords[1].expand(coords[0].shape[0], -1, -1), codes[1].expand(codes[0].shape[0], -1)
        prompt = (torch.cat(coords, dim=1), torch.cat(codes, dim=1)) if coords else None
        masks = as_tensor(mask_logits) if mask_logits is not None else None
        embed, high_res = self.unpack(embedding)
        with torch.inference_mode():
            sparse, dense = self.prompt_encoder(points=prompt, boxes=None, masks=masks)
            logits, scores, _, _ = self.mask_decoder(
                image_embeddings=embed,
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                repeat_image=sparse.shape[0] > 1,
                high_res_features=high_res,
            )
        self.decoder_runs += int(logits.shape[0])
        return Decoded(logits.float().cpu().numpy(), scores.float().cpu().numpy())

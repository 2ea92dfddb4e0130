"""SAM (ViT-B/L/H, ``segment-anything``) and MedSAM (SAM ViT-B fine-tuned on medical images) adapters.

Same interface as LiteMedSAM: images (B, 3, 1024, 1024) in [0, 1] in, embeddings out. SAM normalises with its
ImageNet pixel mean and std on a 0–255 scale; MedSAM was trained on min-max normalised images fed as they are,
and, like LiteMedSAM, with box prompts (its clicks therefore go through the same boxes, ``prompts.click_logits``).
"""

from __future__ import annotations

import os

import numpy as np

from ..checkpoints import load_into, load_state_dict
from ..errors import CheckpointError
from .base import SamLikeAdapter

# ViT variant → image-encoder embedding width and depth (how a checkpoint's variant is recognised)
VARIANTS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
_PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
_PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def checkpoint_variant(state: dict) -> str | None:
    """The ViT variant a SAM-architecture state dict was made for, from its patch embedding and depth."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        return None
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    return next((name for name, (width, blocks) in VARIANTS.items()
                 if weight.shape[0] == width and depth == blocks), None)


class SAM(SamLikeAdapter):
    """Segment Anything with a ViT image encoder; ``variant`` is vit_b, vit_l or vit_h."""

    normalization = "imagenet"

    @classmethod
    def load(cls, device, checkpoint: str | os.PathLike, variant: str | None, name: str,
             state: dict | None = None) -> SAM:
        """See :meth:`SamLikeAdapter.load`; ``variant`` is a key of :data:`VARIANTS`."""
        if variant not in VARIANTS:
            raise ValueError(f"SAM variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        from segment_anything import sam_model_registry

        state = state if state is not None else load_state_dict(checkpoint)
        found = checkpoint_variant(state)
        if found is None:
            raise CheckpointError(f"Checkpoint {checkpoint} is not a SAM checkpoint (no ViT image encoder in it).")
        if found != variant:
            raise CheckpointError(f"Checkpoint {checkpoint} looks like a {found.replace('_', '-').upper()} "
                                  f"checkpoint; you chose {variant}.")
        net = sam_model_registry[variant]()
        load_into(net, state, checkpoint, f"SAM {variant}")
        model = cls(net.image_encoder, net.prompt_encoder, net.mask_decoder, device)
        model.name, model.checkpoint = name, str(checkpoint)
        return model

    def normalize(self, images01):
        if self.normalization != "imagenet":
            return images01
        import torch

        mean = torch.as_tensor(_PIXEL_MEAN, device=images01.device).view(1, 3, 1, 1)
        std = torch.as_tensor(_PIXEL_STD, device=images01.device).view(1, 3, 1, 1)
        return (images01 * 255.0 - mean) / std


class MedSAM(SAM):
    """MedSAM: SAM ViT-B weights fine-tuned on medical images; min-max normalised input, box prompts."""

    normalization = "minmax"

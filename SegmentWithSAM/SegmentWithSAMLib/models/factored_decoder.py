"""SAM's mask decoder computed in a cheaper order: the same weights and the same function, fewer operations.

SAM's two-way transformer attends between a handful of prompt tokens (N ≈ 7) and the T = 64 × 64 image tokens.
Its attention layers project all T image tokens to queries, keys and values, which costs T·C·C/2 per projection.
Because the projections are linear, the products can be re-associated so that the image tokens only ever meet
matrices of width H·N (heads × prompt tokens):

* token → image: ``softmax(q Wkᵀ Xᵀ) (X Wvᵀ + bv) = softmax((q Wk) Xᵀ) X Wvᵀ + bv`` (the key bias adds a
  constant per query row, which softmax ignores), so X meets a (H·N, C) matrix twice;
* image → token: ``softmax((X Wqᵀ + bq) kᵀ) v Woᵀ = softmax(X (Wqᵀ kᵀ) + bq kᵀ) (v Woᵀ)`` per head.

The output upscaling (two 2×2 stride-2 transposed convolutions) runs as matrix products in token layout, and
the four mask products with the hypernetwork vectors are taken before the pixels are rearranged. The result
equals :class:`MaskDecoder`'s up to float rounding (tested); on a 2-core CPU it runs several times faster.

Works for any SAM-architecture decoder (SAM, MedSAM, LiteMedSAM), not SAM 2's (which adds high-resolution
features and an object score).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def image_tokens(embedding: torch.Tensor) -> torch.Tensor:
    """An embedding (B, C, h, w) as tokens (B, h·w, C), row-major, as SAM's transformer reads it."""
    return embedding.flatten(2).transpose(1, 2)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _token_to_image(attention, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``attention(q=queries, k=keys, v=values)`` for few queries (B, N, C) and many keys/values (B, T, C)."""
    heads = attention.num_heads
    q = _heads(attention.q_proj(queries), heads)  # (B, H, N, d)
    d = q.shape[-1]
    k_weight = attention.k_proj.weight.unflatten(0, (heads, d))  # (H, d, C)
    folded = (q @ k_weight).flatten(1, 2) / math.sqrt(d)  # (B, H·N, C)
    weights = torch.softmax(folded @ keys.transpose(1, 2), dim=-1)  # (B, H·N, T)
    mixed = (weights @ values).unflatten(1, (heads, -1))  # (B, H, N, C)
    v_weight = attention.v_proj.weight.unflatten(0, (heads, d))  # (H, d, C)
    out = mixed @ v_weight.transpose(1, 2) + attention.v_proj.bias.unflatten(0, (heads, d))[:, None]  # (B, H, N, d)
    return attention.out_proj(out.transpose(1, 2).flatten(2))


def _image_to_token(attention, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``attention(q=queries, k=keys, v=values)`` for many queries (B, T, C) and few keys/values (B, N, C)."""
    heads = attention.num_heads
    k = _heads(attention.k_proj(keys), heads)  # (B, H, N, d)
    v = _heads(attention.v_proj(values), heads)  # (B, H, N, d)
    d = k.shape[-1]
    q_weight = attention.q_proj.weight.unflatten(0, (heads, d))  # (H, d, C)
    folded = (q_weight.transpose(1, 2) @ k.transpose(2, 3)) / math.sqrt(d)  # (B, H, C, N)
    bias = (attention.q_proj.bias.unflatten(0, (heads, d))[:, None] @ k.transpose(2, 3)) / math.sqrt(d)  # (B, H, 1, N)
    scores = queries @ folded.transpose(1, 2).flatten(2) + bias.transpose(1, 2).flatten(2)  # (B, T, H·N)
    weights = torch.softmax(scores.unflatten(-1, (heads, -1)), dim=-1).flatten(2)  # (B, T, H·N)
    o_weight = attention.out_proj.weight.unflatten(1, (heads, d))  # (C, H, d)
    projected = (v @ o_weight.permute(1, 2, 0)).flatten(1, 2)  # (B, H·N, C)
    return weights @ projected + attention.out_proj.bias


def _transposed_conv_weight(conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A 2×2 stride-2 transposed convolution as a (C_in, 4·C_out) matrix, columns ordered (dy, dx, C_out)."""
    if tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2):
        raise ValueError(f"Only 2×2 stride-2 upscaling is supported, not {conv.kernel_size}/{conv.stride}.")
    return conv.weight.permute(0, 2, 3, 1).flatten(1)


class FactoredMaskDecoder(nn.Module):
    """``MaskDecoder.predict_masks`` of ``mask_decoder`` with ``prompt_encoder``'s dense positional encoding,
    computed in the re-associated order described above.

    ``forward(tokens, sparse, dense)``: ``tokens`` (1, h·w, C), the image encoder's embedding (1, C, h, w) as
    row-major tokens (see :func:`image_tokens`), ``sparse`` (B, N, C) and ``dense`` (1 or B, C, h or 1, w or 1)
    from the prompt encoder (a (1, C, 1, 1) ``dense`` is the no-mask embedding, broadcast). Returns low-res
    logits (B, 1 + K, 4h, 4w) and predicted IoU (B, 1 + K): the single-mask output first, then SAM's K
    multimask outputs.
    """

    def __init__(self, prompt_encoder, mask_decoder) -> None:
        super().__init__()
        self.decoder = mask_decoder
        self.transformer = mask_decoder.transformer
        upscaling = list(mask_decoder.output_upscaling)
        if len(upscaling) != 5:
            raise ValueError("Expected SAM's upscaling: transposed conv, LayerNorm2d, GELU, transposed conv, GELU.")
        self.up1, self.norm, self.act1, self.up2, self.act2 = upscaling
        self.grid = tuple(prompt_encoder.image_embedding_size)
        with torch.no_grad():
            self.register_buffer("image_pe", prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).clone())
            self.register_buffer("up1_weight", _transposed_conv_weight(self.up1).clone())
            self.register_buffer("up2_weight", _transposed_conv_weight(self.up2).clone())

    def forward(self, tokens: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        decoder = self.decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
        prompts = torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)  # (B, N, C)
        keys = (tokens + image_tokens(dense)).expand(prompts.shape[0], -1, -1)  # (B, T, C)
        queries, keys = self._transformer(prompts, keys)
        masks = self._masks(queries[:, 1: 1 + decoder.num_mask_tokens], keys, *self.grid)
        return masks, decoder.iou_prediction_head(queries[:, 0])

    def _transformer(self, prompts: torch.Tensor, keys: torch.Tensor):
        """TwoWayTransformer's forward: prompt tokens (B, N, C) and image tokens (B, T, C), both updated."""
        pe, queries = self.image_pe, prompts
        for layer in self.transformer.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + prompts
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            placed = keys + pe
            queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image, queries + prompts,
                                                            placed, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = layer.norm4(keys + _image_to_token(layer.cross_attn_image_to_token, placed,
                                                      queries + prompts, queries))
        final = self.transformer.final_attn_token_to_image
        queries = queries + _token_to_image(final, queries + prompts, keys + pe, keys)
        return self.transformer.norm_final_attn(queries), keys

    def _masks(self, mask_tokens: torch.Tensor, keys: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Mask logits (B, K', 4h, 4w) from the mask tokens (B, K', C) and image tokens (B, h·w, C)."""
        hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(self.decoder.output_hypernetworks_mlps)],
                            dim=2)  # (B, c, K')
        up = (keys @ self.up1_weight).unflatten(-1, (4, -1)) + self.up1.bias  # (B, T, 4, C1)
        up = F.layer_norm(up, up.shape[-1:], eps=self.norm.eps) * self.norm.weight + self.norm.bias
        up = self.act1(up)
        up = (up @ self.up2_weight).unflatten(-1, (4, -1)) + self.up2.bias  # (B, T, 4, 4, c)
        logits = self.act2(up) @ hyper[:, None, None]  # (B, T, 4, 4, K')
        # (B, y, x, dy1, dx1, dy2, dx2, K') → (B, K', y, dy1, dy2, x, dx1, dx2)
        logits = logits.reshape(logits.shape[0], height, width, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(logits.shape[0], logits.shape[1], 4 * height, 4 * width)

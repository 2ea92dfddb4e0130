"""SAM's mask decoder computed in a cheaper order: the same weights and the same function, fewer operations.

SAM's two-way transformer attends between a handful of prompt tokens (N ≈ 7) and the T = 64 × 64 image tokens.
Its attention layers project all T image tokens to queries, keys and values, which costs T·C·C/2 per projection.
Because the projections are linear, the products can be re-associated so that the image tokens only ever meet
matrices of width H·N (heads × prompt tokens):

* token → image: ``softmax(q Wkᵀ Xᵀ) (X Wvᵀ + bv) = softmax((q Wk) Xᵀ) X Wvᵀ + bv`` (the key bias adds a
  constant per query row, which softmax ignores), so X meets a (H·N, C) matrix twice;
* image → token: ``softmax((X Wqᵀ + bq) kᵀ) v Woᵀ = softmax(X (Wqᵀ kᵀ) + bq kᵀ) (v Woᵀ)`` per head.

Before the first layer updates them, the image tokens do not depend on the prompts (unless a mask prompt is
given), so the first layer's projections of them — keys and values for token → image, queries for image →
token — are computed once per image (:meth:`FactoredMaskDecoder.prepare`) and each click only meets them with
its few tokens (:meth:`FactoredMaskDecoder.attend`). The final token → image attention treats each token on its
own, so it is taken for the IoU token and the wanted masks' tokens only. For export, the prompts come in as
labelled points (:func:`.base.labelled_points`, :meth:`FactoredMaskDecoder.attend_points`), so that a click needs no
PyTorch work outside the exported graphs.

The upscaling (:meth:`FactoredMaskDecoder.upscale`) runs as matrix products in token layout for the wanted
masks only. The result equals :class:`MaskDecoder`'s up to float rounding (tested). For SAM-architecture
decoders (SAM, MedSAM, LiteMedSAM), not SAM 2's (high-resolution features, an object score).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def image_tokens(embedding: torch.Tensor) -> torch.Tensor:
    """An embedding (B, C, h, w) as tokens (B, h·w, C), row-major, as SAM's transformer reads it."""
    return embedding.flatten(2).transpose(1, 2)


def embed_labelled_points(prompt_encoder, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``prompt_encoder``'s sparse embeddings (B, N, C) of labelled points (see :func:`.base.labelled_points`): the
    points' positional encoding (none for padding) plus the embedding of their label."""
    position = prompt_encoder.pe_layer.forward_with_coords(coords + 0.5, prompt_encoder.input_image_size)
    table = torch.cat([prompt_encoder.not_a_point_embed.weight,
                       *(embedding.weight for embedding in prompt_encoder.point_embeddings)])  # labels -1, 0, …, 3
    return position * (labels != -1).unsqueeze(-1) + table[labels + 1]


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
    folded = (k @ q_weight).flatten(1, 2) / math.sqrt(d)  # (B, H·N, C)
    bias = (k @ attention.q_proj.bias.unflatten(0, (heads, d))[:, :, None]).flatten(1, 2) / math.sqrt(d)  # (B, H·N, 1)
    return _mix_token_values(attention, folded @ queries.transpose(1, 2) + bias, v)


def _mix_token_values(attention, scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Image → token attention's output (B, T, C) from its scores (B, H·N, T) and the tokens' values per head
    (B, H, N, d): ``softmax (v Woᵀ) + bo``, so the image tokens never meet the output projection. The scores
    are kept with the image tokens last, so that the softmax over each head's N tokens runs along T."""
    heads = attention.num_heads
    weights = torch.softmax(scores.unflatten(1, (heads, -1)), dim=2).flatten(1, 2)  # (B, H·N, T)
    o_weight = attention.out_proj.weight.unflatten(1, (heads, -1))  # (C, H, d)
    projected = (v @ o_weight.permute(1, 2, 0)).flatten(1, 2)  # (B, H·N, C)
    return weights.transpose(1, 2) @ projected + attention.out_proj.bias


def _token_to_projected_image(attention, queries: torch.Tensor, keys: torch.Tensor,
                              values: torch.Tensor) -> torch.Tensor:
    """``attention`` from few queries (B, N, C) to image keys, already projected, scaled by 1/√d and
    transposed (1 or B, H, d, T), and image values already projected (1 or B, H, T, d)."""
    q = _heads(attention.q_proj(queries), attention.num_heads)  # (B, H, N, d)
    weights = torch.softmax(q @ keys, dim=-1)  # (B, H, N, T)
    return attention.out_proj((weights @ values).transpose(1, 2).flatten(2))


def _projected_image_to_token(attention, queries: torch.Tensor, keys: torch.Tensor,
                              values: torch.Tensor) -> torch.Tensor:
    """``attention`` from image queries, already projected, scaled by 1/√d and transposed (1 or B, H, d, T),
    to few keys and values (B, N, C)."""
    heads = attention.num_heads
    k = _heads(attention.k_proj(keys), heads)  # (B, H, N, d)
    v = _heads(attention.v_proj(values), heads)  # (B, H, N, d)
    return _mix_token_values(attention, (k @ queries).flatten(1, 2), v)


def _scaled_transposed(projection: nn.Linear, heads: int, x: torch.Tensor) -> torch.Tensor:
    """The image tokens x (B, T, C) projected per head, scaled by 1/√d and transposed: (B, H, d, T)."""
    projected = _heads(projection(x), heads)
    return projected.transpose(2, 3) / math.sqrt(projected.shape[-1])


def _transposed_conv_weight(conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A 2×2 stride-2 transposed convolution as a (C_in, 4·C_out) matrix, columns ordered (dy, dx, C_out)."""
    if tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2):
        raise ValueError(f"Only 2×2 stride-2 upscaling is supported, not {conv.kernel_size}/{conv.stride}.")
    return conv.weight.permute(0, 2, 3, 1).flatten(1)


MASK_OUTPUTS = ("all", "single", "multi")


class FactoredMaskDecoder(nn.Module):
    """``MaskDecoder.predict_masks`` of ``mask_decoder`` with ``prompt_encoder``'s dense positional encoding,
    computed in the re-associated order described above, in parts: :meth:`prepare` (per image), then per click
    :meth:`attend` and :meth:`upscale` (:meth:`decode` runs both); ``forward(tokens, sparse, dense)`` runs all.

    ``tokens`` (1, h·w, C) are the image encoder's embedding (1, C, h, w) as row-major tokens (see
    :func:`image_tokens`), ``sparse`` (B, N, C) and ``dense`` (1 or B, C, h or 1, w or 1) come from the prompt
    encoder (a (1, C, 1, 1) ``dense`` is the no-mask embedding, broadcast). Returns low-res logits (B, M, 4h, 4w)
    and predicted IoU (B, M) for ``masks``: "all" (M = 1 + K: SAM's single-mask output first, then its K
    multimask outputs), "single" (M = 1) or "multi" (M = K).
    """

    def __init__(self, prompt_encoder, mask_decoder, masks: str = "all") -> None:
        super().__init__()
        if masks not in MASK_OUTPUTS:
            raise ValueError(f"masks must be one of {MASK_OUTPUTS}, not {masks!r}")
        self.prompt_encoder, self.decoder = prompt_encoder, mask_decoder
        self.transformer = mask_decoder.transformer
        upscaling = list(mask_decoder.output_upscaling)
        if len(upscaling) != 5:
            raise ValueError("Expected SAM's upscaling: transposed conv, LayerNorm2d, GELU, transposed conv, GELU.")
        self.up1, self.norm, self.act1, self.up2, self.act2 = upscaling
        self.grid = tuple(prompt_encoder.image_embedding_size)
        count = mask_decoder.num_mask_tokens
        self.outputs = {"all": range(count), "single": range(1), "multi": range(1, count)}[masks]
        with torch.no_grad():
            self.register_buffer("image_pe", prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).clone())
            self.register_buffer("up1_weight", _transposed_conv_weight(self.up1).clone())
            self.register_buffer("up2_weight", _transposed_conv_weight(self.up2).clone())
            self.register_buffer("up2_bias", self.up2.bias.repeat(4).clone())  # per (dy, dx, c) column

    def forward(self, tokens: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        return self.decode(*self.prepare(tokens, dense), sparse)

    def prepare(self, tokens: torch.Tensor, dense: torch.Tensor):
        """The prompt-free part: image tokens (1 or B, T, C) with the dense prompt added, and the first layer's
        projections of them: token → image keys, scaled by 1/√d and transposed (1 or B, H, d, T), and values
        (1 or B, H, T, d); image → token queries, scaled and transposed (1 or B, H, d, T). Scaled and laid out
        here, once per image, so that each click's products take them as they are."""
        keys = tokens + image_tokens(dense)
        placed = keys + self.image_pe
        first = self.transformer.layers[0]
        to_image, to_token = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        return (keys, _scaled_transposed(to_image.k_proj, to_image.num_heads, placed),
                _heads(to_image.v_proj(keys), to_image.num_heads),
                _scaled_transposed(to_token.q_proj, to_token.num_heads, placed))

    def decode(self, keys: torch.Tensor, first_keys: torch.Tensor, first_values: torch.Tensor,
               first_queries: torch.Tensor, sparse: torch.Tensor):
        """Logits and scores (see the class) from :meth:`prepare`'s outputs and the sparse prompts (B, N, C)."""
        hyper, scores, keys = self.attend(keys, first_keys, first_values, first_queries, sparse)
        return self.upscale(keys, hyper), scores

    def attend(self, keys: torch.Tensor, first_keys: torch.Tensor, first_values: torch.Tensor,
               first_queries: torch.Tensor, sparse: torch.Tensor):
        """The per-click transformer: from :meth:`prepare`'s outputs and the sparse prompts (B, N, C), the wanted
        masks' hypernetwork vectors (B, c, M), their scores (B, M) and the updated image tokens (B, T, C)."""
        decoder = self.decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
        prompts = torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)  # (B, N, C)
        chosen = list(self.outputs)
        needed = [0, *(1 + i for i in chosen)]  # the IoU token and the wanted masks' tokens
        queries, keys = self._transformer(prompts, keys, (first_keys, first_values, first_queries), needed)
        mlps = decoder.output_hypernetworks_mlps
        hyper = torch.stack([mlps[i](queries[:, 1 + n]) for n, i in enumerate(chosen)], dim=2)  # (B, c, M)
        return hyper, decoder.iou_prediction_head(queries[:, 0])[:, chosen], keys

    def attend_points(self, keys: torch.Tensor, first_keys: torch.Tensor, first_values: torch.Tensor,
                      first_queries: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor):
        """:meth:`attend` with the prompts as labelled points (B, N, 2) and labels (B, N) (see
        :func:`.base.labelled_points`), embedded here: the per-click part needs nothing else."""
        sparse = embed_labelled_points(self.prompt_encoder, coords, labels)
        return self.attend(keys, first_keys, first_values, first_queries, sparse)

    def _transformer(self, prompts: torch.Tensor, keys: torch.Tensor, first: tuple, needed: list[int]):
        """TwoWayTransformer's forward: prompt tokens (B, N, C) and image tokens (B, T, C), both updated; the
        first layer's image projections ``first`` come from :meth:`prepare`. The final attention, where each
        token attends on its own, is taken for the ``needed`` tokens only, and only they are returned."""
        pe, queries = self.image_pe, prompts
        for number, layer in enumerate(self.transformer.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + prompts
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            if number == 0:
                image_keys, image_values, image_queries = first
                attended = _token_to_projected_image(layer.cross_attn_token_to_image, queries + prompts,
                                                     image_keys, image_values)
            else:
                placed = keys + pe
                attended = _token_to_image(layer.cross_attn_token_to_image, queries + prompts, placed, keys)
            queries = layer.norm2(queries + attended)
            queries = layer.norm3(queries + layer.mlp(queries))
            if number == 0:
                update = _projected_image_to_token(layer.cross_attn_image_to_token, image_queries,
                                                   queries + prompts, queries)
            else:
                update = _image_to_token(layer.cross_attn_image_to_token, placed, queries + prompts, queries)
            keys = layer.norm4(keys + update)
        final = self.transformer.final_attn_token_to_image
        queries, prompts = queries[:, needed], prompts[:, needed]
        queries = queries + _token_to_image(final, queries + prompts, keys + pe, keys)
        return self.transformer.norm_final_attn(queries), keys

    def embed_mask(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """The dense prompt embedding (B, C, h, w) of a mask prompt: low-res logits (B, 1, 4h, 4w)."""
        return self.prompt_encoder.mask_downscaling(mask_logits)

    def upscale(self, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, M, 4h, 4w) from the image tokens (B, h·w, C) and the masks' hypernetwork vectors
        (B, c, M): the output upscaling, then each mask's product with its vector."""
        height, width = self.grid
        up = (keys @ self.up1_weight).unflatten(-1, (4, -1)) + self.up1.bias  # (B, T, 4, C1)
        up = F.layer_norm(up, up.shape[-1:], eps=self.norm.eps) * self.norm.weight + self.norm.bias
        up = self.act1(up)
        # the bias added before the split, as one vector: the matrix product then takes it in (measured faster;
        # not so for the first product, whose fastest kernel takes no bias)
        up = (up @ self.up2_weight + self.up2_bias).unflatten(-1, (4, -1))  # (B, T, 4, 4, c)
        logits = self.act2(up) @ hyper[:, None, None]  # (B, T, 4, 4, M)
        # (B, y, x, dy1, dx1, dy2, dx2, M) → (B, M, y, dy1, dy2, x, dx1, dx2)
        logits = logits.reshape(logits.shape[0], height, width, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(logits.shape[0], logits.shape[1], 4 * height, 4 * width)


DECODER_PARTS = ("prepare", "attend_points", "upscale", "embed_mask")  # what ..engines exports


class DecoderPart(nn.Module):
    """One of :class:`FactoredMaskDecoder`'s parts (``DECODER_PARTS``) as a module, for export."""

    def __init__(self, decoder: FactoredMaskDecoder, part: str) -> None:
        super().__init__()
        if part not in DECODER_PARTS:
            raise ValueError(f"part must be one of {DECODER_PARTS}, not {part!r}")
        self.decoder, self.part = decoder, part

    def forward(self, *inputs):
        return getattr(self.decoder, self.part)(*inputs)

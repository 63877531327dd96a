"""The two forward passes of decoding, over the model's stages: the prefill of the prompts, then
one-token steps. Greedy, sampled and beam decoding all run these."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from idefics2.model.fast_linear import prepare_for_compile
from idefics2.model.kv_cache import KVCache
from idefics2.model.text import positions_from_mask


def prefill(model: nn.Module, input_ids: Tensor, mask: Tensor | None, features: Tensor | None,
            cache: KVCache, hidden_states: list[Tensor] | None = None,
            inputs_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Prompts input_ids, mask (B, T) (None: no padding) with image `features` (R, L, D) -> next-token
    logits (B, V) in float32 and each row's next RoPE position (B, 1), the prompts' keys and values
    written to `cache`. Positions are mask-aware, so a row gets the same ones alone or left-padded
    in a batch. `hidden_states`, a list, receives the embeddings and each layer's output (B, T, D),
    the last one normed, as transformers returns them. `inputs_embeds` (B, T, D), when given, is
    used instead of embedding `input_ids` (which still place the image features)."""
    positions = positions_from_mask(torch.ones_like(input_ids) if mask is None else mask)  # (B, T)
    if inputs_embeds is None:
        embeds = model.embed_inputs(input_ids, features)  # (B, T, D)
    else:  # the caller's embeddings, image features still placed at the `<image>` positions
        embeds = inputs_embeds if features is None else model.model.merge_image_features(inputs_embeds, features,
                                                                                          input_ids)
    hidden = model.run_decoder(embeds, positions, mask, cache, hidden_states)  # (B, T, D)
    return model.compute_logits(hidden[:, -1]).float(), positions[:, -1:] + 1


def decode_step(model: nn.Module, tokens: Tensor, positions: Tensor, attention_mask: Tensor | None,
                cache: KVCache, hidden_states: list[Tensor] | None = None) -> Tensor:
    """One new token per row: tokens, positions (B, 1); attention_mask (B, S) or None when no row
    is padded -> next-token logits (B, V) in float32. The model's stages without `forward`'s
    checks, and the LM head on the one position only. `hidden_states` as in `prefill`, (B, 1, D)."""
    hidden = model.run_decoder(model.embed_inputs(tokens), positions, attention_mask, cache,
                               hidden_states)  # (B, 1, D)
    return model.compute_logits(hidden[:, -1]).float()  # (B, V)


def compile_decode_step() -> Callable[..., Tensor]:
    """`decode_step` through `torch.compile` (dynamic shapes: one graph for every batch and length)."""
    prepare_for_compile()
    return torch.compile(decode_step, dynamic=True)

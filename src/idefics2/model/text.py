"""Mistral decoder: RoPE, grouped-query attention, sliding window, RMSNorm.

Last stage: token embeddings (image rows already replaced by perceiver latents) -> hidden states
(B, T, D). Must match transformers' `MistralModel` (docs/numerics.md §4.5); names equal `model.text_model.*`.
The decoder takes explicit positions and an optional `KVCache`; it never allocates a cache itself.
Shape letters: B batch, T new tokens, S = cached + new tokens, D width, H/H_kv heads, hd head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from idefics2.config import TextConfig
from idefics2.model.fast_linear import Linear
from idefics2.model.kv_cache import KVCache
from idefics2.model.layers import (
    CheckpointedLayer,
    GatedMLP,
    RMSNorm,
    apply_rotary,
    attention,
    rotary_cos_sin,
    signed_sin,
)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """RoPE positions that skip left padding: cumsum(mask) - 1, padding at 0 (docs/numerics.md §4.8).

    What `generate` (and training, so that it sees the same positions) uses instead of the
    plain `arange` of `forward`: a row then gets the same positions alone or left-padded in a batch.
    """
    mask = attention_mask.long()
    return (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)


def decoder_attention_mask(attention_mask: Tensor | None, batch_size: int, past: int, num_new: int,
                           sliding_window: int | None, device: torch.device) -> Tensor | None:
    """Causal + sliding-window + padding mask (B, 1, T, S), True = visible; None when all visible.
    A 4-D `attention_mask` is the caller's own and is used as given (`_given_4d_mask`).

    Query i (a cache position) sees key j iff j <= i, j > i - W and key j is not padding. Each query
    also sees itself, so a padding query never has an empty row (its output is unused, but a NaN
    there would reach the real rows through later layers' values).
    """
    S = past + num_new
    if attention_mask is not None and attention_mask.dim() == 4:
        return _given_4d_mask(attention_mask, batch_size, num_new, S)
    if attention_mask is None and num_new == 1 and (sliding_window is None or S <= sliding_window):
        return None  # one new token, no padding, window not reached: it sees every key
    i = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    j = torch.arange(S, device=device)[None, :]  # (1, S)
    visible = j <= i
    if sliding_window is not None and S > sliding_window:
        visible = visible & (j > i - sliding_window)
    if attention_mask is None:
        return visible[None, None].expand(batch_size, 1, num_new, S)
    if attention_mask.shape != (batch_size, S):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch_size}, {S}): "
                         "one entry per cached and new token")
    visible = visible[None] & attention_mask.bool()[:, None, :]  # (B, T, S)
    visible = visible | (j == i)[None]
    return visible[:, None]


def _given_4d_mask(mask: Tensor, batch_size: int, num_new: int, num_keys: int) -> Tensor:
    """A caller's own (B or 1, 1, T, S) mask, used as given, as transformers does: bool with True =
    may attend, or float added to the attention scores (0 = visible, a large negative = hidden).
    Causality, the sliding window and padding are then the caller's."""
    if mask.shape[1] != 1 or mask.shape[0] not in (1, batch_size) or mask.shape[2:] != (num_new, num_keys):
        raise ValueError(f"a 4-D attention_mask must be ({batch_size} or 1, 1, {num_new}, {num_keys}) "
                         f"(batch, 1, new tokens, cached + new tokens), got {tuple(mask.shape)}")
    return mask


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.attention_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = Linear(self.num_heads * hd, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, layer_idx: int) -> Tensor:
        """x (B, T, D); cos and signed sin (B, 1, T, hd) from `MistralDecoder.rotary`."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, H_kv, S, hd)
        out = attention(q, k, v, mask, self.head_dim**-0.5)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(CheckpointedLayer):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = TextAttention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, layer_idx: int) -> Tensor:
        if cache is not None:  # never recomputed: the replay would append this step's keys to the cache again
            return self.block(x, cos, sin, mask, cache, layer_idx)
        return super().forward(x, cos, sin, mask, cache, layer_idx)

    def block(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
              cache: KVCache | None, layer_idx: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class MistralDecoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._rope_table: tuple[Tensor, Tensor] | None = None  # float32 (S_table, hd) cos, signed sin

    def reserve_rotary(self, length: int, device: torch.device) -> None:
        """Make the RoPE table cover positions [0, length) on `device` (generation calls it up front)."""
        table = self._rope_table
        if table is None or table[0].shape[0] < length or table[0].device != device:
            size = max(length, 2 * table[0].shape[0] if table is not None else 256)
            rows = torch.arange(size, device=device)[None]  # (1, S_table)
            cos, sin = rotary_cos_sin(rows, self.config.attention_head_dim, self.config.rope_theta,
                                      torch.float32)
            self._rope_table = (cos[0, 0], signed_sin(sin[0, 0]))  # each (S_table, hd)

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and signed sin (`layers.signed_sin`), each (B, 1, T, hd), at `positions` (B, T).

        Read from a table built once and grown on demand: decoding asks for one position per step,
        and recomputing the frequencies each time costs more than the lookup. Table rows are the
        same float32 products as `rotary_cos_sin`, so the result is bit-identical to computing it
        directly. Under `torch.compile` the table must already be large enough (`reserve_rotary`):
        the size check reads a tensor value.
        """
        if not torch.compiler.is_compiling() and positions.numel():
            lowest, highest = (int(v) for v in positions.aminmax())
            if lowest < 0:  # a caller's own position scheme; the table only holds non-negative rows
                cos, sin = rotary_cos_sin(positions, self.config.attention_head_dim, self.config.rope_theta,
                                          dtype)
                return cos, signed_sin(sin)
            self.reserve_rotary(highest + 1, positions.device)
        assert self._rope_table is not None
        cos, sin = self._rope_table
        return cos[positions][:, None].to(dtype), sin[positions][:, None].to(dtype)

    def forward(self, inputs_embeds: Tensor, positions: Tensor, attention_mask: Tensor | None = None,
                cache: KVCache | None = None, hidden_states: list[Tensor] | None = None) -> Tensor:
        """inputs_embeds (B, T, D); positions (B, T) RoPE positions; attention_mask (B, S) 1 = real token,
        covering the cached tokens and the new ones. Returns (B, T, D) after the final norm.

        `hidden_states`, when a list, receives the embeddings and each layer's output, the last
        layer's after the norm (transformers' `output_hidden_states`)."""
        B, T, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        mask = decoder_attention_mask(attention_mask, B, past, T, self.config.sliding_window, inputs_embeds.device)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(inputs_embeds.dtype)  # SDPA adds a float mask in the activation dtype
        cos, sin = self.rotary(positions, inputs_embeds.dtype)
        x = inputs_embeds
        for idx, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, cos, sin, mask, cache, idx)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

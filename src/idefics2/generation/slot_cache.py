"""The engine's key/value cache: one preallocated row ("slot") per running sequence.

Buffers per layer: (slots, H_kv, max_len, hd), zero-filled once, so a masked key never holds a
NaN that would reach the output through a zero attention weight. Each slot fills from position 0
with its own sequence (prefilled alone, never padded), so a slot's cache index equals its RoPE
position and the rows of a decode batch may hold different lengths. The running sequences always
occupy slots 0..B-1 (the engine `copy`s the last one into a freed slot), so a decode step reads
plain views.

Both views below speak the decoder's cache protocol (`length`, `update`, `advance`) of
`model.kv_cache.KVCache`, which the decoder uses without knowing which one it got.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_len = slots, max_len

    def prefill_view(self, slot: int) -> _PrefillView:
        """A cache for one sequence's prefill (batch 1) that writes into `slot` from position 0."""
        return _PrefillView(self, slot)

    def step_view(self, lengths: Tensor) -> _StepView:
        """A cache for one decode step of slots 0..B-1, holding `lengths` (B,) tokens each."""
        return _StepView(self, lengths)

    def copy(self, source: int, target: int, length: int) -> None:
        """Slot `target` gets the first `length` positions of slot `source` (a sibling sample, or
        compaction after a sequence left)."""
        for buf in self.keys + self.values:
            buf[target, :, :length] = buf[source, :, :length]


class _PrefillView:
    def __init__(self, cache: SlotKVCache, slot: int) -> None:
        self.cache, self.slot, self.length = cache, slot, 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (1, H_kv, T, hd) -> this slot's (1, H_kv, length + T, hd)."""
        end = self.length + k.shape[2]
        rows = slice(self.slot, self.slot + 1)
        buf_k, buf_v = self.cache.keys[layer][rows], self.cache.values[layer][rows]
        buf_k[:, :, self.length:end] = k
        buf_v[:, :, self.length:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class _StepView:
    """One new token per slot 0..B-1, stored at each slot's own length. `length` is the longest
    slot's, so the keys returned are (B, H_kv, length + 1, hd); `step_mask` hides, per row, the
    positions past its own length and outside the sliding window."""

    def __init__(self, cache: SlotKVCache, lengths: Tensor) -> None:
        self.cache, self.lengths = cache, lengths
        self.length = int(lengths.max())
        self._rows = torch.arange(lengths.shape[0], device=lengths.device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, H_kv, 1, hd) -> (B, H_kv, length + 1, hd)."""
        B, end = k.shape[0], self.length + 1
        buf_k, buf_v = self.cache.keys[layer], self.cache.values[layer]
        buf_k[self._rows, :, self.lengths] = k[:, :, 0]
        buf_v[self._rows, :, self.lengths] = v[:, :, 0]
        return buf_k[:B, :, :end], buf_v[:B, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.lengths += num_tokens

    def step_mask(self, sliding_window: int | None) -> Tensor:
        """(B, 1, 1, length + 1) bool, True = visible: key j of row b iff j <= lengths[b] (and
        within the window: j > lengths[b] - W)."""
        j = torch.arange(self.length + 1, device=self.lengths.device)[None]  # (1, S)
        own = self.lengths[:, None]  # (B, 1): the new token's position
        visible = j <= own
        if sliding_window is not None:
            visible = visible & (j > own - sliding_window)
        return visible[:, None, None]

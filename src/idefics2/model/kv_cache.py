"""Key/value cache for the Mistral decoder: one preallocated buffer pair per layer.

The decoder receives it and never allocates one on its own, so that generation controls its
size: `prompt + max_new_tokens` up front, no reallocation while decoding.
Keys are stored after RoPE. The sliding window is applied by the attention mask, not by evicting
entries, which stays correct at any length (docs/numerics.md §4.9).
Buffers: (B, H_kv, S_max, hd); `length` tokens are filled, the same count for every row
(left padding keeps rows aligned).
"""

from __future__ import annotations

from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int, max_length: int = 0) -> None:
        """Buffers are created on the first `update`, with that call's batch, heads, dtype and device.

        `max_length` is the capacity to allocate; a longer sequence grows the buffers (doubling),
        so a too-small estimate costs a copy, never a wrong result.
        """
        self.num_layers = num_layers
        self.capacity = max_length
        self.length = 0
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, hd) after the `length` cached tokens; return all (B, H_kv, length+T, hd)."""
        start, end = self.length, self.length + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[2] < end:
            size = max(end, self.capacity, 2 * buf_k.shape[2] if buf_k is not None else 0)
            new_k = k.new_empty(k.shape[0], k.shape[1], size, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], size, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]  # type: ignore[index]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v  # type: ignore[index]
        return buf_k[:, :, :end], buf_v[:, :, :end]  # type: ignore[index]

    def advance(self, num_tokens: int) -> None:
        """Mark `num_tokens` more positions as filled; called once per forward, after every layer."""
        self.length += num_tokens

    def select_rows(self, rows: Tensor) -> None:
        """Keep only the batch rows `rows` (1-D index), e.g. to stop paying for finished sequences."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None and v is not None:
                self.keys[i], self.values[i] = k.index_select(0, rows), v.index_select(0, rows)

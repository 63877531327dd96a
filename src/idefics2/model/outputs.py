"""What `forward` returns: dataclasses that also read like transformers' `ModelOutput`.

Fields are in transformers' order; the unset (None) ones are left out of indexing, iteration and
`to_tuple`, so `outputs[0]` is the loss when labels were given and the logits otherwise, and
`forward(..., return_dict=False)` gives `to_tuple()`, as in transformers. Shape letters: B batch,
T tokens, D width, V vocabulary, R real images, L latents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from idefics2.model.kv_cache import KVCache


class ModelOutput:
    """Dict- and tuple-like access to the set fields of a dataclass."""

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    @property
    def cache(self) -> KVCache | None:
        """transformers 5.x's name for `past_key_values`."""
        return self.past_key_values  # type: ignore[attr-defined]


@dataclass
class Idefics2ModelOutput(ModelOutput):
    """`Idefics2Model.forward`. hidden_states: with `output_hidden_states`, the embeddings and each
    decoder layer's output, the last one after the final norm (= last_hidden_state), each (B, T, D)."""

    last_hidden_state: Tensor | None = None  # (B, T, D)
    past_key_values: KVCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    image_hidden_states: Tensor | None = None  # (R, L, D) features of the real images, when computed


@dataclass
class Idefics2CausalLMOutput(ModelOutput):
    """`Idefics2ForConditionalGeneration.forward`: `Idefics2ModelOutput`'s fields with logits (B, T', V)
    and, with labels, the loss in place of the last hidden state."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    image_hidden_states: Tensor | None = None

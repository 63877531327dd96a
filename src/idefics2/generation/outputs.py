"""What `generate(..., return_dict_in_generate=True)` returns, and the per-step recording behind it.

Greedy, sampled and beam decoding record the same things per step, as transformers 5.24's
`GenerateDecoderOnlyOutput` / `GenerateBeamDecoderOnlyOutput` hold them: processed scores, raw
logits, each layer's hidden states, and (empty, see `StepRecorder`) attentions; then the KV cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from idefics2.generation.config import GenerationConfig
from idefics2.model.kv_cache import KVCache

logger = logging.getLogger(__name__)


@dataclass
class GenerateOutput:
    """`generate(..., return_dict_in_generate=True)`. `scores`: per step, the processed (B, V)
    scores the token was chosen from (as transformers' `output_scores`; beam search: the processed
    log-probabilities of every beam); `logits`: per step, the model's raw (B, V) logits
    (`output_logits`). A row that has finished holds -inf with 0 at the pad token in both (it emits
    its pad with certainty). `log_probs` (B, N_new): log-softmax of the scores at the chosen token
    (0 for padding after a row finished). `hidden_states` (`output_hidden_states`): per step, a
    tuple over the embeddings and each layer of (B, T_step, D), T_step the prompt length at the
    first step and 1 after it (with `use_cache=False`, the whole sequence so far, as a model that
    recomputes it gives). `attentions` (`output_attentions`): per step an empty tuple.
    `past_key_values` (`use_cache`): per layer (keys, values), each (B, H_kv, S - 1, hd), as
    transformers' legacy cache tuples; also reachable as 5.x's `cache`."""

    sequences: Tensor
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None
    log_probs: Tensor | None = None
    sequences_scores: Tensor | None = None  # beam search: each returned hypothesis's length-penalised score
    beam_indices: Tensor | None = None  # beam search (B*R, N_new): the beam row each step's token came from
    hidden_states: tuple[tuple[Tensor, ...], ...] | None = None
    attentions: tuple[tuple[Tensor, ...], ...] | None = None
    past_key_values: tuple[tuple[Tensor, Tensor], ...] | None = None

    @property
    def cache(self) -> tuple[tuple[Tensor, Tensor], ...] | None:
        return self.past_key_values


def keeps_every_row(cfg: GenerationConfig, use_cache: bool) -> bool:
    """Whether finished rows must stay in the batch (fed the pad token, as transformers does): the
    hidden states and the cache of the output cover every row."""
    return bool(cfg.return_dict_in_generate) and (bool(cfg.output_hidden_states) or use_cache)


def cache_layers(cache: KVCache) -> tuple[tuple[Tensor, Tensor], ...]:
    """Each layer's filled (keys, values) (B, H_kv, length, hd), views of the cache's buffers."""
    L = cache.length
    return tuple((k[:, :, :L], v[:, :, :L]) for k, v in zip(cache.keys, cache.values, strict=True)
                 if k is not None and v is not None)


def every_row(values: Tensor, rows: Tensor, batch: int, pad: int) -> Tensor:
    """values (B_active, V) of the rows still decoding -> (batch, V); a finished row emits its pad
    with certainty (-inf everywhere, 0 at the pad token)."""
    full = values.new_full((batch, values.shape[-1]), float("-inf"))
    full[:, pad] = 0.0
    full[rows] = values
    return full


class StepRecorder:
    """The per-step outputs one request asked for. Attention probabilities are never formed (fused
    SDPA kernels), so `output_attentions=True` records an empty tuple per step and warns, which is
    what transformers 5.24 gives with its default SDPA attention. With `use_cache=False` the hidden
    states of step i cover the whole sequence: the earlier positions' states are carried over
    (causal attention gives them unchanged) and reordered with the beams (`select`)."""

    def __init__(self, cfg: GenerationConfig, use_cache: bool) -> None:
        on = bool(cfg.return_dict_in_generate)
        self.scores: list[Tensor] | None = [] if on and cfg.output_scores else None
        self.logits: list[Tensor] | None = [] if on and cfg.output_logits else None
        self.hidden: list[tuple[Tensor, ...]] | None = [] if on and cfg.output_hidden_states else None
        self.attentions: list[tuple[Tensor, ...]] | None = [] if on and cfg.output_attentions else None
        if self.attentions is not None:
            logger.warning("output_attentions=True: attention runs in fused SDPA kernels that never form the "
                           "attention probabilities; each step's attentions are an empty tuple")
        self.use_cache = use_cache
        self._whole: list[Tensor] | None = None  # use_cache=False: each layer's (B, S, D) so far

    def layers(self) -> list[Tensor] | None:
        """A list for the next forward pass to fill with its hidden states, if they are recorded."""
        return [] if self.hidden is not None else None

    def add(self, scores: Tensor, logits: Tensor, layers: list[Tensor] | None,
            to_batch: Callable[[Tensor], Tensor] | None = None) -> None:
        """One step: scores and raw logits (B_active, V), made whole-batch by `to_batch` when kept,
        and the hidden states of the forward that gave them."""
        if self.scores is not None:
            self.scores.append(to_batch(scores) if to_batch is not None else scores)
        if self.logits is not None:
            self.logits.append(to_batch(logits) if to_batch is not None else logits)
        if self.attentions is not None:
            self.attentions.append(())
        if self.hidden is not None:
            assert layers is not None
            if not self.use_cache:
                if self._whole is not None:
                    layers = [torch.cat([old, new], dim=1) for old, new in zip(self._whole, layers, strict=True)]
                self._whole = layers
            self.hidden.append(tuple(layers))

    def select(self, rows: Tensor) -> None:
        """The rows (B,) that go on, in order (beams reordered): their carried-over hidden states follow."""
        if self._whole is not None:
            self._whole = [h[rows] for h in self._whole]

    def fill(self, out: GenerateOutput, cache: KVCache | None) -> GenerateOutput:
        """`out` with what was recorded, and the cache when decoding used one."""
        out.scores = tuple(self.scores) if self.scores is not None else None
        out.logits = tuple(self.logits) if self.logits is not None else None
        out.hidden_states = tuple(self.hidden) if self.hidden is not None else None
        out.attentions = tuple(self.attentions) if self.attentions is not None else None
        out.past_key_values = cache_layers(cache) if cache is not None and self.use_cache else None
        return out

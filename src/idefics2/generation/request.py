"""A `generate` call's request, made ready before any compute: the tensors checked, on the model's
device and repeated per beam or returned sequence, the constraints compiled per row, the random
source chosen, and the `Plan` that carries all of it to the decode loop (`generate._run`) or to
`beam_search`. Kept apart from the loop so that a wrong argument fails here, naming itself, and the
loop reads only values that are already right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from idefics2.generation.checks import check_cache_memory, check_input_tensors
from idefics2.generation.config import GenerationConfig, check_inputs, validate
from idefics2.generation.constraints import CompiledConstraint, Constraint, compiler_for, per_row
from idefics2.generation.sampling import LogitsProcessor
from idefics2.generation.streaming import Decoder
from idefics2.generation.threads import ThreadTuner
from idefics2.generation.vision_cache import VisionFeatureCache


class Streamer(Protocol):
    """What `generate` feeds: the prompt ids, then each step's new ids; `end()` once, even on errors."""

    def put(self, value: Tensor) -> None: ...
    def end(self) -> None: ...


@dataclass
class Plan:
    """Everything `generate` resolved and validated, handed to the decode loop or beam search."""

    cfg: GenerationConfig
    eos_ids: list[int]
    pad: int
    sampling: bool
    stops: list[str]
    generator: torch.Generator | None
    tokenizer: Decoder | None
    streamer: Streamer | None
    step_fn: Callable[..., Tensor]
    vision_cache: VisionFeatureCache | None
    decode_threads: int | None | str
    thread_tuner: ThreadTuner | None  # with decode_threads "auto" on several CPU threads
    logits_processor: list[LogitsProcessor]
    use_cache: bool  # False: the dict output carries no cache, its hidden states the whole sequence
    inputs_embeds: Tensor | None  # the caller's prompt embeddings, in place of embedding input_ids
    constraints: list[CompiledConstraint | None] | None  # per row of the expanded batch


def prepared_inputs(model: nn.Module, cfg: GenerationConfig, eos_ids: list[int], input_ids: Tensor | None,
                    attention_mask: Tensor | None, pixel_values: Tensor | None,
                    pixel_attention_mask: Tensor | None,
                    inputs_embeds: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The checked inputs on the model's device, each prompt repeated once per beam or returned
    sequence (together, as transformers expands them); no `input_ids`: (B, 1) BOS tokens."""
    check_input_tensors(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, inputs_embeds)
    text_config = model.config.text_config
    device = model.device
    if input_ids is None:
        bos = cfg.bos_token_id if cfg.bos_token_id is not None else text_config.bos_token_id
        if bos is None:
            raise ValueError("generate without input_ids starts from bos_token_id, and none is set: "
                             "pass input_ids or bos_token_id")
        given = [t for t in (attention_mask, pixel_values, pixel_attention_mask) if t is not None]
        input_ids = torch.full((given[0].shape[0] if given else 1, 1), bos, dtype=torch.long)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    check_inputs(input_ids, attention_mask, pixel_values, pixel_attention_mask)
    validate(cfg, eos_ids, text_config.vocab_size, text_config.max_position_embeddings, input_ids.shape[1])
    beams = int(cfg.num_beams)  # type: ignore[arg-type]
    n = beams if beams > 1 else int(cfg.num_return_sequences)  # type: ignore[arg-type]
    tensors = (input_ids, attention_mask.long(), pixel_values, pixel_attention_mask)
    ids, mask, values, pmask = (t.repeat_interleave(n, 0) if t is not None and n > 1 else t for t in tensors)
    assert ids is not None and mask is not None
    check_cache_memory(model, ids.shape[0], ids.shape[1], int(cfg.max_new_tokens))  # type: ignore[arg-type]
    return ids, mask, values, pmask


def prepared_embeds(model: nn.Module, input_ids: Tensor, inputs_embeds: Tensor | None) -> Tensor | None:
    """The caller's prompt embeddings (B, T, D) beside `input_ids` (already repeated per beam or
    returned sequence; the ids still place the images and start the output), repeated alike."""
    if inputs_embeds is None:
        return None
    D = model.config.text_config.hidden_size
    n = input_ids.shape[0] // max(inputs_embeds.shape[0], 1) if inputs_embeds.dim() == 3 else 0
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[1:] != (input_ids.shape[1], D) or n < 1 \
            or inputs_embeds.shape[0] * n != input_ids.shape[0]:
        raise ValueError(f"inputs_embeds must be (batch, tokens, {D}) matching input_ids (batch, tokens); "
                         f"got {tuple(inputs_embeds.shape)} for input_ids of {tuple(input_ids.shape)}")
    embeds = inputs_embeds.to(model.device, model.get_input_embeddings().weight.dtype)
    return embeds.repeat_interleave(n, 0) if n > 1 else embeds


def compiled_constraints(model: nn.Module, constraint: Constraint | Sequence[Constraint | None] | None,
                         tokenizer: Decoder | None, cfg: GenerationConfig,
                         rows: int) -> list[CompiledConstraint | None] | None:
    """One compiled constraint (or None) per row of the expanded batch (`num_return_sequences` rows
    per prompt), each distinct constraint compiled once; None without a constraint."""
    if constraint is None:
        return None
    if int(cfg.num_beams) > 1:  # type: ignore[arg-type]
        raise ValueError("constrained beam search (a constraint with num_beams > 1) is not implemented; "
                         "use greedy or sampled decoding")
    copies = int(cfg.num_return_sequences)  # type: ignore[arg-type]
    per_prompt = per_row(constraint, rows // copies)
    if tokenizer is None:
        raise ValueError("a constraint needs the tokenizer to read tokens as text: pass tokenizer=")
    compiler = compiler_for(tokenizer, model.config.text_config.vocab_size)
    compiled: dict[int, CompiledConstraint] = {}
    for c in per_prompt:
        if c is not None and id(c) not in compiled:
            compiled[id(c)] = compiler.compile(c)
    return [None if c is None else compiled[id(c)] for c in per_prompt for _ in range(copies)]


def random_source(generator: torch.Generator | None, seed: int | None,
                  device: torch.device) -> torch.Generator | None:
    """The caller's generator, or a new one seeded with `seed`; None: torch's global RNG."""
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    return torch.Generator(device=device).manual_seed(seed) if seed is not None else generator

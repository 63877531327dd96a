"""Generation settings: `GenerationConfig` (generation_config.json), defaults and argument checks.

Read by `Generator.generate` before any compute: call arguments > `model.generation_config` (set
by the checkpoint loader from generation_config.json) > `BUILTIN_DEFAULTS` and the model config
(EOS, pad; docs/numerics.md §2.7). Field names and meanings follow transformers' GenerationConfig; every
invalid value raises a ValueError naming the argument and its allowed range.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from idefics2.generation.checks import FLOAT32, is_finite_real, is_int, is_real
from idefics2.model.vision import check_pixel_inputs

logger = logging.getLogger(__name__)

# What a field falls back to when neither the call nor model.generation_config sets it.
# 20 new tokens is what transformers users get by default (its max_length=20).
BUILTIN_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 20, "min_new_tokens": 0, "do_sample": False, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "repetition_penalty": 1.0, "bad_words_ids": [], "stop_strings": [],
    "output_scores": False, "output_logits": False, "return_dict_in_generate": False,
    "num_return_sequences": 1, "no_repeat_ngram_size": 0, "num_beams": 1, "length_penalty": 1.0,
    "early_stopping": False, "remove_invalid_values": False, "output_hidden_states": False,
    "output_attentions": False,
}
_BOOKKEEPING_KEYS = {"_from_model_config", "transformers_version"}


@dataclass
class GenerationConfig:
    """Decoding defaults, named as in a checkpoint's generation_config.json; None = not set here.

    Instruction-tuned Idefics2 checkpoints end a turn with `<end_of_utterance>` (id 32002) as well
    as `</s>`: set `eos_token_id=[2, 32002]` here, or pass `eos_token_id=[2, 32002]` (the CLI
    does, from the processor's ids) or `extra_eos_token_ids=[32002]` (added to the defaults) to
    `generate`.
    """

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    bad_words_ids: list[list[int]] | None = None
    stop_strings: list[str] | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None
    return_dict_in_generate: bool | None = None
    num_return_sequences: int | None = None
    no_repeat_ngram_size: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    remove_invalid_values: bool | None = None
    output_hidden_states: bool | None = None
    output_attentions: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GenerationConfig:
        """Known keys become fields; the rest (max_length, num_beam_groups, ...) is kept in `extra`, unused."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        if isinstance(known.get("stop_strings"), str):
            known["stop_strings"] = [known["stop_strings"]]
        extra = {k: v for k, v in raw.items() if k not in names and k not in _BOOKKEEPING_KEYS}
        if extra:
            logger.debug("generation config: ignoring keys %s", sorted(extra))
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in out.items() if v is not None}}


# transformers' generate options we do not implement, with the value that leaves them off (accepted).
UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "num_beam_groups": 1, "diversity_penalty": 0.0, "constraints": None, "force_words_ids": None,
    "assistant_model": None, "prompt_lookup_num_tokens": None,
}
# Options accepted with any value because they cannot change the result: decoding computes the
# logits of the last position only, whatever `logits_to_keep` asks of `forward`.
IGNORED_OPTIONS = {"logits_to_keep"}


def check_unsupported(options: dict[str, Any]) -> None:
    """A ValueError naming each option `generate` does not take, or takes only switched off."""
    unknown = sorted(set(options) - set(UNSUPPORTED_OPTIONS) - IGNORED_OPTIONS)
    if unknown:
        raise ValueError(f"unknown generate option(s) {unknown}")
    used = sorted(f"{k}={v!r}" for k, v in options.items()
                  if k not in IGNORED_OPTIONS and v != UNSUPPORTED_OPTIONS[k])
    if used:
        raise ValueError(f"generate does not implement {', '.join(used)} (group beam search, constrained "
                         "and assisted decoding); leave them at their defaults")


def load_generation_config(folder: str | os.PathLike[str]) -> GenerationConfig | None:
    """The checkpoint folder's generation_config.json, or None when it has none."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return GenerationConfig.from_dict(raw)


def resolve(model: nn.Module, overrides: dict[str, Any]) -> GenerationConfig:
    """Call arguments > model.generation_config > built-in defaults and the model config."""
    base = getattr(model, "generation_config", None) or GenerationConfig()
    names = [f.name for f in dataclasses.fields(GenerationConfig) if f.name != "extra"]
    values = {name: getattr(base, name) for name in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    text = model.config.text_config
    for name, default in BUILTIN_DEFAULTS.items():
        if values[name] is None:
            values[name] = default
    if values["eos_token_id"] is None:
        values["eos_token_id"] = text.eos_token_id
    if values["pad_token_id"] is None:
        values["pad_token_id"] = text.pad_token_id
    return GenerationConfig(**values)


def _check_lengths(cfg: GenerationConfig) -> None:
    if not is_int(cfg.max_new_tokens) or cfg.max_new_tokens < 1:  # type: ignore[operator]
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {cfg.max_new_tokens!r}")
    if not is_int(cfg.min_new_tokens) or not 0 <= cfg.min_new_tokens <= cfg.max_new_tokens:  # type: ignore[operator]
        raise ValueError(f"min_new_tokens must be an integer in [0, max_new_tokens={cfg.max_new_tokens}], "
                         f"got {cfg.min_new_tokens!r}")
    cfg.max_new_tokens, cfg.min_new_tokens = int(cfg.max_new_tokens), int(cfg.min_new_tokens)  # type: ignore[arg-type]
    n, beams = cfg.num_return_sequences, cfg.num_beams
    if not is_int(beams) or beams < 1:  # type: ignore[operator]
        raise ValueError(f"num_beams must be an integer >= 1 (1 = no beam search), got {beams!r}")
    if not is_int(n) or n < 1:  # type: ignore[operator]
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {n!r}")
    if beams > 1 and n > beams:  # type: ignore[operator]
        raise ValueError(f"num_return_sequences ({n}) must be at most num_beams ({beams})")
    if n > 1 and beams == 1 and not (cfg.do_sample and cfg.temperature != 0):  # type: ignore[operator]
        raise ValueError(f"num_return_sequences={n} needs do_sample=True with a temperature above 0, or "
                         f"num_beams >= {n}: greedy decoding returns the same sequence each time")
    if cfg.early_stopping not in (True, False, "never") or type(cfg.early_stopping) not in (bool, str):
        raise ValueError(f"early_stopping must be True, False or 'never', got {cfg.early_stopping!r}")
    if not is_finite_real(cfg.length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {cfg.length_penalty!r}")
    ngram = cfg.no_repeat_ngram_size
    if not is_int(ngram) or ngram < 0:  # type: ignore[operator]
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), got {ngram!r}")


def _check_sampling(cfg: GenerationConfig) -> None:
    """Temperature: any number >= 0 (0 = greedy, inf = uniform over the allowed ids); one so small that
    the scaled scores overflow float32 gives the greedy token (`sampling.apply_temperature`)."""
    if not is_real(cfg.temperature) or not cfg.temperature >= 0:  # type: ignore[operator]
        raise ValueError(f"temperature must be >= 0 (a number; 0 = greedy), got {cfg.temperature!r}")
    if not is_int(cfg.top_k) or cfg.top_k < 0:  # type: ignore[operator]
        raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k filtering), got {cfg.top_k!r}")
    if not is_real(cfg.top_p) or not 0 < cfg.top_p <= 1:  # type: ignore[operator]
        raise ValueError(f"top_p must be in (0, 1], got {cfg.top_p!r}")
    penalty = cfg.repetition_penalty
    if not is_real(penalty) or not penalty > 0:  # type: ignore[operator]
        raise ValueError(f"repetition_penalty must be > 0 (1 = no penalty), got {penalty!r}")
    if not FLOAT32.tiny <= penalty <= FLOAT32.max:  # type: ignore[operator]
        # float32 turns 1e-300 into 0 (scores / 0 = inf) and 1e300 into inf
        raise ValueError(f"repetition_penalty must be > 0 (1 = no penalty) and within float32's normal range "
                         f"[{FLOAT32.tiny:.3g}, {FLOAT32.max:.3g}], got {penalty!r}")
    for name in ("do_sample", "output_scores", "output_logits", "return_dict_in_generate",
                 "remove_invalid_values", "output_hidden_states", "output_attentions"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}")


def _check_ids(cfg: GenerationConfig, eos_ids: list[int], vocab_size: int) -> None:
    bad_eos = [i for i in eos_ids if not 0 <= i < vocab_size]
    if bad_eos:
        raise ValueError(f"eos_token_id must be token ids in [0, {vocab_size}) (the vocabulary), got {bad_eos}")
    for name in ("pad_token_id", "bos_token_id"):
        value = getattr(cfg, name)
        if value is not None and (not is_int(value) or not 0 <= value < vocab_size):
            raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")
    bad_words = cfg.bad_words_ids or []
    if isinstance(bad_words, (str, bytes)) or not isinstance(bad_words, Sequence):
        raise ValueError(f"bad_words_ids must be a list of lists of token ids, got {bad_words!r}")
    for seq in bad_words:
        if not isinstance(seq, (list, tuple)) or not seq or any(not is_int(i) or not 0 <= i < vocab_size
                                                                for i in seq):
            raise ValueError(f"bad_words_ids must be non-empty lists of token ids in [0, {vocab_size}), got {seq!r}")
    stops = cfg.stop_strings or []
    if not isinstance(stops, Sequence) or any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop_strings must be non-empty strings, got {cfg.stop_strings!r}")


def validate(cfg: GenerationConfig, eos_ids: list[int], vocab_size: int, max_positions: int,
              prompt_length: int) -> None:
    """Every argument checked before any compute; messages name the argument and its allowed range.
    Integers (NumPy ones too) are stored back as Python ints; bools are not numbers here."""
    assert cfg.max_new_tokens is not None and cfg.min_new_tokens is not None
    _check_lengths(cfg)
    _check_sampling(cfg)
    _check_ids(cfg, eos_ids, vocab_size)
    if prompt_length >= max_positions:
        raise ValueError(f"prompt length ({prompt_length} tokens, images included) leaves no room for a new "
                         f"token: text_config.max_position_embeddings is {max_positions}; shorten the prompt "
                         "or use fewer images")
    if prompt_length + cfg.max_new_tokens > max_positions:
        raise ValueError(f"prompt length ({prompt_length}) + max_new_tokens ({cfg.max_new_tokens}) exceeds "
                         f"text_config.max_position_embeddings ({max_positions}): max_new_tokens must be in "
                         f"[1, {max_positions - prompt_length}] for this prompt")


def check_inputs(input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
                  pixel_attention_mask: Tensor | None) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got shape "
                         f"{tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                         f"{tuple(input_ids.shape)} like input_ids")
    real = attention_mask != 0
    if not bool(real.any(dim=1).all()):
        raise ValueError("attention_mask has a row with no real token; every row needs at least one")
    # Masked tokens anywhere are hidden from attention and skipped by the positions, as in transformers;
    # a masked last token still gives the next one (its logits), which is rarely what was meant.
    if not bool(real[:, -1].all()):
        logger.warning("attention_mask ends with padding in some row: generation continues after the padding; "
                       "pad on the left for generation (the processor and tokenizer do by default)")
    if pixel_values is not None:
        check_pixel_inputs(pixel_values, pixel_attention_mask)
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values has batch size {pixel_values.shape[0]} but input_ids has "
                             f"{input_ids.shape[0]}")

"""What each config value may be: its type, its range, finiteness; the standard library only.

`FIELDS` gives a check for every field of the configs of `idefics2.config` (a test keeps the two
in step); `check_fields` raises one ValueError naming the first value that fails its check, then
checks what a sub-config's values must satisfy together (`RULES`: head counts dividing widths).
`check_consistency` checks what spans sub-configs (ids below the vocabulary); it runs only when a
model is built, so that `Idefics2Config()` with transformers' defaults constructs.

Sizes are positive ints (a bool is refused although Python counts it as one) below caps that no
real checkpoint comes near, so that a model is never built with, say, 10^9 layers:

- `MAX_LAYERS` (10,000) for num_hidden_layers and resampler_depth (the largest checkpoints have
  about 130; the checkpoint loader also checks layer counts against the weights);
- `MAX_WIDTH` (2^20) for widths, head counts, head dims, latents and channels (largest real MLP
  widths are about 75,000);
- `MAX_IMAGE_SIDE` (2^16 pixels) for image_size and patch_size (the vision tower holds
  (image_size / patch_size)^2 position embeddings; Idefics2 uses 980);
- `MAX_VOCAB` (2^24) for vocab_size and the token ids (largest real vocabularies are about 260,000);
- `MAX_POSITIONS` (2^30) for max_position_embeddings and sliding_window (the longest contexts are
  about 10^7 tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

MAX_LAYERS = 10_000
MAX_WIDTH = 2**20
MAX_IMAGE_SIDE = 2**16
MAX_VOCAB = 2**24
MAX_POSITIONS = 2**30

# The activations `idefics2.model.layers.ACTIVATIONS` implements (a test keeps the two in step).
ACTIVATION_NAMES = ("gelu", "gelu_new", "gelu_pytorch_tanh", "silu")

# A check returns None when the value is fine, else what the value must be.
Check = Callable[[Any], str | None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    """The value as a finite float, or None when it is no real number (a bool neither) or not finite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def size(cap: int, *, optional: bool = False) -> Check:
    """A positive int at most `cap` (or None when `optional`)."""
    want = f"a positive integer at most {cap}" + (" or null" if optional else "")
    return lambda v: None if (optional and v is None) or (_is_int(v) and 0 < v <= cap) else want


def token_id(*, optional: bool = True, many: bool = False) -> Check:
    """A non-negative int below MAX_VOCAB, or None when `optional`, or a list of them when `many`;
    the range against the vocabulary is checked when a model is built."""
    want = ("null or " if optional else "") + f"a token id (an integer in [0, {MAX_VOCAB}))"
    want += " or a list of them" if many else ""

    def one(v: Any) -> bool:
        return _is_int(v) and 0 <= v < MAX_VOCAB

    def check(v: Any) -> str | None:
        listed = many and isinstance(v, (list, tuple)) and all(map(one, v))
        return None if (optional and v is None) or one(v) or listed else want

    return check


def positive_number(v: Any) -> str | None:
    number = _finite(v)
    return None if number is not None and number > 0 else "a finite number > 0"


def non_negative_number(v: Any) -> str | None:
    number = _finite(v)
    return None if number is not None and number >= 0 else "a finite number >= 0"


def probability(v: Any) -> str | None:
    number = _finite(v)
    return None if number is not None and 0 <= number < 1 else "a number in [0, 1)"


def activation_name(v: Any) -> str | None:
    return None if isinstance(v, str) and v in ACTIVATION_NAMES else f"one of {list(ACTIVATION_NAMES)}"


def flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def dtype_name(v: Any) -> str | None:
    """None, a dtype's name or a torch.dtype (informational: the weights' dtype decides)."""
    ok = v is None or isinstance(v, str) or (type(v).__name__ == "dtype" and type(v).__module__ == "torch")
    return None if ok else "null or a dtype name such as 'bfloat16'"


def sub_config(v: Any) -> str | None:
    return None  # its own checks run when it is made and by the whole config's `validate`


_WIDTH, _LAYERS, _IMAGE = size(MAX_WIDTH), size(MAX_LAYERS), size(MAX_IMAGE_SIDE)
_COMMON = {"hidden_act": activation_name, "attention_dropout": probability, "initializer_range": non_negative_number}

# Class name -> field -> its check.
FIELDS: dict[str, dict[str, Check]] = {
    "VisionConfig": {
        "hidden_size": _WIDTH, "intermediate_size": _WIDTH, "num_hidden_layers": _LAYERS,
        "num_attention_heads": _WIDTH, "num_channels": _WIDTH, "image_size": _IMAGE, "patch_size": _IMAGE,
        "layer_norm_eps": positive_number, **_COMMON,
    },
    "PerceiverConfig": {
        "hidden_size": _WIDTH, "rms_norm_eps": positive_number, "resampler_n_latents": _WIDTH,
        "resampler_depth": _LAYERS, "resampler_n_heads": _WIDTH, "resampler_head_dim": _WIDTH,
        "num_key_value_heads": _WIDTH, **_COMMON,
    },
    "TextConfig": {
        "vocab_size": size(MAX_VOCAB), "hidden_size": _WIDTH, "intermediate_size": _WIDTH,
        "num_hidden_layers": _LAYERS, "num_attention_heads": _WIDTH, "num_key_value_heads": _WIDTH,
        "head_dim": size(MAX_WIDTH, optional=True), "max_position_embeddings": size(MAX_POSITIONS),
        "rms_norm_eps": positive_number, "rope_theta": positive_number,
        "sliding_window": size(MAX_POSITIONS, optional=True), "pad_token_id": token_id(),
        "bos_token_id": token_id(), "eos_token_id": token_id(many=True), "tie_word_embeddings": flag, **_COMMON,
    },
    "Idefics2Config": {
        "vision_config": sub_config, "perceiver_config": sub_config, "text_config": sub_config,
        "image_token_id": token_id(optional=False), "tie_word_embeddings": flag, "use_cache": flag, "dtype": dtype_name,
    },
}


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, shortened; never raises (an int of 10^5000 digits has no repr)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - any repr failure: name the type instead
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_fields(obj: Any) -> None:
    """Raise a ValueError naming the first field of `obj` whose value fails its check, or the
    fields that `RULES` finds inconsistent."""
    owner = type(obj).__name__
    for name, check in FIELDS[owner].items():
        value = getattr(obj, name)
        want = check(value)
        if want is not None:
            raise ValueError(f"{owner}.{name} must be {want}, got {shown(value)}")
    problem = RULES.get(owner, lambda _: None)(obj)
    if problem is not None:
        raise ValueError(problem)


def _divides(part: str, p: int, whole: str, w: int) -> str | None:
    return None if w % p == 0 else f"{part} ({p}) must divide {whole} ({w})"


def _vision_rules(c: Any) -> str | None:
    if c.hidden_size % c.num_attention_heads:
        return (f"vision_config.hidden_size ({c.hidden_size}) must be divisible by "
                f"vision_config.num_attention_heads ({c.num_attention_heads})")
    if c.patch_size > c.image_size:
        return f"vision_config.patch_size ({c.patch_size}) must be at most vision_config.image_size ({c.image_size})"
    return None


def _perceiver_rules(c: Any) -> str | None:
    return _divides("perceiver_config.num_key_value_heads", c.num_key_value_heads,
                    "perceiver_config.resampler_n_heads", c.resampler_n_heads)


def _text_rules(c: Any) -> str | None:
    problem = _divides("text_config.num_key_value_heads", c.num_key_value_heads,
                       "text_config.num_attention_heads", c.num_attention_heads)
    if problem is None and c.head_dim is None and c.hidden_size % c.num_attention_heads:
        problem = (f"text_config.hidden_size ({c.hidden_size}) must be divisible by "
                   f"text_config.num_attention_heads ({c.num_attention_heads}) when head_dim is null")
    if problem is None and c.attention_head_dim % 2:
        given = "" if c.head_dim is not None else " = hidden_size / num_attention_heads"
        problem = (f"text_config.head_dim ({c.attention_head_dim}{given}) must be even: rotary "
                   "embeddings rotate pairs of channels")
    return problem


RULES: dict[str, Callable[[Any], str | None]] = {
    "VisionConfig": _vision_rules, "PerceiverConfig": _perceiver_rules, "TextConfig": _text_rules}


def check_consistency(config: Any) -> None:
    """What the sub-configs of a valid Idefics2Config must satisfy together, for a model to be built."""
    text, perceiver = config.text_config, config.perceiver_config
    if perceiver.hidden_size != text.hidden_size:
        raise ValueError(f"perceiver_config.hidden_size ({perceiver.hidden_size}) must equal "
                         f"text_config.hidden_size ({text.hidden_size}): the perceiver's "
                         "outputs replace token embeddings")
    eos = text.eos_token_id if isinstance(text.eos_token_id, (list, tuple)) else [text.eos_token_id]
    ids = [("image_token_id", config.image_token_id), ("text_config.pad_token_id", text.pad_token_id),
           ("text_config.bos_token_id", text.bos_token_id), *(("text_config.eos_token_id", i) for i in eos)]
    for name, token in ids:
        if token is not None and token >= text.vocab_size:
            raise ValueError(f"{name} ({token}) must be a token id below text_config.vocab_size ({text.vocab_size})")

"""Model configuration: the vision tower, the perceiver resampler, the Mistral decoder and the whole.

Frozen dataclasses whose field names are the keys of an Idefics2 `config.json`. `from_dict` is the
one place that knows the legacy spellings of docs/numerics.md §2.6 (Hub, transformers 4.x and 5.x); keys we do
not model are kept in `extra` and written back, so a load/save round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, TypeVar

logger = logging.getLogger(__name__)

# Keys every transformers version writes for its own bookkeeping; never meaningful to the model.
_BOOKKEEPING_KEYS = {"_attn_implementation_autoset", "_name_or_path", "transformers_version", "model_type"}
# Generic PretrainedConfig fields that v4 serialises inside every sub-config (docs/numerics.md §2.6): dropped.
_V4_GENERIC_KEYS = {
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "architectures", "finetuning_task", "id2label", "label2id",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "problem_type", "torch_dtype", "dtype",
}

C = TypeVar("C", bound="_SubConfig")

# What transformers' Idefics2Config passes to MistralConfig when config.json has no text_config.
IDEFICS2_TEXT_DEFAULTS = {"max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "pad_token_id": 0}


def _require_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class _SubConfig:
    """Shared (de)serialisation: declared fields by name, everything else kept in `extra`."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    model_type: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[C], raw: Mapping[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names and k not in _BOOKKEEPING_KEYS}
        dropped = sorted(k for k in extra if k in _V4_GENERIC_KEYS)
        if dropped:
            logger.debug("%s: ignoring generic keys %s", cls.__name__, dropped)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out, "model_type": self.model_type}


@dataclass(frozen=True)
class VisionConfig(_SubConfig):
    """SigLIP-style vision tower at native resolution (docs/numerics.md §2.2)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    model_type: ClassVar[str] = "idefics2_vision"

    def __post_init__(self) -> None:
        _require_positive(self, "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_channels", "image_size", "patch_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision_config.hidden_size ({self.hidden_size}) must be divisible by "
                             f"vision_config.num_attention_heads ({self.num_attention_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class PerceiverConfig(_SubConfig):
    """Perceiver resampler: `resampler_n_latents` learned queries per image (docs/numerics.md §2.3)."""

    hidden_act: str = "silu"
    hidden_size: int = 4096  # must equal TextConfig.hidden_size
    rms_norm_eps: float = 1e-6  # transformers >= 4.46 default when the key is absent (docs/numerics.md §2.6)
    resampler_n_latents: int = 64
    resampler_depth: int = 3
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    num_key_value_heads: int = 4
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    model_type: ClassVar[str] = "idefics2_perceiver"

    def __post_init__(self) -> None:
        _require_positive(self, "hidden_size", "resampler_n_latents", "resampler_depth",
                          "resampler_n_heads", "resampler_head_dim", "num_key_value_heads")
        if self.resampler_n_heads % self.num_key_value_heads:
            raise ValueError(f"perceiver_config.num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"perceiver_config.resampler_n_heads ({self.resampler_n_heads})")


@dataclass(frozen=True)
class TextConfig(_SubConfig):
    """Mistral decoder (docs/numerics.md §2.4). Defaults are transformers' MistralConfig defaults; a config.json
    without any text_config gets the Idefics2 overrides of `IDEFICS2_TEXT_DEFAULTS` instead."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    model_type: ClassVar[str] = "mistral"

    def __post_init__(self) -> None:
        _require_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text_config.num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"text_config.num_attention_heads ({self.num_attention_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text_config.hidden_size ({self.hidden_size}) must be divisible by "
                             f"text_config.num_attention_heads ({self.num_attention_heads})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"text_config.sliding_window must be positive or null, got {self.sliding_window}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TextConfig:
        raw = dict(raw)
        rope = raw.pop("rope_parameters", None) or raw.pop("rope_scaling", None)
        if isinstance(rope, Mapping):
            if rope.get("rope_type", "default") not in ("default", None):
                raise ValueError(f"text_config rope type {rope.get('rope_type')!r} is not supported; "
                                 "Idefics2 uses plain RoPE ('default')")
            raw.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
        return super().from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # transformers 5.x reads rope_parameters, 4.x reads rope_theta: write both.
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        return out

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Idefics2Config:
    """The whole model. Build from a `config.json` with `from_pretrained` or `from_dict`."""

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    perceiver_config: PerceiverConfig = field(default_factory=PerceiverConfig)
    text_config: TextConfig = field(default_factory=lambda: TextConfig(**IDEFICS2_TEXT_DEFAULTS))
    image_token_id: int = 32001
    tie_word_embeddings: bool = False
    use_cache: bool = True
    dtype: str | None = None  # the checkpoint's declared dtype; informational
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.perceiver_config.hidden_size != self.text_config.hidden_size:
            raise ValueError(f"perceiver_config.hidden_size ({self.perceiver_config.hidden_size}) must equal "
                             f"text_config.hidden_size ({self.text_config.hidden_size}): the perceiver's "
                             "outputs replace token embeddings")
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(f"image_token_id ({self.image_token_id}) must be a token id below "
                             f"text_config.vocab_size ({self.text_config.vocab_size})")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, perceiver_eps_from_text: bool = False) -> Idefics2Config:
        """Parse a config.json dict, accepting the Hub, transformers 4.x and 5.x spellings.

        `perceiver_eps_from_text=True` reproduces transformers <= 4.45, whose perceiver RMSNorms
        used `text_config.rms_norm_eps` (docs/numerics.md §2.6); the default follows 4.46+ and 5.x.
        """
        raw = dict(raw)
        text = TextConfig.from_dict(raw.pop("text_config", None) or IDEFICS2_TEXT_DEFAULTS)
        vision = VisionConfig.from_dict(raw.pop("vision_config", None) or {})
        perceiver_raw = dict(raw.pop("perceiver_config", None) or {})
        if perceiver_eps_from_text:
            perceiver_raw["rms_norm_eps"] = text.rms_norm_eps
        perceiver = PerceiverConfig.from_dict(perceiver_raw)
        if perceiver.hidden_size != text.hidden_size:
            # transformers' sync rule: the text width wins and brings its eps along.
            logger.warning("perceiver_config.hidden_size (%d) != text_config.hidden_size (%d): using the "
                           "text values for hidden_size and rms_norm_eps", perceiver.hidden_size, text.hidden_size)
            perceiver = dataclasses.replace(perceiver, hidden_size=text.hidden_size, rms_norm_eps=text.rms_norm_eps)
        dtype = raw.pop("dtype", None) or raw.pop("torch_dtype", None)
        raw.pop("torch_dtype", None)
        known = {k: raw.pop(k) for k in ("image_token_id", "tie_word_embeddings", "use_cache") if k in raw}
        extra = {k: v for k, v in raw.items() if k not in _BOOKKEEPING_KEYS}
        return cls(vision_config=vision, perceiver_config=perceiver, text_config=text, dtype=dtype,
                   extra=extra, **known)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra,
            "architectures": self.extra.get("architectures", ["Idefics2ForConditionalGeneration"]),
            "model_type": "idefics2",
            "image_token_id": self.image_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": self.use_cache,
            "vision_config": self.vision_config.to_dict(),
            "perceiver_config": self.perceiver_config.to_dict(),
            "text_config": self.text_config.to_dict(),
        }
        if self.dtype is not None:
            out["dtype"] = self.dtype
        return out

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], **kwargs: Any) -> Idefics2Config:
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"no config.json in {os.fspath(folder)!r}: expected a Hub-layout checkpoint folder")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **kwargs)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

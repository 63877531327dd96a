"""Model configuration: the vision tower, the perceiver resampler, the Mistral decoder and the whole.

Dataclasses whose field names are the keys of an Idefics2 `config.json`, used as transformers'
configs are: constructed with keywords (sub-configs as objects or dicts), read and assigned as
attributes. Keys we do not model, from a file, a keyword or an assignment, are kept in `extra`
(readable as attributes) and written back, so a load/save round trip loses nothing. `from_dict`
is the one place that knows the legacy spellings of docs/numerics.md §2.6 (Hub, transformers 4.x
and 5.x). Values are checked when a sub-config is made and again, with the checks that span
several of them (image_token_id against the vocabulary), by `validate` when a model is built:
every value for type, range and finiteness (the rules and the caps on sizes are in
`idefics2.config_checks`), each refusal one ValueError naming the field, and the file when read
from one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, TypeVar

from idefics2.config_checks import check_consistency, check_fields, shown

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


class ConfigNotFoundError(FileNotFoundError, ValueError):
    """No config.json where one was asked for: an OSError as transformers raises, and a ValueError
    as every other refusal of this package."""


C = TypeVar("C", bound="_SubConfig")
T = TypeVar("T")

_MISSING = object()

# What transformers' Idefics2Config passes to MistralConfig when config.json has no text_config.
IDEFICS2_TEXT_DEFAULTS = {"max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "pad_token_id": 0}


def _mapping(raw: Any, what: str) -> Mapping[str, Any]:
    if isinstance(raw, Mapping):
        return raw
    raise ValueError(f"{what} must be a dict (a JSON object), got {type(raw).__name__}: {shown(raw)}")


def config_class(cls: type[T]) -> type[T]:
    """A dataclass whose constructor also takes keywords it has no field for: they go to `extra`,
    as transformers' configs keep any keyword as an attribute."""
    cls = dataclass(cls)
    names = frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        extra = dict(_mapping(kwargs.pop("extra", None) or {}, f"{cls.__name__} extra"))
        extra.update({key: kwargs.pop(key) for key in list(kwargs) if key not in names})
        init(self, *args, extra=extra, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.field_names = names  # type: ignore[attr-defined]
    return cls


class _ConfigAttributes:
    """Attribute access to `extra`: reading a key kept there, assigning a name that is no field."""

    field_names: ClassVar[frozenset[str]] = frozenset()

    def __getattr__(self, name: str) -> Any:  # called only when no field or method has the name
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.field_names or name.startswith("_") or hasattr(type(self), name):
            object.__setattr__(self, name, value)  # a property without a setter raises here
        else:
            self.extra[name] = value  # type: ignore[attr-defined]


@config_class
class _SubConfig(_ConfigAttributes):
    """Shared (de)serialisation: declared fields by name, everything else kept in `extra`."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    model_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first impossible value (`config_checks.check_fields`)."""
        check_fields(self)

    @classmethod
    def from_dict(cls: type[C], raw: Mapping[str, Any]) -> C:
        raw = _mapping(raw, cls.__name__)
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

    def to_diff_dict(self) -> dict[str, Any]:
        """`to_dict` without the values equal to this class's defaults (`model_type` always kept)."""
        default = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "model_type" or default.get(k, _MISSING) != v}


@config_class
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@config_class
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


@config_class
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

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TextConfig:
        raw = dict(_mapping(raw, cls.__name__))
        rope = raw.pop("rope_parameters", None)
        if rope is None or rope == {}:
            rope = raw.pop("rope_scaling", None)
        if rope is not None:
            rope = _mapping(rope, "text_config.rope_parameters")
            if rope.get("rope_type", "default") not in ("default", None):
                raise ValueError(f"text_config rope type {shown(rope.get('rope_type'))} is not supported; "
                                 "Idefics2 uses plain RoPE ('default')")
            if raw.get("rope_theta") is None:
                raw["rope_theta"] = rope.get("rope_theta", cls.rope_theta)
        return super().from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # transformers 5.x reads rope_parameters, 4.x reads rope_theta: write both.
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        return out

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads


def _sub_config(value: Any, cls: type[C], name: str, default: Mapping[str, Any] | None = None) -> C:
    """A sub-config given as an object, a dict (missing keys take `cls`'s defaults) or None (`default`)."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls.from_dict(default or {})
    if isinstance(value, Mapping):
        return cls.from_dict(value)
    raise ValueError(f"{name} must be a {cls.__name__}, a dict or None, got {type(value).__name__}")


@config_class
class Idefics2Config(_ConfigAttributes):
    """The whole model, as transformers' `Idefics2Config` takes it: `Idefics2Config()` gives its
    defaults; sub-configs may be objects or dicts; other keywords are kept as attributes.

    A text_config left out gets the Idefics2 defaults of `IDEFICS2_TEXT_DEFAULTS`, one given as a
    dict the Mistral defaults for what it leaves out (as in transformers). A perceiver width that
    differs from the text width is set to it, with the text's eps, as transformers does.
    """

    vision_config: VisionConfig = None  # type: ignore[assignment]  # None or a dict: converted on init
    perceiver_config: PerceiverConfig = None  # type: ignore[assignment]
    text_config: TextConfig = None  # type: ignore[assignment]
    image_token_id: int = 32001
    tie_word_embeddings: bool = False
    use_cache: bool = True
    dtype: str | None = None  # the checkpoint's declared dtype; informational
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    model_type: ClassVar[str] = "idefics2"
    is_encoder_decoder: ClassVar[bool] = False
    sub_configs: ClassVar[dict[str, type]] = {
        "text_config": TextConfig, "vision_config": VisionConfig, "perceiver_config": PerceiverConfig}

    def __post_init__(self) -> None:
        self.vision_config = _sub_config(self.vision_config, VisionConfig, "vision_config")
        self.perceiver_config = _sub_config(self.perceiver_config, PerceiverConfig, "perceiver_config")
        self.text_config = _sub_config(self.text_config, TextConfig, "text_config", IDEFICS2_TEXT_DEFAULTS)
        text, perceiver = self.text_config, self.perceiver_config
        if perceiver.hidden_size != text.hidden_size:
            # transformers' sync rule: the text width wins and brings its eps along.
            logger.warning("perceiver_config.hidden_size (%d) != text_config.hidden_size (%d): using the "
                           "text values for hidden_size and rms_norm_eps", perceiver.hidden_size, text.hidden_size)
            perceiver.hidden_size, perceiver.rms_norm_eps = text.hidden_size, text.rms_norm_eps
        check_fields(self)

    def validate(self) -> None:
        """Every check, the sub-configs' included; run when a model is built from this config, so
        that values assigned since construction are checked too."""
        for name, cls in self.sub_configs.items():
            sub = getattr(self, name)
            if isinstance(sub, cls):
                sub.validate()
            else:
                raise ValueError(  # noqa: TRY004 - every refusal of a config value is a ValueError
                    f"{name} must be a {cls.__name__}, got {type(sub).__name__}: {shown(sub)}")
        check_fields(self)
        check_consistency(self)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> TextConfig:
        """The decoder's config (transformers' name for it)."""
        return self.text_config

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, perceiver_eps_from_text: bool = False,
                  **overrides: Any) -> Idefics2Config:
        """Parse a config.json dict, accepting the Hub, transformers 4.x and 5.x spellings, then set
        `overrides` (attributes the config has, e.g. `use_cache=False`; others are refused).

        `perceiver_eps_from_text=True` reproduces transformers <= 4.45, whose perceiver RMSNorms
        used `text_config.rms_norm_eps` (docs/numerics.md §2.6); the default follows 4.46+ and 5.x.
        """
        raw = dict(_mapping(raw, "an Idefics2 config"))
        sub_raw = {name: raw.pop(name, None) for name in cls.sub_configs}
        sub_raw = {name: {} if value is None else _mapping(value, name) for name, value in sub_raw.items()}
        text = TextConfig.from_dict(sub_raw["text_config"] or IDEFICS2_TEXT_DEFAULTS)
        vision = VisionConfig.from_dict(sub_raw["vision_config"])
        perceiver_raw = dict(sub_raw["perceiver_config"])
        if perceiver_eps_from_text:
            perceiver_raw["rms_norm_eps"] = text.rms_norm_eps
        perceiver = PerceiverConfig.from_dict(perceiver_raw)
        dtype = raw.pop("dtype", None) or raw.pop("torch_dtype", None)
        raw.pop("torch_dtype", None)
        known = {k: raw.pop(k) for k in ("image_token_id", "tie_word_embeddings", "use_cache") if k in raw}
        extra = {k: v for k, v in raw.items() if k not in _BOOKKEEPING_KEYS}
        config = cls(vision_config=vision, perceiver_config=perceiver, text_config=text, dtype=dtype,
                     extra=extra, **known)
        for name, value in overrides.items():
            if not hasattr(config, name):
                raise ValueError(f"unknown Idefics2Config option {name!r}: expected one of its fields "
                                 f"({', '.join(sorted(config.field_names - {'extra'}))}) or a key of config.json")
            setattr(config, name, value)
        if overrides:
            config.__post_init__()  # converts sub-configs given as dicts, checks the values set
        return config

    def to_dict(self) -> dict[str, Any]:
        """config.json as a dict: every value, the sub-configs' included."""
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

    def to_diff_dict(self) -> dict[str, Any]:
        """`to_dict` without what equals the defaults: of `Idefics2Config()` at the top, of each
        sub-config's class inside (as transformers writes it)."""
        default = Idefics2Config().to_dict()
        out = {k: v for k, v in self.to_dict().items()
               if k not in self.sub_configs and default.get(k, _MISSING) != v}
        out.update({name: getattr(self, name).to_diff_dict() for name in self.sub_configs})
        return {**out, "model_type": self.model_type}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike[str], use_diff: bool = True) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string(use_diff))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> Idefics2Config:
        """A config.json file; `kwargs` as `from_dict` takes them. A file that is no JSON object of
        valid values is a ValueError naming the file and the field."""
        with open(path, encoding="utf-8") as f:
            try:
                return cls.from_dict(json.load(f), **kwargs)
            except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError too
                raise ValueError(f"{os.fspath(path)}: {error}") from error

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], *, subfolder: str = "", **kwargs: Any) -> Idefics2Config:
        """config.json of a checkpoint folder (or of its `subfolder`); `kwargs` as `from_dict` takes them."""
        path = os.path.join(folder, subfolder, "config.json")
        if not os.path.isfile(path):
            raise ConfigNotFoundError(f"no config.json in {os.path.join(folder, subfolder)!r}: expected a "
                                      "Hub-layout checkpoint folder")
        return cls.from_json_file(path, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        os.makedirs(folder, exist_ok=True)
        self.to_json_file(os.path.join(folder, "config.json"), use_diff=False)

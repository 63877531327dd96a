"""Hostile config values: each refusal is one ValueError naming the field (and the file when read from
one), before any weight is allocated; what is accepted builds a model."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idefics2 import Idefics2Config, Idefics2Model
from idefics2.config import PerceiverConfig, TextConfig, VisionConfig
from idefics2.config_checks import ACTIVATION_NAMES, FIELDS, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH
from idefics2.model.layers import ACTIVATIONS
from tests.conftest import tiny_config_dict

SUB = {"vision_config": VisionConfig, "perceiver_config": PerceiverConfig, "text_config": TextConfig}
ALL_NAMES = {name for fields in FIELDS.values() for name in fields} | set(SUB) | {"rope_parameters", "rope_scaling"}


def _with(path: str, value: Any, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tiny config dict with `path` ("text_config.rope_theta" or "image_token_id") set to `value`."""
    raw = copy.deepcopy(raw or tiny_config_dict())
    *parents, name = path.split(".")
    target = raw
    for parent in parents:
        target = target[parent]
    target[name] = value
    return raw


def _validated(raw: Any) -> Idefics2Config:
    config = Idefics2Config.from_dict(raw)
    config.validate()
    return config


def test_every_field_has_a_check_and_every_activation_name_is_implemented() -> None:
    for cls in (*SUB.values(), Idefics2Config):
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        assert set(FIELDS[cls.__name__]) == fields, cls.__name__
    assert set(ACTIVATION_NAMES) == set(ACTIVATIONS)


def test_defaults_and_tiny_configs_are_accepted() -> None:
    """`Idefics2Config()` constructs with transformers' defaults; its image_token_id (32001) is only
    refused against a 32000-token vocabulary when a model is built."""
    Idefics2Config()
    for cls in SUB.values():
        cls().validate()
    with pytest.raises(ValueError, match=r"image_token_id \(32001\) must be a token id below"):
        Idefics2Config().validate()
    _validated(tiny_config_dict())
    # JSON spellings of valid values: an int where a float is meant, null windows, several EOS ids
    raw = _with("text_config.rope_theta", 10000, _with("text_config.rms_norm_eps", 1))
    raw = _with("text_config.sliding_window", None, _with("text_config.eos_token_id", [2, 3], raw))
    config = _validated(_with("vision_config.attention_dropout", 0, _with("text_config.initializer_range", 0, raw)))
    assert config.text_config.rope_theta == 10000 and config.text_config.eos_token_id == [2, 3]


@pytest.mark.parametrize("path, value, message", [
    # the cases of the hardening issue
    ("text_config.head_dim", -8, r"TextConfig.head_dim must be a positive integer .*got -8"),
    ("text_config.rms_norm_eps", math.nan, r"TextConfig.rms_norm_eps must be a finite number > 0, got nan"),
    ("perceiver_config.rms_norm_eps", math.nan, r"PerceiverConfig.rms_norm_eps must be a finite number > 0"),
    ("vision_config.layer_norm_eps", 0.0, r"VisionConfig.layer_norm_eps must be a finite number > 0, got 0.0"),
    ("text_config.rope_theta", 0, r"TextConfig.rope_theta must be a finite number > 0, got 0"),
    ("text_config.rope_theta", -1, r"TextConfig.rope_theta must be a finite number > 0, got -1"),
    ("text_config.rope_theta", math.nan, r"TextConfig.rope_theta must be a finite number > 0, got nan"),
    ("text_config.rope_theta", math.inf, r"TextConfig.rope_theta must be a finite number > 0, got inf"),
    ("text_config.rope_theta", 10**400, r"TextConfig.rope_theta must be a finite number > 0"),
    ("text_config.rope_parameters", {"rope_theta": -1.0}, r"TextConfig.rope_theta must be a finite number > 0"),
    ("text_config.rope_parameters", [10000.0], r"text_config.rope_parameters must be a dict .*got list"),
    ("text_config.sliding_window", 0.5, r"TextConfig.sliding_window must be a positive integer .*or null, got 0.5"),
    ("text_config.sliding_window", 0, r"TextConfig.sliding_window must be a positive integer"),
    ("text_config.sliding_window", True, r"TextConfig.sliding_window must be a positive integer .*got True"),
    ("text_config.hidden_act", ["silu"], r"TextConfig.hidden_act must be one of \['gelu', .*got \['silu'\]"),
    ("vision_config.hidden_act", "relu", r"VisionConfig.hidden_act must be one of .*got 'relu'"),
    ("perceiver_config.hidden_act", None, r"PerceiverConfig.hidden_act must be one of"),
    # sizes: positive ints, no bools, under the caps
    ("vision_config.hidden_size", True, r"VisionConfig.hidden_size must be a positive integer .*got True"),
    ("vision_config.patch_size", 4.0, r"VisionConfig.patch_size must be a positive integer"),
    ("vision_config.image_size", 2, r"vision_config.patch_size \(4\) must be at most vision_config.image_size \(2\)"),
    ("text_config.num_hidden_layers", 10**9,
     rf"TextConfig.num_hidden_layers must be a positive integer at most {MAX_LAYERS}, got 1000000000"),
    ("perceiver_config.resampler_depth", 10**6, r"PerceiverConfig.resampler_depth must be .* at most 10000"),
    ("text_config.hidden_size", 2**40, rf"TextConfig.hidden_size must be a positive integer at most {MAX_WIDTH}"),
    ("text_config.vocab_size", 10**12, rf"TextConfig.vocab_size must be a positive integer at most {MAX_VOCAB}"),
    ("text_config.max_position_embeddings", 10**15, r"TextConfig.max_position_embeddings must be a positive"),
    pytest.param("text_config.intermediate_size", 10**5000,  # too long for repr: named by its type
                 r"TextConfig.intermediate_size must be a positive integer .*got <int>", id="int-of-5000-digits"),
    ("text_config.head_dim", 7, r"text_config.head_dim \(7\) must be even"),
    ("text_config.num_attention_heads", 5,
     r"text_config.num_key_value_heads \(2\) must divide text_config.num_attention_heads \(5\)"),
    # probabilities, ranges, flags, ids
    ("vision_config.attention_dropout", 1.0, r"VisionConfig.attention_dropout must be a number in \[0, 1\), got 1.0"),
    ("text_config.attention_dropout", -0.1, r"TextConfig.attention_dropout must be a number in \[0, 1\)"),
    ("perceiver_config.initializer_range", -0.02, r"PerceiverConfig.initializer_range must be a finite number >= 0"),
    ("text_config.initializer_range", math.nan, r"TextConfig.initializer_range must be a finite number >= 0"),
    ("tie_word_embeddings", "yes", r"Idefics2Config.tie_word_embeddings must be true or false, got 'yes'"),
    ("use_cache", 1, r"Idefics2Config.use_cache must be true or false, got 1"),
    ("dtype", 16, r"Idefics2Config.dtype must be null or a dtype name"),
    ("image_token_id", -1, r"Idefics2Config.image_token_id must be a token id .*got -1"),
    ("image_token_id", None, r"Idefics2Config.image_token_id must be a token id .*got None"),
    ("text_config.pad_token_id", "0", r"TextConfig.pad_token_id must be null or a token id"),
    ("text_config.eos_token_id", [2, "3"], r"TextConfig.eos_token_id must be null or a token id .*or a list of them"),
    # checks against the vocabulary run when a model is built
    ("image_token_id", 120, r"image_token_id \(120\) must be a token id below text_config.vocab_size \(120\)"),
    ("text_config.pad_token_id", 500, r"text_config.pad_token_id \(500\) must be a token id below"),
    ("text_config.eos_token_id", [2, 999], r"text_config.eos_token_id \(999\) must be a token id below"),
    # sub-configs that are no dicts
    ("vision_config", [1, 2], r"vision_config must be a dict \(a JSON object\), got list"),
    ("text_config", [], r"text_config must be a dict \(a JSON object\), got list"),
    ("perceiver_config", "big", r"perceiver_config must be a dict \(a JSON object\), got str"),
])
def test_each_hostile_value_is_one_value_error_naming_the_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _validated(_with(path, value))


@pytest.mark.parametrize("raw", [[1, 2], [["image_token_id", 3]], "config", 3, None])
def test_a_config_that_is_no_dict_is_refused(raw: Any) -> None:
    """A list of pairs would pass `dict(raw)`; it is refused like any other list."""
    with pytest.raises(ValueError, match=r"an Idefics2 config must be a dict \(a JSON object\), got "):
        Idefics2Config.from_dict(raw)
    with pytest.raises(ValueError, match=r"TextConfig must be a dict \(a JSON object\)"):
        TextConfig.from_dict(raw)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", r"an Idefics2 config must be a dict \(a JSON object\), got list"),
    ('{"text_config": {"rope_theta": NaN}}', r"TextConfig.rope_theta must be a finite number > 0, got nan"),
    ('{"vision_config": [1]}', r"vision_config must be a dict"),
    ('{"text_config": {"hidden_act": ["silu"]}}', r"TextConfig.hidden_act must be one of"),
    ('{"text_config": ', r"Expecting value"),
    ("[" * 100_000 + "]" * 100_000, r"recursion"),
])
def test_a_hostile_config_file_is_a_value_error_naming_the_file_and_the_field(tmp_path: Path, text: str,
                                                                              message: str) -> None:
    (tmp_path / "config.json").write_text(text, encoding="utf-8")
    for read in (Idefics2Config.from_pretrained, lambda folder: Idefics2Config.from_json_file(folder / "config.json")):
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + ": .*" + message):
            read(tmp_path)


def test_values_assigned_or_overridden_later_are_checked_before_any_weight_is_allocated() -> None:
    config = Idefics2Config.from_dict(tiny_config_dict())
    config.text_config.rope_theta = math.nan
    with pytest.raises(ValueError, match="TextConfig.rope_theta must be a finite number > 0, got nan"):
        Idefics2Model(config)
    config = Idefics2Config.from_dict(tiny_config_dict())
    config.text_config.num_hidden_layers = 10**9  # would take forever to build
    with pytest.raises(ValueError, match="TextConfig.num_hidden_layers must be a positive integer at most"):
        Idefics2Model(config)
    config.text_config = [1]
    with pytest.raises(ValueError, match="text_config must be a TextConfig, got list"):
        Idefics2Model(config)
    with pytest.raises(ValueError, match="Idefics2Config.image_token_id must be a token id"):
        Idefics2Config.from_dict(tiny_config_dict(), image_token_id=-3)
    overridden = Idefics2Config.from_dict(tiny_config_dict(), vision_config={"hidden_size": 16, "num_attention_heads": 2})
    assert isinstance(overridden.vision_config, VisionConfig) and overridden.vision_config.hidden_size == 16
    with pytest.raises(ValueError, match=r"VisionConfig extra must be a dict"):
        VisionConfig(extra=[1])


# ---------------------------------------------------------------------------------------------------
# Property-based: random types and values per field, nested sub-config dicts, lists instead of dicts.

FIELD_PATHS = sorted([f"{sub}.{name}" for sub, cls in SUB.items() for name in FIELDS[cls.__name__]]
                     + [name for name in FIELDS["Idefics2Config"]]
                     + ["text_config.rope_parameters", "text_config.rope_scaling"])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 130),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1e-6, -0.0, 1e308, 5e-324, 10**400]),
    st.text(max_size=4), st.sampled_from([*ACTIVATION_NAMES, "relu", "bfloat16", "default", "linear"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(sorted(ALL_NAMES | {"rope_type", "rope_theta", "x"})),
                                        inner, max_size=4), max_leaves=8)


def _names_a_field(message: str) -> bool:
    return any(name in message for name in ALL_NAMES) or "Idefics2 config" in message


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(FIELD_PATHS), value=values)
def test_one_hostile_field_is_refused_naming_it_or_builds(path: str, value: Any) -> None:
    field = path.split(".")[-1]
    try:
        config = _validated(_with(path, value))
    except ValueError as error:
        message = str(error)
        named = [field] + (["rope"] if field.startswith("rope_") else [])
        named += [f"{SUB[field].__name__}.", f"{field}."] if field in SUB else []  # a field inside it
        assert any(name in message for name in named), message
        return
    widths = [getattr(sub, name) for sub in (config.vision_config, config.text_config, config.perceiver_config)
              for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "resampler_depth",
                           "resampler_n_latents", "image_size", "vocab_size") if name in sub.field_names]
    if max(widths) <= 256 and config.vision_config.num_patches_per_side <= 16:
        Idefics2Model(config)  # what is accepted builds


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(values, st.dictionaries(st.sampled_from(sorted(SUB)), values, max_size=3)))
def test_any_json_like_value_is_a_config_or_a_value_error_naming_a_field(raw: Any) -> None:
    try:
        _validated(raw)
    except ValueError as error:
        assert _names_a_field(str(error)), str(error)
    if isinstance(raw, dict):
        try:
            Idefics2Config(**{k: v for k, v in raw.items()}).validate()
        except ValueError as error:
            assert _names_a_field(str(error)), str(error)

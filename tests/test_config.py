"""Config parsing: every spelling of docs/numerics.md §2.6, round trips, and errors that name the field."""

from __future__ import annotations

import dataclasses
import json

import pytest
import transformers

from idefics2 import Idefics2Config, Idefics2Model
from idefics2.config import PerceiverConfig, TextConfig, VisionConfig

HUB_LIKE = {  # the Hub's layout: "idefics2" inside the sub-configs, no perceiver eps, v4 generic keys
    "architectures": ["Idefics2ForConditionalGeneration"],
    "model_type": "idefics2",
    "image_token_id": 32001,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.40.0.dev0",
    "vocab_size": 32003,
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "idefics2",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "num_beams": 1,
                      "bad_words_ids": None},
    "perceiver_config": {"model_type": "idefics2", "resampler_depth": 3, "resampler_head_dim": 96,
                         "resampler_n_heads": 16, "resampler_n_latents": 64, "num_key_value_heads": 4},
    "text_config": {"model_type": "mistral", "vocab_size": 32003, "rope_theta": 10000.0, "sliding_window": 4096,
                    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5},
}


def test_hub_like_config_resolves_like_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    ours = Idefics2Config.from_dict(HUB_LIKE)
    theirs = transformers.Idefics2Config(**json.loads(json.dumps(HUB_LIKE)))
    assert ours.perceiver_config.rms_norm_eps == theirs.perceiver_config.rms_norm_eps == 1e-6
    for sub in ("vision_config", "perceiver_config", "text_config"):
        for f in dataclasses.fields(getattr(ours, sub)):
            if f.name in ("extra", "head_dim", "rope_theta"):
                continue
            assert getattr(getattr(ours, sub), f.name) == getattr(getattr(theirs, sub), f.name), (sub, f.name)
    assert ours.text_config.rope_theta == theirs.text_config.rope_parameters["rope_theta"]
    assert ours.dtype == "float32"
    assert ours.vision_config.num_patches_per_side == 70 and ours.vision_config.head_dim == 72


def test_legacy_perceiver_eps_flag_uses_the_text_eps() -> None:
    assert Idefics2Config.from_dict(HUB_LIKE, perceiver_eps_from_text=True).perceiver_config.rms_norm_eps == 1e-5


def test_rope_parameters_and_dtype_spellings_are_equivalent() -> None:
    v5 = {**HUB_LIKE, "dtype": "bfloat16", "text_config": {**HUB_LIKE["text_config"], "rope_theta": None}}
    v5.pop("torch_dtype")
    v5["text_config"].pop("rope_theta")
    v5["text_config"]["rope_parameters"] = {"rope_theta": 12345.0, "rope_type": "default"}
    config = Idefics2Config.from_dict(v5)
    assert config.text_config.rope_theta == 12345.0 and config.dtype == "bfloat16"


def test_round_trip_keeps_unknown_keys_and_values(tmp_path) -> None:  # noqa: ANN001
    config = Idefics2Config.from_dict({**HUB_LIKE, "my_custom_key": [1, 2]})
    config.save_pretrained(tmp_path)
    again = Idefics2Config.from_pretrained(tmp_path)
    assert again == config
    assert again.extra["my_custom_key"] == [1, 2] and again.extra["vocab_size"] == 32003
    assert again.vision_config.extra["num_beams"] == 1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["text_config"]["rope_parameters"]["rope_theta"] == 10000.0
    assert saved["vision_config"]["model_type"] == "idefics2_vision"


def test_what_we_write_loads_in_transformers_with_the_same_values(tmp_path) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    Idefics2Config.from_dict(HUB_LIKE).save_pretrained(tmp_path)
    theirs = transformers.Idefics2Config.from_pretrained(tmp_path)
    assert theirs.vision_config.hidden_size == 1152 and theirs.perceiver_config.rms_norm_eps == 1e-6
    assert theirs.text_config.vocab_size == 32003 and theirs.text_config.rope_parameters["rope_theta"] == 10000.0


def test_mismatched_perceiver_width_follows_the_text_config_with_its_eps() -> None:
    raw = {**HUB_LIKE, "perceiver_config": {"hidden_size": 64}}
    config = Idefics2Config.from_dict(raw)
    assert config.perceiver_config.hidden_size == 4096 and config.perceiver_config.rms_norm_eps == 1e-5


@pytest.mark.parametrize("build, message", [
    (lambda: TextConfig(num_attention_heads=32, num_key_value_heads=5), r"text_config.num_key_value_heads \(5\)"),
    (lambda: TextConfig(hidden_size=100, num_attention_heads=32), r"text_config.hidden_size \(100\)"),
    (lambda: VisionConfig(hidden_size=100, num_attention_heads=16), r"vision_config.hidden_size \(100\)"),
    (lambda: PerceiverConfig(resampler_n_heads=4, num_key_value_heads=8),
     r"perceiver_config.num_key_value_heads \(8\)"),
    (lambda: TextConfig(vocab_size=0), r"TextConfig.vocab_size must be a positive integer"),
    # checks that span sub-configs run where a model is built, as assigned values must pass them too
    (lambda: Idefics2Model(Idefics2Config(image_token_id=40000)), r"image_token_id \(40000\)"),
    (lambda: Idefics2Model(_assigned(Idefics2Config(), "text_config.num_key_value_heads", 5)),
     r"text_config.num_key_value_heads \(5\)"),
])
def test_impossible_values_raise_a_value_error_naming_the_field(build, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        build()


def test_missing_config_file_is_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    """An OSError for a path that does not exist, as transformers raises, and a ValueError like our
    other refusals. A folder without config.json is refused too (transformers returns its defaults)."""
    for folder in (tmp_path, tmp_path / "missing"):
        for error in (ValueError, OSError):
            with pytest.raises(error, match="no config.json"):
                Idefics2Config.from_pretrained(folder)
    with pytest.raises(OSError):
        transformers.Idefics2Config.from_pretrained(tmp_path / "missing")


def test_from_json_file_and_a_subfolder_read_what_transformers_reads(tmp_path) -> None:  # noqa: ANN001
    """Neither existed: transformers' ConfigTester reads a config both ways."""
    Idefics2Config.from_dict(HUB_LIKE).save_pretrained(tmp_path / "sub")
    ours = Idefics2Config.from_pretrained(tmp_path, subfolder="sub", image_token_id=7)
    theirs = transformers.Idefics2Config.from_pretrained(tmp_path, subfolder="sub")
    assert ours.image_token_id == 7 and theirs.text_config.vocab_size == ours.text_config.vocab_size == 32003
    from_file = Idefics2Config.from_json_file(tmp_path / "sub" / "config.json")
    assert from_file.to_dict() == Idefics2Config.from_dict(HUB_LIKE).to_dict()


def _assigned(config: Idefics2Config, path: str, value: object) -> Idefics2Config:
    *parents, name = path.split(".")
    target = config
    for parent in parents:
        target = getattr(target, parent)
    setattr(target, name, value)
    return config


def _oracle_dict(config: transformers.PretrainedConfig) -> dict:
    """The reference's config.json values, without its bookkeeping."""
    out = config.to_dict()
    out.pop("transformers_version", None)
    return out


def _ours_dict(config: Idefics2Config) -> dict:
    return Idefics2Config.from_dict(config.to_dict()).to_dict()


def test_default_constructor_gives_transformers_defaults() -> None:
    """`Idefics2Config()` constructs (its image_token_id is checked only against a model's vocabulary)."""
    ours, reference = Idefics2Config(), transformers.Idefics2Config()
    assert ours.image_token_id == reference.image_token_id == 32001
    for name in ("vision_config", "perceiver_config", "text_config"):
        theirs = getattr(reference, name)
        for key, value in getattr(ours, name).to_dict().items():
            if key in ("model_type", "rope_parameters", "head_dim") or not hasattr(theirs, key):
                continue
            assert getattr(theirs, key) == value, f"{name}.{key}"
    # ours keeps head_dim None (derived from the width); the reference writes the derived value
    assert ours.text_config.attention_head_dim == reference.text_config.head_dim == 128


def test_sub_configs_as_dicts_and_keyword_extras_like_transformers() -> None:
    kwargs = {"vision_config": {"hidden_size": 32, "num_attention_heads": 4, "model_type": "idefics2"},
              "text_config": {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 120,
                              "model_type": "mistral"},
              "perceiver_config": {"hidden_size": 64}, "use_cache": False, "image_token_id": 100, "foo": 3}
    ours, reference = Idefics2Config(**kwargs), transformers.Idefics2Config(**kwargs)
    assert isinstance(ours.vision_config, VisionConfig) and ours.vision_config.hidden_size == 32
    # a text_config dict takes the Mistral defaults for what it leaves out, as the reference does
    assert ours.text_config.max_position_embeddings == reference.text_config.max_position_embeddings == 131072
    # the perceiver follows the text width and eps, as the reference does
    assert ours.perceiver_config.hidden_size == reference.perceiver_config.hidden_size == 48
    assert ours.perceiver_config.rms_norm_eps == reference.perceiver_config.rms_norm_eps
    assert ours.foo == reference.foo == 3 and ours.to_dict()["foo"] == 3
    assert not ours.use_cache and ours.get_text_config() is ours.text_config
    assert ours.is_encoder_decoder is reference.is_encoder_decoder is False
    assert set(ours.sub_configs) == set(reference.sub_configs)
    with pytest.raises(ValueError, match="text_config must be a TextConfig, a dict or None, got int"):
        Idefics2Config(text_config=3)


def test_attributes_can_be_assigned_and_are_saved(tmp_path) -> None:  # noqa: ANN001
    config = Idefics2Config.from_dict(HUB_LIKE)
    config.use_cache = False
    config.text_config.rope_theta = 5e5
    config.my_note = "kept"
    config.save_pretrained(tmp_path)
    again = Idefics2Config.from_pretrained(tmp_path)
    assert not again.use_cache and again.text_config.rope_theta == 5e5 and again.my_note == "kept"
    reference = transformers.Idefics2Config.from_pretrained(tmp_path)
    assert reference.use_cache is False and reference.text_config.rope_parameters["rope_theta"] == 5e5
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        _ = config.missing


def test_diff_dict_and_json_load_in_transformers_with_the_same_values(tmp_path) -> None:  # noqa: ANN001
    config = Idefics2Config.from_dict(HUB_LIKE)
    config.use_cache = False
    diff = config.to_diff_dict()
    assert "use_cache" in diff and "tie_word_embeddings" not in diff  # False is the default
    assert "num_channels" not in diff["vision_config"] and diff["vision_config"]["patch_size"] == 14
    assert diff["text_config"]["max_position_embeddings"] == 32768  # differs from the Mistral default
    for use_diff in (True, False):
        path = tmp_path / f"config-{use_diff}.json"
        config.to_json_file(path, use_diff=use_diff)
        assert json.loads(path.read_text()) == json.loads(config.to_json_string(use_diff))
        theirs = transformers.Idefics2Config.from_dict(json.loads(path.read_text()))
        ours = Idefics2Config.from_dict(json.loads(path.read_text()))
        assert ours.to_dict() == config.to_dict()
        assert theirs.use_cache is False and theirs.vision_config.patch_size == 14
        assert theirs.text_config.max_position_embeddings == 32768 and theirs.text_config.vocab_size == 32003


def test_from_pretrained_takes_overrides_and_refuses_unknown_ones(tmp_path) -> None:  # noqa: ANN001
    Idefics2Config.from_dict(HUB_LIKE).save_pretrained(tmp_path)
    config = Idefics2Config.from_pretrained(tmp_path, use_cache=False, image_token_id=7)
    assert not config.use_cache and config.image_token_id == 7
    with pytest.raises(ValueError, match="unknown Idefics2Config option 'use_cahce'"):
        Idefics2Config.from_pretrained(tmp_path, use_cahce=False)

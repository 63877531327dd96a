"""Config parsing: every spelling of docs/numerics.md §2.6, round trips, and errors that name the field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from idefics2 import Idefics2Config
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
    (lambda: Idefics2Config(perceiver_config=PerceiverConfig(hidden_size=64)),
     r"perceiver_config.hidden_size \(64\) must equal text_config.hidden_size \(4096\)"),
    (lambda: TextConfig(vocab_size=0), r"TextConfig.vocab_size must be a positive integer"),
    (lambda: Idefics2Config(image_token_id=40000), r"image_token_id \(40000\)"),
])
def test_impossible_values_raise_a_value_error_naming_the_field(build, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        build()


def test_missing_config_file_is_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="no config.json"):
        Idefics2Config.from_pretrained(tmp_path)

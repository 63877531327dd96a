"""recipes/shapes_vqa/stitch.py, which made the shipped model: the joined model holds one model's
vision tower and the other's perceiver and decoder, and only the projection is fitted."""

from __future__ import annotations

import pytest
import torch

from conftest import SHIPPED
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration
from idefics2.processing.tokenizer import Tokenizer
from recipes.shapes_vqa import stitch
from recipes.shapes_vqa.presets import build_processor, model_config_dict


def _model(preset: str, seed: int) -> tuple[Idefics2ForConditionalGeneration, Idefics2Config, object]:
    tokenizer = Tokenizer.from_pretrained(SHIPPED)
    processor = build_processor(preset, tokenizer)
    config = Idefics2Config.from_dict(model_config_dict(preset, len(tokenizer), processor.image_token_id))
    torch.manual_seed(seed)
    return Idefics2ForConditionalGeneration(config).eval(), config, processor


def test_the_joined_model_takes_the_tower_from_one_and_the_rest_from_the_other() -> None:
    vision_from, _, _ = _model("gpu64", 1)
    rest_from, _, processor = _model("cpu64kv2", 2)
    _, config, _ = _model("gpu64-text128", 3)
    model = stitch.stitched_model(vision_from, rest_from, config)
    own, tower, rest = model.state_dict(), vision_from.state_dict(), rest_from.state_dict()
    for name, value in own.items():
        if ".vision_model." in name:
            assert torch.equal(value, tower[name]), name
        elif not name.startswith(stitch.PROJECTION_INPUT):
            assert torch.equal(value, rest[name]), name
    assert own["model.connector.modality_projection.gate_proj.weight"].shape[1] == 192  # the tower's width
    # fitting trains the projection alone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    error = stitch.fit_projection(model, rest_from, processor, minutes=0.0, batch_size=2, lr=1e-3, seed=0)
    assert 0 < error < float("inf")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.connector.modality_projection.") for k in changed)


def test_a_preset_that_does_not_fit_both_models_is_refused() -> None:
    vision_from, _, _ = _model("gpu64", 1)
    rest_from, _, _ = _model("cpu64kv2", 2)
    _, config, _ = _model("cpu64kv2", 3)  # a 128-wide tower cannot take gpu64's 192-wide one
    with pytest.raises(ValueError, match="does not fit the two models"):
        stitch.stitched_model(vision_from, rest_from, config)

"""transformers' `PreTrainedModel` surface on both classes, checked against transformers 5.24:
attributes, parameter counts, the generation config, weight initialisation, and activation
checkpointing (same loss and gradients as without it, also under LoRA)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_batch, tiny_config_dict
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Model
from idefics2.lora import LoRAConfig, add_lora
from idefics2.model import base

pytestmark = pytest.mark.oracle
CLASSES = (Idefics2Model, Idefics2ForConditionalGeneration)


def oracle_class(cls: type) -> Any:
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, cls.__name__)


def both(cls: type, config: dict[str, Any]) -> tuple[Any, Any]:
    """Ours and transformers' `cls`, each built from `config` with its own initialisation."""
    hf_config = pytest.importorskip("transformers").Idefics2Config(**copy.deepcopy(config))
    return cls(Idefics2Config.from_dict(config)), oracle_class(cls)(hf_config)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("cls", CLASSES)
def test_attributes_and_parameter_counts_match_transformers(cls: type, tie: bool) -> None:
    """Idefics2Model lacked most of these; counts must skip a tied head and every embedding."""
    ours, theirs = both(cls, tiny_config_dict(tie=tie))
    assert (ours.get_output_embeddings() is None) == (theirs.get_output_embeddings() is None) == (cls is Idefics2Model)
    for name in ("main_input_name", "base_model_prefix", "_tied_weights_keys", "supports_gradient_checkpointing"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.can_generate() == theirs.can_generate() == cls.can_generate() == (cls is not Idefics2Model)
    assert type(ours.base_model).__name__ == type(theirs.base_model).__name__ == "Idefics2Model"
    assert (ours.base_model is ours) == (theirs.base_model is theirs)
    frozen = "text_model" if cls is Idefics2Model else "model.vision_model"
    for model in (ours, theirs):
        model.get_submodule(frozen).requires_grad_(False)
    for only_trainable in (False, True):
        for exclude_embeddings in (False, True):
            assert ours.num_parameters(only_trainable, exclude_embeddings) == theirs.num_parameters(
                only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    ours.tie_weights(missing_keys=set(), recompute_mapping=False)
    if cls is not Idefics2Model:
        assert (ours.lm_head.weight is ours.get_input_embeddings().weight) == tie


def test_the_base_model_resizes_its_embeddings_like_transformers() -> None:
    ours, theirs = both(Idefics2Model, tiny_config_dict())
    kept = ours.get_input_embeddings().weight.detach().clone()
    mine, reference = ours.resize_token_embeddings(131, mean_resizing=False), theirs.resize_token_embeddings(131)
    assert mine.weight.shape == reference.weight.shape == (131, 48)
    assert ours.config.text_config.vocab_size == theirs.config.text_config.vocab_size == 131
    assert torch.equal(mine.weight[:120], kept) and ours.get_input_embeddings() is mine
    with pytest.raises(AttributeError, match="no LM head"):
        ours.set_output_embeddings(torch.nn.Linear(48, 131))


def test_generation_config_comes_from_the_model_config_and_is_saved_like_transformers(tmp_path: Path) -> None:
    """It was None for a model built from a config, and save_pretrained wrote no generation_config.json."""
    config = tiny_config_dict()
    config["text_config"].update(bos_token_id=3, eos_token_id=7, pad_token_id=5)
    ours, theirs = both(Idefics2ForConditionalGeneration, config)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours.generation_config, name) == getattr(theirs.generation_config, name), name
    assert ours.save_pretrained(tmp_path / "ours") is theirs.save_pretrained(tmp_path / "theirs") is None
    mine, reference = (json.loads((tmp_path / side / "generation_config.json").read_text()) for side in ("ours", "theirs"))
    assert {k: mine[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "_from_model_config")} == {
        k: reference[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "_from_model_config")}
    (tmp_path / "ours" / "generation_config.json").unlink()
    assert Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "ours").generation_config.eos_token_id == 7
    Idefics2Model(Idefics2Config.from_dict(config)).save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base" / "generation_config.json").exists()


def test_weights_are_drawn_like_transformers_init_weights() -> None:
    """Torch's defaults before: each part at its own initializer_range, the projection and the head
    at the text's, padding row zero, norms and latents one."""
    config = tiny_config_dict(vision_hidden=64, text_hidden=96, vocab=400)
    for part, std in (("vision_config", 0.11), ("perceiver_config", 0.23), ("text_config", 0.37)):
        config[part]["initializer_range"] = std
    torch.manual_seed(0)
    ours, theirs = both(Idefics2ForConditionalGeneration, config)
    reference = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        expected = reference[name]
        if expected.std() == 0:
            assert torch.equal(param, expected), name
        else:
            assert param.std().item() == pytest.approx(expected.std().item(), rel=0.15), name
            assert param.mean().abs().item() < 0.1 * expected.std().item(), name
    assert not ours.get_input_embeddings().weight[0].any()  # pad_token_id 0


@pytest.mark.parametrize("cls", CLASSES)
def test_a_zero_initializer_range_gives_means_of_zero_or_one(cls: type) -> None:
    """transformers' test_initialization: with ranges of 1e-10 every mean rounds to 0 or 1."""
    config = tiny_config_dict()
    for part in ("vision_config", "perceiver_config", "text_config"):
        config[part]["initializer_range"] = 1e-10
    for name, param in cls(Idefics2Config.from_dict(config)).named_parameters():
        assert ((param.mean() * 1e9).round() / 1e9).item() in (0.0, 1.0), name


def test_loading_a_checkpoint_draws_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Idefics2ForConditionalGeneration(Idefics2Config.from_dict(tiny_config_dict())).save_pretrained(tmp_path)

    def refuse(*args: Any) -> None:
        raise AssertionError("init_weights ran while loading a checkpoint")

    monkeypatch.setattr(base, "init_weights", refuse)
    Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    Idefics2Model.from_pretrained(tmp_path)


def loss_and_grads(model: Idefics2ForConditionalGeneration, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def count_attention_calls(model: Idefics2ForConditionalGeneration, calls: dict[str, int]) -> None:
    """Count, in `calls`, the runs of the first decoder and vision layers' attention."""
    def count(module: torch.nn.Module, args: Any, out: Any) -> None:
        calls[type(module).__name__] = calls.get(type(module).__name__, 0) + 1

    for layer in (model.model.text_model.layers[0], model.model.vision_model.encoder.layers[0]):
        layer.self_attn.register_forward_hook(count)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}])
def test_checkpointing_keeps_loss_and_gradients_and_recomputes_each_layer(kwargs: Any, lora: bool) -> None:
    """No activation checkpointing before. The reentrant form with frozen embeddings (LoRA, here
    in the vision tower too) gives the adapters gradients only through the embedding hooks."""
    torch.manual_seed(0)
    plain = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(tiny_config_dict()))
    if lora:
        add_lora(plain, LoRAConfig(r=2, target_modules=["q_proj", "v_proj", "gate_proj"]))
        for name, param in plain.named_parameters():
            if "lora_B" in name:  # nonzero, so that lora_A gets a gradient too
                torch.nn.init.normal_(param, 0.0, 0.1)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    plain_calls: dict[str, int] = {}
    calls: dict[str, int] = {}
    count_attention_calls(plain, plain_calls)
    count_attention_calls(checkpointed, calls)
    batch = make_batch(tiny_config_dict())
    (loss, grads), (expected_loss, expected) = loss_and_grads(checkpointed, batch), loss_and_grads(plain, batch)
    assert calls == {name: 2 * n for name, n in plain_calls.items()}  # forward + recompute
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
    assert grads.keys() == expected.keys() and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-6, msg=name)
    calls.clear()
    with torch.no_grad():
        checkpointed(**batch)
    checkpointed.eval()(**batch, use_cache=False, labels=batch["input_ids"]).loss.backward()
    assert calls == {name: 2 * n for name, n in plain_calls.items()}  # one pass each: no recompute
    checkpointed.gradient_checkpointing_disable()
    assert not checkpointed.is_gradient_checkpointing and not checkpointed._require_grads_hooks


def test_checkpointing_flags_follow_transformers(tmp_path: Path) -> None:
    """config.gradient_checkpointing=True turns it on at construction and is consumed; in training
    the cache is then off, as in transformers 5.24."""
    config = Idefics2Config.from_dict(tiny_config_dict())
    config.gradient_checkpointing = True
    model = Idefics2ForConditionalGeneration(config)
    layers = [*model.model.text_model.layers, *model.model.vision_model.encoder.layers]
    assert model.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in layers)
    assert all(layer.checkpoint_kwargs == {"use_reentrant": False} for layer in layers)
    model.save_pretrained(tmp_path)
    assert "gradient_checkpointing" not in json.loads((tmp_path / "config.json").read_text())
    batch = make_batch(tiny_config_dict())
    with pytest.warns(UserWarning, match="incompatible with gradient checkpointing"):
        assert model.train()(**batch, use_cache=True).past_key_values is None
    assert model.eval()(**batch, use_cache=True).past_key_values is not None
    model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in layers)

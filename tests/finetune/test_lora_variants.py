"""DoRA, rsLoRA, rank/alpha patterns and lora_bias against PEFT 0.21.2 on transformers' Idefics2 (logits,
gradients, merges, round trips both ways), `model.load_adapter` / `merge_adapter`, and LoRA on a
quantized base (QLoRA) against the same model holding the dequantized weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import test_finetune
import torch

from conftest import make_batch, oracle_model, random_model, tiny_config_dict
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration
from idefics2.finetune.command import FinetuneConfig, main
from idefics2.lora import LoRAConfig, LoRALinear, add_lora, lora_state_dict, merge_lora, save_adapter
from idefics2.model.quant import Int4Linear, Int8Linear, quantize_linears

checkpoint, data = test_finetune.checkpoint, test_finetune.data  # the tiny Hub-layout model, conversations

CONFIG = tiny_config_dict(text_hidden=64, vision_hidden=32)  # 64: int4's kernel takes the decoder's shapes
# the vision tower's projections have biases (lora_bias merges there), the decoder's do not
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "fc1"]
VARIANTS = {
    "dora": {"use_dora": True},
    "rslora-patterns": {"use_rslora": True,
                        "rank_pattern": {"q_proj": 3, "model.text_model.layers.0.mlp.down_proj": 5},
                        "alpha_pattern": {r"layers\.1\.self_attn\.o_proj": 2, "v_proj": 7}},
    "dora-rslora-patterns": {"use_dora": True, "use_rslora": True, "rank_pattern": {"v_proj": 1},
                             "alpha_pattern": {"fc1": 3}},
    "lora-bias": {"lora_bias": True},
    "lora-bias-vision": {"lora_bias": True, "target_modules": ["fc1", "fc2", "out_proj"]},  # with base biases
}


def _ours(hf: Any) -> Idefics2ForConditionalGeneration:
    return Idefics2ForConditionalGeneration.from_pretrained(None, config=Idefics2Config.from_dict(CONFIG),
                                                            state_dict=hf.state_dict()).eval()


def _random_model() -> Idefics2ForConditionalGeneration:
    """Ours alone, every parameter random as `oracle_model` draws them (without importing transformers)."""
    return random_model(CONFIG)


def _peft_model(variant: str, dropout: float = 0.0, seed: int = 5) -> Any:
    """transformers' model with a PEFT adapter of `variant` whose every tensor is random (DoRA's
    magnitudes moved off ||W||, lora_B off zero), so each part of the update shows in the logits."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=dropout,
                             **{"target_modules": TARGETS, **VARIANTS[variant]})
    model = peft.get_peft_model(oracle_model(CONFIG), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _randomise(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.3)


def _loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A loss that weighs every real position's logits differently (padding holds no defined value)."""
    weights = torch.linspace(-1, 1, logits.shape[-1])
    return (logits[mask.bool()] * weights).sin().sum()


def _our_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".default", "").replace(
        "lora_magnitude_vector.weight", "lora_magnitude_vector")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_our_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_grads(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-5 of each tensor's largest entry: float32 sums in another order differ by ~1e-6 of
    it (these gradients reach ~100), a wrong term by far more."""
    assert sorted(grads) == sorted(expected)  # the same tensors train
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-5 * scale, msg=name)


@pytest.mark.oracle
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_peft_adapter_gives_peft_logits_and_gradients(variant: str, tmp_path: Path) -> None:
    theirs = _peft_model(variant)
    theirs.save_pretrained(tmp_path / "peft")
    ours = _ours(oracle_model(CONFIG))  # the same random weights as PEFT's base
    config = ours.load_adapter(tmp_path / "peft")
    assert all(getattr(config, k) == v for k, v in VARIANTS[variant].items() if k != "target_modules")
    batch = make_batch(CONFIG)
    mask = batch["attention_mask"].bool()
    their_logits, our_logits = theirs(**batch).logits, ours(**batch).logits
    torch.testing.assert_close(our_logits[mask], their_logits[mask], rtol=0, atol=1e-5)
    _loss(their_logits, mask).backward()
    _loss(our_logits, mask).backward()
    _assert_same_grads(_grads(ours), _grads(theirs))  # lora_B.bias and DoRA's magnitudes too


@pytest.mark.oracle
@pytest.mark.parametrize("options", [{"use_dora": True}, {"lora_bias": True}, {}],
                         ids=["dora", "lora-bias", "lora"])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_a_layer_in_training_with_dropout_matches_peft_mask_for_mask(options: dict, quantized: bool) -> None:
    """One layer, so the same seed draws the same dropout mask on both sides: DoRA's dropout path (the
    magnitude term on the dropped-out input, the base's own output on the whole one) checked exactly,
    gradients to the input too. The int8 case runs PEFT on the dequantized float layer."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    base = Int8Linear.from_weight(layer.weight, layer.bias) if quantized else copy.deepcopy(layer)
    if quantized:
        with torch.no_grad():
            layer.weight.copy_(base.dequantize())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.4,
                                                          target_modules=["layer"], **options),
                                          torch.nn.ModuleDict({"layer": layer}))["layer"]
    ours = LoRALinear(base, 3, 5 / 3, 0.4, **options)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in name else 0.0))
                ours.get_parameter(_our_name(name)).copy_(p)
    ours.train()
    theirs.train()
    x = torch.randn(2, 7, 24)
    out = []
    for model in (ours, theirs):
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        y = model(xi)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
        out.append((y, xi.grad, _grads(model)))
    (y, x_grad, grads), (their_y, their_x_grad, their_grads) = out
    torch.testing.assert_close(y, their_y, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_grad, their_x_grad, rtol=0, atol=1e-5)
    _assert_same_grads(grads, their_grads)
    torch.manual_seed(4)
    assert not torch.equal(ours(x), y)  # the dropout does fire


@pytest.mark.oracle
@pytest.mark.parametrize("variant", ["dora-rslora-patterns", "lora-bias-vision"])
def test_our_trained_adapter_round_trips_through_peft(variant: str, tmp_path: Path) -> None:
    """Trained here (a few AdamW steps, every adapter tensor moving), saved, loaded by PEFT: the same
    logits; and merged here equals PEFT's merge_and_unload, weight for weight."""
    peft = pytest.importorskip("peft")
    _peft_model(variant).save_pretrained(tmp_path / "start")
    ours = _ours(oracle_model(CONFIG))
    config = ours.load_adapter(tmp_path / "start")
    ours.train()
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch(CONFIG)
    mask = batch["attention_mask"].bool()
    before = {k: v.clone() for k, v in lora_state_dict(ours).items()}
    for _ in range(3):
        optimizer.zero_grad()
        _loss(ours(**batch).logits, mask).backward()
        optimizer.step()
    after = lora_state_dict(ours)
    assert all(not torch.equal(before[k], after[k]) for k in after)
    ours.eval()
    save_adapter(ours, config, tmp_path / "trained")
    theirs = peft.PeftModel.from_pretrained(oracle_model(CONFIG), tmp_path / "trained").eval()
    with torch.no_grad():
        our_logits = ours(**batch).logits
        torch.testing.assert_close(our_logits[mask], theirs(**batch).logits[mask], rtol=0, atol=1e-5)
        ours.merge_adapter()
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        merged = theirs.merge_and_unload().state_dict()
        for name, tensor in ours.state_dict().items():
            torch.testing.assert_close(tensor, merged[name], rtol=1e-6, atol=1e-6, msg=name)
        # the merge keeps the outputs (float32 noise of W + BA against Wx + B(Ax))
        torch.testing.assert_close(ours(**batch).logits[mask], our_logits[mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_load_adapter_keeps_the_models_mode(training: bool, tmp_path: Path) -> None:
    model = _random_model()
    config = LoRAConfig(r=2, lora_dropout=0.5, use_dora=True, target_modules=TARGETS)
    add_lora(model, config)
    _randomise(model)  # lora_B = 0 would leave DoRA's magnitude term, where the dropout acts, at zero
    save_adapter(model, config, tmp_path / "a")
    fresh = _random_model().train(training)
    fresh.load_adapter(tmp_path / "a")
    assert all(m.training == training for m in fresh.modules())
    assert all(p.requires_grad == is_adapter for n, p in fresh.named_parameters()
               for is_adapter in [".lora_" in n])
    batch = make_batch(CONFIG)
    with torch.no_grad():
        same = torch.equal(fresh(**batch).logits, fresh(**batch).logits)
    assert same != training  # eval: deterministic; train: the adapter's dropout fires


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_layers_backward_multiplies_by_its_dequantized_weight(method: str) -> None:
    """grad x = grad y W, W as the kernel computes with it (int4 reads W back in blocks of 1024 inputs:
    2080 inputs take three), and no gradient for the frozen weight; in bfloat16 the adapters above it
    still get float32 gradients."""
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 2080), torch.randn(48)
    layer = Int8Linear.from_weight(weight, bias) if method == "int8" else Int4Linear.from_weight(weight, bias, 32)
    x = torch.randn(3, 5, 2080, requires_grad=True)
    g = torch.randn(3, 5, 48)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ layer.dequantize(), rtol=0, atol=1e-4)
    assert not any(t.requires_grad for t in [*layer.parameters(), *layer.buffers()])
    adapted = LoRALinear(layer, 4, 2.0, 0.0, use_dora=True)
    torch.nn.init.normal_(adapted.lora_B.weight)
    xb = torch.randn(2, 2080, dtype=torch.bfloat16, requires_grad=True)
    y = adapted(xb)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and xb.grad is not None and xb.grad.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and bool(p.grad.isfinite().all())
               for p in adapted.parameters() if p.requires_grad)


def _quantized_pair(method: str) -> tuple[Idefics2ForConditionalGeneration, Idefics2ForConditionalGeneration]:
    """(a model whose decoder and connector are int8/int4, the same float model holding their
    dequantized weights), as `from_pretrained(quantization=...)` would quantize them."""
    model = _random_model()
    reference = copy.deepcopy(model)
    for part in (model.model.text_model, model.model.connector):
        quantize_linears(part, method, group_size=32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (Int8Linear, Int4Linear)):
                reference.get_submodule(name).weight.copy_(module.dequantize())
    return model, reference


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_adapters_on_a_quantized_base_get_the_gradients_of_the_dequantized_float_base(method: str,
                                                                                      use_dora: bool) -> None:
    """QLoRA: the backward through the frozen quantized layers reaches every adapter, those of the vision
    tower before them too, with the float base's gradients; the quantized weights get none."""
    model, reference = _quantized_pair(method)
    assert sum(isinstance(m, Int4Linear if method == "int4" else Int8Linear) for m in model.modules()) > 10
    config = LoRAConfig(r=3, lora_alpha=5, target_modules=TARGETS, use_dora=use_dora)
    for m in (model, reference):
        torch.manual_seed(0)
        add_lora(m, config)
        _randomise(m)
    assert any(isinstance(m.base_layer, (Int8Linear, Int4Linear)) for m in model.modules()
               if isinstance(m, LoRALinear))
    model.train()
    reference.train()
    batch = make_batch(CONFIG)
    mask = batch["attention_mask"].bool()
    logits, expected = model(**batch).logits, reference(**batch).logits
    torch.testing.assert_close(logits[mask], expected[mask], rtol=0, atol=1e-5)
    _loss(logits, mask).backward()
    _loss(expected, mask).backward()
    grads = _grads(model)
    assert any("vision_model" in n for n in grads)
    _assert_same_grads(grads, _grads(reference))


def test_a_quantized_base_does_not_merge_and_is_left_unchanged() -> None:
    model, _ = _quantized_pair("int8")
    add_lora(model, LoRAConfig(r=2, target_modules=TARGETS))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="is quantized: an adapter merges into the float checkpoint"):
        model.merge_adapter()
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


def test_lora_bias_without_a_base_bias_does_not_merge() -> None:
    model = _random_model()
    add_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], lora_bias=True))  # the decoder's have no bias
    with pytest.raises(ValueError, match="q_proj has no bias for the adapter's lora_bias to merge into"):
        merge_lora(model)
    assert any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize(("options", "message"), [
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"use_qalora": True}, "use_qalora"),
    ({"bias": "all"}, "'bias'"),
    ({"use_dora": True, "lora_bias": True}, "lora_bias is not supported with DoRA"),
    ({"use_dora": "yes"}, "use_dora must be true or false"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern must map module-name patterns to positive integers"),
    ({"alpha_pattern": {"q_proj": "8"}}, "alpha_pattern must map module-name patterns to finite numbers"),
    ({"rank_pattern": {"(a+)+": 2}}, "rank_pattern key .* nests a repetition"),
])
def test_options_we_do_not_implement_are_refused_by_name(options: dict, message: str) -> None:
    data = {**LoRAConfig().to_peft_dict(), **options}
    with pytest.raises(ValueError, match=message):
        LoRAConfig.from_peft_dict(data)


def test_patterns_follow_peft_first_match_at_a_name_boundary() -> None:
    config = LoRAConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 9, "layers.0.q_proj": 2},
                        alpha_pattern={"proj": 1})
    assert config.rank_of("model.text_model.layers.0.self_attn.q_proj") == 9  # the first matching key wins
    assert config.rank_of("model.text_model.layers.0.self_attn.xq_proj") == 4  # a whole name part only
    assert config.scaling_of("a.q_proj") == 8 / 3  # "proj" is not a whole part of "q_proj": alpha stays 8
    assert config.scaling_of("a.proj") == pytest.approx(1 / 2)  # alpha 1 / sqrt(4)


def test_finetune_trains_dora_and_rslora_on_an_int8_base_for_the_float_model(checkpoint: Path, data: Path,
                                                                            tmp_path: Path) -> None:
    main(["--model", str(checkpoint), "--data", str(data), "--out-dir", str(tmp_path), "--lora-r", "4",
          "--use-dora", "--use-rslora", "--quantization", "int8", "--lr", "1e-2", "--warmup-steps", "0",
          "--max-steps", "6", "--batch-size", "3", "--threads", "1"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["use_dora"], saved["use_rslora"]) == (True, True)
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()  # the float base
    model.load_adapter(tmp_path / "adapter")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(isinstance(m.base_layer, torch.nn.Linear) for m in layers)
    assert layers[0].scaling == 8 / 2  # alpha / sqrt(r)
    moved = [float((m.lora_magnitude_vector - m.weight_norm()).abs().max()) for m in layers]
    assert min(moved) > 1e-4  # every magnitude trained away from its starting norm
    with pytest.raises(ValueError, match="--merge with --quantization: --merge would fold the adapter"):
        FinetuneConfig(model=str(checkpoint), data=str(data), quantization="int8", merge=True)
    with pytest.raises(ValueError, match="quantization must be one of"):
        FinetuneConfig(model=str(checkpoint), data=str(data), quantization="int3")

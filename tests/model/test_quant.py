"""Weight-only int8 / int4 linear layers: exact against their dequantized weights, close to the float
layer, and a quantized tiny model equal to the same model holding the dequantized weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import EXAMPLES, make_batch, tiny_config_dict
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration
from idefics2.model.quant import Int4Linear, Int8Linear, quantize_linears


def linear(n: int = 64, k: int = 256, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
        layer.weight[3, :7] = 4.0  # an outlier row and group: the scales must follow them
    return layer


@pytest.mark.parametrize("make", [lambda l: Int8Linear.from_weight(l.weight, l.bias),
                                  lambda l: Int4Linear.from_weight(l.weight, l.bias, 64)], ids=["int8", "int4-g64"])
def test_quantized_linear_is_exact_against_its_dequantized_weight(make) -> None:
    float_layer = linear()
    q = make(float_layer)
    x = torch.randn(2, 5, 256)
    reference = x @ q.dequantize().t() + float_layer.bias
    torch.testing.assert_close(q(x), reference, rtol=1e-5, atol=1e-4)
    w = float_layer.weight.detach()
    error = (q.dequantize() - w).abs()
    if isinstance(q, Int8Linear):  # half a step of each row's grid
        step = (w.abs().amax(dim=1, keepdim=True) / 127).expand_as(w)
    else:  # half a step of each group's grid
        groups = w.view(w.shape[0], -1, 64)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15)[..., None].expand_as(groups).reshape(w.shape)
    assert bool((error <= step / 2 + 1e-5).all())
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_int4_follows_the_kernel_convention_with_a_float_zero_point() -> None:
    """W = (q - 8) * scale + zero, per group: a group of constant weights comes back exactly."""
    layer = nn.Linear(128, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(16.0)[:, None].expand(16, 128) - 7.5)
    q = Int4Linear.from_weight(layer.weight, None, 32)
    torch.testing.assert_close(q.dequantize(), layer.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_model_equals_the_model_with_its_dequantized_weights(method: str) -> None:
    config = Idefics2Config.from_dict(tiny_config_dict(text_hidden=64, vision_hidden=32))
    torch.manual_seed(1)
    model = Idefics2ForConditionalGeneration(config).eval()
    reference = copy.deepcopy(model)
    odd_shapes = sorted(n for n, m in model.model.text_model.named_modules() if isinstance(m, nn.Linear)
                        and (m.out_features % 16 or m.in_features % 32))  # the MLP's 56 rows/inputs
    left = quantize_linears(model.model.text_model, method, group_size=32)
    assert sorted(left) == ([] if method == "int8" else odd_shapes) and len(odd_shapes) == 6
    with torch.no_grad():
        for name, module in model.model.text_model.named_modules():
            if isinstance(module, (Int8Linear, Int4Linear)):
                reference.model.text_model.get_submodule(name).weight.copy_(module.dequantize())
    batch = make_batch(tiny_config_dict(text_hidden=64, vision_hidden=32))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-4, atol=1e-4)
        tokens = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4)
        same = reference.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4)
    assert torch.equal(tokens, same)


def test_bad_quantization_options_are_refused() -> None:
    with pytest.raises(ValueError, match=r"quantization must be one of \['int8', 'int4'\], got 'int3'"):
        quantize_linears(nn.Sequential(linear()), "int3")
    with pytest.raises(ValueError, match=r"group_size must be one of \[32, 64, 128, 256\] for int4, got 100"):
        quantize_linears(nn.Sequential(linear()), "int4", group_size=100)
    odd = nn.Sequential(nn.Linear(96, 16), nn.Linear(128, 16))
    assert quantize_linears(odd, "int4", group_size=64) == ["0"]  # 96 inputs: not whole groups of 64
    assert isinstance(odd[0], nn.Linear) and isinstance(odd[1], Int4Linear)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantizing_while_loading_equals_quantizing_after(tmp_path, method: str) -> None:
    config = Idefics2Config.from_dict(tiny_config_dict(text_hidden=64, vision_hidden=32))
    torch.manual_seed(2)
    Idefics2ForConditionalGeneration(config).save_pretrained(tmp_path, max_shard_size="30KB")
    loaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path, quantization=method, group_size=32)
    after = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    quantize_linears(after.model.text_model, method, group_size=32)
    quantize_linears(after.model.connector, method, group_size=32)
    kinds = {type(m) for m in loaded.model.vision_model.modules()} | {type(loaded.lm_head)}
    assert not kinds & {Int8Linear, Int4Linear}  # the vision tower and the head stay in float
    assert sum(isinstance(m, (Int8Linear, Int4Linear)) for m in loaded.modules()) == \
        sum(isinstance(m, (Int8Linear, Int4Linear)) for m in after.modules()) > 4
    batch = make_batch(tiny_config_dict(text_hidden=64, vision_hidden=32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, after(**batch).logits, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")  # int8: our layout; int4: AWQ's GEMM layout
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == ("idefics2-int8" if method == "int8" else "awq")
    again = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, after(**batch).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="quantization must be one of"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path, quantization="fp8")


def test_the_cli_answers_with_quantized_weights(capsys) -> None:
    from idefics2.cli import main

    for method in ("int8", "int4"):
        assert main(["generate", "--quantization", method, "--group-size", "32", "--image",
                     str(EXAMPLES / "shapes.png"), "What color is the circle?"]) == 0
        assert capsys.readouterr().out.strip() == "Red."


@pytest.mark.skipif(torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has bfloat16 kernels")
def test_a_quantized_bfloat16_model_keeps_its_vision_tower_in_float32_on_a_cpu_without_bf16(tmp_path) -> None:
    """The tower's float32 features are cast to bfloat16 before the connector: the image features
    equal the connector's on the float32 tower's output rounded to bfloat16."""
    config_dict = tiny_config_dict(text_hidden=64, vision_hidden=32)
    torch.manual_seed(3)
    Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config_dict)).to(torch.bfloat16).save_pretrained(
        tmp_path)
    model = Idefics2ForConditionalGeneration.from_pretrained(tmp_path, quantization="int8")
    assert {p.dtype for p in model.model.vision_model.parameters()} == {torch.float32}
    assert model.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    batch = make_batch(config_dict)
    pixels = batch["pixel_values"][:1, :1]  # one image, the full canvas
    with torch.no_grad():
        features = model.model.get_image_features(pixels)
        image, patch_mask = model.model.real_images(pixels, None)  # (1, 3, H, W) float32, (1, Gh, Gw)
        assert image.dtype == torch.float32 and bool(patch_mask.all())
        patch_features = model.model.vision_model(image, patch_mask)  # (1, P, D_v) float32
        expected = model.model.connector(patch_features.to(torch.bfloat16), patch_mask.flatten(1))
        torch.testing.assert_close(features, expected, rtol=0, atol=0)
        assert model.generate(**batch, max_new_tokens=3).shape[1] == batch["input_ids"].shape[1] + 3
    plain = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)  # nothing quantized: as stored
    assert {p.dtype for p in plain.model.vision_model.parameters()} == {torch.bfloat16}

"""AWQ GEMM checkpoints: written here from a random model with AutoAWQ's documented packing (its
own loop, not ours), loaded as int4 layers whose weights are exactly the dequantized AWQ weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_batch, tiny_config_dict
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration
from idefics2.model.quant import Int4Linear

GROUP = 32
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map for 4 bits


def config_dict() -> dict:
    config = tiny_config_dict(text_hidden=64)
    config["text_config"]["intermediate_size"] = 96  # every decoder projection in whole groups
    return config


def awq_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (N, K) -> AutoAWQ's qweight, qzeros, scales, and the weight they stand for."""
    N, K = w.shape
    groups = w.view(N, K // GROUP, GROUP)
    high, low = groups.amax(-1), groups.amin(-1)
    scales = ((high - low).clamp(min=1e-5) / 15).half()  # (N, K / group)
    zeros = torch.round(-low / scales.float()).clamp(0, 15).int()
    q = (torch.round(groups / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15).int().view(N, K)
    dequantized = ((q.view(N, -1, GROUP) - zeros[..., None]) * scales.float()[..., None]).view(N, K)

    def pack(intweight: torch.Tensor) -> torch.Tensor:  # (rows, cols) -> (rows, cols / 8), AutoAWQ's loop
        packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
        for col in range(intweight.shape[1] // 8):
            for i in range(8):
                packed[:, col] |= intweight[:, col * 8 + ORDER[i]] << (i * 4)
        return packed

    return pack(q.t().contiguous()), pack(zeros.t().contiguous()), scales.t().contiguous(), dequantized


def write_awq_checkpoint(folder: Path, **quantization: object) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config_dict())).save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    dequantized = {}
    for key in [k for k in tensors if ".text_model.layers." in k and k.endswith("_proj.weight")]:
        name = key[: -len(".weight")]
        qweight, qzeros, scales, dequantized[name] = awq_quantize(tensors.pop(key))
        tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm",
                                     "zero_point": True, "modules_to_not_convert": ["vision_model"], **quantization}
    (folder / "config.json").write_text(json.dumps(config))
    return dequantized


def test_an_awq_checkpoint_loads_with_exactly_its_dequantized_weights(tmp_path: Path) -> None:
    dequantized = write_awq_checkpoint(tmp_path)
    model = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    reference = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config_dict())).eval()
    reference.load_state_dict({k: v for k, v in load_file(tmp_path / "model.safetensors").items()
                               if not k.endswith(("qweight", "qzeros", "scales"))}, strict=False)
    assert len(dequantized) == 2 * 7  # two layers of q, k, v, o, gate, up, down
    for name, weight in dequantized.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Int4Linear)
        torch.testing.assert_close(layer.dequantize(), weight, rtol=0, atol=1e-5)
        reference.get_submodule(name).weight.data.copy_(weight)
    batch = make_batch(config_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"bits": 8}, r"AWQ checkpoint with bits=8; only 4-bit GEMM with zero points"),
    ({"version": "gemv"}, r"version='gemv'"),
    ({"quant_method": "gptq"}, r"quant_method 'gptq' is not supported \(only 'awq' and 'idefics2-int8'\)"),
])
def test_awq_variants_we_do_not_read_are_named(tmp_path: Path, change: dict, message: str) -> None:
    write_awq_checkpoint(tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)


def test_a_broken_awq_layer_and_double_quantization_are_refused(tmp_path: Path) -> None:
    write_awq_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"already quantized .*drop quantization="):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path, quantization="int8")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.text_model.layers.0.self_attn.q_proj.qzeros"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"quantized layer model.text_model.layers.0.self_attn.q_proj lacks \['qzeros'\]"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)

"""`finetune --fsdp` under torchrun with 2 CPU processes (gloo): the same adapters and weights as DDP and as
one process taking the whole step, a resumed FSDP run equal to a straight one (dropout on), and
the mixed-precision policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import SRC, _free_port, _history, _inputs, checkpoint, data  # noqa: F401 - fixtures

from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.finetune.command import FinetuneConfig, finetune
from idefics2.lora import load_adapter

pytestmark = pytest.mark.slow  # each torchrun starts two Python processes that load torch


def _torchrun(*flags: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "-m", "idefics2.finetune", "--threads", "1", *flags],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def _assert_same_tensors(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, atol=atol, rtol=0, msg=key)


def test_fsdp_trains_the_adapters_of_ddp_and_of_one_process(checkpoint: Path, data: Path, tmp_path: Path) -> None:
    """LoRA, 2 processes x 2 micro-batches of 1 conversation against 1 process with 4: every micro-batch mixes
    conversations with one, two and no images, so a process without images in a micro-batch still takes
    part in the root's gradient reduction (zeros for the connector's adapters)."""
    settings = {"model": str(checkpoint), "data": str(data), "lora_r": 4, "lr": 1e-2, "warmup_steps": 0,
                "max_steps": 3}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    finetune(FinetuneConfig(**settings, batch_size=4, threads=1, out_dir=str(tmp_path / "one"),  # type: ignore[arg-type]
                            eval_data=str(data)))
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp", "--merge"])):
        _torchrun(*flags, "--batch-size", "1", "--grad-accum", "2", "--eval-data", str(data),
                  "--out-dir", str(tmp_path / name), *extra)
    one = _adapter(tmp_path / "one")
    assert any(value.abs().max() > 1e-3 for key, value in one.items() if "lora_B" in key)  # the steps moved them
    _assert_same_tensors(_adapter(tmp_path / "fsdp"), _adapter(tmp_path / "ddp"), atol=1e-5)
    _assert_same_tensors(_adapter(tmp_path / "fsdp"), one, atol=1e-5)
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(_history(tmp_path / "fsdp", key)),
                                   torch.tensor(_history(tmp_path / "one", key)), atol=1e-5, rtol=1e-5)
    adapted = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    load_adapter(adapted, tmp_path / "fsdp" / "adapter")
    merged = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "fsdp" / "model").eval()
    inputs = _inputs(Idefics2Processor.from_pretrained(checkpoint))
    with torch.no_grad():  # --merge wrote the trained adapters folded into the weights
        torch.testing.assert_close(merged(**inputs).logits, adapted(**inputs).logits, atol=2e-5, rtol=1e-5)
    eval_losses = [json.loads((tmp_path / name / "summary.json").read_text())["eval_loss"] for name in ("fsdp", "one")]
    assert eval_losses[0] == pytest.approx(eval_losses[1], abs=1e-5)  # 9 held-out conversations: 5 and 4
    _torchrun(*flags, "--batch-size", "1", "--grad-accum", "2", "--out-dir", str(tmp_path / "bf16"), "--fsdp",
              "--fsdp-mixed-precision")
    bf16 = _adapter(tmp_path / "bf16")
    assert all(value.dtype == torch.float32 for value in bf16.values())  # float32 master shards
    assert any(not torch.equal(bf16[key], value) for key, value in one.items())  # computed in bfloat16
    # the same run up to bfloat16 rounding (AdamW turns the adapters' rounding noise into whole steps, so the
    # losses are compared)
    torch.testing.assert_close(torch.tensor(_history(tmp_path / "bf16")), torch.tensor(_history(tmp_path / "one")),
                               rtol=1e-2, atol=0)


def test_fsdp_full_finetuning_trains_the_weights_of_ddp_and_of_one_process(checkpoint: Path, data: Path,
                                                                           tmp_path: Path) -> None:
    settings = {"model": str(checkpoint), "data": str(data), "full": True, "lr": 1e-3, "warmup_steps": 0,
                "max_steps": 2, "grad_clip": 0.0}
    finetune(FinetuneConfig(**settings, batch_size=4, threads=1, out_dir=str(tmp_path / "one")))  # type: ignore[arg-type]
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in settings.items()]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        _torchrun(*flags, "--batch-size", "2", "--out-dir", str(tmp_path / name), *extra)
    weights = {name: load_file(tmp_path / name / "model" / "model.safetensors") for name in ("one", "ddp", "fsdp")}
    base = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).state_dict()
    changed = [k for k, v in weights["one"].items() if not torch.equal(v, base[k])]
    assert any("vision_model" in k for k in changed) and any("text_model.layers" in k for k in changed)
    # A key bias shifts every score of a query alike, which the softmax ignores: its gradient is zero but
    # for float noise, which AdamW scales to steps of the rate's size. Every other weight must agree.
    for side in weights.values():
        for key in [k for k in side if k.endswith("k_proj.bias")]:
            del side[key]
    _assert_same_tensors(weights["fsdp"], weights["ddp"], atol=1e-5)
    _assert_same_tensors(weights["fsdp"], weights["one"], atol=1e-5)


def test_a_resumed_fsdp_run_equals_a_straight_one(checkpoint: Path, data: Path, tmp_path: Path) -> None:
    """4 steps straight == 2 steps + resume to 4 (a constant rate, so the shorter run has the same steps), with
    dropout on (each process's generators are in the checkpoint); the resumed half also recomputes its layers (--gradient-checkpointing: same gradients)."""
    flags = ["--model", str(checkpoint), "--data", str(data), "--lora-r", "4", "--lora-dropout", "0.3", "--lr", "1e-2",
             "--warmup-steps", "0", "--min-lr-ratio", "1", "--batch-size", "2", "--checkpoint-every", "2", "--fsdp"]
    _torchrun(*flags, "--max-steps", "4", "--out-dir", str(tmp_path / "straight"))
    _torchrun(*flags, "--max-steps", "2", "--out-dir", str(tmp_path / "split"))
    _torchrun(*flags, "--max-steps", "4", "--out-dir", str(tmp_path / "split"), "--resume", "--gradient-checkpointing")
    _assert_same_tensors(_adapter(tmp_path / "split"), _adapter(tmp_path / "straight"), atol=1e-6)
    assert _history(tmp_path / "split") == pytest.approx(_history(tmp_path / "straight"), abs=1e-6)

"""LoRA adapters (against PEFT on the reference model) and the `finetune` command, one and two processes."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import HUB_LIKE_TOKENIZER, ROOT, SHIPPED
from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.finetune.command import FinetuneConfig, finetune, main
from idefics2.finetune.data import Conversation, assistant_prefix_ids, load_conversations, make_batch
from idefics2.finetune.run_folder import export
from idefics2.lora import (
    DEFAULT_TARGET_MODULES,
    LoRAConfig,
    LoRALinear,
    add_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from idefics2.processing.tokenizer import Tokenizer
from recipes.shapes_vqa.presets import build_processor, model_config_dict
from recipes.shapes_vqa.synthetic import render, sample_scene

SRC = ROOT / "src"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-preset model with random weights (std 0.2, so adapters and steps move the logits)."""
    from idefics2 import Idefics2Config

    folder = tmp_path_factory.mktemp("tiny") / "model"
    processor = build_processor("tiny", Tokenizer.from_pretrained(SHIPPED))
    config = Idefics2Config.from_dict(model_config_dict("tiny", len(processor.tokenizer), processor.image_token_id))
    model = Idefics2ForConditionalGeneration(config)
    torch.manual_seed(0)  # after building: only these draws decide the weights
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.1 if p.dim() == 1 else 0.2)
    export(model.eval(), processor, folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight one- and two-image conversations (and one without images) as the README documents them."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(3)
    lines = []
    answers = ("Red.", "A red circle and a blue square.", "Blue and green, and a little purple.")  # uneven lengths
    for i in range(9):
        n_images = (1, 2, 0)[i % 3]
        names = []
        for j in range(n_images):
            render(sample_scene(rng)).save(folder / f"{i}-{j}.png")
            names.append(f"{i}-{j}.png")
        user = [{"type": "image"}] * n_images + [{"type": "text", "text": "How many shapes are there?"}]
        lines.append({"messages": [{"role": "user", "content": user},
                                   {"role": "assistant", "content": f"{i % 4 + 1}."},
                                   {"role": "user", "content": "And the colour?"},
                                   {"role": "assistant", "content": [{"type": "text", "text": answers[i % 3]}]}],
                      "images": names})
    (folder / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return folder / "train.jsonl"


def _inputs(processor: Idefics2Processor) -> dict[str, torch.Tensor]:
    rng = random.Random(11)
    images = [[render(sample_scene(rng))], [render(sample_scene(rng)), render(sample_scene(rng))]]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(row) + [
        {"type": "text", "text": "What color is the circle?"}]}], add_generation_prompt=True) for row in images]
    return dict(processor(images=images, text=prompts, padding=True, return_tensors="pt"))


def _randomise_adapters(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


def test_adapter_starts_as_a_no_op_and_merging_keeps_the_outputs(checkpoint: Path) -> None:
    processor = Idefics2Processor.from_pretrained(checkpoint)
    inputs = _inputs(processor)
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        base = model(**inputs).logits
    names = add_lora(model, LoRAConfig(r=4, lora_alpha=8))
    assert names and all("vision_model" not in n for n in names)
    assert any("perceiver_resampler" in n for n in names) and any("modality_projection" in n for n in names)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{n}.lora_{ab}.weight" for n in names for ab in "AB"]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)  # lora_B starts at zero
        _randomise_adapters(model, 0)
        adapted = model(**inputs).logits
        assert (adapted - base).abs().max() > 0.1
        merged = merge_lora(model)(**inputs).logits
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    # W + BA in float32 sums in another order than Wx + B(Ax): float32 noise relative to the logits' scale
    # (here up to 5; 2.7e-5 apart at most on a 2-core AVX2 machine)
    torch.testing.assert_close(merged, adapted, atol=1e-5 * float(adapted.abs().max()), rtol=1e-5)


def test_a_loaded_adapter_with_dropout_is_deterministic_in_eval_mode(checkpoint: Path, tmp_path: Path) -> None:
    """Wrapping a layer of a model in eval mode keeps eval mode: the adapter's Dropout must not fire
    (it did, moving the logits by up to 4.4 between two identical calls)."""
    processor = Idefics2Processor.from_pretrained(checkpoint)
    inputs = _inputs(processor)
    trained = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    add_lora(trained, LoRAConfig(r=4, lora_dropout=0.5))
    _randomise_adapters(trained, 1)
    save_adapter(trained, LoRAConfig(r=4, lora_dropout=0.5), tmp_path / "adapter")
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    load_adapter(model, tmp_path / "adapter")
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    model.train()  # and in training mode the dropout does fire
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, model(**inputs).logits)


@pytest.mark.oracle
def test_adapters_load_both_ways_with_peft_on_the_reference_model(checkpoint: Path, tmp_path: Path) -> None:
    """Ours saved -> PEFT on transformers' model gives our logits; PEFT saved -> ours gives PEFT's."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    processor = Idefics2Processor.from_pretrained(checkpoint)
    inputs = _inputs(processor)
    ours = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    add_lora(ours, LoRAConfig(r=4, lora_alpha=16))
    _randomise_adapters(ours, 1)
    save_adapter(ours, LoRAConfig(r=4, lora_alpha=16), tmp_path / "ours")
    hf = transformers.Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    hf_peft = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        real = inputs["attention_mask"].bool()  # padding positions hold no defined value on either side
        torch.testing.assert_close(hf_peft(**inputs).logits[real], ours(**inputs).logits[real], atol=1e-4, rtol=1e-4)

    hf2 = transformers.Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    their = peft.get_peft_model(hf2, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in their.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    their.save_pretrained(tmp_path / "theirs")
    mine = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    config = load_adapter(mine, tmp_path / "theirs")
    assert (config.r, config.scaling_of("model.text_model.layers.0.self_attn.q_proj")) == (2, 3.0)
    assert any("vision_model" in n for n, m in mine.named_modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        torch.testing.assert_close(mine(**inputs).logits[real], their(**inputs).logits[real], atol=1e-4, rtol=1e-4)


def test_adapter_for_another_model_or_a_bad_config_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    add_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, LoRAConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    with pytest.raises(ValueError, match="LoRA adapters attached"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, LoRAConfig(r=4))
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = 8  # the tensors are rank 4
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit this model: 0 missing, 0 unexpected and"):
        load_adapter(Idefics2ForConditionalGeneration.from_pretrained(checkpoint), tmp_path / "a")
    config.update(r=4, fan_in_fan_out=True)  # an option we do not implement is named
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        load_adapter(Idefics2ForConditionalGeneration.from_pretrained(checkpoint), tmp_path / "a")
    fresh = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    for broken in ({"r": None}, {"target_modules": None}, {"r": 4, "target_modules": ["k_proj"]}):
        config_file.write_text(json.dumps({**config, "fan_in_fan_out": False, **broken}))
        with pytest.raises(ValueError, match="lacks|does not fit"):
            load_adapter(fresh, tmp_path / "a")
        assert not any(isinstance(m, LoRALinear) for m in fresh.modules())  # a refused adapter changes nothing
    config_file.write_text(json.dumps({**config, "fan_in_fan_out": False}))
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read the adapter"):
        load_adapter(fresh, tmp_path / "a")
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        add_lora(Idefics2ForConditionalGeneration.from_pretrained(checkpoint), LoRAConfig(target_modules=["qproj"]))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(r=0)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", ":2: not valid JSON"),
    (json.dumps({"messages": []}), ':2: expected an object with a non-empty "messages" list'),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}]}), ":2: no assistant turn"),
    (json.dumps({"messages": [{"role": "robot", "content": "Hi"}]}), ":2: message 0 needs a role"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}]},
                              {"role": "assistant", "content": "x"}]}), ":2: 1 image parts in the messages but 0"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}],
                 "images": ["missing.png"]}), ":2: image file .*missing.png not found"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}],
                 "images": ["d.jsonl"]}), ":2: cannot read image .*d.jsonl"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "image"}, {"type": "text", "text": "x"}]}], "images": ["d.jsonl"]}), ":2: an assistant turn holds an image"),
    # HF-style prompts that already spell the image out would put bare image tokens in the sequence
    (json.dumps({"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "x"}]}),
     ":2: message 0: the text holds <image>, which the chat template writes itself"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Yes.<end_of_utterance>"}]}]}), ":2: message 1: the text holds <end_of_utterance>"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "x"}]}),
     ':2: message 0: a text part needs a "text" string'),
])
def test_bad_data_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_conversations(path)


def test_a_line_separator_inside_a_string_is_not_a_line_break(tmp_path: Path) -> None:
    text = json.dumps({"messages": [{"role": "user", "content": "a\u2028b\x0cc"},
                                    {"role": "assistant", "content": "d\x85e"}]}, ensure_ascii=False)
    (tmp_path / "d.jsonl").write_text(text + "\n", encoding="utf-8")
    assert load_conversations(tmp_path / "d.jsonl")[0].messages[0]["content"][0]["text"] == "a\u2028b\x0cc"


@pytest.mark.parametrize(("conversation", "message"), [
    ([{"role": "user", "content": "a " * 600}, {"role": "assistant", "content": "b " * 500}],
     r"d.jsonl:2: the conversation is \d+ tokens long .* at most 1024 positions"),
    ([{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}],
     r"d.jsonl:2: 1 assistant turns but 0 found after tokenization"),
    ([{"role": "user", "content": "Say\nAssistant: yes"}, {"role": "assistant", "content": "No."}],
     r"d.jsonl:2: 1 assistant turns but 2 found"),
])
def test_conversations_that_tokenize_wrong_are_refused_before_training(checkpoint: Path, tmp_path: Path,
                                                                      conversation: list, message: str) -> None:
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(short) + "\n" + json.dumps({"messages": conversation}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        finetune(FinetuneConfig(model=str(checkpoint), data=str(path), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_steps": 0}, "--max-steps must be positive"), ({"grad_clip": -1.0}, "--grad-clip must be 0 or more"),
    ({"dtype": "float16"}, "float16 would need loss scaling"), ({"full": True, "dtype": "bfloat16"}, "--full"),
    ({"lora_r": 0}, "--lora-r must be positive"), ({"device": "gpu"}, "unknown device 'gpu'"),
    ({"resume": True, "out_dir": "no-such-run"}, "--resume: no-such-run/checkpoint.pt does not exist"),
])
def test_bad_settings_are_refused_before_loading(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        finetune(FinetuneConfig(model="nowhere", data="nothing.jsonl", **settings))


def _history(folder: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (folder / "history.jsonl").read_text().splitlines()]


def test_finetune_learns_the_answers_and_writes_peft_files_and_a_merged_model(checkpoint: Path, data: Path,
                                                                              tmp_path: Path) -> None:
    main(["--model", str(checkpoint), "--data", str(data), "--out-dir", str(tmp_path), "--lora-r", "4",
          "--lr", "1e-2", "--warmup-steps", "0", "--max-steps", "25", "--batch-size", "3", "--merge",
          "--threads", "1", "--eval-data", str(data), "--eval-every", "10"])
    losses = _history(tmp_path)
    assert len(losses) == 25 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    evaluated = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    assert [step for step, _ in evaluated] == [10, 20, 25] and evaluated[2][1] < evaluated[0][1] < 2 * losses[0]
    assert json.loads((tmp_path / "summary.json").read_text())["eval_loss"] == pytest.approx(evaluated[2][1], abs=1e-6)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == DEFAULT_TARGET_MODULES
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.") and k.endswith(("lora_A.weight", "lora_B.weight"))
               for k in keys)
    processor = Idefics2Processor.from_pretrained(tmp_path / "model")
    inputs = _inputs(processor)
    adapted = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    load_adapter(adapted, tmp_path / "adapter")
    merged = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted(**inputs).logits, atol=2e-5, rtol=1e-5)


def test_full_finetuning_trains_every_weight_and_writes_a_checkpoint(checkpoint: Path, data: Path,
                                                                    tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()  # left by an earlier LoRA run in the same folder: refused, or deleted
    config = FinetuneConfig(model=str(checkpoint), data=str(data), out_dir=str(tmp_path), full=True, lr=3e-3,
                            warmup_steps=0, max_steps=12, batch_size=3, threads=1)
    with pytest.raises(ValueError, match=r"already holds a run \(adapter\): pass --resume .* --overwrite"):
        finetune(config)
    finetune(dataclasses.replace(config, overwrite=True))
    assert not (tmp_path / "adapter").exists()
    losses = _history(tmp_path)
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3])
    before = Idefics2ForConditionalGeneration.from_pretrained(checkpoint).state_dict()
    after = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "model").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("vision_model" in k for k in changed) and any("lm_head" in k or "embed" in k for k in changed)
    assert (tmp_path / "model" / "tokenizer.json").is_file()


def test_resume_continues_exactly(checkpoint: Path, data: Path, tmp_path: Path) -> None:
    """3 steps + resume to 6 == 6 straight steps (constant lr; the conversations of a step are a function
    of the seed and the step; the dropout masks continue from the random generators in the checkpoint),
    and the history holds each step once."""
    def config(folder: str, **changes: object) -> FinetuneConfig:
        settings = {"model": str(checkpoint), "data": str(data), "lora_r": 4, "lr": 1e-2, "warmup_steps": 0,
                    "lora_dropout": 0.3, "min_lr_ratio": 1.0, "batch_size": 2, "threads": 1, "max_steps": 6,
                    "checkpoint_every": 3,
                    "out_dir": str(tmp_path / folder), **changes}
        return FinetuneConfig(**settings)  # type: ignore[arg-type]

    finetune(config("straight"))
    finetune(config("split", max_steps=3))
    with open(tmp_path / "split" / "history.jsonl", "a") as f:  # as if killed after the checkpoint
        f.write(json.dumps({"step": 4, "loss": 9.9}) + "\n")
    finetune(config("split", resume=True))
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    split = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    for name, value in straight.items():
        torch.testing.assert_close(split[name], value, msg=name)
    assert [json.loads(line)["step"] for line in (tmp_path / "split" / "history.jsonl").read_text().splitlines()] == [
        1, 2, 3, 4, 5, 6]
    assert _history(tmp_path / "split")[3:] == _history(tmp_path / "straight")[3:]
    with pytest.raises(ValueError, match=r"differs from the one .* continues in --batch-size \(2 in the checkpoint, "
                                         r"3 now\); --lora-r \(4 in the checkpoint, 2 now\)\. Resume with"):
        finetune(config("split", resume=True, lora_r=2, batch_size=3, max_steps=7))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_same_weights_as_one(checkpoint: Path, data: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo), each accumulating 2 micro-batches of 1 conversation, against 1
    process with 4: the loss is normalised by the step's answer tokens over both processes and micro-batches,
    so the gradients (their logged norms) and the updates agree."""
    common = ["--model", str(checkpoint), "--data", str(data), "--lora-r", "4", "--lr", "1e-2",
              "--warmup-steps", "0", "--max-steps", "3", "--threads", "1", "--eval-data", str(data)]
    single = FinetuneConfig(model=str(checkpoint), data=str(data), lora_r=4, lr=1e-2, warmup_steps=0, max_steps=3,
                            threads=1, batch_size=4, out_dir=str(tmp_path / "one"), eval_data=str(data))
    finetune(single)
    env = {**os.environ, "PYTHONPATH": str(SRC), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "-m", "idefics2.finetune", *common, "--batch-size", "1", "--grad-accum", "2",
         "--out-dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4)
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")]
    assert summaries[0]["eval_loss"] == pytest.approx(summaries[1]["eval_loss"], abs=1e-4)  # split over 2 processes
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(_history(tmp_path / "two", key)),
                                   torch.tensor(_history(tmp_path / "one", key)), atol=1e-4, rtol=1e-4)


def test_cli_finetune_reports_bad_data_in_one_line_and_generate_applies_an_adapter(
        checkpoint: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from idefics2.cli import EXIT_USER_ERROR
    from idefics2.cli import main as cli
    from idefics2.processing.image_file import read_image

    (tmp_path / "bad.jsonl").write_text("{oops\n", encoding="utf-8")
    assert cli(["finetune", "--model", str(checkpoint), "--data", str(tmp_path / "bad.jsonl")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("idefics2: error: ") and "bad.jsonl:1: not valid JSON" in err and err.count("\n") == 1

    model = Idefics2ForConditionalGeneration.from_pretrained(checkpoint)
    add_lora(model, LoRAConfig(r=4))
    _randomise_adapters(model, 2)
    save_adapter(model, LoRAConfig(r=4), tmp_path / "adapter")
    image = str(data.parent / "0-0.png")
    answers = []
    for extra in ([], ["--adapter", str(tmp_path / "adapter")]):
        assert cli(["generate", "--model", str(checkpoint), "--image", image, "--json", "--max-new-tokens", "6",
                    "--temperature", "0", *extra, "What color is the circle?"]) == 0
        answers.append(json.loads(capsys.readouterr().out)["answer"])
    merge_lora(model)
    processor = Idefics2Processor.from_pretrained(checkpoint)
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}], add_generation_prompt=True)
    inputs = processor(images=[[read_image(image)]], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert answers[1] == expected.strip() and answers[0] != answers[1]


def test_answers_are_found_with_a_mistral_style_tokenizer() -> None:
    """Mistral's tokenizer writes "Assistant:" alone as "▁Assistant", ":" but in a conversation as "Ass",
    "istant", ":" after "<end_of_utterance>", "▁", "<0x0A>": the labels must come from the latter."""
    processor = Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)
    conversation = Conversation([{"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                                 {"role": "user", "content": [{"type": "text", "text": "Shape?"}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}], [])
    labels = make_batch([conversation], processor, assistant_prefix_ids(processor.tokenizer), "d.jsonl")["labels"][0]
    assert processor.tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist()) == [
        "▁Red", ".", "<end_of_utterance>", "▁A", "▁square", ".", "<end_of_utterance>"]


def test_the_cosine_after_warm_up_follows_transformers_schedule() -> None:
    """The cosine starts after the warm-up (the rate right after it stays ~1, not 0.87x)."""
    transformers = pytest.importorskip("transformers")
    from idefics2.finetune.loop import cosine_progress, lr_factor

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=100)
    expected = []
    for _ in range(100):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    ours = [lr_factor(cosine_progress(step, 100, 10), step, 10, 0.0) for step in range(100)]
    assert ours[10:] == pytest.approx(expected[10:], abs=1e-12)
    assert ours[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # warm-up from the first step


def test_gradient_checkpointing_gives_the_same_run(checkpoint: Path, data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from idefics2.model.layers import CheckpointedLayer

    recomputed: list[int] = []
    block = CheckpointedLayer.forward

    def counting(self: CheckpointedLayer, *args: object) -> object:
        recomputed.append(int(self.gradient_checkpointing and self.training))
        return block(self, *args)

    monkeypatch.setattr(CheckpointedLayer, "forward", counting)
    runs = []
    for extra in ([], ["--gradient-checkpointing"]):
        out = tmp_path / str(len(runs))
        main(["--model", str(checkpoint), "--data", str(data), "--out-dir", str(out), "--lora-r", "4",
              "--lora-dropout", "0.1", "--lr", "1e-2", "--warmup-steps", "0", "--max-steps", "4",
              "--batch-size", "2", "--threads", "1", *extra])
        runs.append((_history(out), load_file(out / "adapter" / "adapter_model.safetensors")))
        if not extra:
            assert not any(recomputed)
            recomputed.clear()
    assert recomputed and all(recomputed[:8])  # the flag switched the layers' checkpointing on
    (plain, plain_adapter), (checkpointed, checkpointed_adapter) = runs
    assert checkpointed == pytest.approx(plain, rel=1e-6, abs=1e-7)
    for key, value in plain_adapter.items():
        torch.testing.assert_close(checkpointed_adapter[key], value, rtol=1e-5, atol=1e-6)

"""Checkpoint folders for the vLLM tests: random small Idefics2 models in the Hub layout, with the
shipped model's tokenizer and chat template, and vLLM engines on them kept for a whole module.

vLLM's CPU attention takes head dims 32, 64, 80, 96, 112, 128, ... only, so the decoders use those.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

# Before vLLM is imported: a small KV cache (GiB) on a machine shared with others.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "src" / "idefics2" / "assets" / "shapes-vqa"
EXAMPLES = ROOT / "examples"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json")
IMAGE_TOKEN_ID = 4  # the shipped tokenizer's `<image>`

torch.set_num_threads(2)


def config_dict(*, text_hidden: int, text_heads: int, kv_heads: int, vision_hidden: int, vision_heads: int,
                patch: int, image_size: int, latents: int, sliding_window: int | None, tie: bool) -> dict[str, Any]:
    """A config.json dict over the shipped tokenizer's 495-token vocabulary; sizes all distinct."""
    return {
        "architectures": ["Idefics2ForConditionalGeneration"], "model_type": "idefics2",
        "image_token_id": IMAGE_TOKEN_ID, "tie_word_embeddings": tie,
        "vision_config": {"hidden_size": vision_hidden, "intermediate_size": 72, "num_hidden_layers": 2,
                          "num_attention_heads": vision_heads, "image_size": image_size, "patch_size": patch,
                          "model_type": "idefics2_vision"},
        "perceiver_config": {"hidden_size": text_hidden, "resampler_n_latents": latents, "resampler_depth": 2,
                             "resampler_n_heads": 4, "resampler_head_dim": 16, "num_key_value_heads": 2,
                             "rms_norm_eps": 1e-6, "model_type": "idefics2_perceiver"},
        "text_config": {"model_type": "mistral", "vocab_size": 495, "hidden_size": text_hidden,
                        "intermediate_size": 3 * text_hidden, "num_hidden_layers": 2,
                        "num_attention_heads": text_heads, "num_key_value_heads": kv_heads,
                        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "sliding_window": sliding_window,
                        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": tie},
    }


def write_checkpoint(folder: Path, config: dict[str, Any], *, seed: int, do_image_splitting: bool,
                     longest_edge: int, shortest_edge: int) -> Path:
    """Our model with every weight drawn at random (norms and latents too), saved in the Hub
    layout, beside the shipped tokenizer and a processor config for these sizes."""
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.5 if param.dim() == 1 else 0.15)
            if name.endswith(".weight") and param.dim() == 1:
                param.add_(1.0)  # norm weights near 1, so activations stay in range through the layers
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(SHIPPED / name, folder / name)
    preprocessor = json.loads((SHIPPED / "preprocessor_config.json").read_text())
    preprocessor.update(do_image_splitting=do_image_splitting,
                        size={"longest_edge": longest_edge, "shortest_edge": shortest_edge})
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    latents = config["perceiver_config"]["resampler_n_latents"]
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": latents,
                                                              "processor_class": "Idefics2Processor"}))
    return folder


def ours(folder: Path) -> tuple[Any, Any]:
    return Idefics2ForConditionalGeneration.from_pretrained(folder).eval(), Idefics2Processor.from_pretrained(folder)


def new_llm(folder: Path, **options: Any) -> Any:
    """A vLLM engine in float32, eager (no graph capture: start-up is most of a test's time)."""
    from vllm import LLM

    return LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
               limit_mm_per_prompt={"image": 2}, max_num_seqs=8, **options)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")

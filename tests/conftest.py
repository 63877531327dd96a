"""Shared fixtures: tiny random configs, and the oracle (transformers) built from the same dict."""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "idefics2" / "assets" / "shapes-vqa"
EXAMPLES = ROOT / "examples"
HUB_LIKE_TOKENIZER = ROOT / "tests" / "fixtures" / "hub-like-tokenizer"


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """`app` under uvicorn on a free 127.0.0.1 port, in a daemon thread: yields the base URL
    ("http://127.0.0.1:PORT") once the server has started, and stops it afterwards."""
    uvicorn = pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def tiny_config_dict(*, vision_hidden: int = 32, vision_heads: int = 4, patch: int = 4, image_size: int = 32,
                     text_hidden: int = 48, text_heads: int = 4, kv_heads: int = 2, layers: int = 2,
                     vocab: int = 120, sliding_window: int | None = 64, latents: int = 3,
                     perceiver_heads: int = 4, perceiver_kv_heads: int = 2, tie: bool = False,
                     image_token_id: int = 100, perceiver_eps: float | None = 1e-6) -> dict[str, Any]:
    """A config.json-shaped dict small enough for CPU tests; every size distinct to catch swaps."""
    perceiver: dict[str, Any] = {
        "hidden_size": text_hidden, "resampler_n_latents": latents, "resampler_depth": 2,
        "resampler_n_heads": perceiver_heads, "resampler_head_dim": 8, "num_key_value_heads": perceiver_kv_heads,
        "model_type": "idefics2",
    }
    if perceiver_eps is not None:
        perceiver["rms_norm_eps"] = perceiver_eps
    return {
        "model_type": "idefics2",
        "image_token_id": image_token_id,
        "tie_word_embeddings": tie,
        "vision_config": {"hidden_size": vision_hidden, "intermediate_size": 40, "num_hidden_layers": 2,
                          "num_attention_heads": vision_heads, "image_size": image_size, "patch_size": patch,
                          "model_type": "idefics2"},
        "perceiver_config": perceiver,
        "text_config": {"model_type": "mistral", "vocab_size": vocab, "hidden_size": text_hidden,
                        "intermediate_size": 56, "num_hidden_layers": layers, "num_attention_heads": text_heads,
                        "num_key_value_heads": kv_heads, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
                        "sliding_window": sliding_window, "pad_token_id": 0, "bos_token_id": 1,
                        "eos_token_id": 2, "tie_word_embeddings": tie},
    }


def oracle_model(config: dict[str, Any], seed: int = 0, attn: str = "eager") -> Any:
    """transformers' Idefics2ForConditionalGeneration with every parameter random (norms and latents too)."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Idefics2Config(**copy.deepcopy(config))
    hf_config._attn_implementation = attn
    for sub in (hf_config.vision_config, hf_config.perceiver_config, hf_config.text_config):
        sub._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.Idefics2ForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lm_head.weight") and config.get("tie_word_embeddings"):
                continue
            param.normal_(0, 0.5 if param.dim() == 1 else 0.2)
    return model


def random_model(config: dict[str, Any], seed: int = 0) -> Any:
    """Ours with every parameter random as `oracle_model` draws them, without importing transformers."""
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() == 1 else 0.2)
    return model


def make_batch(config: dict[str, Any], seed: int = 1) -> dict[str, torch.Tensor]:
    """Three rows: two images of different sizes; one image + a padding image, left padded; text only.

    The canvas (27 x 30 pixels) is not a multiple of the patch size, and the smaller images leave
    partial patches at their edges.
    """
    g = torch.Generator().manual_seed(seed)
    L = config["perceiver_config"]["resampler_n_latents"]
    image = config["image_token_id"]
    T = 6 + 3 * L + 8
    H, W = 27, 30
    pixel_values = torch.randn(3, 2, 3, H, W, generator=g)
    pixel_mask = torch.ones(3, 2, H, W, dtype=torch.long)
    for (b, m), (h, w) in {(0, 1): (19, 30), (1, 0): (27, 13)}.items():
        pixel_mask[b, m, h:, :] = 0
        pixel_mask[b, m, :, w:] = 0
        pixel_values[b, m] *= pixel_mask[b, m]
    pixel_values[1, 1] = 0  # padding image
    pixel_mask[1, 1] = 0
    pixel_values[2] = 0  # the text-only row has two padding images
    pixel_mask[2] = 0
    input_ids = torch.randint(3, image - 1, (3, T), generator=g)
    attention_mask = torch.ones(3, T, dtype=torch.long)
    input_ids[0, 2:2 + L] = image
    input_ids[0, 5 + L:5 + 2 * L] = image
    input_ids[1, :5] = 0  # left padding
    attention_mask[1, :5] = 0
    input_ids[1, 7:7 + L] = image
    input_ids[2, :2] = 0
    attention_mask[2, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "pixel_attention_mask": pixel_mask}

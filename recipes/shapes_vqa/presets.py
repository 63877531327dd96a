"""Model sizes of the shapes recipe: a preset names one, `model_config_dict` turns it into a config.json,
`build_processor` into the processor that feeds it."""

from __future__ import annotations

from typing import Any, NamedTuple

from idefics2.processing.image_processor import Idefics2ImageProcessor
from idefics2.processing.processor import Idefics2Processor
from idefics2.processing.tokenizer import Tokenizer


class Preset(NamedTuple):
    """Model sizes of a `train --preset`. Text heads are 64 wide (two below 128); the perceiver has as many
    heads as the text, with half as many key/value heads."""

    vision_width: int
    vision_layers: int
    patch_size: int
    image_size: int
    latents: int
    perceiver_depth: int
    text_width: int
    text_layers: int
    text_kv_heads: int = 1  # decoder key/value heads; each is a separate key space to match image tokens in


PRESETS: dict[str, Preset] = {
    "tiny": Preset(32, 1, 8, 32, 4, 1, 32, 1),  # tests only
    "cpu": Preset(128, 3, 16, 128, 16, 1, 128, 3),  # sized for a 2-core CPU; 64 patches per image
    "small": Preset(192, 4, 8, 128, 32, 1, 160, 3),  # the first model shipped, 14 MB
    "cpu64": Preset(128, 3, 16, 128, 64, 1, 128, 3),  # "cpu" with one latent per patch, for --route-weight
    # cpu64 with a key/value head per query head in the decoder (docs/experiments/shapes-vqa-log.md)
    "cpu64kv2": Preset(128, 3, 16, 128, 64, 1, 128, 3, text_kv_heads=2),
    # a wider cpu64 for a GPU, where the data loader sets the pace and width is free (the first-stage model)
    "gpu64": Preset(192, 4, 16, 128, 64, 1, 256, 3, text_kv_heads=4),
    # gpu64's tower under cpu64kv2's perceiver and decoder: the shipped model (stitch.py)
    "gpu64-text128": Preset(192, 4, 16, 128, 64, 1, 128, 3, text_kv_heads=2),
}


def model_config_dict(preset: str, vocab_size: int, image_token_id: int) -> dict[str, Any]:
    """config.json for a preset; pad/BOS/EOS are the ids 0/1/2 our tokenizer gives them."""
    v_width, v_layers, patch, image_size, latents, depth, t_width, t_layers, t_kv_heads = PRESETS[preset]
    v_heads = max(1, v_width // 32)
    t_heads = max(1, t_width // 64) if t_width >= 128 else 2
    if t_heads % t_kv_heads:
        raise ValueError(f"preset {preset!r}: {t_kv_heads} key/value heads do not divide {t_heads} heads")
    return {
        "model_type": "idefics2",
        "image_token_id": image_token_id,
        "tie_word_embeddings": True,
        "vision_config": {"hidden_size": v_width, "intermediate_size": 4 * v_width,
                          "num_hidden_layers": v_layers, "num_attention_heads": v_heads,
                          "image_size": image_size, "patch_size": patch, "model_type": "idefics2_vision"},
        "perceiver_config": {"hidden_size": t_width, "resampler_n_latents": latents, "resampler_depth": depth,
                             "resampler_n_heads": t_heads, "resampler_head_dim": t_width // t_heads,
                             "num_key_value_heads": 1 if t_heads == 1 else t_heads // 2,
                             "rms_norm_eps": 1e-6, "model_type": "idefics2_perceiver"},
        "text_config": {"model_type": "mistral", "vocab_size": vocab_size, "hidden_size": t_width,
                        "intermediate_size": 3 * t_width, "num_hidden_layers": t_layers,
                        "num_attention_heads": t_heads, "num_key_value_heads": t_kv_heads,
                        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "sliding_window": None,
                        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                        "tie_word_embeddings": True},
    }


def build_processor(preset: str, tokenizer: Tokenizer) -> Idefics2Processor:
    """Every image is resized to the preset's square size (no splitting), one block of latents each."""
    image_size, latents = PRESETS[preset].image_size, PRESETS[preset].latents
    image_processor = Idefics2ImageProcessor(size={"longest_edge": image_size, "shortest_edge": image_size},
                                             do_image_splitting=False)
    return Idefics2Processor(image_processor, tokenizer, image_seq_len=latents)

"""Up-front checks of `generate`'s tensors and call arguments, before any compute.

Every wrong type, shape, dtype or value raises a ValueError naming the argument, instead of an
IndexError in the embedding, a RuntimeError in a convolution or `torch.multinomial`, or an
AttributeError on a list. The generation-config fields are checked by `config.validate`; the KV
cache size by `check_cache_memory`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from idefics2.generation.vision_cache import VisionFeatureCache

FLOAT32 = torch.finfo(torch.float32)


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool (True is not 1 new token)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_real(value: Any) -> bool:
    """A Python or NumPy real number, not a bool and not a string ("0.7" is not parsed)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_finite_real(value: Any) -> bool:
    return is_real(value) and math.isfinite(value)


def _tensor(name: str, value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {what}, got {type(value).__name__}")
    return value


def _integer_dtype(t: Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def _only_zeros_and_ones(t: Tensor) -> bool:
    return t.numel() == 0 or bool(((t == 0) | (t == 1)).all())


def as_id_list(value: int | Sequence[int] | Tensor | None, name: str = "eos_token_id") -> list[int]:
    """Token ids as a list; a ValueError naming `name` for anything but an int, a list of ints or an
    integer tensor (a string such as "2" is not parsed, True is not id 1)."""
    if value is None:
        return []
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool or value.dim() > 1:
            raise ValueError(f"{name} must be token ids (an int or a list of ints), got a {value.dtype} tensor "
                             f"of shape {tuple(value.shape)}")
        return [int(v) for v in value.reshape(-1).tolist()]
    if is_int(value):
        return [int(value)]  # type: ignore[arg-type]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(is_int(v) for v in value):
        raise ValueError(f"{name} must be token ids (an int or a list of ints), got {value!r}")
    return [int(v) for v in value]


def check_input_tensors(model: nn.Module, input_ids: Any, attention_mask: Any, pixel_values: Any,
                        pixel_attention_mask: Any, inputs_embeds: Any) -> None:
    """Types, dtypes, sizes and values of the tensors given to `generate` (shapes against each
    other are checked by `config.check_inputs` and `request.prepared_embeds`)."""
    vocab = model.config.text_config.vocab_size
    if input_ids is not None:
        ids = _tensor("input_ids", input_ids, "of integer token ids (batch, tokens)")
        if not _integer_dtype(ids):
            raise ValueError(f"input_ids must hold integer token ids (torch.long), got dtype {ids.dtype}")
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, tokens) with at least one row and one token, got shape "
                             f"{tuple(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids must be token ids in [0, {vocab}) (text_config.vocab_size), got values "
                             f"from {low} to {high}")
    if attention_mask is not None:
        mask = _tensor("attention_mask", attention_mask, "of 0 (padding) and 1 (token)")
        if mask.dim() != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
            raise ValueError(f"attention_mask must be (batch, tokens) like input_ids, got shape {tuple(mask.shape)}")
        if not _only_zeros_and_ones(mask):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if pixel_values is not None:
        pixels = _tensor("pixel_values", pixel_values, "(batch, images, channels, height, width)")
        channels = model.config.vision_config.num_channels
        if not pixels.dtype.is_floating_point:
            raise ValueError(f"pixel_values must be floating point (the processor's normalised pixels), got "
                             f"dtype {pixels.dtype}")
        if pixels.dim() != 5 or pixels.shape[2] != channels or min(pixels.shape) == 0:
            raise ValueError(f"pixel_values must be (batch, images, {channels}, height, width) with no empty "
                             f"dimension, got shape {tuple(pixels.shape)}")
        if not bool(pixels.isfinite().all()):
            raise ValueError("pixel_values must be finite: it holds nan or inf")
    if pixel_attention_mask is not None:
        pmask = _tensor("pixel_attention_mask", pixel_attention_mask, "of 0 (padding) and 1 (pixel)")
        if pixel_values is None:
            raise ValueError("pixel_attention_mask was given without pixel_values")
        if not _only_zeros_and_ones(pmask):
            raise ValueError("pixel_attention_mask must hold only 0 (padding) and 1 (pixel)")
    if inputs_embeds is not None:
        embeds = _tensor("inputs_embeds", inputs_embeds, "(batch, tokens, hidden)")
        if not embeds.dtype.is_floating_point:
            raise ValueError(f"inputs_embeds must be floating point, got dtype {embeds.dtype}")
        if input_ids is None:
            raise ValueError("inputs_embeds needs input_ids beside it (they place the images and begin the output)")
        if not bool(embeds.isfinite().all()):
            raise ValueError("inputs_embeds must be finite: it holds nan or inf")


def check_call_arguments(model: nn.Module, seed: Any, generator: Any, extra_eos_token_ids: Any,
                         logits_processor: Any, streamer: Any, use_cache: Any, compile: Any,
                         vision_cache: Any) -> list[int]:
    """The call arguments that are not generation-config fields; returns `extra_eos_token_ids` as a list."""
    if seed is not None and (not is_int(seed) or not -2**63 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != model.device.type:
            raise ValueError(f"generator is on {generator.device} but the model on {model.device}: "
                             f"pass torch.Generator(device={str(model.device)!r})")
    if logits_processor is not None and (not isinstance(logits_processor, Sequence)
                                         or not all(callable(p) for p in logits_processor)):
        raise ValueError(f"logits_processor must be a list of callables (input_ids, scores) -> scores, got "
                         f"{logits_processor!r}")
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        raise ValueError(f"streamer must have put() and end() methods, got {type(streamer).__name__}")
    for name, value in (("use_cache", use_cache), ("compile", compile)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if not (vision_cache is None or isinstance(vision_cache, (bool, VisionFeatureCache))):
        raise ValueError(f"vision_cache must be True, False, None or a VisionFeatureCache, got {vision_cache!r}")
    return as_id_list(extra_eos_token_ids, "extra_eos_token_ids")


def _free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`; None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None
    return None


def cache_bytes(model: nn.Module, batch: int, length: int) -> int:
    """Bytes of a full KV cache for `batch` rows of `length` tokens (keys and values, every layer)."""
    text = model.config.text_config
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * text.num_hidden_layers * batch * text.num_key_value_heads * text.attention_head_dim * length * itemsize


def check_cache_memory(model: nn.Module, batch: int, prompt_length: int, max_new_tokens: int) -> None:
    """A ValueError, before any compute, when prompt + max_new_tokens cannot fit in memory at all."""
    need = cache_bytes(model, batch, prompt_length + max_new_tokens)
    free = _free_bytes(model.device)
    if free is not None and need > free:
        raise ValueError(f"max_new_tokens={max_new_tokens} cannot fit: a KV cache for {batch} row(s) of "
                         f"{prompt_length} + {max_new_tokens} tokens needs {need / 2**30:.1f} GiB and "
                         f"{model.device} has {free / 2**30:.1f} GiB free; lower max_new_tokens or the batch")


def initial_cache_length(prompt_length: int, max_new_tokens: int, compile: bool) -> int:
    """The KV cache's first capacity: prompt + max_new_tokens, at most 1024 new tokens ahead
    uncompiled (the cache and RoPE table grow by doubling, so a request that stops early never
    pays for a huge max_new_tokens); the compiled decode step cannot grow them, so it gets it all."""
    return prompt_length + (max_new_tokens if compile else min(max_new_tokens, 1024))

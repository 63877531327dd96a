"""A processor folder's JSON files read as untrusted input, and the bounds that keep a hostile file or
call from building gigabytes.

Every file the processor reads (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
processor_config.json, preprocessor_config.json, chat_template.json/.jinja) goes through
`read_json_object` or `read_text_file` and has its fields checked on read; whatever is wrong is one
ValueError that names the file and the field. Writes go through `write_text_file`
(`idefics2.files.write_file_atomically`), so a failed save leaves every file whole, old or new.

Caps (documented limits, far above any real checkpoint):
- `MAX_IMAGE_SEQ_LEN` = 4096 `<image>` tokens per (sub-)image. Real checkpoints use the perceiver's
  64 latents; the processor does not know the model, so it refuses only values no model could want.
- `MAX_PAD_LENGTH` = 10**6 tokens: the most `padding="max_length"` pads a row to (from `max_length`,
  or from `model_max_length` when no `max_length` is given).
- `MIN_IMAGE_SIDE` = 14 pixels: Idefics2's vision patch. A (sub-)image smaller than one patch on a side
  has no patch for the vision tower to see, so the processor refuses it.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idefics2 import files

MAX_IMAGE_SEQ_LEN = 4096
MAX_PAD_LENGTH = 1_000_000
MIN_IMAGE_SIDE = 14
DEFAULT_IMAGE_SEQ_LEN = 64


def shown(value: Any, limit: int = 80) -> str:
    """A value's repr, cut short: a hostile file's field may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def field_error(path: Path | str, field: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{path}: {field} must be {expected}, got {shown(value)}")


def read_text_file(path: Path) -> str:
    """A UTF-8 text file; undecodable bytes are a ValueError naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_json_object(path: Path, what: str = "a config") -> dict[str, Any]:
    """A JSON file whose top level is an object (`what` it should be, for the message); anything else
    is a ValueError naming the file."""
    text = read_text_file(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, too many digits, too deep
        raise ValueError(f"{path}: not valid JSON ({shown(str(err), 200)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {_json_kind(data)}, not {what} (expected a JSON object)")
    return data


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def write_text_file(path: Path, text: str) -> None:
    """`path` replaced whole by `text`, or left as it was if the write fails at any point."""
    files.write_file_atomically(path, text)


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value: Any) -> bool:
    """A finite Python or NumPy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def checked_image_seq_len(value: Any, where: str = "image_seq_len") -> int:
    """`<image>` tokens per (sub-)image: an int in 1..MAX_IMAGE_SEQ_LEN."""
    if not is_int(value) or not 1 <= value <= MAX_IMAGE_SEQ_LEN:
        raise ValueError(f"{where} must be a positive int of at most {MAX_IMAGE_SEQ_LEN} (real checkpoints "
                         f"use 64, the perceiver's latents), got {shown(value)}")
    return int(value)


def checked_chat_template_field(value: Any, path: Path, field: str = "chat_template") -> Any:
    """None, a Jinja source, or a non-empty {name: source} object of strings."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return value
    raise field_error(path, field, "a string or a non-empty {name: template} object of strings", value)


def read_processor_config(path: Path) -> dict[str, Any]:
    """processor_config.json, checked: `image_seq_len`, `chat_template`, `image_processor` (an object;
    its settings are checked by the image processor)."""
    config = read_json_object(path)
    if "image_seq_len" in config:
        checked_image_seq_len(config["image_seq_len"], f"{path}: image_seq_len")
    checked_chat_template_field(config.get("chat_template"), path)
    if "image_processor" in config and not isinstance(config["image_processor"], dict):
        raise field_error(path, "image_processor", "a JSON object of image processor settings",
                          config["image_processor"])
    return config


def check_chat_template_files(folder: Path, json_name: str, jinja_name: str, named_dir: str) -> None:
    """The chat template files of `folder`, checked before they are read: chat_template.json an object
    whose `chat_template` is a string or named strings, every .jinja file UTF-8 text."""
    if (folder / json_name).is_file():
        config = read_json_object(folder / json_name)
        checked_chat_template_field(config.get("chat_template"), folder / json_name)
    for path in [folder / jinja_name, *sorted((folder / named_dir).glob("*.jinja"))]:
        if path.is_file():
            read_text_file(path)


def checked_pad_length(target: int, source: str) -> int:
    """The length `padding="max_length"` pads to, bounded by MAX_PAD_LENGTH."""
    if target > MAX_PAD_LENGTH:
        raise ValueError(f"padding='max_length' would pad every row to {source}={target} tokens; the most "
                         f"this tokenizer pads to is {MAX_PAD_LENGTH} (a 10**6 cap against memory bombs): "
                         "pass a smaller max_length")
    return target


def check_image_sides(pixels: Mapping[str, Any]) -> None:
    """Every real (sub-)image must hold at least one MIN_IMAGE_SIDE-pixel vision patch on each side:
    one smaller than a patch gives the vision tower nothing to see and fails later in the model."""
    mask = pixels.get("pixel_attention_mask")
    if mask is not None:
        mask = torch.as_tensor(mask)
        heights, widths = mask[..., :, 0].sum(-1), mask[..., 0, :].sum(-1)  # (B, M): valid region top-left
        sizes = [list(zip(hs, ws, strict=True)) for hs, ws in zip(heights.tolist(), widths.tolist(), strict=True)]
        real = mask.flatten(2).any(-1).tolist()
    elif isinstance(pixels.get("pixel_values"), list):  # do_pad=False: a list per sample of (3, h, w)
        sizes = [[tuple(x.shape[-2:]) for x in sample] for sample in pixels["pixel_values"]]
        real = [[True] * len(sample) for sample in sizes]
    else:
        return
    for b, sample in enumerate(sizes):
        for k, (h, w) in enumerate(sample):
            if real[b][k] and min(h, w) < MIN_IMAGE_SIDE:
                raise ValueError(
                    f"sample {b}, (sub-)image {k}: a {w}x{h} image is smaller than one {MIN_IMAGE_SIDE}x"
                    f"{MIN_IMAGE_SIDE} vision patch; pass a larger image or let the processor resize it "
                    "(do_resize=True)")

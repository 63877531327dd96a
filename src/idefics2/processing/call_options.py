"""The keyword options of `Idefics2Processor.__call__`, merged as transformers 5.x processors merge them.

An option may come flat (`padding="max_length"`), in its modality's dict (`text_kwargs=`,
`images_kwargs=`) or, for `return_tensors`, in `common_kwargs=`; the tokenizer's `init_kwargs`
(`Tokenizer.from_pretrained(folder, padding=..., max_length=...)`) are the text defaults. Code written
for transformers 5.x passes options in all of these forms, and the test suites of transformers check
each one. Precedence, lowest first: our defaults, the tokenizer's `init_kwargs`, `common_kwargs`, the
modality dicts, flat keywords; an option given both flat and in its modality's dict is an error, as in
transformers. transformers logs and drops an option it does not know; here every unknown or
unimplemented option raises a ValueError naming it, so a typo or a missing feature is never silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from idefics2.processing.image_settings import SETTING_NAMES

# Tokenizer keywords of a processor call, with the value used when nothing sets them.
TEXT_DEFAULTS: dict[str, Any] = {
    "padding": False,
    "truncation": False,
    "max_length": None,
    "add_special_tokens": True,
    "padding_side": None,
}
IMAGE_OPTIONS = (*SETTING_NAMES, "input_data_format")
_RETURN_TENSORS = "return_tensors"
_GROUPS = {
    "text_kwargs": {*TEXT_DEFAULTS, _RETURN_TENSORS},
    "images_kwargs": {*IMAGE_OPTIONS, _RETURN_TENSORS},
    "common_kwargs": {_RETURN_TENSORS},
}
# transformers' dicts for modalities Idefics2 does not have: refused unless empty.
_OTHER_MODALITIES = ("audio_kwargs", "videos_kwargs")
_PROCESSOR_ONLY = ("image_seq_len",)


@dataclass(frozen=True)
class CallOptions:
    """One call's options, sorted by who uses them."""

    text: dict[str, Any]  # tokenizer keywords
    images: dict[str, Any]  # image processor overrides (`input_data_format` included)
    return_tensors: str | None
    image_seq_len: int | None


def _group(kwargs: dict[str, Any], name: str) -> dict[str, Any]:
    value = kwargs.pop(name, None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of options, got {type(value).__name__}")
    return dict(value)


def _refuse_unknown(given: dict[str, Any], valid: set[str], where: str) -> None:
    unknown = sorted(set(given) - valid)
    if unknown:
        raise ValueError(f"unknown or unsupported {where} option(s) {unknown}; valid: {sorted(valid)}")


def merge_call_options(kwargs: dict[str, Any], tokenizer_defaults: dict[str, Any]) -> CallOptions:
    """Sort a call's keywords into tokenizer, image processor and processor options (module docstring).

    Raises ValueError for an unknown option (flat or in a dict), for an option given flat and in its
    modality's dict, and for `return_tensors` values that disagree between text and images.
    """
    flat = dict(kwargs)
    groups = {name: _group(flat, name) for name in (*_GROUPS, *_OTHER_MODALITIES)}
    for name in _OTHER_MODALITIES:
        if groups[name]:
            raise ValueError(f"{name} was given, but Idefics2 takes no {name.removesuffix('_kwargs')} input")
    for name, valid in _GROUPS.items():
        _refuse_unknown(groups[name], valid, name)
    image_seq_len = flat.pop("image_seq_len", None)
    _refuse_unknown(flat, _GROUPS["text_kwargs"] | _GROUPS["images_kwargs"] | set(_PROCESSOR_ONLY), "processor")
    for name in ("text_kwargs", "images_kwargs"):
        twice = sorted(set(groups[name]) & set(flat))
        if twice:
            raise ValueError(f"Keyword argument(s) {twice} passed two times: in {name} and as keyword(s)")
    common = groups["common_kwargs"]
    defaults = {key: value for key, value in tokenizer_defaults.items() if key in TEXT_DEFAULTS}
    text = {**TEXT_DEFAULTS, **defaults, **common, **groups["text_kwargs"]}
    images = {**common, **groups["images_kwargs"]}
    for key, value in flat.items():
        if key in _GROUPS["text_kwargs"]:
            text[key] = value
        if key in _GROUPS["images_kwargs"]:
            images[key] = value
    text_tensors, image_tensors = text.pop(_RETURN_TENSORS, None), images.pop(_RETURN_TENSORS, None)
    if None not in (text_tensors, image_tensors) and text_tensors != image_tensors:
        raise ValueError(
            f"return_tensors is {text_tensors!r} for the text but {image_tensors!r} for the images; "
            "one output holds both, so give one value"
        )
    return_tensors = image_tensors if text_tensors is None else text_tensors
    return CallOptions(text, images, return_tensors, image_seq_len)

"""A tokenizer's Hub files: tokenizer.json, tokenizer_config.json, special_tokens_map.json.

Reading gives the `tokenizers` pipeline and the keyword settings `Tokenizer` takes; writing puts
them back in the layout transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from idefics2.processing.config_files import (
    field_error,
    is_finite_number,
    is_int,
    read_json_object,
    shown,
    write_text_file,
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
UNLIMITED = int(1e30)  # the Hub's `model_max_length` when a tokenizer sets none
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# The `Tokenizer` settings a config (or `Tokenizer.from_pretrained`'s keywords) may set.
SETTING_KEYS = (
    *SPECIAL_KEYS,
    "additional_special_tokens",
    "add_bos_token",
    "add_eos_token",
    "padding_side",
    "truncation_side",
    "model_max_length",
    "clean_up_tokenization_spaces",
    "chat_template",
)
# Call defaults that transformers keeps in `init_kwargs` and saves in tokenizer_config.json: the
# tokenizer's own calls ignore them, processors use them as the defaults of their text options.
CALL_DEFAULT_KEYS = ("padding", "truncation", "max_length")
# Keys this class owns; every other key of tokenizer_config.json is kept verbatim for save_pretrained.
OWNED_KEYS = (*SETTING_KEYS, *CALL_DEFAULT_KEYS, "added_tokens_decoder")


TRUNCATE = {True, "longest_first", "only_first"}
NO_TRUNCATE = {False, None, "do_not_truncate"}
PAD_LONGEST = {True, "longest"}
PADDING = PAD_LONGEST | {False, None, "do_not_pad", "max_length"}


def is_option(value: Any, allowed: set[Any]) -> bool:
    """Membership that a list or dict read from a JSON config cannot break (they are unhashable)."""
    return isinstance(value, (bool, str, type(None))) and value in allowed


def checked_call_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """The call defaults, refused when a processor call would only fail on them later."""
    unknown = sorted(set(defaults) - set(CALL_DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"unknown tokenizer call default(s) {unknown}; valid: {list(CALL_DEFAULT_KEYS)}")
    if "padding" in defaults and not is_option(defaults["padding"], PADDING):
        raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', "
                         f"got {shown(defaults['padding'])}")
    if "truncation" in defaults and not is_option(defaults["truncation"], TRUNCATE | NO_TRUNCATE):
        raise ValueError(f"Unsupported truncation={shown(defaults['truncation'])}")
    limit = defaults.get("max_length")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_length must be a positive int or None, got {shown(limit)}")
    return dict(defaults)


def token_content(value: Any) -> str | None:
    """Special tokens appear in configs either as plain strings or as serialised AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"Cannot read a special token from {value!r}")


def read_tokenizer_folder(folder: Path) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """The pipeline of `folder`/tokenizer.json and the `Tokenizer` keyword settings from its configs,
    every field checked on read (a ValueError names the file and the field)."""
    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).is_file():
        raise ValueError(f"No {TOKENIZER_FILE} in {folder}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as err:  # the tokenizers library raises a bare Exception for a bad file
        raise ValueError(f"{folder / TOKENIZER_FILE}: the tokenizers library cannot read it "
                         f"({shown(str(err), 200)})") from None
    config: dict[str, Any] = {}
    if (folder / TOKENIZER_CONFIG_FILE).is_file():
        config = checked_tokenizer_config(folder / TOKENIZER_CONFIG_FILE)
    if (folder / SPECIAL_TOKENS_MAP_FILE).is_file():
        special_map = checked_tokenizer_config(folder / SPECIAL_TOKENS_MAP_FILE)
        for key, value in special_map.items():  # tokenizer_config.json wins, as in transformers
            config.setdefault(key, value)
    check_added_tokens(backend, config.get("added_tokens_decoder") or {})
    additional = config.get("additional_special_tokens") or []
    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # 4.x allowed several named templates
        named = {item["name"]: item["template"] for item in chat_template}
        chat_template = named.get("default")
    max_len = config.get("model_max_length")
    return backend, dict(
        **{key: token_content(config.get(key)) for key in SPECIAL_KEYS},
        additional_special_tokens=[t for t in map(token_content, additional) if t is not None],
        add_bos_token=config.get("add_bos_token"),
        add_eos_token=config.get("add_eos_token"),
        padding_side=config.get("padding_side") or "left",
        truncation_side=config.get("truncation_side") or "right",
        model_max_length=int(max_len) if max_len is not None else UNLIMITED,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        chat_template=chat_template,
        init_kwargs={key: config[key] for key in CALL_DEFAULT_KEYS if key in config},
        extra_config={k: v for k, v in config.items() if k not in OWNED_KEYS},
    )


def checked_tokenizer_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json or special_tokens_map.json, each field this class reads checked."""
    config = read_json_object(path)
    for key in SPECIAL_KEYS:
        _checked_token(config.get(key), path, key)
    additional = config.get("additional_special_tokens")
    if additional is not None and not isinstance(additional, list):
        raise field_error(path, "additional_special_tokens", "a list of tokens", additional)
    for i, token in enumerate(additional or []):
        _checked_token(token, path, f"additional_special_tokens[{i}]")
    for key in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise field_error(path, key, "true, false or null", config[key])
    for key in ("padding_side", "truncation_side"):
        if config.get(key) not in (None, "left", "right"):
            raise field_error(path, key, "'left' or 'right'", config[key])
    limit = config.get("model_max_length")
    if limit is not None and not ((is_int(limit) or is_finite_number(limit)) and limit >= 1):
        raise field_error(path, "model_max_length", "a finite number >= 1 (1e30: no limit)", limit)
    _check_named_templates(config.get("chat_template"), path)
    _check_added_tokens_decoder(config.get("added_tokens_decoder"), path)
    defaults = {key: config[key] for key in CALL_DEFAULT_KEYS if key in config}
    try:
        checked_call_defaults(defaults)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return config


def _checked_token(value: Any, path: Path, field: str) -> None:
    try:
        token_content(value)
    except ValueError:
        raise field_error(path, field, 'a string, null or an object with a "content" string', value) from None


def _check_named_templates(value: Any, path: Path) -> None:
    """A chat template: a string, or 4.x's list of {"name": ..., "template": ...} objects."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list):
        raise field_error(path, "chat_template", 'a string or a list of {"name", "template"} objects', value)
    for i, item in enumerate(value):
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)):
            raise field_error(path, f"chat_template[{i}]", 'an object with "name" and "template" strings', item)


def _check_added_tokens_decoder(value: Any, path: Path) -> None:
    """{"id": {"content": str, "lstrip": bool, ...}}, ids decimal strings."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise field_error(path, "added_tokens_decoder", "an object of {id: token}", value)
    for index, spec in value.items():
        field = f"added_tokens_decoder[{shown(index, 30)}]"
        if not (index.isascii() and index.isdigit() and len(index) <= 18):
            raise ValueError(f"{path}: {field}: the key must be a token id (a non-negative integer)")
        if not isinstance(spec, dict) or not isinstance(spec.get("content"), str) or not spec["content"]:
            raise field_error(path, f"{field}.content", "a non-empty string", spec)
        for flag in ("single_word", "lstrip", "rstrip", "normalized", "special"):
            if flag in spec and not isinstance(spec[flag], bool):
                raise field_error(path, f"{field}.{flag}", "true or false", spec[flag])


def check_added_tokens(backend: tokenizers.Tokenizer, declared: dict[str, Any]) -> None:
    """Add tokens the config declares but tokenizer.json lacks; refuse files that disagree on ids."""
    for index, spec in sorted(declared.items(), key=lambda item: int(item[0])):
        content = spec["content"]
        existing = backend.token_to_id(content)
        if existing is None:
            token = tokenizers.AddedToken(
                content,
                single_word=spec.get("single_word", False),
                lstrip=spec.get("lstrip", False),
                rstrip=spec.get("rstrip", False),
                normalized=spec.get("normalized", False),
                special=spec.get("special", False),
            )
            backend.add_tokens([token])
            existing = backend.token_to_id(content)
        if existing != int(index):
            raise ValueError(
                f"tokenizer_config.json declares {content!r} as id {index} but "
                f"tokenizer.json gives it id {existing}"
            )


def write_tokenizer_folder(tokenizer: Any, folder: Path) -> tuple[str, str, str]:
    """Write the three files of `tokenizer` (a `Tokenizer`, whose module imports this one) into
    `folder`; returns their paths, tokenizer_config.json first (transformers' order).

    `legacy: true` is added when the config does not say otherwise: it was the 4.x default, and it
    makes transformers 5 keep the `▁` prefix on every segment as tokenizer.json does (docs/numerics.md §6.2).
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_text_file(folder / TOKENIZER_FILE, tokenizer.backend.to_str(pretty=True))
    decoder = tokenizer.backend.get_added_tokens_decoder()
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "legacy": True,
        **tokenizer.extra_config,
    }
    for key, flag in (("add_bos_token", tokenizer.add_bos_token), ("add_eos_token", tokenizer.add_eos_token)):
        if flag is not None:
            config[key] = flag
    config["added_tokens_decoder"] = {str(i): tok.__getstate__() for i, tok in sorted(decoder.items())}
    config["additional_special_tokens"] = list(tokenizer.additional_special_tokens)
    config.update({key: getattr(tokenizer, key) for key in SPECIAL_KEYS if getattr(tokenizer, key) is not None})
    config.update(
        padding_side=tokenizer.padding_side,
        truncation_side=tokenizer.truncation_side,
        model_max_length=tokenizer.model_max_length,
        clean_up_tokenization_spaces=tokenizer.clean_up_tokenization_spaces,
        **tokenizer.init_kwargs,
    )
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    by_content = {tok.content: tok.__getstate__() for tok in decoder.values()}

    def as_dict(content: str) -> dict[str, Any]:  # special_tokens_map.json has no "special" field
        entry = by_content.get(content) or tokenizers.AddedToken(content).__getstate__()
        return {key: value for key, value in entry.items() if key != "special"}

    names = [key for key in SPECIAL_KEYS if getattr(tokenizer, key) is not None]
    special_map = {key: as_dict(getattr(tokenizer, key)) for key in names}
    special_map["additional_special_tokens"] = [as_dict(t) for t in tokenizer.additional_special_tokens]
    for name, payload in ((TOKENIZER_CONFIG_FILE, config), (SPECIAL_TOKENS_MAP_FILE, special_map)):
        write_text_file(folder / name, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return tuple(str(folder / name) for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_FILE))

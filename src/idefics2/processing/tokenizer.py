"""Text tokenizer: a strict wrapper around a `tokenizers.Tokenizer` pipeline plus its Hub config files.

First step of the text path (expanded prompts -> input_ids, attention_mask; ids -> text on the way out).
Must match transformers 4.x fast tokenizers on the same files (docs/numerics.md §6.2): tokenizer.json defines the
segmentation (the Hub normaliser prefixes `▁` to every segment), BOS/EOS follow `add_bos_token` and
`add_eos_token`, padding is on the left. Nothing here is specific to the Mistral vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch

from idefics2.processing.batch import BatchFeature
from idefics2.processing.chat_inputs import check_options
from idefics2.processing.chat_template import Message, render_chat
from idefics2.processing.config_files import checked_pad_length, shown
from idefics2.processing.tokenizer_files import (
    CALL_DEFAULT_KEYS,
    NO_TRUNCATE,
    PAD_LONGEST,
    PADDING,
    SETTING_KEYS,
    SPECIAL_KEYS,
    TRUNCATE,
    UNLIMITED,
    checked_call_defaults,
    is_option,
    read_tokenizer_folder,
    write_tokenizer_folder,
)

# transformers treats a `model_max_length` above this as "no limit"; the Hub value is 1e30 (UNLIMITED).
_NO_LIMIT = int(1e20)
# What `from_pretrained` takes: the settings and the call defaults (`init_kwargs`).
FROM_PRETRAINED_OPTIONS = (*SETTING_KEYS, *CALL_DEFAULT_KEYS)


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: glue punctuation and English contractions back on."""
    for spaced in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"):
        text = text.replace(spaced, spaced.strip())
    return text


def _as_id_list(ids: Any) -> list[int]:
    """Accept a list/tuple of ints, a 1-D tensor or array, or a single int."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim > 1:
            raise ValueError(
                f"decode expects one sequence, got an array of shape {tuple(ids.shape)}; use batch_decode"
            )
        return [int(i) for i in ids.tolist()] if ids.ndim == 1 else [int(ids.item())]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class Tokenizer:
    """`tokenizers` pipeline + the special-token, padding and truncation settings of `tokenizer_config.json`.

    Args:
        backend: the `tokenizers.Tokenizer`; it owns normalisation, added tokens and the post-processor.
        add_bos_token / add_eos_token: when either is not None the post-processor is rebuilt from them,
            as 4.x `LlamaTokenizerFast` does; when both are None the file's post-processor is kept.
        padding_side: "left" by default, since generation needs left padding.
        init_kwargs: `padding`, `truncation`, `max_length` defaults for processor calls. As in
            transformers, the tokenizer's own calls ignore them, processors read them and
            `save_pretrained` writes them into tokenizer_config.json.
        extra_config: other `tokenizer_config.json` keys, written back unchanged by `save_pretrained`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        additional_special_tokens: Sequence[str] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int = UNLIMITED,
        clean_up_tokenization_spaces: bool = False,
        chat_template: str | None = None,
        init_kwargs: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
            raise ValueError(f"model_max_length must be a positive int, got {model_max_length!r}")
        self.init_kwargs = checked_call_defaults(init_kwargs or {})
        self.backend = backend
        # Per-call settings replace whatever padding/truncation the file enables, as in transformers.
        backend.no_padding()
        backend.no_truncation()
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.additional_special_tokens = list(additional_special_tokens)
        missing = [
            t
            for t in (bos_token, eos_token, unk_token, pad_token, *self.additional_special_tokens)
            if t is not None and backend.token_to_id(t) is None
        ]
        self.add_special_tokens(missing)  # transformers adds declared special tokens the vocabulary lacks
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        if add_bos_token is not None or add_eos_token is not None:
            self._rebuild_post_processor()
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.chat_template = chat_template
        self.extra_config = dict(extra_config or {})

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (+ `special_tokens_map.json` if present).

        `overrides` replace the config's settings (`padding_side="right"`, `model_max_length=512`,
        `pad_token=...`) or set the call defaults `padding`, `truncation`, `max_length` that
        processors use (`init_kwargs`), as transformers' `from_pretrained` keywords do. transformers
        keeps any other keyword silently; here it is an error naming it.
        """
        unknown = sorted(set(overrides) - set(FROM_PRETRAINED_OPTIONS))
        if unknown:
            raise ValueError(f"unknown tokenizer option(s) {unknown}; valid: {sorted(FROM_PRETRAINED_OPTIONS)}")
        backend, settings = read_tokenizer_folder(Path(folder))
        defaults = {key: overrides.pop(key) for key in CALL_DEFAULT_KEYS if key in overrides}
        settings["init_kwargs"] = {**settings["init_kwargs"], **defaults}
        try:
            return cls(backend, **{**settings, **overrides})
        except ValueError as err:  # settings that do not fit together (e.g. add_bos_token without a bos_token)
            raise ValueError(f"{Path(folder) / 'tokenizer_config.json'}: {err}") from None

    def save_pretrained(self, folder: str | Path) -> tuple[str, str, str]:
        """Write tokenizer_config.json, special_tokens_map.json and tokenizer.json (loadable by
        transformers); returns their paths, as transformers returns the files it saved."""
        return write_tokenizer_folder(self, Path(folder))

    # ------------------------------------------------------------------ vocabulary
    def _rebuild_post_processor(self) -> None:
        """4.x `update_post_processor`: `[BOS] $A [EOS]` from the two flags, replacing the file's template."""
        wanted = [(self.add_bos_token, self.bos_token, "bos"), (self.add_eos_token, self.eos_token, "eos")]
        for flag, token, name in wanted:
            if flag and token is None:
                raise ValueError(f"add_{name}_token is true but {name}_token is not set")
        bos, eos = ([token] if flag else [] for flag, token, _ in wanted)

        def template(part: str, type_id: int) -> str:
            return " ".join(f"{t}:{type_id}" for t in [*bos, f"${part}", *eos])

        self.backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=template("A", 0),
            pair=f"{template('A', 0)} {template('B', 1)}",
            special_tokens=[(t, self.token_to_id(t)) for t in dict.fromkeys([*bos, *eos])],
        )

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and self.backend.token_to_id(token) is not None

    def token_to_id(self, token: str) -> int:
        """Strict lookup: a missing token is an error, not the unk id (see `convert_tokens_to_ids`)."""
        index = self.backend.token_to_id(token)
        if index is None:
            raise ValueError(f"Token {token!r} is not in the vocabulary")
        return index

    def add_special_tokens(self, tokens: Sequence[str]) -> int:
        """Register special (never split, never normalised) tokens; returns how many ids were created."""
        added = self.backend.add_special_tokens(
            [tokenizers.AddedToken(t, normalized=False, special=True) for t in tokens]
        )
        named = {self.bos_token, self.eos_token, self.unk_token, self.pad_token}
        for token in tokens:
            if token not in self.additional_special_tokens and token not in named:
                self.additional_special_tokens.append(token)
        return added

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Unknown tokens map to the unk id (transformers' rule); without an unk token they are an error."""

        def one(token: str) -> int:
            index = self.backend.token_to_id(token)
            if index is None:
                if self.unk_token_id is None:
                    raise ValueError(f"Token {token!r} is not in the vocabulary and there is no unk token")
                return self.unk_token_id
            return index

        return one(tokens) if isinstance(tokens, str) else [one(t) for t in tokens]

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int], skip_special_tokens: bool = False
    ) -> str | list[str]:
        special = set(self.all_special_ids) if skip_special_tokens else set()

        def one(index: int) -> str:
            token = self.backend.id_to_token(int(index))
            if token is None:
                raise ValueError(f"Token id {index} is outside the vocabulary (size {len(self)})")
            return token

        if isinstance(ids, int):
            return one(ids)
        return [one(i) for i in ids if int(i) not in special]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Base vocabulary without added tokens (transformers' meaning); `len(tokenizer)` counts them."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _optional_id(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._optional_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._optional_id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._optional_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._optional_id(self.pad_token)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(index for index, tok in self.backend.get_added_tokens_decoder().items() if tok.special)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens, as chat templates expect them (`bos_token`, ...)."""
        return {key: getattr(self, key) for key in SPECIAL_KEYS if getattr(self, key) is not None}

    # ------------------------------------------------------------------ encoding
    def _limit(self, max_length: int | None) -> int | None:
        if max_length is not None:
            return max_length
        return self.model_max_length if self.model_max_length <= _NO_LIMIT else None

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        padding_side: str | None = None,
    ) -> dict[str, Any]:
        """Encode one string or a batch.

        Returns a dict with `input_ids` and `attention_mask`: lists (flat for a single string) when
        `return_tensors` is None, else int64 "pt"/"np" arrays of shape (B, T). Truncation keeps the
        special tokens (it trims the text part), as transformers does. `padding_side` ("left" or
        "right") replaces the tokenizer's for this call.
        """
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        is_batched = not isinstance(text, str)
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(
                f"text must be a string or a list of strings, got {[type(t).__name__ for t in texts]}"
            )
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        if not is_option(truncation, TRUNCATE | NO_TRUNCATE):
            raise ValueError(f"Unsupported truncation={truncation!r}")
        if not is_option(padding, PADDING):
            raise ValueError(f"Unsupported padding={shown(padding)}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
            raise ValueError(f"max_length must be an int or None, got {shown(max_length)}")
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        if truncation in TRUNCATE and (limit := self._limit(max_length)) is not None:
            n_special = self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0
            if limit < n_special:
                raise ValueError(f"max_length={limit} leaves no room for the {n_special} special tokens")
            for encoding in encodings:
                encoding.truncate(limit - n_special, direction=self.truncation_side)
        if add_special_tokens:
            encodings = [self.backend.post_process(e, None, True) for e in encodings]
        rows = [list(e.ids) for e in encodings]
        masks = [[1] * len(r) for r in rows]
        if padding == "max_length":
            target = self._limit(max_length)
            if target is None:
                raise ValueError("padding='max_length' needs max_length")
            checked_pad_length(target, "max_length" if max_length is not None else "model_max_length")
            self._pad(rows, masks, target, side)
        elif padding in PAD_LONGEST:
            self._pad(rows, masks, max((len(r) for r in rows), default=0), side)
        if return_tensors is None:
            if is_batched:
                return BatchFeature(input_ids=rows, attention_mask=masks)
            return BatchFeature(input_ids=rows[0], attention_mask=masks[0])
        if len({len(r) for r in rows}) > 1:
            raise ValueError(
                "Sequences have different lengths "
                f"{[len(r) for r in rows]}; pass padding=True to return tensors"
            )
        return BatchFeature(input_ids=as_tensor(rows, return_tensors),
                            attention_mask=as_tensor(masks, return_tensors))

    def _pad(self, rows: list[list[int]], masks: list[list[int]], target: int, side: str) -> None:
        """Pad in place to `target` on `side`; rows already longer stay as they are."""
        if any(len(r) < target for r in rows) and self.pad_token_id is None:
            raise ValueError("Padding was requested but the tokenizer has no pad token")
        for row, mask in zip(rows, masks, strict=True):
            n = target - len(row)
            if n <= 0:
                continue
            if side == "left":
                row[:0], mask[:0] = [self.pad_token_id] * n, [0] * n
            else:
                row.extend([self.pad_token_id] * n)
                mask.extend([0] * n)

    # ------------------------------------------------------------------ decoding
    def apply_chat_template(self, conversation: Sequence[Message] | Sequence[Sequence[Message]], *,
                            chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = True, padding: bool | str = False,
                            truncation: bool | str = False,
                            max_length: int | None = None, return_tensors: str | None = None,
                            return_dict: bool = True, tokenizer_kwargs: dict[str, Any] | None = None,
                            **template_kwargs: Any) -> Any:
        """transformers' tokenizer form: render with `chat_template` (default: the tokenizer's) and,
        with `tokenize` (the default), tokenize without adding special tokens (the template writes
        them): a BatchFeature with `return_dict` (the default), else the ids. Other keywords are
        template variables; transformers options we do not implement raise naming them."""
        check_options(template_kwargs)
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template: pass chat_template=, or use the "
                             "processor's apply_chat_template (it has the Idefics2 template)")
        is_batched = bool(conversation) and all(isinstance(c, (list, tuple)) for c in conversation)
        conversations = list(conversation) if is_batched else [conversation]
        variables = {**self.special_tokens_map, **template_kwargs}
        rendered = [render_chat(c, template, add_generation_prompt=add_generation_prompt, **variables)
                    for c in conversations]
        if not tokenize:
            return rendered if is_batched else rendered[0]
        options = {"add_special_tokens": False, "padding": padding, "truncation": truncation,
                   "max_length": max_length, "return_tensors": return_tensors, **(tokenizer_kwargs or {})}
        encoded = self(rendered if is_batched else rendered[0], **options)
        return encoded if return_dict else encoded["input_ids"]

    def decode(
        self, ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        """ids (list, 1-D tensor/array or int) -> text, through tokenizer.json's decoder."""
        text = self.backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean else text

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """A list of sequences or a (B, T) tensor/array -> one string per row."""
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]


def as_tensor(rows: list[list[int]], kind: str) -> Any:
    """Equal-length id rows -> an int64 (B, T) torch tensor ("pt") or numpy array ("np")."""
    array = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
    return torch.from_numpy(array) if kind == "pt" else array

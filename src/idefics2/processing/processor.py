"""Idefics2Processor: prompts + images -> input_ids, attention_mask, pixel_values, pixel_attention_mask.

Entry point of the data flow: each `<image>` becomes `F I*image_seq_len F` (5 blocks with splitting,
adjacent fakes shared; F/I = fake/image token), images are matched to their samples, then tokenizer and
image processor run. Must match transformers 4.x token for token (docs/numerics.md §6.3, no space inserted after a
closing fake), with a ValueError for every §6.4 mismatch and for truncation that would cut an image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any

from idefics2.files import resolve_folder
from idefics2.processing.batch import BatchFeature
from idefics2.processing.call_options import merge_call_options
from idefics2.processing.chat_inputs import (
    PROCESSOR_OPTIONS,
    UNSUPPORTED_OPTIONS,
    check_options,
    images_from_messages,
)
from idefics2.processing.chat_template import (
    CHAT_TEMPLATE_JINJA,
    CHAT_TEMPLATE_JSON,
    DEFAULT_CHAT_TEMPLATE,
    NAMED_TEMPLATES_DIR,
    ChatTemplate,
    Message,
    read_chat_template,
    template_source,
    write_chat_template,
)
from idefics2.processing.config_files import (
    DEFAULT_IMAGE_SEQ_LEN,
    check_chat_template_files,
    check_image_sides,
    checked_image_seq_len,
    read_processor_config,
    write_text_file,
)
from idefics2.processing.image_inputs import make_nested_images
from idefics2.processing.image_processor import Idefics2ImageProcessor
from idefics2.processing.image_settings import SETTING_NAMES
from idefics2.processing.tokenizer import FROM_PRETRAINED_OPTIONS, Tokenizer, as_tensor

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
PROCESSOR_CONFIG_FILE = "processor_config.json"
# `from_pretrained` keywords that go to the tokenizer; the processor keeps `chat_template` itself.
_TOKENIZER_OVERRIDES = tuple(key for key in FROM_PRETRAINED_OPTIONS if key != "chat_template")
# Each image becomes 4 crops + the full image when splitting (docs/numerics.md §5.5).
SPLIT_IMAGES_PER_IMAGE = 5


def reserved_token_in(text: str) -> str | None:
    """The first of the tokens the chat template writes itself (`<image>`, the fake token,
    `<end_of_utterance>`) that a message's text spells out, or None. The tokenizer reads such text as
    the special token, so it would add an image slot or end a turn where the user meant neither."""
    return next((token for token in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN) if token in text), None)


def expand_image_tokens(sample: str, *, image_seq_len: int, do_image_splitting: bool) -> str:
    """The 4.x text rule (docs/numerics.md §6.3 step 4): replace each `<image>` and merge the fakes of adjacent images."""
    block = FAKE_IMAGE_TOKEN + IMAGE_TOKEN * image_seq_len + FAKE_IMAGE_TOKEN
    if do_image_splitting:
        block *= SPLIT_IMAGES_PER_IMAGE
    return sample.replace(IMAGE_TOKEN, block).replace(FAKE_IMAGE_TOKEN * 2, FAKE_IMAGE_TOKEN)


def _nest_images(images: Any, n_images_in_text: list[int] | None) -> list[list[Any]]:
    """One list of images per sample (docs/numerics.md §6.4).

    The image processor's `make_nested_images` decides what an image is and validates the structure;
    the only text-aware rule added here is that a flat list given with text is split in order by the
    number of `<image>` in each prompt (PR #34222 behaviour).
    """
    try:
        nested = make_nested_images(images)
    except ValueError as error:
        raise ValueError(f"Invalid input images: {error}") from error
    is_flat = isinstance(images, (list, tuple)) and not any(
        isinstance(item, (list, tuple)) for item in images
    )
    if n_images_in_text is None or not is_flat or len(nested) != 1:
        return nested
    flat = nested[0]
    if sum(n_images_in_text) != len(flat):
        raise ValueError(
            f"The total number of {IMAGE_TOKEN} tokens in the prompts should be the same as the number of "
            f"images passed. Found {sum(n_images_in_text)} {IMAGE_TOKEN} tokens and {len(flat)} images."
        )
    bounds = [0, *accumulate(n_images_in_text)]
    return [flat[start:stop] for start, stop in pairwise(bounds)]


def _validate_seq_len(value: Any) -> int:
    """1..MAX_IMAGE_SEQ_LEN (4096; `config_files`): the processor does not know the model's latents."""
    return checked_image_seq_len(value)


class Idefics2Processor:
    """Tokenizer + image processor + the Idefics2 image-token expansion and chat template.

    Args:
        image_processor: its `do_image_splitting` attribute (or the per-call override) decides both how
            many sub-images are made and how many image blocks the text gets.
        tokenizer: `<fake_token_around_image>`, `<image>` and `<end_of_utterance>` are added as special
            tokens if it lacks them (docs/numerics.md §6.1); it is modified in place, as in transformers.
        image_seq_len: `<image>` tokens per (sub-)image; must equal the perceiver's latent count.
        chat_template: Jinja source; None means the Idefics2 template of docs/numerics.md §6.6.
    """

    def __init__(
        self,
        image_processor: Idefics2ImageProcessor,
        tokenizer: Tokenizer,
        image_seq_len: int = 64,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_seq_len = _validate_seq_len(image_seq_len)
        self.chat_template = DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template
        missing = [t for t in (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN) if t not in tokenizer]
        tokenizer.add_special_tokens(missing)

    # ------------------------------------------------------------------ tokens
    image_token = IMAGE_TOKEN
    fake_image_token = FAKE_IMAGE_TOKEN
    end_of_utterance_token = END_OF_UTTERANCE_TOKEN
    model_input_names = ["pixel_values", "pixel_attention_mask", "input_ids", "attention_mask"]
    attributes = ["image_processor", "tokenizer"]  # the components, under transformers' name for them

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.token_to_id(IMAGE_TOKEN)

    @property
    def fake_image_token_id(self) -> int:
        return self.tokenizer.token_to_id(FAKE_IMAGE_TOKEN)

    @property
    def end_of_utterance_id(self) -> int:
        return self.tokenizer.token_to_id(END_OF_UTTERANCE_TOKEN)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> Idefics2Processor:
        """Load the 4.x Hub layout (preprocessor_config.json, chat_template.json) or the 5.x one
        (image settings inside processor_config.json, chat_template.jinja). `overrides`, routed as
        transformers routes them: `image_seq_len` and `chat_template` to the processor, image
        processor settings (`do_image_splitting=False`) to it, `Tokenizer.from_pretrained` options
        (`padding_side`, `max_length`, ...) to the tokenizer; any other name is an error. A repo id
        is found as a model's is (`idefics2.files.resolve_folder`: the HF cache, downloads only
        when allowed)."""
        folder = resolve_folder(folder)
        own_keys = ("image_seq_len", "chat_template")
        unknown = sorted(set(overrides) - {*own_keys, *SETTING_NAMES, *_TOKENIZER_OVERRIDES})
        if unknown:
            raise ValueError(f"unknown image processor or tokenizer option(s) {unknown}; valid: "
                             f"{sorted({*own_keys, *SETTING_NAMES, *_TOKENIZER_OVERRIDES})}")
        config: dict[str, Any] = {}
        if (folder / PROCESSOR_CONFIG_FILE).is_file():
            config = read_processor_config(folder / PROCESSOR_CONFIG_FILE)
        check_chat_template_files(folder, CHAT_TEMPLATE_JSON, CHAT_TEMPLATE_JINJA, NAMED_TEMPLATES_DIR)
        own = {k: overrides.pop(k) for k in own_keys if k in overrides}
        text = {k: overrides.pop(k) for k in _TOKENIZER_OVERRIDES if k in overrides}
        image_processor = Idefics2ImageProcessor.from_pretrained(folder, **overrides)
        tokenizer = Tokenizer.from_pretrained(folder, **text)
        return cls(
            image_processor,
            tokenizer,
            image_seq_len=own.get("image_seq_len", config.get("image_seq_len", DEFAULT_IMAGE_SEQ_LEN)),
            chat_template=own.get("chat_template") or cls._find_chat_template(folder, config, tokenizer),
        )

    @staticmethod
    def _find_chat_template(folder: Path, config: dict[str, Any], tokenizer: Tokenizer) -> ChatTemplate | None:
        """The template files (`read_chat_template`), then the processor config, then the tokenizer
        config: the first one found wins, as in transformers."""
        return read_chat_template(folder) or config.get("chat_template") or tokenizer.chat_template

    def to_dict(self) -> dict[str, Any]:
        """transformers 5.x's processor config: the image processor's settings nested, the processor's
        own `image_seq_len`, and the class name; the tokenizer and the chat template have files of
        their own and are left out, as in transformers."""
        return {
            "image_processor": self.image_processor.to_file_dict(),
            "image_seq_len": self.image_seq_len,
            "processor_class": type(self).__name__,
        }

    def to_json_string(self) -> str:
        """processor_config.json's text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | Path) -> None:
        write_text_file(Path(path), self.to_json_string())

    def save_pretrained(self, folder: str | Path) -> list[str]:
        """Write the files transformers 5.x writes: the tokenizer's, processor_config.json (image
        settings nested, `to_dict`) and the chat template (`write_chat_template`); and the 4.x
        preprocessor_config.json beside them, so that 4.x loaders find the image settings too.

        Returns `[processor_config.json]`, the list transformers 5.x returns.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.to_json_file(folder / PROCESSOR_CONFIG_FILE)
        write_chat_template(folder, self.chat_template)
        return [str(folder / PROCESSOR_CONFIG_FILE)]

    # ------------------------------------------------------------------ main call
    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        **options: Any,
    ) -> BatchFeature:
        """Expand, tokenize and match images to prompts.

        `options`, flat or grouped as transformers 5.x groups them (`text_kwargs`, `images_kwargs`,
        `common_kwargs`; merged by `call_options`, the tokenizer's `init_kwargs` as text defaults):
        `padding`, `truncation`, `max_length`, `add_special_tokens`, `padding_side` for the tokenizer;
        image processor settings and `input_data_format` for the images; `return_tensors`;
        `image_seq_len` for this call. `do_image_splitting` also drives the text expansion, so
        pixels and tokens always agree. `return_tensors=None` returns torch tensors and left-pads a
        ragged batch (so `model.generate(**processor(images=..., text=...))` works); with an
        explicit "pt"/"np" a ragged, unpadded batch is an error instead. Raises ValueError on an
        unknown option, on any images/text mismatch and when truncation would cut into an image's
        tokens.
        """
        if text is None and images is None:
            raise ValueError("You must provide either `text` or `images`.")
        # merged before any work, so a misspelt option fails even in a call it would not affect
        merged = merge_call_options(options, getattr(self.tokenizer, "init_kwargs", {}))
        return_tensors, image_kwargs, image_seq_len = merged.return_tensors, merged.images, merged.image_seq_len
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        tensor_kind = return_tensors or "pt"
        do_split = image_kwargs.get("do_image_splitting", self.image_processor.do_image_splitting)
        if not isinstance(do_split, bool):
            raise ValueError(f"do_image_splitting must be a bool, got {do_split!r}")
        seq_len = self.image_seq_len if image_seq_len is None else _validate_seq_len(image_seq_len)
        outputs: dict[str, Any] = {}
        n_images_in_text: list[int] | None = None
        if text is not None:
            prompts = [text] if isinstance(text, str) else text
            if (
                not isinstance(prompts, (list, tuple))
                or not prompts
                or not all(isinstance(p, str) for p in prompts)
            ):
                raise ValueError(
                    "Invalid input text. Please provide a string, or a non-empty list of strings; "
                    f"got {type(text).__name__}."
                )
            n_images_in_text = [p.count(IMAGE_TOKEN) for p in prompts]
            expanded = [
                expand_image_tokens(p, image_seq_len=seq_len, do_image_splitting=do_split) for p in prompts
            ]
            text_options = dict(merged.text)
            if return_tensors is None and text_options["padding"] in (False, None, "do_not_pad"):
                text_options["padding"] = True  # documented: the default output is a padded tensor batch
            encoded = self.tokenizer(expanded, **text_options)
            self._check_image_tokens_survived(expanded, encoded["input_ids"])
            lengths = {len(row) for row in encoded["input_ids"]}
            if len(lengths) > 1:
                raise ValueError(
                    f"The prompts have different token lengths {sorted(lengths)}; pass padding=True "
                    f"(left padding) to get {return_tensors!r} tensors."
                )
            outputs = {key: as_tensor(rows, tensor_kind) for key, rows in encoded.items()}
        if images is not None:
            nested = _nest_images(images, n_images_in_text)
            outputs.update(self._process_images(nested, n_images_in_text, tensor_kind, image_kwargs))
        return BatchFeature(outputs)

    def _process_images(
        self,
        nested: list[list[Any]],
        n_images_in_text: list[int] | None,
        tensor_kind: str,
        image_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        n_images = [len(sample) for sample in nested]
        if n_images_in_text is not None:
            if sum(n_images) and not sum(n_images_in_text):
                raise ValueError(
                    f"{sum(n_images)} images were passed but the text contains no {IMAGE_TOKEN} "
                    "token; put one <image> where each image belongs."
                )
            if n_images != n_images_in_text:
                raise ValueError(
                    f"The number of images in the text {n_images_in_text} and images {n_images} "
                    "should be the same."
                )
        if not sum(n_images):
            return {}  # a text-only batch (e.g. [[], []]): no pixels, which the model accepts
        pixels = self.image_processor(nested, return_tensors=tensor_kind, **image_kwargs)
        check_image_sides(pixels)
        return dict(pixels)

    def _check_image_tokens_survived(self, expanded: list[str], input_ids: list[list[int]]) -> None:
        """Truncation must not drop or split an image: the model needs every block whole (pitfall §8.6)."""
        for index, (prompt, ids) in enumerate(zip(expanded, input_ids, strict=True)):
            for token, token_id in (
                (IMAGE_TOKEN, self.image_token_id),
                (FAKE_IMAGE_TOKEN, self.fake_image_token_id),
            ):
                if ids.count(token_id) != prompt.count(token):
                    raise ValueError(
                        f"Truncation would cut through the image tokens of sample {index}: the text has "
                        f"{prompt.count(token)} {token} but only {ids.count(token_id)} survive. Disable "
                        "truncation or raise max_length."
                    )

    # ------------------------------------------------------------------ chat and decoding
    def apply_chat_template(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        return_dict: bool = False,
        return_tensors: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> Any:
        """Render one conversation (-> str) or a batch (-> list[str]), as transformers does.

        `tokenize=True` returns a list with one id list per conversation: the rendered text with
        images expanded, BOS added unless the template already wrote it. With `return_dict=True` as
        well, the model inputs of this processor's call (`BatchFeature`), images taken from the image
        parts of the messages (`chat_inputs`); `return_tensors`, `processor_kwargs` and the call's
        own keywords found among the others (padding, truncation, ...) go to that call. Other
        keywords are template variables. Options of transformers' signature that we do not implement
        (tools, documents, continue_final_message, ...) raise a ValueError naming them.
        """
        check_options(template_kwargs)
        if return_dict and not tokenize:
            raise ValueError("return_dict=True needs tokenize=True (the dict holds tokenized model inputs)")
        call_kwargs = dict(processor_kwargs or {})
        call_kwargs.update({k: template_kwargs.pop(k) for k in PROCESSOR_OPTIONS if k in template_kwargs})
        for name in UNSUPPORTED_OPTIONS:
            template_kwargs.pop(name, None)
        is_batched = bool(messages) and all(isinstance(m, (list, tuple)) for m in messages)
        conversations = list(messages) if is_batched else [messages]
        rendered = self.tokenizer.apply_chat_template(
            conversations, chat_template=template_source(self.chat_template, chat_template),
            add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs)
        if not tokenize:
            return rendered if is_batched else rendered[0]
        bos = self.tokenizer.bos_token
        written_bos = [bos is not None and prompt.startswith(bos) for prompt in rendered]
        if return_dict or return_tensors is not None:
            if any(written_bos) and not all(written_bos):
                raise ValueError("the template wrote BOS in some conversations only; render them separately")
            images = images_from_messages(conversations) if return_dict else None
            inputs = self(images=images, text=rendered, add_special_tokens=not any(written_bos),
                          return_tensors=return_tensors, **call_kwargs)
            return inputs if return_dict else inputs["input_ids"]
        split = call_kwargs.get("do_image_splitting", self.image_processor.do_image_splitting)
        seq_len = call_kwargs.get("image_seq_len", self.image_seq_len)
        return [
            self.tokenizer(
                expand_image_tokens(prompt, image_seq_len=seq_len, do_image_splitting=split),
                add_special_tokens=not wrote_bos,
            )["input_ids"]
            for prompt, wrote_bos in zip(rendered, written_bos, strict=True)
        ]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

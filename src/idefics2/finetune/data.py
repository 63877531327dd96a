"""Fine-tuning data: conversations in the chat format, tokenized with answer-only labels.

A conversation (chat messages and its images) -> the processor's left-padded inputs -> `labels`
that are -100 everywhere except the assistant answers and the `<end_of_utterance>` closing each, so
only what the assistant says is learned.

`load_conversations` reads a JSON Lines file (a record a line), a JSON file holding an array of
records, a Parquet file, or a folder written by `datasets`' `save_to_disk` (the last two with the
`datasets` extra; `data_files` reads them). Each record is one conversation, in one of three shapes:

- `messages`: chat messages as `apply_chat_template` takes them, one `{"type": "image"}` part per image;
- `question` and `answer` strings: a user turn (the images, then the question) and its answer;
- `texts`: a list of `{"user": ..., "assistant": ...}` turns (the Cauldron's layout), the images
  before the first user text;

with its images in `images` (a list, in the order of the image parts) or `image` (one): file paths
relative to the folder holding the data, or `{"bytes", "path"}` dicts, as `datasets` stores its
Image feature. Images kept in a table stay encoded there until a batch decodes them: a saved data
set's Arrow files are memory-mapped (its images are read from disk as they are used), a Parquet file
is read into memory whole.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from idefics2.finetune.data_files import read_records
from idefics2.processing.image_file import DEFAULT_MAX_PIXELS, read_image
from idefics2.processing.processor import END_OF_UTTERANCE_TOKEN, Idefics2Processor, reserved_token_in
from idefics2.processing.tokenizer import Tokenizer

IGNORE_INDEX = -100

ROLES = ("system", "user", "assistant")


def assistant_prefix_ids(tokenizer: Tokenizer) -> list[int]:
    """Token ids of "\nAssistant:" as they are in a chat-template conversation, where they follow the
    `<end_of_utterance>` that closes the previous turn (docs/numerics.md §6.6). Tokenized after that special token,
    as in context: a tokenizer that marks a string's first word (Mistral's "▁") gives other ids for
    "Assistant:" alone, and no answer would be found."""
    end = tokenizer.token_to_id(END_OF_UTTERANCE_TOKEN)
    ids = tokenizer(END_OF_UTTERANCE_TOKEN + "\nAssistant:", add_special_tokens=False)["input_ids"]
    if len(ids) < 2 or ids[0] != end:
        raise ValueError(f"the tokenizer does not keep {END_OF_UTTERANCE_TOKEN} as one token")
    return ids[1:]


def assistant_labels(input_ids: Tensor, prefix_ids: Sequence[int], end_id: int) -> Tensor:
    """-100 everywhere except the assistant answers: the tokens after each "Assistant:" up to and
    including the `<end_of_utterance>` that closes the turn. Prompts, images and padding never are."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    n = len(prefix_ids)
    for row, ids in enumerate(input_ids.tolist()):
        t = 0
        while t + n <= len(ids):
            if ids[t:t + n] != list(prefix_ids):
                t += 1
                continue
            t += n
            while t < len(ids):
                labels[row, t] = ids[t]
                t += 1
                if ids[t - 1] == end_id:
                    break
    return labels


def labelled_batch(processor: Idefics2Processor, conversations: Sequence[list[dict[str, Any]]],
                   images: Sequence[list[Any]] | None, prefix_ids: Sequence[int]) -> dict[str, Tensor]:
    """Chat-template conversations (with their images, or None) as left-padded model inputs plus
    assistant-only `labels`."""
    texts = [processor.apply_chat_template(messages) for messages in conversations]
    batch = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    batch["labels"] = assistant_labels(batch["input_ids"], prefix_ids, processor.end_of_utterance_id)
    return batch


def load_processor(folder: str | os.PathLike[str], image_splitting: bool | None = None,
                   longest_edge: int | None = None) -> Idefics2Processor:
    """The checkpoint's processor, with fine-tuning's overrides of its image settings (None keeps the
    file's): `image_splitting` turns the four crops beside each image on or off, `longest_edge` is the
    longest side images are resized to. Its shortest edge, the side every image is brought up to,
    is lowered to `longest_edge` when above it, as the two must fit together."""
    processor = Idefics2Processor.from_pretrained(folder)
    overrides: dict[str, Any] = {}
    if image_splitting is not None:
        overrides["do_image_splitting"] = image_splitting
    if longest_edge is not None:
        size = processor.image_processor.size
        if "longest_edge" not in size:
            raise ValueError(f"--longest-edge: the processor of {folder} resizes every image to "
                             f"{size['height']}x{size['width']}, not by its longest edge")
        overrides["size"] = {"shortest_edge": min(size["shortest_edge"], longest_edge),
                             "longest_edge": longest_edge}
    return Idefics2Processor.from_pretrained(folder, **overrides) if overrides else processor


@dataclass(frozen=True)
class StoredImage:
    """An image held in a table's cell as its encoded bytes (`table` is an Arrow table, memory-mapped
    for a saved data set), read from there when a batch needs it, so a data set's images are never all
    held in memory as Python objects."""

    table: Any = field(repr=False, compare=False)
    row: int
    column: str
    index: int | None  # in the cell's list of images; None for a one-image column

    def data(self) -> bytes:
        cell = self.table.column(self.column)[self.row].as_py()
        return (cell if self.index is None else cell[self.index])["bytes"]


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    images: list[Path | StoredImage]
    line: int = 0  # in the data file, for error messages
    row: int | None = None  # in a table (Parquet, saved data set, JSON array), from 0, instead of a line

    def place(self, path: str) -> str:
        return _place(path, self.row, self.line)


def _place(path: str | Path, row: int | None, line: int) -> str:
    """Where a record is in the data, for error messages: "train.jsonl:3" or "train.parquet row 2"."""
    return f"{path}:{line}" if row is None else f"{path} row {row}"


def _count_images(content: Any) -> int:
    return 0 if isinstance(content, str) else sum(part.get("type") == "image" for part in content)


def _image_column(record: dict[str, Any]) -> tuple[str, list[Any]] | str:
    """(the column holding the record's images, its images as a list), or what is wrong with them. A
    null column (a table's row without images) holds none."""
    column = "images" if "images" in record or "image" not in record else "image"
    value = record.get(column)
    if value is None:
        return column, []
    if column == "image":
        return column, [value]
    if not isinstance(value, list):
        return '"images" must be a list'
    return column, value


def _as_messages(record: dict[str, Any], n_images: int) -> list[Any] | str:
    """The record's conversation as chat messages (the `messages` shape kept as it is, checked later), or
    what is wrong with it."""
    if "messages" in record:
        return record["messages"]
    images = [{"type": "image"}] * n_images
    if "question" in record or "answer" in record:
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            return '"question" and "answer" must both be strings'
        return [{"role": "user", "content": [*images, {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]
    if "texts" in record:
        turns = record["texts"]
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str)
                for t in turns):
            return '"texts" must be a non-empty list of {"user": string, "assistant": string} turns'
        messages = []
        for k, turn in enumerate(turns):
            user = [*(images if k == 0 else []), {"type": "text", "text": turn["user"]}]
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": turn["assistant"]}]
        return messages
    return ('expected "messages", "question" and "answer", or "texts"; the record has '
            f"{sorted(record) if record else 'no fields'}")


def _check_messages(messages: Any, n_images: int) -> str | None:
    """What is wrong with a conversation's chat messages and its number of images, or None."""
    if not isinstance(messages, list) or not messages:
        return 'expected an object with a non-empty "messages" list'
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"message {i} needs a role, one of {ROLES}"
        content = message.get("content")
        if not isinstance(content, str) and not (
                isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "image")
                                                  for p in content)):
            return f"message {i}: content must be a string or a list of text/image parts"
        texts = [content] if isinstance(content, str) else [
            p.get("text") for p in content if p["type"] == "text"]
        if not all(isinstance(text, str) for text in texts):
            return f'message {i}: a text part needs a "text" string'
        reserved = next((token for token in map(reserved_token_in, texts) if token), None)
        if reserved:
            return (f"message {i}: the text holds {reserved}, which the chat template writes itself; "
                    'mark an image with an {"type": "image"} part instead')
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn: there is nothing to learn"
    if any(m["role"] == "assistant" and _count_images(m["content"]) for m in messages):
        return "an assistant turn holds an image part: images belong to user turns"
    n_parts = sum(_count_images(m["content"]) for m in messages)
    if n_parts != n_images:
        return f"{n_parts} image parts in the messages but {n_images} images"
    return None


def _image_problem(source: Path | bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Whether PIL recognises the image and its size is within `max_pixels`, from its header only:
    decoding every image up front would cost a pass over the data set; an image that is damaged
    further in is reported, with its place, when it is used."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Path) and not source.exists():
        return f"image file {source} not found"
    if isinstance(source, Path) and not source.is_file():  # a FIFO or a device would block or never end
        return f"cannot read image {source}: not a regular file"
    try:
        with warnings.catch_warnings():  # the size is checked here, against our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
                width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
        return f"cannot read image {name}: {err}"
    if width * height > max_pixels:
        return (f"image {name} is {width}x{height} = {width * height} pixels, more than the {max_pixels} "
                "allowed")
    return None


def _image_source(value: Any, folder: Path, table: Any, row: int, column: str,
                  index: int | None) -> Path | StoredImage | str:
    """Where one image of a record is (a file, or bytes in the table's cell), checked by its header; or
    what is wrong with it."""
    where = column if index is None else f"{column}[{index}]"
    if isinstance(value, dict) and value.get("bytes") is not None:
        if not isinstance(value["bytes"], bytes):
            return f'{where}: "bytes" must be the encoded image file'
        problem = _image_problem(value["bytes"], where)
        return problem if problem else StoredImage(table, row, column, index)
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        value = value["path"]
    if not isinstance(value, str):
        return (f'{where} must be an image file path or a {{"bytes", "path"}} dict, got '
                f"{type(value).__name__}")
    path = folder / value
    return _image_problem(path, str(path)) or path


def _conversation(record: Any, folder: Path, table: Any, row: int | None, line: int) -> Conversation | str:
    """One record as a checked Conversation, or what is wrong with it; `table` holds the record's row
    `row` when it comes from a table."""
    if not isinstance(record, dict):
        return 'expected an object with a non-empty "messages" list'
    images = _image_column(record)
    if isinstance(images, str):
        return images
    column, values = images
    messages = _as_messages(record, len(values))
    problem = messages if isinstance(messages, str) else _check_messages(messages, len(values))
    if problem is not None:
        return problem
    sources = []
    for k, value in enumerate(values):
        source = _image_source(value, folder, table, row or 0, column, None if column == "image" else k)
        if isinstance(source, str):
            return source
        sources.append(source)
    # the parts as the chat template reads them, without the other keys a table's rows carry (None)
    parts = [[{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else
             [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]}
              for p in m["content"]] for m in messages]
    return Conversation([{"role": m["role"], "content": content}
                         for m, content in zip(messages, parts, strict=True)], sources, line, row)


def load_conversations(path: str | os.PathLike[str]) -> list[Conversation]:
    """Parse and check the whole data (every record, every image's header) before any training; errors
    name the line, or the row of a table."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} not found")
    conversations = []
    for record, table, row, line in read_records(path):
        conversation = _conversation(record, path.parent, table, row, line)
        if isinstance(conversation, str):
            raise ValueError(f"{_place(path, row, line)}: {conversation}")
        conversations.append(conversation)
    if not conversations:
        raise ValueError(f"{path} holds no conversations")
    return conversations


def check_tokenized(conversations: Sequence[Conversation], processor: Idefics2Processor, prefix_ids: Sequence[int],
                    limit: int, path: str) -> None:
    """Tokenize every conversation (image tokens counted, no pixels) before training and refuse, by line,
    one longer than the model's positions (it would run past its rotary range without complaint) or one
    whose assistant turns are not all found as answers (an assistant turn first, or "\nAssistant:"
    inside a user's text, would shift what is learned)."""
    for c in conversations:
        labels = labelled_batch(processor, [c.messages], None, prefix_ids)["labels"][0]
        if len(labels) > limit:
            raise ValueError(f"{c.place(path)}: the conversation is {len(labels)} tokens long (image tokens "
                             f"included); the model takes at most {limit} positions")
        answers = int((labels == processor.end_of_utterance_id).sum())
        turns = sum(m["role"] == "assistant" for m in c.messages)
        if answers != turns:
            raise ValueError(f"{c.place(path)}: {turns} assistant turns but {answers} found after tokenization; "
                             "a conversation must not start with an assistant turn, and user text must not "
                             "contain '\\nAssistant:'")


def make_batch(conversations: Sequence[Conversation], processor: Idefics2Processor, prefix_ids: Sequence[int],
               path: str) -> dict[str, Tensor]:
    """Left-padded model inputs with assistant-only labels; an image that cannot be decoded names its line."""
    images = []
    for c in conversations:
        try:
            images.append([read_image(str(p) if isinstance(p, Path) else io.BytesIO(p.data()))
                           for p in c.images])
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{c.place(path)}: cannot read an image: {err}") from None
    return labelled_batch(processor, [c.messages for c in conversations], images if any(images) else None,
                          prefix_ids)


def answer_tokens(labels: Tensor) -> int:
    """How many labels `causal_lm_loss` scores: every position but the first that is not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

"""Fine-tuning data: conversations in the chat format, tokenized with answer-only labels.

A conversation (chat messages and its image files) -> the processor's left-padded inputs ->
`labels` that are -100 everywhere except the assistant answers and the `<end_of_utterance>`
closing each, so only what the assistant says is learned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from idefics2.processing.image_file import read_image
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


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    images: list[Path]
    line: int = 0  # in the data file, for error messages

def _count_images(content: Any) -> int:
    return 0 if isinstance(content, str) else sum(part.get("type") == "image" for part in content)

def _check_conversation(record: Any) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return 'expected an object with a non-empty "messages" list'
    images = record.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return '"images" must be a list of file paths'
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"message {i} needs a role, one of {ROLES}"
        content = message.get("content")
        if not isinstance(content, str) and not (
                isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "image")
                                                  for p in content)):
            return f"message {i}: content must be a string or a list of text/image parts"
        texts = [content] if isinstance(content, str) else [p.get("text") for p in content if p["type"] == "text"]
        if not all(isinstance(text, str) for text in texts):
            return f'message {i}: a text part needs a "text" string'
        reserved = next((token for token in map(reserved_token_in, texts) if token), None)
        if reserved:
            return (f"message {i}: the text holds {reserved}, which the chat template writes itself; "
                    'mark an image with an {"type": "image"} part instead')
    if not any(m["role"] == "assistant" for m in record["messages"]):
        return "no assistant turn: there is nothing to learn"
    if any(m["role"] == "assistant" and _count_images(m["content"]) for m in record["messages"]):
        return "an assistant turn holds an image part: images belong to user turns"
    n_parts = sum(_count_images(m["content"]) for m in record["messages"])
    if n_parts != len(images):
        return f"{n_parts} image parts in the messages but {len(images)} files in \"images\""
    return None

def _image_problem(path: Path) -> str | None:
    """Whether PIL recognises the file (its header only: decoding every image up front would cost a pass
    over the data set; a file that is damaged further in is reported, with its line, when it is used)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return None
    except FileNotFoundError:
        return f"image file {path} not found"
    except (UnidentifiedImageError, OSError) as err:
        return f"cannot read image {path}: {err}"

def load_conversations(path: str | os.PathLike[str]) -> list[Conversation]:
    """Parse and check the whole data file before any training; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    conversations = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        problem = _check_conversation(record)
        if problem is not None:
            raise ValueError(f"{path}:{number}: {problem}")
        images = [path.parent / p for p in record.get("images", [])]
        for image in images:
            problem = _image_problem(image)
            if problem is not None:
                raise ValueError(f"{path}:{number}: {problem}")
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str)
                    else m for m in record["messages"]]
        conversations.append(Conversation(messages, images, number))
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
            raise ValueError(f"{path}:{c.line}: the conversation is {len(labels)} tokens long (image tokens "
                             f"included); the model takes at most {limit} positions")
        answers = int((labels == processor.end_of_utterance_id).sum())
        turns = sum(m["role"] == "assistant" for m in c.messages)
        if answers != turns:
            raise ValueError(f"{path}:{c.line}: {turns} assistant turns but {answers} found after tokenization; "
                             "a conversation must not start with an assistant turn, and user text must not "
                             "contain '\\nAssistant:'")

def make_batch(conversations: Sequence[Conversation], processor: Idefics2Processor, prefix_ids: Sequence[int],
               path: str) -> dict[str, Tensor]:
    """Left-padded model inputs with assistant-only labels; an image that cannot be decoded names its line."""
    images = []
    for c in conversations:
        try:
            images.append([read_image(str(p)) for p in c.images])
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{path}:{c.line}: cannot read an image: {err}") from None
    return labelled_batch(processor, [c.messages for c in conversations], images if any(images) else None,
                          prefix_ids)

def answer_tokens(labels: Tensor) -> int:
    """How many labels `causal_lm_loss` scores: every position but the first that is not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

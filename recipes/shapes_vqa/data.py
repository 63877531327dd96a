"""Training batches of the recipe: synthetic conversations, rendered and labelled on the fly."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from idefics2.finetune.data import assistant_prefix_ids, labelled_batch
from idefics2.processing.processor import Idefics2Processor
from recipes.shapes_vqa.grounding import patch_classes
from recipes.shapes_vqa.synthetic import (
    MAX_SHAPES,
    SINGLE_IMAGE_TYPES,
    TWO_IMAGE_FRACTION,
    sample_conversation,
)


def json_space_id(tokenizer: Any) -> int:
    """The id of the space the chat template puts between "Assistant:" and a JSON answer's "{".

    "Assistant: {" tokenizes as ":", "Ġ", "{", but a JSON-schema constraint's first token after the
    prompt's "Assistant:" is "{": trained with the space, the model would be asked for a token it
    never learned to give right after the prompt. `ConversationBatches` drops that space.
    """
    spaced = tokenizer(" {", add_special_tokens=False)["input_ids"]
    brace = tokenizer("{", add_special_tokens=False)["input_ids"]
    if len(spaced) != 2 or spaced[1:] != brace:
        raise ValueError(f'the tokenizer does not give " {{" as a space token then "{{": {spaced}')
    return spaced[0]


def drop_json_answer_space(batch: dict[str, Tensor], prefix_ids: Sequence[int], space_id: int,
                           brace_id: int, pad_id: int) -> dict[str, Tensor]:
    """`batch` with the space token removed wherever an answer starts with "Ġ", "{" right after
    `prefix_ids` ("\nAssistant:"); each shortened row is padded again on the left (padding id,
    mask 0, label -100), so the batch keeps its length and its left padding."""
    n = len(prefix_ids)
    ids = batch["input_ids"].tolist()
    keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)  # (B, T)
    for row, tokens in enumerate(ids):
        for t in range(n, len(tokens) - 1):
            if tokens[t] == space_id and tokens[t + 1] == brace_id and tokens[t - n:t] == list(prefix_ids):
                keep[row, t] = False
    if keep.all():
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    out = dict(batch)
    for key, value in fill.items():
        rows = []
        for row in range(keep.shape[0]):
            kept = batch[key][row][keep[row]]
            rows.append(torch.cat([kept.new_full((keep.shape[1] - len(kept),), value), kept]))
        out[key] = torch.stack(rows)
    return out


def parse_weights(text: str | None) -> dict[str, int]:
    """"position=4,describe=2" -> {"position": 4, "describe": 2} (the `--question-weights` flag)."""
    weights: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--question-weights takes TYPE=INTEGER pairs separated by commas, got {item!r}")
        weights[name.strip()] = int(value)
    return weights


class ConversationBatches(Dataset[dict[str, Tensor]]):
    """Batch `index` is a pure function of (seed, index): workers need no shared state, resumes are exact.

    With `curriculum_steps` = N > 0, single images of batch b have at most 1 + b // N shapes (up to
    the full 5): a model that first sees one shape per image learns colour and shape words from
    the image alone, then binds them when more shapes appear. On colour and counting questions
    from scratch on a CPU, colour reached 61% by step 1,650 with N = 300 and 38% without
    (docs/training.md).
    """

    def __init__(self, processor: Idefics2Processor, seed: int, batch_size: int, start: int, stop: int,
                 max_turns: int, curriculum_steps: int = 0, types: Sequence[str] = SINGLE_IMAGE_TYPES,
                 patch_grid: int = 0, json_fraction: float = 0.0) -> None:
        self.processor, self.seed, self.batch_size = processor, seed, batch_size
        self.start, self.stop, self.max_turns = start, stop, max_turns
        self.curriculum_steps, self.types = curriculum_steps, tuple(types)
        self.json_fraction = json_fraction  # of colour, shape and counting questions (`sample_conversation`)
        self.patch_grid = patch_grid  # > 0: add each image's `patch_classes` for the grounding losses
        self.prefix_ids = assistant_prefix_ids(processor.tokenizer)
        self.space_id = json_space_id(processor.tokenizer) if json_fraction > 0 else None
        self.brace_id = processor.tokenizer("{", add_special_tokens=False)["input_ids"][0]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def max_shapes(self, step: int) -> int:
        """Most shapes a single image of batch `step` (counted from the run's start) may have."""
        if self.curriculum_steps <= 0:
            return MAX_SHAPES
        return min(MAX_SHAPES, 1 + step // self.curriculum_steps)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        step = self.start + index
        rng = random.Random(self.seed * 1_000_000_007 + step)
        # One image count per batch: no all-zero padding images to ship between processes.
        two_images = rng.random() < TWO_IMAGE_FRACTION
        samples = [sample_conversation(rng, self.max_turns, two_images, self.max_shapes(step), self.types,
                                       self.json_fraction)
                   for _ in range(self.batch_size)]
        batch = labelled_batch(self.processor, [s.messages for s in samples], [s.images for s in samples],
                               self.prefix_ids)
        if self.space_id is not None:
            batch = drop_json_answer_space(batch, self.prefix_ids, self.space_id, self.brace_id,
                                           self.processor.tokenizer.pad_token_id)
        # Half the bytes through shared memory; values k/127.5 - 1 lose < 1e-3 in float16.
        batch["pixel_values"] = batch["pixel_values"].half()
        if self.patch_grid:
            objects, words = zip(*(patch_classes(scene, self.patch_grid) for s in samples for scene in s.scenes))
            batch["patch_objects"] = torch.from_numpy(np.stack(objects))  # (R, P) in placeholder order
            batch["patch_words"] = torch.from_numpy(np.stack(words))
        return batch

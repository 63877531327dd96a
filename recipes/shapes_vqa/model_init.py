"""Initial weights for training from scratch: the reference's init with the recipe's changes
(random perceiver latents, wider perceiver query/key projections, a sine/cosine position table)."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from idefics2.model.connector import PerceiverAttention
from idefics2.modeling import Idefics2ForConditionalGeneration
from recipes.shapes_vqa.synthetic import COLORS, JSON_KEYS, MAX_SHAPES, SHAPES
from recipes.shapes_vqa.tokenizer_training import SPECIAL_TOKENS


def sincos_position_table(patches_per_side: int, width: int) -> Tensor:
    """2-D sine/cosine table (patches_per_side², width), rows in `bucket_position_ids` order
    (row-major): the first half of the channels encodes the patch row, the second half the column,
    each as sines then cosines at geometrically spaced frequencies. Values in [-1, 1]."""
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter))
    angles = torch.arange(patches_per_side, dtype=torch.float64)[:, None] * frequencies  # (side, width/4)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (side, width/2)
    table = torch.zeros(patches_per_side, patches_per_side, width, dtype=torch.float64)
    table[..., : 2 * quarter] = axis[:, None, :]  # depends on the row only
    table[..., 2 * quarter : 4 * quarter] = axis[None, :, :]  # on the column only
    return table.reshape(patches_per_side**2, width).float()


def model_position_table(model: Idefics2ForConditionalGeneration) -> Tensor:
    """`sincos_position_table` in the shape of `model`'s vision position embedding."""
    vision = model.config.vision_config
    return sincos_position_table(vision.num_patches_per_side, vision.hidden_size)


def position_embedding(model: Idefics2ForConditionalGeneration) -> Tensor:
    return model.model.vision_model.embeddings.position_embedding.weight


def init_weights(model: Idefics2ForConditionalGeneration, std: float = 0.02, *, latents_std: float = 1.0,
                 perceiver_qk_std: float = 0.02, position_table_scale: float = 0.0) -> None:
    """Reference init (docs/numerics.md §3.2) except the perceiver latents, which get N(0, latents_std): latents
    that all start at ones are a symmetry gradient descent cannot break (runs with them learned
    nothing).

    `perceiver_qk_std` sets the perceiver's query/key projections apart. At 0.02 its attention starts
    near-uniform and averages a small object such as a printed word away, and reading is never
    learned; ~0.5 with `latents_std=0.02` lets it be (docs/training.md). `position_table_scale` > 0
    starts the vision position embedding as that multiple of `sincos_position_table`: at the
    reference's N(0, 0.02) it is ~30x smaller than the patch features and stays so, and the first
    shipped model never learned left from right (55% held-out; a GPU run with the table at scale 1
    and a deeper perceiver reached 66%). The defaults are that model's recipe.
    """
    query_key = {id(proj) for m in model.modules() if isinstance(m, PerceiverAttention)
                 for proj in (m.q_proj, m.k_proj)}
    for module in model.modules():  # one pass in module order: the defaults draw what they always drew
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, perceiver_qk_std if id(module) in query_key else std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if hasattr(module, "latents") and isinstance(module.latents, nn.Parameter):
            nn.init.normal_(module.latents, 0.0, latents_std)
    if position_table_scale > 0:
        with torch.no_grad():
            position_embedding(model).copy_(position_table_scale * model_position_table(model))


def init_json_embeddings(model: Idefics2ForConditionalGeneration, tokenizer: Any,
                         trained_ids: set[int]) -> list[int]:
    """Start the tokens of the JSON answers that training never reached from trained ones; returns their ids.

    The answers' value and key pieces without a leading space (`re`+`d`, `blue`, `c`+`ircle`,
    `co`+`lo`+`r`) and their punctuation (`{`, `"`, `:`, `}`) never occurred in the tokenizer's
    corpus, so their (tied) embeddings are still random and larger than trained ones. The first
    untrained piece of each word gets the mean embedding of the word's trained spellings (" red",
    " Red"): as an output it then scores like the word the model already ties to the image, and as an
    input it reads as that word. The mean, not a copy, so a plain answer's "ĠRed" still outscores it.
    Every other untrained token of the answers keeps its direction at the median trained norm.
    """
    embedding = model.get_input_embeddings().weight  # (V, D), tied to the output
    trained = sorted(trained_ids)
    norm = embedding[trained].norm(dim=-1).median()
    done: set[int] = set()
    with torch.no_grad():
        for word in (*COLORS, *SHAPES, *JSON_KEYS.values()):
            pieces = [i for i in _ids(tokenizer, word) if i not in trained_ids]
            spellings = [i for s in (" " + word, " " + word.capitalize()) for i in _ids(tokenizer, s)
                         if i in trained_ids]
            if pieces and spellings and pieces[0] not in done:
                embedding[pieces[0]] = embedding[spellings].mean(dim=0)
                done.add(pieces[0])
        answers = [json.dumps({key: value}) for key, values in (("color", tuple(COLORS)), ("shape", SHAPES),
                                                                  ("count", range(MAX_SHAPES + 1)))
                   for value in values]
        rest = {i for a in answers for i in _ids(tokenizer, a)} - trained_ids - done
        for i in sorted(rest):
            embedding[i] *= norm / embedding[i].norm()
    return sorted(done | rest)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def corpus_token_ids(tokenizer: Any, texts: list[str]) -> set[int]:
    """Every token id that occurs in `texts` (the tokenizer's training corpus), special tokens included."""
    seen = {i for text in texts for i in _ids(tokenizer, text)}
    return seen | {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

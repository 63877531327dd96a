"""Train a small Idefics2 from scratch on the synthetic shapes data and write a Hub-layout folder.

Loop: synthetic conversations -> our processor (chat template, image expansion, pixels) -> labels
that supervise only assistant answers and their `<end_of_utterance>` -> AdamW with warm-up + cosine
decay, gradient clipping, periodic exact-match evaluation, resumable checkpoints and a wall-clock cap.
The learning-rate schedule runs on max(step progress, time progress), so a capped run still decays.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from idefics2.checkpoint import resolve_device, write_folder_atomically
from idefics2.config import Idefics2Config
from idefics2.model.connector import PerceiverAttention
from idefics2.model.idefics2 import Idefics2ForConditionalGeneration
from idefics2.model.text import positions_from_mask
from idefics2.processing.image_processor import Idefics2ImageProcessor
from idefics2.processing.processor import END_OF_UTTERANCE_TOKEN, Idefics2Processor
from idefics2.processing.tokenizer import Tokenizer
from idefics2.training.evaluate import answer_items, score
from idefics2.training.grounding import Grounding, patch_classes, pretrain_vision
from idefics2.training.synthetic import (
    MAX_SHAPES,
    SINGLE_IMAGE_TYPES,
    TWO_IMAGE_FRACTION,
    make_eval_items,
    question_mix,
    sample_conversation,
)
from idefics2.training.tokenizer_training import train_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.jsonl"
VISION_HISTORY_FILE = "vision_history.jsonl"  # `--vision-minutes` pretraining, one record per step
IGNORE_INDEX = -100
# Validation questions come from their own seed offset, never from the training stream.
VALIDATION_SEED_OFFSET = 1_000_003


class Preset(NamedTuple):
    """Model sizes of a `train --preset`. Text heads are 64 wide (two below 128); the perceiver has as many
    heads as the text, with half as many key/value heads."""

    vision_width: int
    vision_layers: int
    patch_size: int
    image_size: int
    latents: int
    perceiver_depth: int
    text_width: int
    text_layers: int
    text_kv_heads: int = 1  # decoder key/value heads; each is a separate key space to match image tokens in


PRESETS: dict[str, Preset] = {
    "tiny": Preset(32, 1, 8, 32, 4, 1, 32, 1),  # tests only
    "cpu": Preset(128, 3, 16, 128, 16, 1, 128, 3),  # near the team's 2-core CPU experiment; 64 patches per image
    "small": Preset(192, 4, 8, 128, 32, 1, 160, 3),  # the first shipped model (until the ninth session), 14 MB
    "cpu64": Preset(128, 3, 16, 128, 64, 1, 128, 3),  # "cpu" with one latent per patch, for --route-weight
    # cpu64 with a key/value head per query head in the decoder (docs/training.md, ninth session)
    "cpu64kv2": Preset(128, 3, 16, 128, 64, 1, 128, 3, text_kv_heads=2),
    # a wider cpu64 for a GPU, where the data loader sets the pace and width is free (shipped in the ninth session)
    "gpu64": Preset(192, 4, 16, 128, 64, 1, 256, 3, text_kv_heads=4),
    # gpu64's tower under cpu64kv2's perceiver and decoder: the shipped model (scripts/stitch_shapes_model.py)
    "gpu64-text128": Preset(192, 4, 16, 128, 64, 1, 128, 3, text_kv_heads=2),
}


@dataclass
class TrainConfig:
    """Every knob of a run (defaults: the first shipped model's recipe, docs/training.md "History", minus
    the GPU flags; the current one's command is at the top of that page).

    Written to train_config.json for the record; `--resume` takes the flags again, so a larger
    `--steps` or `--max-minutes` extends a finished run.
    """

    out_dir: str = "runs/shapes"
    preset: str = "small"
    seed: int = 0
    steps: int = 10000
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    warmup_steps: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    max_turns: int = 3
    curriculum_steps: int = 0
    latents_std: float = 1.0
    perceiver_qk_std: float = 0.02
    position_table_scale: float = 0.0
    question_weights: str | None = None
    init_from: str | None = None
    eval_every: int = 400
    eval_questions: int = 180
    checkpoint_every: int = 400
    max_minutes: float | None = None
    device: str = "cpu"
    num_workers: int = 0
    threads: int = 2
    bf16: bool = False
    vision_minutes: float = 0.0
    freeze_vision: bool = False
    route_weight: float = 0.0
    align_weight: float = 0.0
    background_weight: float = 0.0
    tokenizer_dir: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        """Every value checked before anything is built; a mistake names its flag."""
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        check_flag_ranges(self, positive=("steps", "batch_size", "lr", "max_turns", "eval_every", "checkpoint_every",
                                          "threads", "max_minutes"),
                          non_negative=("warmup_steps", "weight_decay", "grad_clip", "curriculum_steps",
                                        "eval_questions", "num_workers", "vision_minutes", "route_weight",
                                        "align_weight", "background_weight"))


def check_flag_ranges(config: Any, positive: Sequence[str], non_negative: Sequence[str] = ()) -> None:
    """A ValueError naming the `--flag` of the first config field out of range (None, unset, passes), and
    the shared check of `min_lr_ratio` in [0, 1]: the checks `train` and `finetune` both make."""
    for names, in_range, expected in ((positive, lambda v: v > 0, "positive"),
                                      (non_negative, lambda v: v >= 0, "0 or more")):
        for name in names:
            value = getattr(config, name)
            if value is not None and not in_range(value):
                raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {value}")
    if not 0 <= config.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {config.min_lr_ratio}")


# ---------------------------------------------------------------------------------------------- model
def model_config_dict(preset: str, vocab_size: int, image_token_id: int) -> dict[str, Any]:
    """config.json for a preset; pad/BOS/EOS are the ids 0/1/2 our tokenizer gives them."""
    v_width, v_layers, patch, image_size, latents, depth, t_width, t_layers, t_kv_heads = PRESETS[preset]
    v_heads = max(1, v_width // 32)
    t_heads = max(1, t_width // 64) if t_width >= 128 else 2
    if t_heads % t_kv_heads:
        raise ValueError(f"preset {preset!r}: {t_kv_heads} key/value heads do not divide {t_heads} heads")
    return {
        "model_type": "idefics2",
        "image_token_id": image_token_id,
        "tie_word_embeddings": True,
        "vision_config": {"hidden_size": v_width, "intermediate_size": 4 * v_width,
                          "num_hidden_layers": v_layers, "num_attention_heads": v_heads,
                          "image_size": image_size, "patch_size": patch, "model_type": "idefics2_vision"},
        "perceiver_config": {"hidden_size": t_width, "resampler_n_latents": latents, "resampler_depth": depth,
                             "resampler_n_heads": t_heads, "resampler_head_dim": t_width // t_heads,
                             "num_key_value_heads": 1 if t_heads == 1 else t_heads // 2,
                             "rms_norm_eps": 1e-6, "model_type": "idefics2_perceiver"},
        "text_config": {"model_type": "mistral", "vocab_size": vocab_size, "hidden_size": t_width,
                        "intermediate_size": 3 * t_width, "num_hidden_layers": t_layers,
                        "num_attention_heads": t_heads, "num_key_value_heads": t_kv_heads,
                        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "sliding_window": None,
                        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                        "tie_word_embeddings": True},
    }


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


def _model_position_table(model: Idefics2ForConditionalGeneration) -> Tensor:
    """`sincos_position_table` in the shape of `model`'s vision position embedding."""
    vision = model.config.vision_config
    return sincos_position_table(vision.num_patches_per_side, vision.hidden_size)


def _position_embedding(model: Idefics2ForConditionalGeneration) -> Tensor:
    return model.model.vision_model.embeddings.position_embedding.weight


def init_weights(model: Idefics2ForConditionalGeneration, std: float = 0.02, *, latents_std: float = 1.0,
                 perceiver_qk_std: float = 0.02, position_table_scale: float = 0.0) -> None:
    """Reference init (docs/numerics.md §3.2) except the perceiver latents, which get N(0, latents_std): latents
    that all start at ones are a symmetry gradient descent cannot break (the team's runs learned
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
            _position_embedding(model).copy_(position_table_scale * _model_position_table(model))


def _initial_model(cfg: TrainConfig, config: Idefics2Config) -> Idefics2ForConditionalGeneration:
    """A fresh model (`init_weights`), or the weights of `cfg.init_from` to fine-tune.

    A loaded model keeps its weights; `position_table_scale` > 0 then *adds* that multiple of the
    sine/cosine table to its learned position embedding (a fresh model starts from the table).
    """
    if cfg.init_from is None:
        model = Idefics2ForConditionalGeneration(config)
        init_weights(model, latents_std=cfg.latents_std, perceiver_qk_std=cfg.perceiver_qk_std,
                     position_table_scale=cfg.position_table_scale)
        return model
    model = Idefics2ForConditionalGeneration.from_pretrained(cfg.init_from, dtype="float32")
    if model.config.to_dict() != config.to_dict():
        raise ValueError(f"--init-from {cfg.init_from} is not a {cfg.preset!r}-preset model with this tokenizer: "
                         "its config.json differs from the one the preset builds; pass the matching --preset")
    if cfg.position_table_scale > 0:
        with torch.no_grad():
            _position_embedding(model).add_(cfg.position_table_scale * _model_position_table(model))
    return model


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


def build_processor(preset: str, tokenizer: Tokenizer) -> Idefics2Processor:
    """Every image is resized to the preset's square size (no splitting), one block of latents each."""
    image_size, latents = PRESETS[preset].image_size, PRESETS[preset].latents
    image_processor = Idefics2ImageProcessor(size={"longest_edge": image_size, "shortest_edge": image_size},
                                             do_image_splitting=False)
    return Idefics2Processor(image_processor, tokenizer, image_seq_len=latents)


# ---------------------------------------------------------------------------------------------- data
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
                 patch_grid: int = 0) -> None:
        self.processor, self.seed, self.batch_size = processor, seed, batch_size
        self.start, self.stop, self.max_turns = start, stop, max_turns
        self.curriculum_steps, self.types = curriculum_steps, tuple(types)
        self.patch_grid = patch_grid  # > 0: add each image's `patch_classes` for the grounding losses
        self.prefix_ids = assistant_prefix_ids(processor.tokenizer)

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
        samples = [sample_conversation(rng, self.max_turns, two_images, self.max_shapes(step), self.types)
                   for _ in range(self.batch_size)]
        batch = labelled_batch(self.processor, [s.messages for s in samples], [s.images for s in samples],
                               self.prefix_ids)
        # Half the bytes through shared memory; values k/127.5 - 1 lose < 1e-3 in float16.
        batch["pixel_values"] = batch["pixel_values"].half()
        if self.patch_grid:
            objects, words = zip(*(patch_classes(scene, self.patch_grid) for s in samples for scene in s.scenes))
            batch["patch_objects"] = torch.from_numpy(np.stack(objects))  # (R, P) in placeholder order
            batch["patch_words"] = torch.from_numpy(np.stack(words))
        return batch


# ---------------------------------------------------------------------------------------------- loop
def lr_factor(progress: float, step: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up over steps, then cosine from 1 to `min_ratio` over overall progress in [0, 1]."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float,
                  decay_positions: bool = True) -> list[dict[str, Any]]:
    """The trainable parameters in two AdamW groups: no weight decay on norms, biases and latents (1-D or
    learned-query tensors), nor on the vision position table unless `decay_positions` (decay would
    pull a sine/cosine table back to zero)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.dim() < 2 or name.endswith("latents") or (
            not decay_positions and name.endswith("position_embedding.weight"))
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def start_history(folder: Path, resumed_step: int) -> None:
    """A fresh run starts an empty history.jsonl (never mixing in an old run's curve); a resumed one drops
    the records written after its checkpoint (a run killed between two checkpoints)."""
    path = folder / HISTORY_FILE
    if not resumed_step:
        path.unlink(missing_ok=True)
    elif path.is_file():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= resumed_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):  # blank, or cut short by a kill mid-write
                continue
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def check_resumable(folder: Path) -> None:
    """`--resume` needs the folder's checkpoint; without one it is refused rather than starting over, which
    would replace the history a mistyped `--out-dir` was meant to continue."""
    if not (folder / CHECKPOINT_FILE).is_file():
        raise ValueError(f"--resume: {folder / CHECKPOINT_FILE} does not exist; drop --resume to start a new run "
                         "(which replaces that folder's history)")


def append_history(folder: Path, record: dict[str, Any], name: str = HISTORY_FILE) -> None:
    with open(folder / name, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def write_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """checkpoint.pt, written beside and then moved over the previous one (a kill mid-write keeps it)."""
    torch.save(state, folder / (CHECKPOINT_FILE + ".tmp"))
    (folder / (CHECKPOINT_FILE + ".tmp")).replace(folder / CHECKPOINT_FILE)


def read_checkpoint(folder: Path, device: torch.device) -> dict[str, Any]:
    # weights_only: torch's restricted unpickler (tensors, numbers, dicts), never arbitrary objects
    return torch.load(folder / CHECKPOINT_FILE, map_location=device, weights_only=True)


def _load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    if cfg.tokenizer_dir is not None:
        return Tokenizer.from_pretrained(cfg.tokenizer_dir)
    return train_tokenizer(seed=cfg.seed)


def export(model: Idefics2ForConditionalGeneration, processor: Idefics2Processor, folder: Path,
           generation: dict[str, Any] | None = None) -> None:
    """Hub layout: config + safetensors (+ the model's generation config, or `generation`), processor
    files, tokenizer, chat template. Written whole into a temporary folder that then replaces `folder`,
    so a failure never leaves weights without their tokenizer."""
    with write_folder_atomically(Path(folder), owns=lambda name: True) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def shapes_generation_config(model: Idefics2ForConditionalGeneration, processor: Idefics2Processor) -> dict[str, Any]:
    """Greedy, stopping at `</s>` or `<end_of_utterance>`, 32 new tokens: the shipped model's answers are short."""
    return {"eos_token_id": [model.config.text_config.eos_token_id, processor.end_of_utterance_id],
            "pad_token_id": 0, "bos_token_id": 1, "max_new_tokens": 32, "do_sample": False}


def train(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the summary also written to `<out_dir>/summary.json`.

    The exported model (`<out_dir>/model`) is the evaluation-best one, so a late regression or a
    cap that hits mid-decay never ships a worse model than one already seen.
    """
    out = Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    if cfg.resume:
        check_resumable(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs; no effect on CPU
    tokenizer_dir = out / "tokenizer"
    if cfg.resume:
        cfg = replace(cfg, tokenizer_dir=str(tokenizer_dir))
    elif cfg.init_from is not None and cfg.tokenizer_dir is None:
        cfg = replace(cfg, tokenizer_dir=cfg.init_from)
    tokenizer = _load_tokenizer(cfg)
    tokenizer.save_pretrained(tokenizer_dir)
    processor = build_processor(cfg.preset, tokenizer)
    config = Idefics2Config.from_dict(model_config_dict(cfg.preset, len(tokenizer), processor.image_token_id))
    torch.manual_seed(cfg.seed)
    model = _initial_model(cfg, config) if not cfg.resume else Idefics2ForConditionalGeneration(config)
    model.to(device)
    if cfg.vision_minutes > 0 or cfg.freeze_vision:
        model.model.vision_model.requires_grad_(False)  # pretrained first (below) or loaded, then frozen
    groups = param_groups(model, cfg.weight_decay, decay_positions=cfg.position_table_scale <= 0)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    step, elapsed, best = 0, 0.0, {"accuracy": -1.0, "step": 0}
    best_state: dict[str, Tensor] | None = None
    if cfg.resume:
        state = read_checkpoint(out, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, best, best_state = state["step"], state["elapsed"], state["best"], state["best_state"]
        logger.info("resumed from step %d (%.1f min trained)", step, elapsed / 60)
    start_history(out, step)
    if cfg.vision_minutes > 0 and not cfg.resume:  # a checkpoint already holds the pretrained tower
        (out / VISION_HISTORY_FILE).unlink(missing_ok=True)
        accuracy = pretrain_vision(model.model.vision_model, processor.image_processor, seed=cfg.seed,
                                   batch_size=cfg.batch_size, lr=cfg.lr, minutes=cfg.vision_minutes,
                                   num_workers=cfg.num_workers,
                                   log=lambda record: append_history(out, record, VISION_HISTORY_FILE))
        logger.info("vision tower pretrained: patch accuracy %s; frozen from here on", accuracy)
    grounding = None
    if cfg.route_weight > 0 or cfg.align_weight > 0 or cfg.background_weight > 0:
        grounding = Grounding(model, tokenizer, cfg.route_weight, cfg.align_weight, cfg.background_weight)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
    n_params = model.num_parameters()
    logger.info("model: %s preset, %.2f M parameters", cfg.preset, n_params / 1e6)

    validation = make_eval_items(cfg.seed + VALIDATION_SEED_OFFSET, cfg.eval_questions)  # [] = no evaluation
    data = ConversationBatches(processor, cfg.seed, cfg.batch_size, step, cfg.steps, cfg.max_turns,
                               cfg.curriculum_steps, question_mix(parse_weights(cfg.question_weights)),
                               patch_grid=grounding.grid if grounding is not None else 0)
    loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.num_workers else None)
    budget = cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf

    def advance_clock() -> None:
        """Count the wall time since the last call as trained: data waits, steps, evaluations and saves
        all use up the `--max-minutes` budget, which a checkpoint carries over to a resume."""
        nonlocal elapsed, clock
        now = time.monotonic()
        elapsed += now - clock
        clock = now

    def save_checkpoint() -> None:
        advance_clock()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "elapsed": elapsed, "best": best, "best_state": best_state}
        write_checkpoint(out, state)

    def evaluate_now() -> None:
        nonlocal best, best_state
        scores = score(validation, answer_items(model, processor, validation, batch_size=90))
        append_history(out, {"step": step, "eval": scores, "elapsed": round(elapsed, 1)})
        logger.info("step %d: validation exact match %.3f", step, scores["all"])
        if scores["all"] >= best["accuracy"]:
            best = {"accuracy": scores["all"], "step": step}
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    model.train()
    clock = time.monotonic()
    bar = tqdm(loader, initial=step, total=cfg.steps, desc="train", dynamic_ncols=True)
    for batch in bar:
        advance_clock()
        progress = max(step / cfg.steps, elapsed / budget)
        lr = cfg.lr * lr_factor(progress, step, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            answer_loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=positions_from_mask(batch["attention_mask"]),
                                pixel_values=batch["pixel_values"],
                                pixel_attention_mask=batch["pixel_attention_mask"],
                                labels=batch["labels"], use_cache=False).loss
            loss = answer_loss + grounding.loss(batch) if grounding is not None else answer_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        step += 1
        loss_value = answer_loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        append_history(out, {"step": step, "loss": round(loss_value, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                             "elapsed": round(elapsed, 2), **(grounding.last if grounding is not None else {})})
        if on_step is not None:
            on_step(step, loss_value)
        advance_clock()
        out_of_time = elapsed >= budget
        if validation and (step % cfg.eval_every == 0 or step == cfg.steps or out_of_time):
            evaluate_now()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
            save_checkpoint()
        if out_of_time:
            logger.info("wall-clock cap reached at step %d", step)
            break
    bar.close()
    advance_clock()
    if grounding is not None:
        grounding.close()
    if best_state is not None:
        final = copy.deepcopy(model).cpu()
        final.load_state_dict(best_state)
    else:
        final = model.cpu()
    export(final.eval(), processor, out / "model", shapes_generation_config(final, processor))
    summary = {"steps": step, "minutes": round(elapsed / 60, 2), "best": best, "parameters": n_params,
               "config": asdict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def _add_flags(parser: argparse.ArgumentParser) -> None:
    helps = {"out_dir": "run folder: checkpoint, history.jsonl, model/ (the Hub-layout export)",
             "preset": f"model size, one of {sorted(PRESETS)}", "steps": "optimizer steps (the schedule length)",
             "max_minutes": "wall-clock cap; the cosine schedule is stretched to end by then",
             "device": "cpu or cuda", "num_workers": "data-loader processes rendering batches",
             "tokenizer_dir": "use these tokenizer files instead of training a new tokenizer",
             "bf16": "bfloat16 autocast (GPU)", "eval_questions": "validation questions per evaluation; 0 = none",
             "resume": "continue from <out-dir>/checkpoint.pt",
             "latents_std": "std of the perceiver latents at init",
             "position_table_scale": "S > 0: the vision position embedding starts as S x a 2-D sine/cosine "
                                     "table (with --init-from: S x the table is added to it), without "
                                     "weight decay; 0 = reference init",
             "curriculum_steps": "N > 0: single images have at most 1 + step // N shapes (up to 5), "
                                 "which speeds up learning colour binding; 0 = off",
             "question_weights": "TYPE=N,...: ask single-image question TYPE N times as often as an unnamed "
                                 f"type (types: {', '.join(SINGLE_IMAGE_TYPES)})",
             "init_from": "fine-tune this Hub-layout model folder (same preset) instead of starting from "
                          "scratch; its tokenizer too unless --tokenizer-dir",
             "perceiver_qk_std": "std of the perceiver's q/k projections at init; ~0.5 (with "
                                 "--latents-std 0.02) lets reading be learned, see docs/training.md",
             "vision_minutes": "M > 0: first train the vision tower alone for M minutes on per-patch labels "
                               "(grounding.pretrain_vision), then freeze it; 0 = off",
             "freeze_vision": "keep the vision tower fixed (as after --vision-minutes), e.g. when fine-tuning "
                              "a grounded model with --init-from",
             "route_weight": "W > 0: teach latent i to attend to patch i, column by column (needs one "
                             "latent per patch: --preset cpu64); 0 = off",
             "align_weight": "W > 0: pull each latent over a shape or text towards the word embeddings of "
                             "what is there (needs one latent per patch); 0 = off",
             "background_weight": "W > 0: pull each latent over empty background towards the <unk> "
                                  "embedding, so no question's word finds it (needs one latent per "
                                  "patch); 0 = off"}
    add_config_flags(parser, TrainConfig, helps, choices={"preset": sorted(PRESETS)}, floats=("max_minutes",))


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, helps: dict[str, str], *,
                     required: Sequence[str] = (), choices: dict[str, list[str]] | None = None,
                     floats: Sequence[str] = (), ints: Sequence[str] = ()) -> None:
    """One `--flag` per field of a config dataclass: booleans are switches; the rest take a value of the
    default's type (`floats`/`ints` name fields whose default is None), and `--help` shows the default."""
    defaults = config_class()
    for f in fields(config_class):
        flag, default, text = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), helps.get(f.name, "")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=text)
        elif f.name in required:
            parser.add_argument(flag, required=True, help=text)
        elif choices and f.name in choices:
            parser.add_argument(flag, choices=choices[f.name], default=default, help=text)
        else:
            kind = float if isinstance(default, float) or f.name in floats else (
                int if isinstance(default, int) or f.name in ints else str)
            parser.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})".strip())


def run_as_script(command: str, register: Callable[[Any], argparse.ArgumentParser],
                  argv: Sequence[str] | None) -> None:
    """`python -m idefics2.training.<module> ARGS` runs what `idefics2 <command> ARGS` runs."""
    parser = argparse.ArgumentParser(prog=f"python -m idefics2.training.{command}")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args([command, *(argv if argv is not None else sys.argv[1:])])
    args.func(args)


def run_from_args(args: argparse.Namespace) -> None:
    """The `train` command: build a TrainConfig from the parsed flags and train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    summary = train(cfg)
    logger.info("done: %s", json.dumps({k: summary[k] for k in ("steps", "minutes", "best")}))


def register_train_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `train` to the CLI's subparsers; `args.func(args)` runs it."""
    parser = subparsers.add_parser("train", help="train the small shapes model from scratch",
                                   description=__doc__.splitlines()[0])
    _add_flags(parser)
    parser.set_defaults(func=run_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    run_as_script("train", register_train_command, argv)


if __name__ == "__main__":
    main()

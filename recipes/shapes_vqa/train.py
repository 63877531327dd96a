"""Train a small Idefics2 from scratch on the synthetic shapes data and write a Hub-layout folder.

Loop: synthetic conversations -> our processor (chat template, image expansion, pixels) -> labels
that supervise only assistant answers and their `<end_of_utterance>` -> AdamW with warm-up + cosine
decay, gradient clipping, periodic exact-match evaluation, resumable checkpoints and a wall-clock cap.
The learning-rate schedule runs on max(step progress, time progress), so a capped run still decays.

    python -m recipes.shapes_vqa.train --preset gpu64-text128 --out-dir runs/shapes ...

(docs/training.md gives the commands that made the shipped model.)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from idefics2.checkpoint import resolve_device
from idefics2.config import Idefics2Config
from idefics2.finetune.flags import add_config_flags, check_flag_ranges
from idefics2.finetune.loop import forward_batch, lr_factor, param_groups
from idefics2.finetune.run_folder import (
    append_history,
    check_resumable,
    export,
    read_checkpoint,
    start_history,
    write_checkpoint,
)
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.processing.processor import Idefics2Processor
from idefics2.processing.tokenizer import Tokenizer
from recipes.shapes_vqa.data import ConversationBatches, parse_weights
from recipes.shapes_vqa.evaluate import answer_items, score
from recipes.shapes_vqa.grounding import Grounding, pretrain_vision
from recipes.shapes_vqa.model_init import (
    corpus_token_ids,
    init_json_embeddings,
    init_weights,
    model_position_table,
    position_embedding,
)
from recipes.shapes_vqa.presets import PRESETS, build_processor, model_config_dict
from recipes.shapes_vqa.synthetic import SINGLE_IMAGE_TYPES, json_items, make_eval_items, question_mix
from recipes.shapes_vqa.tokenizer_training import conversation_texts, train_tokenizer

logger = logging.getLogger(__name__)

VISION_HISTORY_FILE = "vision_history.jsonl"  # `--vision-minutes` pretraining, one record per step

# Validation questions come from their own seed offset, never from the training stream.
VALIDATION_SEED_OFFSET = 1_000_003


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
    json_fraction: float = 0.0
    init_json_embeddings: bool = False
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
                                        "align_weight", "background_weight", "json_fraction"))
        if self.json_fraction > 1:
            raise ValueError(f"--json-fraction is a probability in [0, 1], got {self.json_fraction}")


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
            position_embedding(model).add_(cfg.position_table_scale * model_position_table(model))
    return model


def _load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    if cfg.tokenizer_dir is not None:
        return Tokenizer.from_pretrained(cfg.tokenizer_dir)
    return train_tokenizer(seed=cfg.seed)


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
    if cfg.init_json_embeddings and not cfg.resume:
        trained = corpus_token_ids(tokenizer, conversation_texts(0, 3000))  # the tokenizer's own corpus
        started = init_json_embeddings(model, tokenizer, trained)
        logger.info("JSON answer tokens started from trained ones: %s",
                    tokenizer.convert_ids_to_tokens(started))
    model.to(device)
    if cfg.vision_minutes > 0 or cfg.freeze_vision:
        model.model.vision_model.requires_grad_(False)  # pretrained first (below) or loaded, then frozen
    groups = param_groups(model, cfg.weight_decay, decay_positions=cfg.position_table_scale <= 0)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    step, elapsed, best = 0, 0.0, {"accuracy": -1.0, "step": 0}
    best_state: dict[str, Tensor] | None = None
    if cfg.resume:
        state = read_checkpoint(out)  # on the CPU: load_state_dict copies onto the device
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
    if cfg.json_fraction > 0:  # the JSON forms of the same questions, so the best checkpoint answers both
        validation += json_items(validation)
    data = ConversationBatches(processor, cfg.seed, cfg.batch_size, step, cfg.steps, cfg.max_turns,
                               cfg.curriculum_steps, question_mix(parse_weights(cfg.question_weights)),
                               patch_grid=grounding.grid if grounding is not None else 0,
                               json_fraction=cfg.json_fraction)
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
            answer_loss = forward_batch(model, batch, labels=batch["labels"]).loss
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
             "json_fraction": "P > 0: ask each colour, shape and counting question in its JSON form "
                              "(\"... Answer in JSON.\" -> {\"color\": \"red\"}) with probability P, and "
                              "validate on the JSON forms too; 0 = never",
             "init_json_embeddings": "before fine-tuning, start the JSON answers' untrained tokens from "
                                     "trained ones (model_init.init_json_embeddings)",
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


def run_from_args(args: argparse.Namespace) -> None:
    """The `train` command: build a TrainConfig from the parsed flags and train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    summary = train(cfg)
    logger.info("done: %s", json.dumps({k: summary[k] for k in ("steps", "minutes", "best")}))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.shapes_vqa.train", description=__doc__.splitlines()[0])
    _add_flags(parser)
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()

"""Stage 5: teach the trained shapes model to answer in JSON (`{"color": "red"}`) as well.

Fine-tuned on JSON answers by cross-entropy alone, the model learned the layout but not which shape's
colour to give (docs/experiments/shapes-vqa-log.md, eleventh and twelfth sessions): the value is
predicted after `{"color": "`, at a position that has to find the asked shape in the image anew,
while the trained model does that only right after "Assistant:". So the value position gets a direct
target: at every decoder layer, its hidden state is pulled towards the one the unchanged model
computes at the plain answer's position for the same image and question (`layer_match_loss`). Plain
conversations in every batch keep the model's plain answers: at the positions that predict their
answer tokens, a KL to the unchanged model's next-token distribution and the same per-layer pull
towards its hidden states (`plain_states_loss`). The vision tower and the connector stay frozen; the
JSON tokens start from trained ones (`model_init.init_json_embeddings`).

From the stage-4 weights, 1,000 steps (17 minutes on one of 2 CPU cores) give 95.1% on the JSON forms
of the 500 held-out questions, bind the JSON colour to the asked shape in 95.0% of the binding scenes,
and keep the plain answers at 96.2% on the 500 (96.4% before) with plain binding at 98.3% (99.2%
before): the shipped model (docs/experiments/shapes-vqa-log.md, fourteenth session).

    python -m recipes.shapes_vqa.json_answers --init-from runs/ftS10/model --out-dir runs/json

Shape letters: B JSON rows (and as many plain ones), T tokens, D text width, V vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from idefics2.finetune.data import IGNORE_INDEX, assistant_prefix_ids, labelled_batch
from idefics2.finetune.flags import add_config_flags, check_flag_ranges
from idefics2.finetune.loop import forward_batch, lr_factor, param_groups
from idefics2.finetune.run_folder import export
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.processing.processor import Idefics2Processor
from recipes.shapes_vqa.data import drop_json_answer_space, json_space_id
from recipes.shapes_vqa.model_init import corpus_token_ids, init_json_embeddings
from recipes.shapes_vqa.synthetic import (
    _assistant,
    _user,
    json_form,
    render,
    sample_conversation,
    sample_scene,
    single_image_question,
)
from recipes.shapes_vqa.tokenizer_training import conversation_texts
from recipes.shapes_vqa.train import shapes_generation_config

logger = logging.getLogger(__name__)

# Colour asked twice as often as the other kinds: it is the one that needs binding in every scene.
QUESTION_TYPES = ("color", "color", "shape", "count", "count_kind")


@dataclass
class JsonTuningConfig:
    """Every knob of a stage-5 run (defaults: run 6d of docs/experiments/shapes-vqa-log.md, the shipped one)."""

    init_from: str = "runs/ftS10/model"
    out_dir: str = "runs/json"
    seed: int = 12
    steps: int = 1000
    batch_size: int = 16
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    match_weight: float = 3.0
    plain_weight: float = 5.0
    plain_match_weight: float = 3.0
    suffix_fraction: float = 1.0
    threads: int = 1

    def __post_init__(self) -> None:
        check_flag_ranges(self, positive=("steps", "batch_size", "lr", "threads"),
                          non_negative=("warmup_steps", "match_weight", "plain_weight", "plain_match_weight",
                                        "suffix_fraction"))
        if self.suffix_fraction > 1:
            raise ValueError(f"--suffix-fraction is a probability in [0, 1], got {self.suffix_fraction}")


def value_prefix(answer: str) -> str:
    """The JSON answer up to its value: '{"color": "' for '{"color": "red"}', '{"count":' for
    '{"count": 3}' (the count's first token, " 3", carries the space)."""
    ((_, value),) = json.loads(answer).items()
    if isinstance(value, str):
        return answer[: answer.index(f'"{value}"') + 1]
    return answer[: answer.index(": ") + 1]


@dataclass
class PairedBatch:
    """`student`: B JSON conversations then B plain ones, left-padded, with labels (2B, T);
    `teacher`: the B plain prompts of the same images and questions, ending at "Assistant:";
    `value_positions` (B,): where each JSON row predicts its value's first token."""

    student: dict[str, Tensor]
    teacher: dict[str, Tensor]
    value_positions: Tensor


def paired_batch(processor: Idefics2Processor, rng: random.Random, batch_size: int,
                 suffix_fraction: float) -> PairedBatch:
    """One batch: colour, shape and counting questions in JSON form (the " Answer in JSON." suffix with
    probability `suffix_fraction`), their plain forms as the teacher's prompts, and as many plain
    conversations of every kind, image pairs included (`sample_conversation`): a kind left out is
    forgotten (without pairs, "What's the difference between these two images?" got a count)."""
    tokenizer = processor.tokenizer
    prompts, conversations, images, prefixes = [], [], [], []
    while len(conversations) < batch_size:
        scene = sample_scene(rng)
        qtype = rng.choice(QUESTION_TYPES)
        qa = single_image_question(rng, scene, qtype)
        if qa is None:
            continue
        question, answer = qa
        json_question, json_answer = json_form(qtype, question, answer)
        if rng.random() >= suffix_fraction:
            json_question = question
        prompts.append(processor.apply_chat_template([_user(question, 1)], add_generation_prompt=True))
        conversations.append([_user(json_question, 1), _assistant(json_answer)])
        images.append([render(scene)])
        prefixes.append(value_prefix(json_answer))
    for _ in range(batch_size):
        sample = sample_conversation(rng, 3)
        conversations.append(sample.messages)
        images.append(sample.images)
    prefix_ids = assistant_prefix_ids(tokenizer)
    brace = tokenizer.token_to_id("{")
    student = drop_json_answer_space(labelled_batch(processor, conversations, images, prefix_ids), prefix_ids,
                                     json_space_id(tokenizer), brace, tokenizer.pad_token_id)
    positions = []
    for row, prefix in enumerate(prefixes):
        tokens = student["input_ids"][row].tolist()
        start = next(t for t in range(len(prefix_ids), len(tokens))
                     if tokens[t] == brace and tokens[t - len(prefix_ids):t] == prefix_ids)
        wanted = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        if tokens[start:start + len(wanted)] != wanted:
            raise ValueError(f"{prefix!r} does not tokenize the same at the start of its answer")
        positions.append(start + len(wanted) - 1)
    teacher = dict(processor(images=images[:batch_size], text=prompts, padding=True, return_tensors="pt"))
    return PairedBatch(student, teacher, torch.tensor(positions))


def relative_distance(own: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """Mean over layers of the mean squared distance between matching (N, D) states, each relative to
    its target's squared norm, so that every layer counts alike whatever its scale."""
    losses = [((o - t) ** 2).sum(-1).div(t.pow(2).sum(-1)).mean() for o, t in zip(own, targets, strict=True)]
    return torch.stack(losses).mean()


def layer_match_loss(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor],
                     positions: Tensor) -> Tensor:
    """`relative_distance` over the decoder layers (embeddings excluded) between the student's state at
    `positions` (rows 0..B-1) and the teacher's at its last position. States: (rows, T, D) per layer,
    the last after the final norm."""
    rows = torch.arange(len(positions))
    return relative_distance([student[rows, positions] for student in student_states[1:]],
                             # (B, D): left padding puts every prompt's "Assistant:" last
                             [teacher[:, -1] for teacher in teacher_states[1:]])


def answer_predicting_positions(labels: Tensor) -> Tensor:
    """(rows, T) bool: the positions whose logits predict an answer token, one before each label
    (the last "Assistant:" token predicts the answer's first token, which decides a plain answer)."""
    return F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


def plain_states_loss(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], positions: Tensor) -> Tensor:
    """`relative_distance` over the decoder layers between the student's plain rows (the last
    `len(positions)` of the batch) and the unchanged model's states at the (rows, T) bool `positions`."""
    return relative_distance([student[-len(positions):][positions] for student in student_states[1:]],
                             [teacher[positions] for teacher in teacher_states[1:]])  # (N, D) each


def tune(cfg: JsonTuningConfig) -> dict[str, Any]:
    """Run stage 5 and export `<out_dir>/model`; returns the summary also written to `summary.json`."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = Idefics2Processor.from_pretrained(cfg.init_from)
    model = Idefics2ForConditionalGeneration.from_pretrained(cfg.init_from, dtype="float32").eval()
    teacher = copy.deepcopy(model).requires_grad_(False)  # the unchanged model: targets and plain answers
    trained = corpus_token_ids(processor.tokenizer, conversation_texts(0, 3000))
    init_json_embeddings(model, processor.tokenizer, trained)
    model.model.vision_model.requires_grad_(False)
    model.model.connector.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=cfg.lr, betas=(0.9, 0.95))
    rng = random.Random(cfg.seed)
    B = cfg.batch_size
    history = (out / "history.jsonl").open("w", encoding="utf-8")
    start = time.monotonic()
    for step in range(1, cfg.steps + 1):
        lr = cfg.lr * lr_factor((step - 1) / cfg.steps, step - 1, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = paired_batch(processor, rng, B, cfg.suffix_fraction)
        with torch.no_grad():
            targets = forward_batch(teacher, batch.teacher, output_hidden_states=True).hidden_states
            plain_rows = {k: v[B:] for k, v in batch.student.items()}  # the teacher reads no JSON row
            plain_teacher = forward_batch(teacher, plain_rows, output_hidden_states=True)  # logits (B, T, V)
        output = forward_batch(model, batch.student, labels=batch.student["labels"], output_hidden_states=True)
        match = layer_match_loss(output.hidden_states, targets, batch.value_positions)
        predicting = answer_predicting_positions(batch.student["labels"][B:])  # (B, T)
        plain = F.kl_div(output.logits[B:][predicting].log_softmax(-1),
                         plain_teacher.logits[predicting].log_softmax(-1), log_target=True, reduction="batchmean")
        plain_match = plain_states_loss(output.hidden_states, plain_teacher.hidden_states, predicting)
        loss = output.loss + cfg.match_weight * match + cfg.plain_weight * plain + cfg.plain_match_weight * plain_match
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        record = {"step": step, "loss": round(output.loss.item(), 5), "match": round(match.item(), 5),
                  "plain_kl": round(plain.item(), 6),
                  "plain_match": round(plain_match.item(), 6), "lr": lr, "elapsed": round(time.monotonic() - start, 1)}
        history.write(json.dumps(record) + "\n")
        if step % 50 == 0:
            history.flush()
            logger.info("step %d: %s", step, record)
    history.close()
    export(model.eval(), processor, out / "model", shapes_generation_config(model, processor))
    summary = {"steps": cfg.steps, "minutes": round((time.monotonic() - start) / 60, 2), "config": asdict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.shapes_vqa.json_answers",
                                     description=__doc__.splitlines()[0])
    helps = {"init_from": "the trained Hub-layout model folder to teach (and the teacher)",
             "out_dir": "run folder: history.jsonl, summary.json, model/ (the Hub-layout export)",
             "steps": "optimizer steps (warm-up, then cosine decay to --min-lr-ratio)",
             "batch_size": "JSON conversations per step; as many plain ones come with them",
             "match_weight": "weight of the per-layer hidden-state match at the value position",
             "plain_weight": "weight of the KL to the unchanged model on the plain conversations",
             "plain_match_weight": "weight of the per-layer hidden-state match to the unchanged model at "
                                   "the plain conversations' answer positions",
             "suffix_fraction": "how often a JSON question ends in \" Answer in JSON.\"; the others are "
                                "the plain question, which the model then learns to answer in JSON too "
                                "(at 0.5 it answered almost every plain colour question in JSON)",
             "threads": "torch threads (1 is fastest on a shared 2-core machine)"}
    add_config_flags(parser, JsonTuningConfig, helps)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = tune(JsonTuningConfig(**{f.name: getattr(args, f.name) for f in fields(JsonTuningConfig)}))
    logger.info("done: %s", json.dumps({k: summary[k] for k in ("steps", "minutes")}))


if __name__ == "__main__":
    main()

"""Exact-match evaluation of a shapes model on held-out synthetic questions, per question type.

Answers are decoded greedily with `model.generate` (image-feature cache off, since the
weights change between evaluations during training) and compared after lower-casing and dropping
punctuation; answers to the JSON forms of questions are parsed with `json.loads` and compared as
values. Used by the training loop (periodic evaluation), the shipped-model test and as a script:
`python -m recipes.shapes_vqa.evaluate MODEL_DIR --seed 12345 --n 500` (add `--colour-binding --seed 5 --n 120`
for the colour-binding check, `--json` for the JSON forms of the sample's colour, shape and counting
questions).
"""

from __future__ import annotations

import argparse
import json
import re
import string
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.processing.processor import Idefics2Processor
from recipes.shapes_vqa.synthetic import (
    GROUPS,
    JSON_TYPES,
    QUESTION_TYPES,
    EvalItem,
    json_items,
    make_colour_binding_items,
    make_eval_items,
)

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}’]")


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces: "The red circle." == "the red circle"."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


@torch.no_grad()
def answer_items(model: Idefics2ForConditionalGeneration, processor: Idefics2Processor,
                 items: Sequence[EvalItem], batch_size: int = 32, max_new_tokens: int = 32) -> list[str]:
    """Greedy answers, batched by image count (a batch needs the same number of images per sample)."""
    was_training = model.training
    model.eval()
    answers: dict[int, str] = {}
    by_images: dict[int, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_images[len(item.images)].append(index)
    for indices in by_images.values():
        for start in range(0, len(indices), batch_size):
            chunk = [items[i] for i in indices[start:start + batch_size]]
            prompts = [processor.apply_chat_template(list(item.messages), add_generation_prompt=True)
                       for item in chunk]
            inputs = processor(images=[list(item.images) for item in chunk], text=prompts, padding=True,
                               return_tensors="pt")
            inputs = {key: value.to(model.device) for key, value in inputs.items()}
            out = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                 extra_eos_token_ids=[processor.end_of_utterance_id], do_sample=False,
                                 vision_cache=False)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            for i, text in zip(indices[start:start + batch_size],
                               processor.batch_decode(new_tokens.cpu(), skip_special_tokens=True), strict=True):
                answers[i] = text.strip()
    model.train(was_training)
    return [answers[i] for i in range(len(items))]


def is_correct(item: EvalItem, answer: str) -> bool:
    """Exact match after `normalise`; for a JSON form, the answer must parse to the expected value
    ('{"count": 3}' is right, '{"count": "3"}' and '{"count": 3' are not)."""
    if item.question_type not in JSON_TYPES:
        return normalise(answer) == normalise(item.answer)
    try:
        return json.loads(answer) == json.loads(item.answer)
    except json.JSONDecodeError:
        return False


def score(items: Sequence[EvalItem], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy per question type, per group ("group:<name>") and overall ("all")."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for item, answer in zip(items, answers, strict=True):
        correct = is_correct(item, answer)
        for key in (item.question_type, f"group:{GROUPS[item.question_type]}", "all"):
            hits[key].append(correct)
    return {key: sum(values) / len(values) for key, values in hits.items()}


def format_table(scores: dict[str, float], items: Sequence[EvalItem]) -> str:
    """Markdown table: one row per question type, then per acceptance group, then overall."""
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item.question_type] += 1
        counts[f"group:{GROUPS[item.question_type]}"] += 1
        counts["all"] += 1
    keys = [t for t in (*QUESTION_TYPES, *JSON_TYPES) if t in scores]
    keys += sorted(k for k in scores if k.startswith("group:")) + ["all"]
    rows = ["| question type | n | exact match |", "| --- | ---: | ---: |"]
    rows += [f"| {key} | {counts[key]} | {scores[key] * 100:.1f}% |" for key in keys]
    return "\n".join(rows)


@torch.no_grad()
def agreement(reference: Idefics2ForConditionalGeneration, model: Idefics2ForConditionalGeneration,
              processor: Idefics2Processor, items: Sequence[EvalItem], batch_size: int = 25) -> dict[str, float]:
    """Next-token agreement of `model` with `reference` on the items' conversations (question and
    answer, teacher-forced), at every real text position: mean KL(reference || model) and top-1
    agreement."""
    kl, same, count = 0.0, 0, 0
    by_images: dict[int, list[EvalItem]] = defaultdict(list)  # a batch needs one image count
    for item in items:
        by_images[len(item.images)].append(item)
    chunks = [group[i:i + batch_size] for group in by_images.values() for i in range(0, len(group), batch_size)]
    for chunk in chunks:
        texts = [processor.apply_chat_template([*item.messages, {"role": "assistant", "content": [
            {"type": "text", "text": item.answer}]}]) for item in chunk]
        inputs = processor(images=[list(item.images) for item in chunk], text=texts, padding=True,
                           return_tensors="pt")
        real = inputs["attention_mask"].bool() & (inputs["input_ids"] != processor.image_token_id)
        p = reference(**inputs).logits.float().log_softmax(-1)[real]  # (positions, V)
        q = model(**inputs).logits.float().log_softmax(-1)[real]
        kl += float((p.exp() * (p - q)).sum())
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        count += p.shape[0]
    return {"positions": count, "mean_kl": kl / count, "top1_agreement": same / count}


def main() -> None:
    parser = argparse.ArgumentParser(description="Exact-match accuracy of a shapes model on fresh questions.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--seed", type=int, default=12345, help="held-out seed (training uses others)")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--show-errors", type=int, default=10)
    parser.add_argument("--colour-binding", action="store_true",
                        help="only colour questions about 2-3 shapes of distinct kinds and colours "
                             "(the shipping check of docs/training.md: --seed 5 --n 120)")
    parser.add_argument("--json", action="store_true",
                        help="ask the colour, shape and counting questions of the sample in their JSON form "
                             "instead (\"... Answer in JSON.\"), each answer parsed with json.loads")
    parser.add_argument("--quantization", choices=["int8", "int4"], help="quantize the decoder and connector")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    parser.add_argument("--agreement", action="store_true",
                        help="with --quantization: next-token KL and top-1 agreement against float32 instead")
    args = parser.parse_args()
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    torch.set_num_threads(2)
    model = Idefics2ForConditionalGeneration.from_pretrained(args.model_dir, quantization=args.quantization,
                                                             group_size=args.group_size).eval()
    processor = Idefics2Processor.from_pretrained(args.model_dir)
    items = (make_colour_binding_items if args.colour_binding else make_eval_items)(args.seed, args.n)
    if args.json:
        items = json_items(items)
    if args.agreement:
        if args.quantization is None:
            parser.error("--agreement compares a --quantization against float32")
        reference = Idefics2ForConditionalGeneration.from_pretrained(args.model_dir).eval()
        print(json.dumps(agreement(reference, model, processor, items)))
        return
    start = time.monotonic()
    answers = answer_items(model, processor, items, batch_size=args.batch_size)
    print(format_table(score(items, answers), items))
    print(f"\n{len(items)} questions in {time.monotonic() - start:.1f} s (seed {args.seed})")
    errors = [(i, a) for i, a in zip(items, answers, strict=True) if not is_correct(i, a)]
    for item, answer in errors[: args.show_errors]:
        print(f"[{item.question_type}] {item.question!r}: expected {item.answer!r}, got {answer!r}")


if __name__ == "__main__":
    main()

"""The model shipped in `idefics2/assets/shapes-vqa` answers held-out questions about fresh images.

The issue's fast test: at least 90% of 60 held-out questions right. Every type but the full
description (81-89% on fresh samples, docs/training.md) also has to reach 90% on its own, and so do
the JSON forms ("... Answer in JSON.") of the colour, shape and counting questions. On
examples/shapes.png each shape's colour is asked, which a model that does not bind colour to kind
gets wrong (an earlier shipped model called the green triangle blue), plainly and in JSON.
"""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import ROOT, SHIPPED
from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from recipes.shapes_vqa.evaluate import answer_items, is_correct, normalise
from recipes.shapes_vqa.synthetic import JSON_SUFFIX, EvalItem, json_items, make_eval_items

LEARNED_TYPES = {"color", "shape", "count", "count_kind", "position", "text", "difference", "more"}
HELD_OUT_SEED = 424242  # training used seed 0, validation 1_000_003, docs/training.md 12345


@pytest.fixture(scope="module")
def shipped() -> tuple[Idefics2ForConditionalGeneration, Idefics2Processor]:
    return Idefics2ForConditionalGeneration.from_pretrained(SHIPPED).eval(), Idefics2Processor.from_pretrained(SHIPPED)


def test_shipped_folder_is_small_and_complete() -> None:
    names = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "processor_config.json", "chat_template.json",
            "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 25 * 2**20


def test_held_out_accuracy(shipped: tuple[Idefics2ForConditionalGeneration, Idefics2Processor]) -> None:
    model, processor = shipped
    items = make_eval_items(HELD_OUT_SEED, 60)
    answers = answer_items(model, processor, items, batch_size=30)
    correct = [normalise(a) == normalise(i.answer) for i, a in zip(items, answers, strict=True)]
    learned = [c for c, i in zip(correct, items, strict=True) if i.question_type in LEARNED_TYPES]
    assert sum(learned) / len(learned) >= 0.9, list(zip(answers, [i.answer for i in items]))
    assert sum(correct) / len(correct) >= 0.9


def test_held_out_json_accuracy(shipped: tuple[Idefics2ForConditionalGeneration, Idefics2Processor]) -> None:
    """The JSON forms ("... Answer in JSON." -> '{"color": "red"}') of the colour, shape and counting
    questions among 150 held-out ones (68 of them; among the 60 above there are 28, one being 3.6
    points), each answer parsed by `json.loads`."""
    model, processor = shipped
    items = json_items(make_eval_items(HELD_OUT_SEED, 150))
    answers = answer_items(model, processor, items, batch_size=34)
    correct = [is_correct(i, a) for i, a in zip(items, answers, strict=True)]
    assert len(items) == 68 and sum(correct) / len(correct) >= 0.9, list(zip(answers, [i.answer for i in items]))


@pytest.mark.parametrize("suffix, answers", [("", ["Red.", "Blue.", "Green."]),
                                             (JSON_SUFFIX, ['{"color": "red"}', '{"color": "blue"}',
                                                            '{"color": "green"}'])])
def test_readme_example(shipped: tuple[Idefics2ForConditionalGeneration, Idefics2Processor], suffix: str,
                        answers: list[str]) -> None:
    model, processor = shipped
    image = Image.open(ROOT / "examples" / "shapes.png")
    questions = [f"What color is the {kind}?{suffix}" for kind in ("circle", "square", "triangle")]
    items = [EvalItem((image,), ({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},),
                      q, answer, "color") for q, answer in zip(questions, answers, strict=True)]
    assert answer_items(model, processor, items) == answers

"""Stage 5 (`recipes.shapes_vqa.json_answers`): the paired batches, the layer-match loss, and a short run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from conftest import SHIPPED
from idefics2.finetune.data import IGNORE_INDEX
from idefics2.processing.processor import Idefics2Processor
from recipes.shapes_vqa.json_answers import (
    JsonTuningConfig,
    answer_predicting_positions,
    layer_match_loss,
    paired_batch,
    plain_states_loss,
    tune,
    value_prefix,
)
from recipes.shapes_vqa.train import TrainConfig, train


def test_value_prefix_ends_where_the_value_begins() -> None:
    assert value_prefix('{"color": "red"}') == '{"color": "'
    assert value_prefix('{"shape": "triangle"}') == '{"shape": "'
    assert value_prefix('{"count": 3}') == '{"count":'  # " 3" is one token: the space goes with the value


def test_a_paired_batch_points_at_the_token_before_each_value() -> None:
    processor = Idefics2Processor.from_pretrained(SHIPPED)
    batch = paired_batch(processor, random.Random(3), 6, 0.5)
    student, tokenizer = batch.student, processor.tokenizer
    assert student["input_ids"].shape[0] == 12 and batch.teacher["input_ids"].shape[0] == 6
    texts = processor.batch_decode(student["input_ids"])
    for row, position in enumerate(batch.value_positions.tolist()):
        before = processor.decode(student["input_ids"][row, : position + 1])
        after = processor.decode(student["input_ids"][row, position + 1:])
        assert before.endswith(('{"color": "', '{"shape": "', '{"count":')), before[-40:]
        assert after.split('"')[0].split("}")[0].strip() != "" and student["labels"][row, position + 1] != IGNORE_INDEX
    assert all("Assistant:{" not in t for t in texts[6:])  # the plain conversations
    prompts = processor.batch_decode(batch.teacher["input_ids"])
    assert all(p.endswith("\nAssistant:") and "JSON" not in p for p in prompts)
    first = tokenizer.convert_ids_to_tokens(student["input_ids"][:6].gather(1, batch.value_positions[:, None] + 1)[:, 0].tolist())
    assert all(not t.startswith("Ġ") or t[1:].isdigit() for t in first), first


def test_layer_match_loss_compares_each_decoder_layer_at_the_value_position() -> None:
    teacher = [torch.zeros(2, 3, 2), torch.tensor([[[9.0, 9.0], [0.0, 0.0], [3.0, 4.0]],
                                                    [[0.0, 0.0], [0.0, 0.0], [0.0, 2.0]]])]
    student = [torch.full((2, 4, 2), 100.0), torch.zeros(2, 4, 2)]  # layer 0 (embeddings) is not compared
    student[1][0, 1] = torch.tensor([4.0, 4.0])  # off by (1, 0) from (3, 4): 1 / 25
    student[1][1, 3] = torch.tensor([0.0, 1.0])  # off by (0, -1) from (0, 2): 1 / 4
    loss = layer_match_loss(student, teacher, torch.tensor([1, 3]))
    assert loss.item() == pytest.approx((1 / 25 + 1 / 4) / 2)
    assert layer_match_loss(teacher, teacher, torch.tensor([2, 2])).item() == 0.0


def test_the_plain_terms_read_the_positions_that_predict_answer_tokens() -> None:
    """The position of "Assistant:"'s last token predicts the answer's first token, so it is read; the
    answer's last label (`<end_of_utterance>`) predicts nothing that is learned, so its position is not."""
    I = IGNORE_INDEX
    labels = torch.tensor([[I, I, I, 7, 8, I],   # prompt, prompt, "Assistant:", answer, <eou>, padding
                           [I, I, 5, I, 6, 9]])  # two turns: answer 5, then answer 6 and its <eou> 9
    expected = torch.tensor([[False, False, True, True, False, False],
                             [False, True, False, True, True, False]])
    assert torch.equal(answer_predicting_positions(labels), expected)


def test_plain_states_loss_compares_the_last_rows_at_the_given_positions() -> None:
    positions = torch.tensor([[False, True, False], [False, False, True]])  # the 2 plain rows
    teacher = [torch.zeros(2, 3, 2), torch.zeros(2, 3, 2)]
    teacher[1][0, 1] = torch.tensor([3.0, 4.0])
    teacher[1][1, 2] = torch.tensor([0.0, 2.0])
    student = [torch.full((4, 3, 2), 100.0), torch.full((4, 3, 2), 50.0)]  # rows 0-1: JSON rows, not read
    student[1][2, 1] = torch.tensor([4.0, 4.0])  # off by (1, 0) from (3, 4): 1 / 25
    student[1][3, 2] = torch.tensor([0.0, 1.0])  # off by (0, -1) from (0, 2): 1 / 4
    assert plain_states_loss(student, teacher, positions).item() == pytest.approx((1 / 25 + 1 / 4) / 2)


def test_a_short_run_keeps_the_vision_tower_and_connector_and_exports(tmp_path: Path) -> None:
    from idefics2 import Idefics2ForConditionalGeneration

    train(TrainConfig(out_dir=str(tmp_path / "base"), preset="tiny", steps=1, batch_size=2, eval_questions=0,
                      tokenizer_dir=str(SHIPPED), max_turns=1, threads=1))
    base_dir = tmp_path / "base" / "model"
    tune(JsonTuningConfig(init_from=str(base_dir), out_dir=str(tmp_path / "json"), steps=2, batch_size=2))
    base = Idefics2ForConditionalGeneration.from_pretrained(base_dir).state_dict()
    tuned = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "json" / "model").state_dict()
    moved = {name for name, value in base.items() if not torch.equal(tuned[name], value)}
    assert moved and not any(n.startswith(("model.vision_model.", "model.connector.")) for n in moved)
    assert any(n.startswith("model.text_model.layers.") for n in moved)
    assert (tmp_path / "json" / "history.jsonl").read_text().count('"match"') == 2


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"--suffix-fraction is a probability in \[0, 1\]"):
        JsonTuningConfig(suffix_fraction=1.5)
    with pytest.raises(ValueError, match="--match-weight must be 0 or more"):
        JsonTuningConfig(match_weight=-1.0)

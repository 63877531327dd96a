"""Training pieces: label masking, synthetic data (determinism, answers match pixels), loop, resume.

The loop tests train the "tiny" preset for a handful of steps with the shipped tokenizer (training a
tokenizer takes ~10 s), so the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SHIPPED
from idefics2.finetune.data import IGNORE_INDEX, assistant_labels, assistant_prefix_ids, labelled_batch
from idefics2.finetune.loop import lr_factor, param_groups
from idefics2.finetune.run_folder import CHECKPOINT_FILE
from idefics2.processing.processor import END_OF_UTTERANCE_TOKEN
from idefics2.processing.tokenizer import Tokenizer
from recipes.shapes_vqa import synthetic
from recipes.shapes_vqa.data import ConversationBatches, drop_json_answer_space, parse_weights
from recipes.shapes_vqa.evaluate import normalise, score
from recipes.shapes_vqa.model_init import (
    corpus_token_ids,
    init_json_embeddings,
    init_weights,
    sincos_position_table,
)
from recipes.shapes_vqa.presets import build_processor, model_config_dict
from recipes.shapes_vqa.synthetic import (
    COLORS,
    SHAPES,
    make_colour_binding_items,
    make_eval_items,
    sample_conversation,
    sample_scene,
)
from recipes.shapes_vqa.tokenizer_training import SPECIAL_TOKENS, conversation_texts, train_tokenizer
from recipes.shapes_vqa.train import TrainConfig, _initial_model, main, train


@pytest.fixture(scope="module")
def processor():  # type: ignore[no-untyped-def]
    return build_processor("tiny", Tokenizer.from_pretrained(SHIPPED))


@pytest.fixture(autouse=True)
def _restore_threads():  # type: ignore[no-untyped-def]
    """`train` sets torch's thread count (1 here: tiny matrices on a shared CPU); give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _conversation() -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3."}]},
    ]


def test_labels_supervise_only_assistant_answers(processor) -> None:  # type: ignore[no-untyped-def]
    image = synthetic.render(sample_scene(random.Random(0)))
    short = [_conversation()[0], {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]
    texts = [processor.apply_chat_template(_conversation()), processor.apply_chat_template(short)]
    batch = processor(images=[[image], [image]], text=texts, padding=True, return_tensors="pt")
    data = ConversationBatches(processor, 0, 1, 0, 1, 1)
    labels = assistant_labels(batch["input_ids"], data.prefix_ids, processor.end_of_utterance_id)
    eou = END_OF_UTTERANCE_TOKEN
    supervised = [processor.decode(ids[lab != IGNORE_INDEX]) for ids, lab in zip(batch["input_ids"], labels)]
    assert supervised == [f" Red.{eou} 3.{eou}", f" Blue.{eou}"]
    # Supervised positions carry their own token as the label; everything else is ignored.
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], batch["input_ids"][keep])
    special = {processor.image_token_id, processor.fake_image_token_id, processor.tokenizer.pad_token_id}
    assert not any(int(t) in special for t in batch["input_ids"][keep])
    assert not keep[batch["attention_mask"] == 0].any()  # left padding of the shorter row


def test_tokenizer_layout() -> None:
    tokenizer = train_tokenizer(seed=1, vocab_size=400, n_conversations=150)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tokenizer("What color is the circle?")["input_ids"]
    assert ids[0] == tokenizer.token_to_id("<s>") and tokenizer.padding_side == "left"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "What color is the circle?"


def test_synthetic_data_is_deterministic_by_seed() -> None:
    a, b = sample_conversation(random.Random(7)), sample_conversation(random.Random(7))
    assert a.messages == b.messages and a.question_types == b.question_types
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True))
    first, again = make_eval_items(3, 18), make_eval_items(3, 18)
    assert [(i.question, i.answer) for i in first] == [(i.question, i.answer) for i in again]
    assert [(i.question, i.answer) for i in first] != [(i.question, i.answer) for i in make_eval_items(4, 18)]


def test_colour_binding_items_ask_about_one_of_several_distinct_shapes() -> None:
    """2 and 3 shapes alternately, kinds and colours all different, the answer the colour of the one
    shape of the asked kind; another colour of the image is always a wrong answer to have."""
    items = make_colour_binding_items(5, 12)
    assert [len(i.scenes[0].shapes) for i in items] == [2, 3] * 6
    for item in items:
        (scene,) = item.scenes
        assert scene.text is None and item.question_type == "color"
        assert len({s.kind for s in scene.shapes}) == len({s.color for s in scene.shapes}) == len(scene.shapes)
        (asked,) = [s for s in scene.shapes if item.question == f"What color is the {s.kind}?"]
        assert item.answer == asked.color.capitalize() + "."
        assert item.images[0].size == (scene.width, scene.height)
    assert [i.answer for i in items] == [i.answer for i in make_colour_binding_items(5, 12)]
    assert {i.answer for i in items} != {i.answer for i in items[:1]}  # not one colour for all


def test_answers_match_the_drawn_scene() -> None:
    rng = random.Random(11)
    for _ in range(60):
        scene = sample_scene(rng)
        pixels = np.asarray(synthetic.render(scene), dtype=np.int32)
        assert 1 <= len(scene.shapes) <= 5
        assert len({(s.kind, s.color) for s in scene.shapes}) == len(scene.shapes)
        for shape in scene.shapes:  # the centre pixel has the named colour (noise is at most mild)
            assert np.abs(pixels[shape.cy, shape.cx] - np.array(COLORS[shape.color])).max() <= 45
        for qtype in synthetic.SINGLE_IMAGE_TYPES:
            qa = synthetic.single_image_question(rng, scene, qtype)
            if qa is None:
                continue
            question, answer = qa
            if qtype == "color":
                kind = question.removeprefix("What color is the ").removesuffix("?")
                assert [s.color.capitalize() + "." for s in scene.shapes if s.kind == kind] == [answer]
            elif qtype == "shape":
                color = question.removeprefix("What shape is ").removesuffix("?")
                assert [s.kind.capitalize() + "." for s in scene.shapes if s.color == color] == [answer]
            elif qtype == "count":
                assert answer == f"{len(scene.shapes)}."
            elif qtype == "count_kind":
                kind = next(k for k in SHAPES if f" {k}s " in question)
                assert answer == f"{sum(s.kind == kind for s in scene.shapes)}."
            elif qtype == "position":
                xs = sorted(s.cx for s in scene.shapes)
                target = xs[0] if question.endswith("left?") else xs[-1]
                assert answer == f"The {next(s.name for s in scene.shapes if s.cx == target)}."
            elif qtype == "text":
                assert answer == f"{scene.text}."
    for qtype in synthetic.TWO_IMAGE_TYPES:
        first, second, _, answer = synthetic.two_image_question(rng, qtype)
        if qtype == "more":
            assert (len(first.shapes) > len(second.shapes)) == (answer == "The first image.")
        else:
            assert set(first.shapes) != set(second.shapes)


def test_curriculum_caps_the_shapes_of_single_images(processor) -> None:  # type: ignore[no-untyped-def]
    """`max_shapes` bounds single-image scenes (pairs keep the full range); the batch schedule
    counts from the run's start, so a resumed run continues the same ramp."""
    rng = random.Random(3)
    counts: list[str] = []
    for _ in range(150):
        sample = sample_conversation(rng, max_turns=5, two_images=False, max_shapes=2)
        for question, answer in zip(sample.messages[::2], sample.messages[1::2]):
            if question["content"][-1]["text"] == "How many shapes are there?":
                counts.append(answer["content"][0]["text"])
    assert counts and set(counts) <= {"1.", "2."} and {"1.", "2."} <= set(counts)
    assert {len(sample_scene(random.Random(s), max_shapes=1).shapes) for s in range(30)} == {1}
    data = ConversationBatches(processor, 0, 1, 0, 100, 1, curriculum_steps=10)
    assert [data.max_shapes(s) for s in (0, 9, 10, 25, 40, 41, 1000)] == [1, 1, 2, 3, 5, 5, 5]
    assert ConversationBatches(processor, 0, 1, 0, 100, 1).max_shapes(0) == 5  # off: the shipped recipe
    capped = ConversationBatches(processor, 0, 4, 0, 100, 1, curriculum_steps=1000)[0]["input_ids"]
    assert not torch.equal(capped, ConversationBatches(processor, 0, 4, 0, 100, 1)[0]["input_ids"])


def test_scoring_normalises_case_and_punctuation() -> None:
    items = make_eval_items(5, 2)
    assert normalise("The RED circle!") == normalise("the red circle.")
    assert score(items, [items[0].answer.upper().rstrip("."), "wrong"])["all"] == 0.5


def test_json_forms_are_json_dumps_of_the_plain_answer() -> None:
    """The exact text a JSON-schema constraint produces (", " and ": " separators), lower-case words, counts
    as numbers; the shipped tokenizer round-trips it (braces, quotes and colons are byte-level tokens)."""
    assert synthetic.json_form("color", "What color is the circle?", "Red.") == (
        "What color is the circle? Answer in JSON.", '{"color": "red"}')
    assert synthetic.json_form("shape", "What shape is blue?", "Triangle.")[1] == '{"shape": "triangle"}'
    assert synthetic.json_form("count", "How many shapes are there?", "4.")[1] == '{"count": 4}'
    assert synthetic.json_form("count_kind", "How many squares are there?", "0.")[1] == '{"count": 0}'
    with pytest.raises(ValueError, match="'describe' has no JSON form"):
        synthetic.json_form("describe", "Describe the image.", "A red circle.")
    tokenizer = Tokenizer.from_pretrained(SHIPPED)
    for text in ('{"color": "orange"}', '{"shape": "square"}', '{"count": 5}', "How many? Answer in JSON."):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text


def test_json_fraction_asks_json_forms_that_match_the_scene() -> None:
    """At 1 every colour, shape and counting question is in JSON form, its value read off the scene; at 0
    the stream is the one earlier stages trained on; in between, about that fraction."""
    rng, checked = random.Random(8), 0
    for _ in range(40):
        sample = sample_conversation(rng, max_turns=5, two_images=False, json_fraction=1.0)
        (scene,) = sample.scenes
        for user, assistant, qtype in zip(sample.messages[::2], sample.messages[1::2], sample.question_types,
                                          strict=True):
            question, answer = user["content"][-1]["text"], assistant["content"][0]["text"]
            assert question.endswith(" Answer in JSON.") == (qtype in synthetic.JSON_KEYS), question
            words = question.split()
            if qtype == "color":
                (shape,) = [s for s in scene.shapes if s.kind == words[-4].rstrip("?")]
                assert json.loads(answer) == {"color": shape.color}
            elif qtype == "shape":
                (shape,) = [s for s in scene.shapes if s.color == words[-4].rstrip("?")]
                assert json.loads(answer) == {"shape": shape.kind}
            elif qtype in ("count", "count_kind"):
                kinds = SHAPES if words[2] == "shapes" else (words[2].removesuffix("s"),)
                assert json.loads(answer) == {"count": sum(s.kind in kinds for s in scene.shapes)}
            else:
                continue
            checked += 1
    assert checked > 40
    for seed in range(5):
        assert sample_conversation(random.Random(seed), 5).messages == sample_conversation(
            random.Random(seed), 5, json_fraction=0.0).messages
    rng = random.Random(9)
    forms = []
    for _ in range(300):
        sample = sample_conversation(rng, 5, two_images=False, json_fraction=0.25)
        forms += [m["content"][-1]["text"].endswith("JSON.")
                  for m, t in zip(sample.messages[::2], sample.question_types, strict=True)
                  if t in synthetic.JSON_KEYS]
    assert 0.18 < sum(forms) / len(forms) < 0.32


def test_json_items_are_scored_by_their_parsed_value() -> None:
    plain = make_eval_items(5, 9)
    items = synthetic.json_items(plain)
    assert [i.question_type for i in items] == ["color_json", "shape_json", "count_json", "count_kind_json"]
    assert all(i.question.endswith(" Answer in JSON.") and i.messages[0]["content"][-1]["text"] == i.question
               and i.images == p.images for i, p in zip(items, plain[:4], strict=True))
    color = items[0]
    value = json.loads(color.answer)["color"]
    for answer, right in (('{"color": "%s"}' % value, True), ('{"color":"%s"}' % value, True),
                          ('{"color": "%s"' % value, False), (value.capitalize() + ".", False),
                          ('{"colour": "%s"}' % value, False)):
        assert score([color], [answer])["all"] == right, answer
    count = items[2]
    as_string = count.answer.replace(": ", ': "').replace("}", '"}')  # '{"count": "3"}'
    assert score([count], [as_string])["all"] == 0
    assert score(items, [i.answer for i in items]) == {**{t: 1.0 for t in synthetic.JSON_TYPES},
                                                       "group:json": 1.0, "all": 1.0}


def test_json_fraction_reaches_the_batches_and_the_validation(  # type: ignore[no-untyped-def]
        processor, tmp_path: Path) -> None:
    """Batch 0 of seed 0 holds single-image conversations (batch 1 holds pairs, which have no JSON form)."""
    batch = ConversationBatches(processor, 0, 8, 0, 1, 3, json_fraction=1.0)[0]
    texts = processor.batch_decode(batch["input_ids"])
    assert any(' Answer in JSON.<end_of_utterance>\nAssistant:{"' in t for t in texts)
    plain = processor.batch_decode(ConversationBatches(processor, 0, 8, 0, 1, 3)[0]["input_ids"])
    assert not any("JSON" in t for t in plain)
    train(_tiny(tmp_path, steps=1, eval_every=1, eval_questions=9, json_fraction=0.5))
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    (record,) = [json.loads(line) for line in lines if '"eval"' in line]
    assert {"color_json", "count_kind_json", "group:json", "color"} <= set(record["eval"])


def test_json_answers_start_with_the_token_a_json_constraint_emits_first(  # type: ignore[no-untyped-def]
        processor) -> None:
    """The template's space before a JSON answer's "{" is dropped (a JSON-schema constraint emits "{"
    right after "Assistant:"); plain answers keep theirs, and the shortened row is padded on the left."""
    tokenizer = processor.tokenizer
    image = synthetic.render(sample_scene(random.Random(0)))
    answer = {"role": "assistant", "content": [{"type": "text", "text": '{"color": "red"}'}]}
    json_turn = [_conversation()[0], answer]
    batch = labelled_batch(processor, [_conversation(), json_turn], [[image], [image]],
                           assistant_prefix_ids(tokenizer))
    data = ConversationBatches(processor, 0, 1, 0, 1, 1, json_fraction=0.5)
    dropped = drop_json_answer_space(batch, data.prefix_ids, data.space_id, data.brace_id,
                                     tokenizer.pad_token_id)
    assert torch.equal(dropped["input_ids"][0], batch["input_ids"][0])  # no JSON answer: unchanged
    eou = END_OF_UTTERANCE_TOKEN
    supervised = dropped["input_ids"][1][dropped["labels"][1] != IGNORE_INDEX].tolist()
    assert supervised == tokenizer('{"color": "red"}' + eou, add_special_tokens=False)["input_ids"]
    assert int(dropped["attention_mask"][1].sum()) == int(batch["attention_mask"][1].sum()) - 1
    assert dropped["input_ids"].shape == batch["input_ids"].shape
    assert dropped["attention_mask"][1][0] == 0 and dropped["labels"][1][0] == IGNORE_INDEX
    assert processor.decode(dropped["input_ids"][1][dropped["attention_mask"][1] == 1]).endswith(
        f'Assistant:{{"color": "red"}}{eou}\n')


def test_json_embeddings_start_from_the_trained_words() -> None:
    """After `init_json_embeddings` the shipped model, asked the circle's colour in examples/shapes.png
    (red), ranks "re" (the first piece of "red" without a space) first among the colours' JSON first
    pieces at the plain answer's position; trained tokens are left alone."""
    from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor

    model = Idefics2ForConditionalGeneration.from_pretrained(SHIPPED).eval()
    processor = Idefics2Processor.from_pretrained(SHIPPED)
    tokenizer = processor.tokenizer
    trained = corpus_token_ids(tokenizer, conversation_texts(0, 3000))
    before = model.get_input_embeddings().weight.detach().clone()
    started = init_json_embeddings(model, tokenizer, trained)
    after = model.get_input_embeddings().weight.detach()
    kept = sorted(set(range(len(tokenizer))) - set(started))
    assert torch.equal(after[kept], before[kept]) and not set(started) & trained
    ids = {t: tokenizer.token_to_id(t) for t in ("re", "Ġred", "ĠRed", "{", "ĠCircle", "Ġcircle", "c")}
    assert torch.allclose(after[ids["re"]], (before[ids["Ġred"]] + before[ids["ĠRed"]]) / 2)
    assert torch.allclose(after[ids["c"]], (before[ids["Ġcircle"]] + before[ids["ĠCircle"]]) / 2)
    median = float(before[sorted(trained)].norm(dim=-1).median())
    assert after[ids["{"]].norm() == pytest.approx(median, rel=1e-5)
    question = {"type": "text", "text": "What color is the circle?"}
    messages = [{"role": "user", "content": [{"type": "image"}, question]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(ROOT / "examples" / "shapes.png")
    inputs = processor(images=[[image]], text=[text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    firsts = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in COLORS]
    assert firsts[int(logits[firsts].argmax())] == ids["re"]


def test_lr_schedule_warms_up_then_decays() -> None:
    assert lr_factor(0.0, 0, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(0.5, 50, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(1.0, 100, 10, 0.1) == pytest.approx(0.1)


def _tiny(tmp_path: Path, **overrides: object) -> TrainConfig:
    settings = dict(out_dir=str(tmp_path), preset="tiny", steps=8, batch_size=4, lr=3e-3, warmup_steps=0,
                    min_lr_ratio=1.0, eval_every=1000, eval_questions=0, checkpoint_every=4,
                    tokenizer_dir=str(SHIPPED), max_turns=2, threads=1)
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def test_presets_set_heads_and_key_value_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Text heads are 64 wide; `text_kv_heads` sets the decoder's key/value heads and nothing else (the
    perceiver keeps half its heads), and a count that does not divide the heads is refused."""
    import recipes.shapes_vqa.presets as presets

    def heads(preset: str) -> tuple[int, int, int, int]:
        config = model_config_dict(preset, 495, 4)
        text, perceiver = config["text_config"], config["perceiver_config"]
        return (text["num_attention_heads"], text["num_key_value_heads"],
                perceiver["resampler_n_heads"], perceiver["num_key_value_heads"])

    assert heads("cpu64") == (2, 1, 2, 1)
    assert heads("cpu64kv2") == (2, 2, 2, 1)
    assert heads("gpu64") == (4, 4, 4, 2)
    assert heads("gpu64-text128") == (2, 2, 2, 1)
    monkeypatch.setitem(presets.PRESETS, "bad", presets.PRESETS["gpu64"]._replace(text_kv_heads=3))
    with pytest.raises(ValueError, match="3 key/value heads do not divide 4 heads"):
        model_config_dict("bad", 495, 4)


def test_init_draws_the_perceiver_query_key_and_latents_at_the_asked_scales() -> None:
    """The from-scratch knobs touch only the perceiver's q/k and latents; the rest stays at 0.02."""
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(model_config_dict("small", 495, 4)))
    init_weights(model, latents_std=0.02, perceiver_qk_std=0.5)
    resampler = model.model.connector.perceiver_resampler
    attn = resampler.layers[0].self_attn
    assert attn.q_proj.weight.std().item() == pytest.approx(0.5, rel=0.05)
    assert attn.k_proj.weight.std().item() == pytest.approx(0.5, rel=0.05)
    assert resampler.latents.std().item() == pytest.approx(0.02, rel=0.05)
    vision_q = model.model.vision_model.encoder.layers[0].self_attn.q_proj.weight
    text_k = model.model.text_model.layers[0].self_attn.k_proj.weight
    for weight in (attn.v_proj.weight, attn.o_proj.weight, vision_q, text_k):
        assert weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_position_table_init_encodes_row_and_column_and_escapes_weight_decay() -> None:
    """Scale 0.5: every patch gets its own row of 0.5 x the sine/cosine table, whose first half
    depends only on the patch row and second half only on the column; the table is then exempt
    from weight decay. Scale 0 (the shipped recipe) leaves N(0, 0.02) under decay."""
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    side, width = 5, 12
    table = sincos_position_table(side, width).view(side, side, width)
    assert torch.equal(table[2, 0, :6], table[2, 4, :6]) and torch.equal(table[0, 3, 6:], table[4, 3, 6:])
    assert not torch.equal(table[1, 0, :6], table[2, 0, :6])
    assert table[0, 0].tolist() == [0.0] * 3 + [1.0] * 3 + [0.0] * 3 + [1.0] * 3  # sin 0, cos 0
    assert table[3, 0, 0].item() == pytest.approx(math.sin(3.0))  # row 3, frequency 1
    assert len({tuple(row) for row in table.view(side * side, width).tolist()}) == side * side

    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(model_config_dict("tiny", 495, 4)))
    init_weights(model, position_table_scale=0.5)
    vision = model.config.vision_config
    weight = model.model.vision_model.embeddings.position_embedding.weight
    assert torch.equal(weight, 0.5 * sincos_position_table(vision.num_patches_per_side, vision.hidden_size))
    exempt = param_groups(model, 0.05, decay_positions=False)[1]["params"]
    assert any(p is weight for p in exempt)
    init_weights(model)
    assert weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert not any(p is weight for p in param_groups(model, 0.05)[1]["params"])


def test_init_flags_reach_the_trained_model(tmp_path: Path) -> None:
    """`--perceiver-qk-std` / `--latents-std` / `--position-table-scale` go from the command line into
    the initial weights (one step at a warm-up lr barely moves them)."""
    from idefics2 import Idefics2ForConditionalGeneration

    main(["--out-dir", str(tmp_path), "--preset", "tiny", "--steps", "1", "--batch-size", "2",
          "--eval-questions", "0", "--tokenizer-dir", str(SHIPPED), "--threads", "1",
          "--perceiver-qk-std", "0.5", "--latents-std", "0.02", "--position-table-scale", "0.5"])
    model = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "model")
    resampler = model.model.connector.perceiver_resampler
    assert resampler.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.5, rel=0.1)
    assert resampler.latents.std().item() == pytest.approx(0.02, rel=0.25)
    vision = model.config.vision_config
    table = 0.5 * sincos_position_table(vision.num_patches_per_side, vision.hidden_size)
    assert torch.allclose(model.model.vision_model.embeddings.position_embedding.weight, table, atol=0.01)


def test_training_lowers_the_loss_and_exports_a_loadable_model(tmp_path: Path) -> None:
    losses: list[float] = []
    summary = train(_tiny(tmp_path, steps=24, batch_size=6), on_step=lambda step, loss: losses.append(loss))
    assert summary["steps"] == 24 and len(losses) == 24
    assert sum(losses[-4:]) / 4 < losses[0] - 1.0
    from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor

    model = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "model")
    processor = Idefics2Processor.from_pretrained(tmp_path / "model")
    assert processor.image_seq_len == model.config.perceiver_config.resampler_n_latents
    assert (tmp_path / "model" / "generation_config.json").is_file()


def test_resume_continues_exactly(tmp_path: Path) -> None:
    """4 steps + resume to 8 == 8 straight steps (constant lr, data indexed by step); records written
    after the last checkpoint are dropped, and so is a line cut short, so the history has each step once."""
    train(_tiny(tmp_path / "straight"))
    train(_tiny(tmp_path / "split", steps=4))
    with open(tmp_path / "split" / "history.jsonl", "a") as f:  # as if killed after the checkpoint, mid-write
        f.write(json.dumps({"step": 5, "loss": 9.9}) + "\n" + '{"step": 6, "lo')
    train(_tiny(tmp_path / "split", resume=True))
    straight = torch.load(tmp_path / "straight" / CHECKPOINT_FILE, weights_only=False)
    split = torch.load(tmp_path / "split" / CHECKPOINT_FILE, weights_only=False)
    assert straight["step"] == split["step"] == 8
    for name, value in straight["model"].items():
        torch.testing.assert_close(split["model"][name], value, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "history.jsonl").read_text().splitlines()
             if "loss" in line]
    assert steps == list(range(1, 9))


@pytest.mark.parametrize(("settings", "message"), [
    ({"eval_every": 0}, "--eval-every must be positive"), ({"checkpoint_every": -1}, "--checkpoint-every must be"),
    ({"max_turns": 0}, "--max-turns must be positive"), ({"max_minutes": -1.0}, "--max-minutes must be positive"),
    ({"min_lr_ratio": 1.5}, r"--min-lr-ratio must be in \[0, 1\]"), ({"preset": "huge"}, "--preset must be one of"),
    ({"route_weight": -1.0}, "--route-weight must be 0 or more"),
    ({"json_fraction": -0.1}, "--json-fraction must be 0 or more"),
    ({"json_fraction": 1.5}, r"--json-fraction is a probability in \[0, 1\]"),
])
def test_bad_settings_are_refused_when_the_config_is_made(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_resume_without_a_checkpoint_is_refused_and_keeps_the_folder(tmp_path: Path) -> None:
    (tmp_path / "history.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="--resume: .*checkpoint.pt does not exist"):
        train(_tiny(tmp_path, resume=True))
    assert (tmp_path / "history.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        train(_tiny(tmp_path, device="gpu"))


def test_question_weights_set_how_often_each_type_is_asked() -> None:
    assert synthetic.question_mix({}) == synthetic.SINGLE_IMAGE_TYPES
    assert synthetic.question_mix({"position": 3, "text": 0}).count("position") == 3
    assert "text" not in synthetic.question_mix({"text": 0})
    rng = random.Random(3)
    asked = [t for _ in range(40) for t in
             sample_conversation(rng, max_turns=3, two_images=False, types=synthetic.question_mix(
                 {t: 0 for t in synthetic.SINGLE_IMAGE_TYPES} | {"position": 1})).question_types]
    assert set(asked) <= {"position", "text", "count"}  # text: forced on half of the scenes with a word;
    assert asked.count("position") > len(asked) / 2  # count: the fallback when the scene cannot answer
    assert parse_weights(" position=4, describe=2 ") == {"position": 4, "describe": 2}
    for bad in ("position", "position=-1", "position=two"):
        with pytest.raises(ValueError, match="TYPE=INTEGER"):
            parse_weights(bad)
    with pytest.raises(ValueError, match="question weights"):
        synthetic.question_mix({"size": 2})
    with pytest.raises(ValueError, match="no single-image question type"):
        synthetic.question_mix({t: 0 for t in synthetic.SINGLE_IMAGE_TYPES})


def test_init_from_fine_tunes_a_saved_model(tmp_path: Path) -> None:
    """`--init-from` starts from a folder's weights (plus the position table when asked) and its
    tokenizer, `--freeze-vision` keeps its vision tower as loaded; a folder of another preset is refused."""
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    train(_tiny(tmp_path / "base", steps=2))
    folder = tmp_path / "base" / "model"
    base = Idefics2ForConditionalGeneration.from_pretrained(folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    config = Idefics2Config.from_dict(model_config_dict("tiny", len(tokenizer),
                                                        build_processor("tiny", tokenizer).image_token_id))
    start = _initial_model(_tiny(tmp_path, init_from=str(folder), position_table_scale=0.25), config)
    vision = base.config.vision_config
    table = 0.25 * sincos_position_table(vision.num_patches_per_side, vision.hidden_size)
    for name, value in base.state_dict().items():
        expected = value + table if name.endswith("position_embedding.weight") else value
        torch.testing.assert_close(start.state_dict()[name], expected, msg=name)
    train(_tiny(tmp_path / "tuned", steps=1, init_from=str(folder), tokenizer_dir=None, freeze_vision=True))
    assert (tmp_path / "tuned" / "model" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    tuned = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "tuned" / "model").state_dict()
    moved = {name for name, value in base.state_dict().items() if not torch.equal(tuned[name], value)}
    assert moved and not any(name.startswith("model.vision_model.") for name in moved), sorted(moved)
    with pytest.raises(ValueError, match="not a 'cpu'-preset model"):
        train(_tiny(tmp_path / "other", steps=1, preset="cpu", init_from=str(folder)))

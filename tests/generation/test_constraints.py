"""Constrained decoding on a random tiny model over the shipped byte-level tokenizer: every sampled
answer follows its JSON schema, regex or choice list (checked with jsonschema / re), per row,
with EOS at the grammar's end; errors name the problem."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
import torch

from conftest import SHIPPED, oracle_model, random_model, tiny_config_dict
from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.generation.constraints import Constraint, ConstraintProcessor, compiler_for

jsonschema = pytest.importorskip("jsonschema")

EOS = 2
SPECIAL = range(6)  # <unk> <s> </s> <fake_token_around_image> <image> <end_of_utterance>
CONFIG = tiny_config_dict(vocab=495, image_token_id=4)

SCHEMAS: dict[str, dict[str, Any]] = {
    "object with a required enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "integer"}},
        "required": ["color"],
        "additionalProperties": False,
    },
    "integer with bounds": {"type": "integer", "minimum": -7, "maximum": 42},
    "array with min and max items": {
        "type": "array",
        "items": {"type": "boolean"},
        "minItems": 2,
        "maxItems": 4,
    },
    "nested object with bounded strings": {
        "type": "object",
        "required": ["name", "box"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "box": {
                "type": "object",
                "required": ["label"],
                "additionalProperties": False,
                "properties": {"label": {"type": "string", "minLength": 1, "maxLength": 4}},
            },
        },
    },
}
REGEX = r"[A-Z]{2}-[0-9]{2,3}( ok)?"
CHOICES = ["red", "green", "dark blue", 'say "hi"']


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return Idefics2Processor.from_pretrained(SHIPPED).tokenizer


@pytest.fixture(scope="module")
def model() -> Idefics2ForConditionalGeneration:
    """Random weights large enough that sampling at temperature 1 reaches any token."""
    return random_model(CONFIG)


def prompts(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(6, 495, (rows, 5), generator=torch.Generator().manual_seed(seed))


def answers(out: torch.Tensor, tokenizer: Any, prompt_length: int = 5) -> list[str | None]:
    """Each row's text before its EOS; None for a row that ended by length (a failure here)."""
    texts: list[str | None] = []
    for row in out[:, prompt_length:].tolist():
        if EOS not in row:
            texts.append(None)
            continue
        new = row[: row.index(EOS)]
        assert not set(new) & set(SPECIAL), "a special token inside the answer"
        texts.append(tokenizer.decode(new, skip_special_tokens=False))
    return texts


def sample(model: Any, tokenizer: Any, constraint: Constraint, max_new_tokens: int) -> list[str | None]:
    """200 sampled answers: 100 rows, twice, at temperature 1 with no top-k."""
    texts: list[str | None] = []
    for seed in (1, 2):
        out = model.generate(
            prompts(100, seed),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            constraint=constraint,
            tokenizer=tokenizer,
            seed=seed,
        )
        texts += answers(out, tokenizer)
    return texts


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_sampled_answer_validates_against_its_schema(model: Any, tokenizer: Any, name: str) -> None:
    schema = SCHEMAS[name]
    texts = sample(model, tokenizer, Constraint.json_schema(schema), max_new_tokens=150)
    assert None not in texts, "an answer ran into max_new_tokens"
    for text in texts:
        value = json.loads(text)  # type: ignore[arg-type]
        jsonschema.validate(value, schema)
    assert len(set(texts)) > 10 or name == "integer with bounds" and len(set(texts)) > 5  # the model explores


def test_every_sampled_answer_matches_the_regex(model: Any, tokenizer: Any) -> None:
    texts = sample(model, tokenizer, Constraint.regex(REGEX), max_new_tokens=20)
    assert None not in texts and all(re.fullmatch(REGEX, t) for t in texts)  # type: ignore[arg-type]
    assert any(t.endswith(" ok") for t in texts) and any(not t.endswith(" ok") for t in texts)  # type: ignore[union-attr]


def test_every_sampled_answer_is_one_of_the_choices(model: Any, tokenizer: Any) -> None:
    texts = sample(model, tokenizer, Constraint.choices(CHOICES), max_new_tokens=20)
    assert None not in texts and set(texts) == set(CHOICES)


def test_rows_follow_their_own_constraint_and_free_rows_are_untouched(model: Any, tokenizer: Any) -> None:
    ids = prompts(3, seed=5)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # a left-padded row
    kwargs: dict[str, Any] = {"attention_mask": mask, "max_new_tokens": 30, "tokenizer": tokenizer}
    free = model.generate(ids, **kwargs)
    mixed = model.generate(
        ids, constraint=[Constraint.choices(["yes", "no"]), None, Constraint.regex("[0-9]{4}")], **kwargs
    )
    texts = answers(mixed, tokenizer)
    assert texts[0] in ("yes", "no") and re.fullmatch("[0-9]{4}", texts[2])  # type: ignore[arg-type]
    n = min(free.shape[1], mixed.shape[1])
    assert torch.equal(mixed[1, :n], free[1, :n])  # greedy, no constraint: the same tokens
    assert not torch.equal(mixed[0, 5:n], free[0, 5:n])


def test_the_grammars_end_forces_eos_even_before_min_new_tokens(model: Any, tokenizer: Any) -> None:
    out = model.generate(
        prompts(8),
        max_new_tokens=12,
        min_new_tokens=10,
        do_sample=True,
        seed=3,
        constraint=Constraint.choices(["yes", "no"]),
        tokenizer=tokenizer,
    )
    assert set(answers(out, tokenizer)) <= {"yes", "no"}


def test_rows_kept_after_a_stop_string_in_a_dict_output_are_left_alone(model: Any, tokenizer: Any) -> None:
    """return_dict_in_generate keeps finished rows in the batch, fed padding: not the grammar's business."""
    out = model.generate(
        prompts(12),
        max_new_tokens=12,
        do_sample=True,
        seed=5,
        stop_strings=["ab"],
        constraint=Constraint.choices(["ab cd", "ef gh"]),
        tokenizer=tokenizer,
        return_dict_in_generate=True,
    )
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out.sequences[:, 5:].tolist()]
    assert {t if t == "ef gh" else t[:2] for t in texts} == {"ab", "ef gh"}


def test_num_return_sequences_and_a_chat_leading_space(model: Any, tokenizer: Any) -> None:
    constraint = Constraint("choices", ("red", "green"), leading_space=True)
    out = model.generate(
        prompts(2),
        max_new_tokens=8,
        do_sample=True,
        seed=4,
        num_return_sequences=3,
        constraint=constraint,
        tokenizer=tokenizer,
    )
    texts = answers(out, tokenizer)
    assert len(texts) == 6 and {t.lstrip(" ") for t in texts} <= {"red", "green"}  # type: ignore[union-attr]
    assert all(t in ("red", "green", " red", " green") for t in texts)


def test_an_answer_cut_by_max_new_tokens_ends_by_length_with_a_warning(
    model: Any, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    schema = SCHEMAS["nested object with bounded strings"]
    with caplog.at_level(logging.WARNING, logger="idefics2.generation.generate"):
        out = model.generate(
            prompts(2), max_new_tokens=4, constraint=Constraint.json_schema(schema), tokenizer=tokenizer
        )
    assert out.shape[1] == 5 + 4 and EOS not in out[:, 5:].tolist()[0]
    assert "rows [0, 1] reached max_new_tokens=4" in caplog.text and "finish reason 'length'" in caplog.text


@pytest.mark.slow
def test_the_processor_works_in_transformers_generate(tokenizer: Any) -> None:
    """`ConstraintProcessor` as a plain logits processor, in a loop that is not ours."""
    from transformers import LogitsProcessorList

    oracle = oracle_model(CONFIG)
    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
        "additionalProperties": False,
    }
    compiled = compiler_for(tokenizer, 495).compile(Constraint.json_schema(schema))
    processor = ConstraintProcessor.for_rows([compiled] * 6, [EOS], 495)
    torch.manual_seed(0)
    out = oracle.generate(
        input_ids=prompts(6),
        attention_mask=torch.ones(6, 5, dtype=torch.long),
        do_sample=True,
        top_k=0,
        max_new_tokens=40,
        eos_token_id=EOS,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([processor]),
    )
    for text in answers(out, tokenizer):
        jsonschema.validate(json.loads(text), schema)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (Constraint.json_schema({"type": "strin"}), "cannot enforce the JSON schema: Invalid type: strin"),
        (
            Constraint.json_schema({"type": "array", "uniqueItems": True}),
            'Unimplemented keys: ["uniqueItems"]',
        ),
        (Constraint.json_schema({"type": "string", "format": "colour"}), "Unknown format: colour"),
        (
            Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 1}),
            "minimum (5) is greater than maximum",
        ),
        (Constraint.json_schema({"$ref": "#/$defs/missing"}), "does not exist"),
        (Constraint.regex("[0-9"), "cannot enforce the regular expression"),
        (Constraint.grammar("start: item\n"), 'unknown name: "item"'),
    ],
)
def test_constraints_that_cannot_be_enforced_are_refused_by_name(
    model: Any, tokenizer: Any, constraint: Constraint, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        model.generate(prompts(1), constraint=constraint, tokenizer=tokenizer)


def test_a_lenient_schema_ignores_what_it_cannot_enforce_and_says_so(
    model: Any, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    schema = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 3},
        "maxItems": 3,
        "uniqueItems": True,
    }
    with caplog.at_level(logging.WARNING):
        out = model.generate(
            prompts(20),
            max_new_tokens=20,
            do_sample=True,
            seed=0,
            tokenizer=tokenizer,
            constraint=Constraint.json_schema(schema, strict=False),
        )
    assert "uniqueItems" in caplog.text
    for text in answers(out, tokenizer):
        jsonschema.validate(json.loads(text), {k: v for k, v in schema.items() if k != "uniqueItems"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"constraint": Constraint.regex("a+")}, "pass tokenizer="),
        ({"constraint": Constraint.regex("a+"), "tokenizer": "tok", "num_beams": 2}, "beam search"),
        (
            {"constraint": [Constraint.regex("a+")] * 2, "tokenizer": "tok"},
            "a list of 2, but there are 1 prompts",
        ),
        ({"constraint": {"type": "object"}, "tokenizer": "tok"}, "constraint must be a Constraint"),
        (
            {"constraint": Constraint.regex("a+"), "tokenizer": "tok", "eos_token_id": []},
            "needs an EOS token id",
        ),
    ],
)
def test_misused_constraints_are_value_errors(
    model: Any, tokenizer: Any, kwargs: dict[str, Any], message: str
) -> None:
    if kwargs.get("tokenizer") == "tok":
        kwargs = {**kwargs, "tokenizer": tokenizer}
    with pytest.raises(ValueError, match=re.escape(message)):
        model.generate(prompts(1), max_new_tokens=3, **kwargs)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Constraint.json_schema(False), "matches no value"),
        (lambda: Constraint.json_schema([1]), "must be an object"),
        (lambda: Constraint.json_schema({"minimum": float("nan")}), "not JSON"),
        (lambda: Constraint.choices([]), "non-empty list of strings"),
        (lambda: Constraint.choices("red"), "non-empty list of strings"),
        (lambda: Constraint.choices(["a", ""]), "non-empty strings"),
        (lambda: Constraint.regex(""), "non-empty string"),
        (lambda: Constraint("xml", "<a/>"), "kind must be one of"),
    ],
)
def test_malformed_constraints_are_refused_when_built(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_the_cli_answers_with_a_choice_or_a_schema_and_names_bad_flags(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import EXAMPLES
    from idefics2.cli import main

    ask = ["generate", "What color is the circle?", "--image", str(EXAMPLES / "shapes.png"), "--json"]
    assert main([*ask, "--choice", "green", "--choice", "blue"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] in ("green", "blue")
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["n"],
                "additionalProperties": False,
            }
        )
    )
    assert main([*ask, "--json-schema", str(schema), "--temperature", "0"]) == 0
    assert set(json.loads(json.loads(capsys.readouterr().out)["answer"])) == {"n"}
    schema.write_text('{"type": "array", "uniqueItems": true}')
    assert main([*ask, "--json-schema", str(schema)]) == 1
    assert "uniqueItems" in capsys.readouterr().err
    assert main([*ask, "--json-schema", str(schema), "--lenient-schema", "--max-new-tokens", "30"]) == 0
    capsys.readouterr()
    assert main([*ask, "--regex", "a+", "--choice", "b"]) == 1
    assert "use one of --json-schema, --regex and --choice" in capsys.readouterr().err


def test_the_engine_constrains_each_sequence_and_greedy_equals_generate(model: Any, tokenizer: Any) -> None:
    """Sequences with different constraints (and none) share the engine's steps; each greedy one
    equals `generate` alone, and sampled siblings (n) each follow the schema."""
    import threading

    from idefics2.generation.engine import Engine, EngineRequest, SamplingParams

    schema = SCHEMAS["nested object with bounded strings"]
    compiler = compiler_for(tokenizer, 495)
    cases = [Constraint.json_schema(schema), Constraint.regex(REGEX), None, Constraint.choices(CHOICES)]
    engine = Engine(model, max_batch_size=8, tokenizer=tokenizer)
    try:
        results: list[dict[int, list[int]]] = []
        done: list[threading.Event] = []
        ends: list[list[str]] = []
        for i, constraint in enumerate([*cases, cases[0]]):
            tokens: dict[int, list[int]] = {}
            finished = threading.Event()
            n = 3 if i == 4 else 1
            reasons: list[str] = []

            def collect(
                event: Any,
                tokens: dict[int, list[int]] = tokens,
                finished: Any = finished,
                n: int = n,
                reasons: list[str] = reasons,
            ) -> None:
                tokens.setdefault(event.index, []).append(event.token)
                if event.finish_reason is not None:
                    reasons.append(event.finish_reason)
                    if len(reasons) == n:
                        finished.set()

            params = SamplingParams(
                150,
                [EOS],
                temperature=1.0 if i == 4 else 0.0,
                seed=i,
                n=n,
                constraint=None if constraint is None else compiler.compile(constraint),
            )
            engine.submit(EngineRequest(prompts(5, seed=9)[i : i + 1], params, collect))
            results.append(tokens)
            done.append(finished)
            ends.append(reasons)
        assert all(f.wait(120) for f in done)
        assert ends[:2] + ends[3:] == [
            ["stop"],
            ["stop"],
            ["stop"],
            ["stop"] * 3,
        ]  # the free one may end by length
    finally:
        engine.close()
    for i, constraint in enumerate(cases):
        alone = model.generate(
            prompts(5, seed=9)[i : i + 1], max_new_tokens=150, constraint=constraint, tokenizer=tokenizer
        )
        assert results[i][0] == alone[0, 5:].tolist()
    assert len(results[4]) == 3
    for sample in results[4].values():
        assert sample[-1] == EOS
        jsonschema.validate(json.loads(tokenizer.decode(sample[:-1], skip_special_tokens=False)), schema)

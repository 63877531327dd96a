"""Structured output through the server: OpenAI's response_format (json_object, json_schema with
strict), vLLM's structured_outputs and guided_* fields, streamed and not, with the official
`openai` client too; OpenAI-shaped 400s naming the field for what cannot be enforced."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_server import data_uri, shipped  # noqa: F401 - shipped is a fixture

from conftest import EXAMPLES, served
from idefics2.cli import SHIPPED_MODEL
from idefics2.serving.server import create_app

jsonschema = pytest.importorskip("jsonschema")

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
COLOR_SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": COLORS}},
    "required": ["color"],
    "additionalProperties": False,
}
SHAPE_SCHEMA = {
    "type": "object",
    "required": ["shapes", "note"],
    "additionalProperties": False,
    "properties": {
        "shapes": {
            "type": "array",
            "items": {"enum": ["circle", "square", "triangle"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "note": {"type": "string", "maxLength": 12},
    },
}


def user(text: str, image: bool = True) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image:
        parts.insert(0, {"type": "image_url", "image_url": {"url": data_uri(EXAMPLES / "shapes.png")}})
    return [{"role": "user", "content": parts}]


def json_schema_format(schema: Any, strict: bool | None = True, **extra: Any) -> dict[str, Any]:
    spec = {"name": "answer", "schema": schema, **extra}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


@pytest.fixture(scope="module")
def client(shipped: tuple[Any, Any]) -> TestClient:
    return TestClient(create_app(*shipped, SHIPPED_MODEL, max_batch_size=8))


def content(client: TestClient, **fields: Any) -> tuple[str, str]:
    body = {
        "messages": user("Describe the image."),
        "temperature": 1.0,
        "seed": 3,
        "max_tokens": 120,
        **fields,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def test_response_format_json_schema_and_json_object(client: TestClient) -> None:
    text, finish = content(client, response_format=json_schema_format(SHAPE_SCHEMA))
    assert finish == "stop" and text.startswith("{")
    jsonschema.validate(json.loads(text), SHAPE_SCHEMA)
    text, finish = content(
        client, response_format={"type": "json_object"}, seed=1
    )  # an untrained free object
    assert finish == "stop" and isinstance(json.loads(text), dict)
    text, _ = content(client, response_format={"type": "text"}, max_tokens=5)  # no constraint
    assert text


def test_n_samples_each_follow_the_schema(client: TestClient) -> None:
    body = {
        "messages": user("Describe the image."),
        "n": 4,
        "temperature": 1.5,
        "seed": 1,
        "max_tokens": 120,
        "response_format": json_schema_format(SHAPE_SCHEMA),
    }
    choices = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert len(choices) == 4
    for choice in choices:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SHAPE_SCHEMA)


def test_vllm_fields_regex_choice_grammar_and_json(client: TestClient) -> None:
    text, _ = content(client, structured_outputs={"regex": r"[a-z]{3,5} [0-9]{2}"})
    assert re.fullmatch(r"[a-z]{3,5} [0-9]{2}", text)
    text, _ = content(
        client, structured_outputs={"choice": ["circle", "square"], "disable_any_whitespace": True}
    )
    assert text in ("circle", "square")
    text, _ = content(
        client, structured_outputs={"json": json.dumps(COLOR_SCHEMA)}
    )  # a schema string, as vLLM allows
    jsonschema.validate(json.loads(text), COLOR_SCHEMA)
    text, _ = content(
        client, structured_outputs={"grammar": 'start: "yes" | "no" | NUMBER\nNUMBER: /[0-9]+/'}
    )
    assert re.fullmatch("yes|no|[0-9]+", text)
    text, _ = content(client, structured_outputs={"grammar": 'root ::= "a" [0-9] [0-9]'})  # GBNF
    assert re.fullmatch("a[0-9][0-9]", text)
    text, _ = content(client, guided_choice=["left", "right"])
    assert text in ("left", "right")
    text, _ = content(client, guided_regex="[0-9]{4}")
    assert re.fullmatch("[0-9]{4}", text)
    text, _ = content(client, guided_json=COLOR_SCHEMA)
    jsonschema.validate(json.loads(text), COLOR_SCHEMA)
    text, _ = content(client, guided_grammar='start: "ok"')
    assert text == "ok"


def test_a_lenient_schema_ignores_what_it_cannot_enforce(client: TestClient) -> None:
    schema = {"type": "array", "items": {"enum": COLORS}, "maxItems": 3, "uniqueItems": True}
    text, finish = content(client, response_format=json_schema_format(schema, strict=False))
    assert finish == "stop"
    jsonschema.validate(json.loads(text), {k: v for k, v in schema.items() if k != "uniqueItems"})


def test_an_answer_cut_short_finishes_by_length(client: TestClient) -> None:
    text, finish = content(client, response_format=json_schema_format(SHAPE_SCHEMA), max_tokens=3)
    assert finish == "length" and text.startswith("{")


def test_streamed_chunks_join_to_the_plain_answer(client: TestClient) -> None:
    body = {
        "messages": user("Describe the image."),
        "temperature": 0,
        "max_tokens": 120,
        "response_format": json_schema_format(SHAPE_SCHEMA),
    }
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    lines = [
        line[6:]
        for line in client.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n")
        if line.startswith("data: ") and not line.endswith("[DONE]")
    ]
    streamed = "".join(
        c["choices"][0]["delta"].get("content", "") for c in map(json.loads, lines) if c["choices"]
    )
    assert streamed == whole
    jsonschema.validate(json.loads(whole), SHAPE_SCHEMA)


BAD_FORMATS = [
    (
        {"response_format": json_schema_format({"type": "strin"})},
        "response_format.json_schema.schema",
        "Invalid type: strin",
    ),
    (
        {"response_format": json_schema_format({"type": "array", "uniqueItems": True})},
        "response_format.json_schema.schema",
        "uniqueItems",
    ),
    (
        {"response_format": json_schema_format({"type": "string", "pattern": "(?=a)"})},
        "response_format.json_schema.schema",
        "look-around",
    ),
    (
        {
            "response_format": json_schema_format(
                {"type": "integer", "minimum": 3, "maximum": 1}, strict=False
            )
        },
        "response_format.json_schema.schema",
        "minimum (3) is greater than maximum (1)",
    ),
    (
        {"response_format": json_schema_format(COLOR_SCHEMA, colour=1)},
        "response_format.json_schema.colour",
        "unknown field",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
        "response_format.json_schema.name",
        "letters, digits",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
        "response_format.json_schema.schema",
        "missing",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}},
        "response_format.json_schema.schema",
        "must be a JSON schema",
    ),
    ({"response_format": json_schema_format(COLOR_SCHEMA, strict="yes")}, "strict", "true or false"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "text, json_object or json_schema"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema", "unknown field"),
    ({"response_format": "json"}, "response_format.type", "text, json_object or json_schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp", "unknown field"),
    (
        {"structured_outputs": {"regex": "[0-9"}},
        "structured_outputs.regex",
        "cannot enforce the regular expression",
    ),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty list of strings"),
    ({"structured_outputs": {"choice": "red"}}, "structured_outputs.choice", "a list of strings"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not JSON"),
    (
        {"structured_outputs": {"grammar": "start: missing_rule"}},
        "structured_outputs.grammar",
        "unknown name",
    ),
    (
        {"structured_outputs": {"json_object": True, "whitespace_pattern": " *"}},
        "structured_outputs.whitespace_pattern",
        "not supported",
    ),
    (
        {"structured_outputs": {"json": {}, "disable_additional_properties": True}},
        "structured_outputs.disable_additional_properties",
        "additionalProperties: false",
    ),
    ({"guided_json": {"type": "object", "if": {}, "then": {}}}, "guided_json", "Unimplemented keys"),
    ({"guided_choice": ["a", 3]}, "guided_choice", "non-empty strings"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "at most one"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "needs a guided_* constraint"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD_FORMATS)
def test_constraints_that_cannot_be_enforced_are_400s_naming_the_field(
    client: TestClient, fields: dict[str, Any], param: str, message: str
) -> None:
    response = client.post("/v1/chat/completions", json={"messages": user("Hi.", image=False), **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert message in error["message"], error


# ------------------------------------------------------------------------- the official openai client
@pytest.fixture(scope="module")
def openai_client(shipped: tuple[Any, Any]) -> Iterator[Any]:
    openai = pytest.importorskip("openai")
    app = create_app(*shipped, SHIPPED_MODEL, max_batch_size=4)
    with served(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_gets_schema_answers_streamed_and_not(openai_client: Any) -> None:
    fmt = json_schema_format(SHAPE_SCHEMA)
    answer = openai_client.chat.completions.create(
        model=SHIPPED_MODEL,
        messages=user("Describe the image."),
        response_format=fmt,
        temperature=0,
        max_tokens=120,
    )
    whole = answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole), SHAPE_SCHEMA)
    stream = openai_client.chat.completions.create(
        model=SHIPPED_MODEL,
        messages=user("Describe the image."),
        response_format=fmt,
        temperature=0,
        max_tokens=120,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole
    sampled = openai_client.chat.completions.create(
        model=SHIPPED_MODEL,
        messages=user("Describe the image."),
        response_format=fmt,
        temperature=1.5,
        seed=2,
        max_tokens=120,
        extra_body={"top_k": 0},
    )
    jsonschema.validate(json.loads(sampled.choices[0].message.content), SHAPE_SCHEMA)
    with pytest.raises(Exception) as refused:  # openai.BadRequestError
        openai_client.chat.completions.create(
            model=SHIPPED_MODEL,
            messages=user("Hi.", image=False),
            response_format=json_schema_format({"type": "strin"}),
        )
    assert getattr(refused.value, "status_code", None) == 400 and "Invalid type" in str(refused.value)


def test_the_shipped_model_answers_the_circles_colour_as_json(openai_client: Any) -> None:
    """The acceptance question, asked freely (the shipped model was taught JSON answers) and held to
    `{"color": enum of the six colours}`."""
    question = user("What color is the circle? Answer in JSON.")
    free = openai_client.chat.completions.create(
        model=SHIPPED_MODEL, messages=question, temperature=0, max_tokens=20
    )
    assert json.loads(free.choices[0].message.content) == {"color": "red"}
    answer = openai_client.chat.completions.create(
        model=SHIPPED_MODEL,
        messages=question,
        temperature=0,
        response_format=json_schema_format(COLOR_SCHEMA),
        max_tokens=20,
    )
    assert json.loads(answer.choices[0].message.content) == {"color": "red"}

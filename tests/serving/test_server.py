"""The OpenAI-compatible server on the shipped model: answers, streaming, stops, errors that keep it serving."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import EXAMPLES
from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.cli import SHIPPED_MODEL, build_parser, shipped_model_path
from idefics2.serving.server import create_app
from idefics2.serving.turn import AssistantTurn


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(text: str, *images: Path, **fields: Any) -> dict[str, Any]:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(p)}} for p in images]
    return {"model": SHIPPED_MODEL, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
            **fields}


@pytest.fixture(scope="module")
def shipped() -> tuple[Any, Any]:
    folder = shipped_model_path()
    return Idefics2ForConditionalGeneration.from_pretrained(folder), Idefics2Processor.from_pretrained(folder)


@pytest.fixture(scope="module")
def client(shipped: tuple[Any, Any]) -> TestClient:
    return TestClient(create_app(*shipped, SHIPPED_MODEL))


def events(response: Any) -> list[Any]:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[len("data: "):] if line.endswith("[DONE]") else json.loads(line[len("data: "):]) for line in lines]


def test_answers_with_openai_fields_and_token_counts(client: TestClient, shipped: tuple[Any, Any]) -> None:
    response = client.post("/v1/chat/completions", json=ask("What color is the circle?", EXAMPLES / "shapes.png"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == SHIPPED_MODEL
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Red."}
    assert body["choices"][0]["finish_reason"] == "stop"
    model, processor = shipped
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "What color is the circle?"}]}], add_generation_prompt=True)
    with Image.open(EXAMPLES / "shapes.png") as image:
        n_prompt = processor(images=[image.convert("RGB")], text=prompt)["input_ids"].shape[1]
    usage = body["usage"]
    assert usage["prompt_tokens"] == n_prompt > model.config.perceiver_config.resampler_n_latents  # images expanded
    assert usage["completion_tokens"] >= 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_two_images_in_one_question(client: TestClient) -> None:
    request = ask("Which image has more shapes?", EXAMPLES / "pair_1.png", EXAMPLES / "pair_2.png")
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] in ("The first image.", "The second image.")


def test_stream_gives_the_same_text_in_pieces(client: TestClient) -> None:
    request = ask("Describe the image.", EXAMPLES / "shapes.png")
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    streamed = events(client.post("/v1/chat/completions", json={**request, "stream": True}))
    assert streamed[-1] == "[DONE]"
    chunks = streamed[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole and len(chunks) > 3


def test_max_tokens_and_stop_end_the_answer(client: TestClient) -> None:
    request = ask("Describe the image.", EXAMPLES / "shapes.png")
    full = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    cut = client.post("/v1/chat/completions", json={**request, "max_tokens": 2}).json()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 2
    assert full.startswith(cut["choices"][0]["message"]["content"])
    word = full.split()[1]  # "A red circle ..." -> stop at "red": the text before it, finish "stop"
    stopped = client.post("/v1/chat/completions", json={**request, "stop": [word]}).json()["choices"][0]
    assert stopped["message"]["content"] == full[: full.index(word)].rstrip()
    assert stopped["finish_reason"] == "stop"


def test_same_seed_same_sample(client: TestClient) -> None:
    request = ask("Describe the image.", EXAMPLES / "shapes.png", temperature=1.5, seed=3)
    first, second = (client.post("/v1/chat/completions", json=request).json() for _ in range(2))
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


def test_models_lists_the_served_model(client: TestClient) -> None:
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [SHIPPED_MODEL]


def png_header(width: int, height: int) -> str:
    """A data URI whose PNG header claims width x height (pixel data cut short): the size check
    must refuse it from the header, before decoding."""
    raw = io.BytesIO()
    Image.new("RGB", (2, 2)).save(raw, "PNG")
    data = bytearray(raw.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


BAD_REQUESTS = [
    ({"messages": []}, "messages", 400),
    ({"messages": "hi"}, "messages", 400),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", 400),
    ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role", 400),
    ({"messages": [{"role": {"user": 1}, "content": "hi"}]}, "messages[0].role", 400),
    ({"messages": ["hi"]}, "messages[0].role", 400),
    ({"messages": [{"role": "user"}]}, "messages[0].content", 400),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", 400),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]", 400),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text", 400),
    ({"messages": [{"role": "user", "content": "\ud800 lone surrogate"}]}, "messages[0].content[0].text", 400),
    (image_part("data:image/png;base64,@@"), "messages[0].content[0].image_url", 400),
    (image_part("data:image/png;base64," + base64.b64encode(b"not a png").decode()),
     "messages[0].content[0].image_url", 400),
    (image_part("data:image/png,rawbytes"), "messages[0].content[0].image_url", 400),
    (image_part("https://example.com/a.png"), "messages[0].content[0].image_url", 400),
    (image_part("/etc/passwd"), "messages[0].content[0].image_url", 400),
    (image_part(png_header(13000, 13000)), "messages[0].content[0].image_url", 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 7}]}]},
     "messages[0].content[0].image_url", 400),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
                   {"role": "user", "content": "hi"}]}, "messages[0].content[0]", 400),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
     "messages[1].role", 400),
    ({"messages": [{"role": "user", "content": "What is in <image>?"}]}, "messages[0].content[0].text", 400),
    ({"n": 0}, "n", 400),
    ({"n": 100}, "n", 400),
    ({"temperature": -1}, "temperature", 400),
    ({"temperature": "hot"}, "temperature", 400),
    ({"top_p": 0}, "top_p", 400),
    ({"top_k": -5}, "top_k", 400),
    ({"min_p": 2}, "min_p", 400),
    ({"repetition_penalty": 0}, "repetition_penalty", 400),
    ({"max_tokens": 0}, "max_tokens", 400),
    ({"max_tokens": "ten"}, "max_tokens", 400),
    ({"max_tokens": 10**40}, "max_tokens", 400),
    ({"max_tokens": 2.5}, "max_tokens", 400),
    ({"seed": -1}, "seed", 400),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
    ({"stop": [""]}, "stop", 400),
    ({"tools": [{"type": "function"}]}, "tools", 400),
    ({"response_format": {"type": "xml"}}, "response_format.type", 400),
    ({"presence_penalty": 0.5}, "presence_penalty", 400),
    ({"logprobs": "yes"}, "logprobs", 400),
    ({"top_logprobs": 3}, "top_logprobs", 400),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", 400),
    ({"stream": "yes"}, "stream", 400),
    ({"stream_options": {"include_usage": True}}, "stream_options", 400),
    ({"model": "gpt-4o"}, "model", 404),
]


@pytest.mark.parametrize("fields, param, status", BAD_REQUESTS)
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(client: TestClient, fields: dict[str, Any],
                                                                     param: str, status: int) -> None:
    body = json.dumps({**ask("What color is the circle?"), **fields})  # ASCII: lone surrogates as \\ud800
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert client.post("/v1/chat/completions", json=ask("How many shapes are there?", EXAMPLES / "count.png",
                                                        max_tokens=4)).status_code == 200


def test_bodies_that_are_not_a_json_object_are_400s(client: TestClient) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    huge_int = b'{"max_tokens": ' + b"7" * 5000 + b"}"
    for payload in (b"{not json", b"[1, 2]", b"\xff\xfe", deep, huge_int, b"{"):
        response = client.post("/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
        assert response.status_code == 400, payload[:40]
        assert "JSON" in response.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=ask("How many shapes are there?", max_tokens=2)).status_code == 200


def test_prompts_beyond_the_position_limit_are_a_400_even_when_streamed(client: TestClient) -> None:
    too_long = ask("What color is the circle? " * 400, EXAMPLES / "shapes.png", stream=True)
    response = client.post("/v1/chat/completions", json=too_long)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    long = ask("What color is the circle? " * 90, EXAMPLES / "shapes.png")
    response = client.post("/v1/chat/completions", json=long)
    assert response.status_code == 200  # max_tokens defaults to generation_config.json's (32)
    assert response.json()["usage"]["prompt_tokens"] > 1024 - 512
    response = client.post("/v1/chat/completions", json={**long, "max_tokens": 1000})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_closing_a_turn_early_stops_generation(shipped: tuple[Any, Any]) -> None:
    model, processor = shipped
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe the image."}]}]
    turn = AssistantTurn(model, processor, messages, [], max_new_tokens=300, min_new_tokens=300)
    puts = []
    original = turn.streamer.put
    turn.streamer.put = lambda value: (puts.append(1), original(value))[1]  # type: ignore[method-assign]
    pieces = iter(turn)
    next(pieces)
    pieces.close()  # the reader goes away: generation stops at its next token
    assert turn.result is None and len(puts) < 300


def test_serve_binds_this_machine_only_by_default() -> None:
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and not args.allow_remote_images


def test_stream_and_whole_agree_around_stop_strings(client: TestClient) -> None:
    request = ask("Describe the image.", EXAMPLES / "shapes.png")
    full = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    for stop in (full.split()[1], " " + full.split()[2], ","):  # "red", " green", ","
        whole = client.post("/v1/chat/completions", json={**request, "stop": stop}).json()
        chunks = events(client.post("/v1/chat/completions", json={**request, "stop": stop, "stream": True}))[:-1]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert streamed == whole["choices"][0]["message"]["content"] == full[: full.index(stop)].rstrip()


def test_n_logprobs_and_usage_chunk(client: TestClient, shipped: tuple[Any, Any]) -> None:
    request = ask("Describe the image.", EXAMPLES / "shapes.png", n=3, temperature=2.0, seed=1, logprobs=True,
                  top_logprobs=2, max_tokens=12)
    body = client.post("/v1/chat/completions", json=request).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) > 1
    for choice in body["choices"]:
        entries = choice["logprobs"]["content"]
        assert entries and all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in entries)
        assert all(e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6 for e in entries)
    tokens = sum(len(c["logprobs"]["content"]) for c in body["choices"])
    assert body["usage"]["completion_tokens"] >= tokens
    streamed = events(client.post("/v1/chat/completions", json={
        **request, "stream": True, "stream_options": {"include_usage": True}}))
    assert streamed[-1] == "[DONE]" and streamed[-2]["choices"] == [] and streamed[-2]["usage"] == body["usage"]
    text = {i: "" for i in range(3)}
    for chunk in streamed[:-2]:
        for c in chunk["choices"]:
            text[c["index"]] += c["delta"].get("content", "")
    assert [text[i] for i in range(3)] == [c["message"]["content"] for c in body["choices"]]  # same seed


def test_health_metrics_and_openai_shaped_route_errors(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    client.post("/v1/chat/completions", json=ask("What color is the circle?", EXAMPLES / "shapes.png"))
    metrics = client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
        assert name in metrics
    for response, status in ((client.get("/v1/nothing"), 404), (client.get("/v1/chat/completions"), 405)):
        assert response.status_code == status and response.json()["error"]["message"]


def test_api_key_body_limit_and_queue_limit(shipped: tuple[Any, Any]) -> None:
    app = create_app(*shipped, SHIPPED_MODEL, api_key="sekret", max_body_bytes=2**20, max_queue=1)
    with TestClient(app) as guarded:
        request = ask("What color is the circle?", EXAMPLES / "shapes.png", max_tokens=3)
        assert guarded.post("/v1/chat/completions", json=request).status_code == 401
        wrong = guarded.post("/v1/chat/completions", json=request, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"]
        key = {"Authorization": "Bearer sekret"}
        assert guarded.post("/v1/chat/completions", json=request, headers=key).status_code == 200
        big = guarded.post("/v1/chat/completions", content=b" " * (2**20 + 1), headers=key)
        assert big.status_code == 413 and big.json()["error"]["message"]
        assert guarded.get("/health").status_code == 200  # not behind the key, as in vLLM
        engine = app.state.engine
        with engine._wake:  # the scheduler is idle and stays so: one waiting entry fills the queue of 1
            engine.waiting.append(None)
            full = guarded.post("/v1/chat/completions", json=request, headers=key)
            engine.waiting.clear()
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert guarded.post("/v1/chat/completions", json=request, headers=key).status_code == 200


@pytest.mark.parametrize("checkpoint, expected", [
    ({}, (1.0, 0, 1.0)),  # OpenAI's defaults: sampling, no top-k
    ({"do_sample": False, "max_new_tokens": 32}, (0.0, 0, 1.0)),
    ({"temperature": 0.7, "top_k": 50, "top_p": 0.9}, (0.7, 50, 0.9)),
])
def test_cli_and_server_resolve_unset_sampling_fields_alike(checkpoint: dict[str, Any],
                                                            expected: tuple[float, int, float]) -> None:
    from types import SimpleNamespace

    from idefics2.cli import sampling_options
    from idefics2.generation.config import GenerationConfig
    from idefics2.serving.protocol import parse_request

    defaults = GenerationConfig.from_dict(checkpoint)
    chat = parse_request({"messages": [{"role": "user", "content": "hi"}]}, defaults, max_n=1,
                         max_tokens_limit=4096, allow_remote=False)
    served = (chat.sampling["temperature"], chat.sampling["top_k"], chat.sampling["top_p"])
    args = build_parser().parse_args(["generate", "hi"])
    cli = sampling_options(SimpleNamespace(generation_config=defaults), args)
    assert served == expected
    assert (cli["temperature"] if cli["do_sample"] else 0.0, cli["top_k"], cli["top_p"]) == expected
    if "max_new_tokens" in checkpoint:
        assert chat.max_tokens == cli["max_new_tokens"] == checkpoint["max_new_tokens"]
    else:  # the server: what the positions leave; the CLI: its documented default
        assert chat.max_tokens is None and cli["max_new_tokens"] == 512

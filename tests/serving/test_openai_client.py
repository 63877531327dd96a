"""The server under uvicorn on 127.0.0.1, spoken to by the official `openai` client: plain,
streamed, several images, logprobs, n, stop, and clients that go away mid-answer."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import EXAMPLES, served
from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.cli import SHIPPED_MODEL, shipped_model_path
from idefics2.serving.server import create_app

openai = pytest.importorskip("openai")


def image(path: Path) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()}}


def user(text: str, *images: Path) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*(image(p) for p in images), {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Any]]:
    folder = shipped_model_path()
    model, processor = Idefics2ForConditionalGeneration.from_pretrained(folder), Idefics2Processor.from_pretrained(folder)
    app = create_app(model, processor, SHIPPED_MODEL, max_batch_size=8)
    with served(app) as url:
        yield url, app.state.engine


@pytest.fixture(scope="module")
def client(server: tuple[str, Any]) -> Any:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_plain_streamed_and_multi_image_answers(client: Any) -> None:
    answer = client.chat.completions.create(model=SHIPPED_MODEL, messages=user("What color is the circle?",
                                                                                EXAMPLES / "shapes.png"), temperature=0)
    assert answer.choices[0].message.content == "Red." and answer.choices[0].finish_reason == "stop"
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    stream = client.chat.completions.create(model=SHIPPED_MODEL, messages=user("Describe the image.",
                                                                                EXAMPLES / "shapes.png"),
                                            stream=True, stream_options={"include_usage": True}, stop=[","])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model=SHIPPED_MODEL, messages=user("Describe the image.",
                                                                               EXAMPLES / "shapes.png"), stop=[","])
    assert text == whole.choices[0].message.content and "," not in text and text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    pair = client.chat.completions.create(model=SHIPPED_MODEL, messages=user(
        "Which image has more shapes?", EXAMPLES / "pair_1.png", EXAMPLES / "pair_2.png"))
    assert pair.choices[0].message.content in ("The first image.", "The second image.")


def test_logprobs_and_n(client: Any) -> None:
    answer = client.chat.completions.create(model=SHIPPED_MODEL, messages=user("Describe the image.",
                                                                                EXAMPLES / "shapes.png"),
                                            n=2, temperature=1.8, seed=5, logprobs=True, top_logprobs=3, max_tokens=10)
    assert len(answer.choices) == 2
    for choice in answer.choices:
        content = choice.logprobs.content
        assert content and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)
        assert "".join(e.token for e in content).strip().startswith(choice.message.content[:3])


def test_clients_that_leave_free_the_engine(server: tuple[str, Any], client: Any) -> None:
    url, engine = server
    messages = user("Describe the image.", EXAMPLES / "shapes.png")
    stream = client.chat.completions.create(model=SHIPPED_MODEL, messages=messages, stream=True, max_tokens=900,
                                            extra_body={"min_tokens": 800})
    next(iter(stream))
    stream.close()  # the openai client's way of giving up on a stream
    plain = threading.Thread(target=lambda: _give_up(url, messages), daemon=True)
    plain.start()
    plain.join()
    deadline = time.monotonic() + 5
    while engine.num_running or engine.num_waiting:
        assert time.monotonic() < deadline, "the abandoned requests still decode"
        time.sleep(0.02)
    started = time.monotonic()
    answer = client.chat.completions.create(model=SHIPPED_MODEL, messages=user("What color is the circle?",
                                                                                EXAMPLES / "shapes.png"))
    assert answer.choices[0].message.content == "Red." and time.monotonic() - started < 10


def _give_up(url: str, messages: list[dict[str, Any]]) -> None:
    """A non-streamed request whose client times out (and drops the connection) mid-answer."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 900, "min_tokens": 800}, timeout=0.5)


def test_malformed_requests_keep_the_connection_usable(server: tuple[str, Any]) -> None:
    url = server[0] + "/v1/chat/completions"
    bad = [b'{"messages": [{"role": ["user"], "content": "hi"}]}', b"[" * 100_000 + b"]" * 100_000,
           b'{"max_tokens": ' + b"9" * 5000 + b"}", b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
           b"{not json"]
    with httpx.Client(timeout=30) as http:  # one keep-alive connection for all of them
        for payload in bad:
            response = http.post(url, content=payload, headers={"content-type": "application/json"})
            assert response.status_code == 400 and response.json()["error"]["message"], payload[:30]
        good = http.post(url, json={"messages": user("What color is the circle?", EXAMPLES / "shapes.png")})
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == "Red."
        assert http.get(server[0] + "/nothing").json()["error"]["code"] == 404


def test_a_bounded_load_gets_every_answer_equal_to_the_request_alone(client: Any) -> None:
    """24 requests at once (streamed and not, different images and lengths) against each alone."""
    from concurrent.futures import ThreadPoolExecutor

    images = sorted(EXAMPLES.glob("*.png"))
    questions = ["What color is the circle?", "Describe the image.", "How many shapes are there?"]
    requests = [(questions[i % 3], images[i % len(images)], 4 + i % 9, i % 2 == 0) for i in range(24)]

    def ask(question: str, image: Path, max_tokens: int, stream: bool) -> str:
        kwargs = {"model": SHIPPED_MODEL, "messages": user(question, image), "max_tokens": max_tokens,
                  "temperature": 0}
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                stream=True, **kwargs) if c.choices)
        return client.chat.completions.create(**kwargs).choices[0].message.content

    alone = [ask(*r) for r in requests]
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(lambda r: ask(*r), requests))
    assert together == alone and len(set(alone)) > 3

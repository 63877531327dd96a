"""OpenAI-compatible HTTP server on the continuous-batching `Engine`.

Routes: `POST /v1/chat/completions` (plain or streamed; structured output through `response_format`
or vLLM's `structured_outputs` / `guided_*` fields, see `protocol.parse_constraint`), `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus, vLLM's metric names). The event loop only moves bytes: the body is
read with a size limit, then parsing, image decoding, templating and image processing run in a
small pool of worker threads (`parse_workers`), and the engine's scheduler thread runs the model.
A client that goes away (streamed or not) cancels its request within one decode step. Every
mistake is an OpenAI-shaped JSON error (400, 401, 404, 405, 413, 429) and the server goes on
serving. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from idefics2.generation.config import GenerationConfig
from idefics2.generation.constraints import compiler_for
from idefics2.generation.engine import Engine, EngineRequest, QueueFull, SamplingParams, TokenEvent
from idefics2.generation.vision_cache import VisionFeatureCache
from idefics2.serving.choices import Choice, usage
from idefics2.serving.metrics import ServerMetrics
from idefics2.serving.protocol import ChatRequest, RequestError, parse_request

MAX_BODY_BYTES = 20 * 2**20
logger = logging.getLogger(__name__)


def error_response(message: str, param: str | None = None, status: int = 400,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


def create_app(model: Any, processor: Any, model_name: str, *, allow_remote_images: bool = False,
               max_tokens_limit: int = 4096, max_batch_size: int = 16, max_model_len: int | None = None,
               max_queue: int = 64, max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None,
               cors_origins: list[str] | None = None, parse_workers: int = 2,
               compile: bool = False) -> FastAPI:
    """The FastAPI app serving `model` under `model_name`; run it with uvicorn (see `serve`).

    `max_batch_size` sequences decode together, each of up to `max_model_len` tokens (default: the
    model's positions); `max_queue` requests may wait (more: 429). `compile` runs the engine's
    decode step through `torch.compile`. `app.state.engine` is the engine; closed at shutdown.
    """
    engine = Engine(model, max_batch_size=max_batch_size, max_model_len=max_model_len, max_queue=max_queue,
                    tokenizer=processor.tokenizer, vision_cache=VisionFeatureCache(), compile=compile)
    eos = [i for i in (processor.end_of_utterance_id, processor.tokenizer.eos_token_id) if i is not None]
    defaults = model.generation_config or GenerationConfig()
    limiter = anyio.CapacityLimiter(parse_workers)
    metrics = ServerMetrics(model_name, engine)
    prepare = functools.partial(_prepare, processor=processor, engine=engine, defaults=defaults, eos=eos,
                                max_tokens_limit=max_tokens_limit, allow_remote=allow_remote_images)
    parsing = 0  # requests being read or parsed, counted against max_queue with the engine's waiting ones

    app = FastAPI(title="idefics2", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.router.add_event_handler("shutdown", engine.close)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
        return error_response(str(err.detail), status=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception) -> JSONResponse:
        return error_response(f"internal error ({type(err).__name__})", status=500)

    @app.middleware("http")
    async def _authenticate(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response("missing or wrong API key: send Authorization: Bearer <key>", status=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "idefics2", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        nonlocal parsing
        if engine.num_waiting + parsing >= max_queue:
            return error_response(f"the server is at its queue limit ({max_queue} requests); retry later",
                                  status=429, headers={"Retry-After": "1"})
        parsing += 1
        try:
            body = await _read_json(request, max_body_bytes)
            if body.get("model") not in (None, model_name):
                raise RequestError(f"the model `{str(body['model'])[:100]}` does not exist; this server serves "
                                   f"`{model_name}`", "model", status=404)
            chat, inputs, params = await anyio.to_thread.run_sync(prepare, body, limiter=limiter)
        except RequestError as err:
            return error_response(str(err), err.param, err.status)
        except ValueError as err:  # the processor's own checks
            return error_response(" ".join(str(err).split())[:2000])
        except Exception as err:  # a bug of ours: logged, answered, and the connection stays usable
            logger.exception("preparing a request failed")
            return error_response(f"internal error ({type(err).__name__})", status=500)
        finally:
            parsing -= 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
        job = EngineRequest(inputs["input_ids"], params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                            inputs.get("pixel_values"), inputs.get("pixel_attention_mask"))
        try:
            engine.submit(job)
        except QueueFull as err:
            return error_response(f"{err}; retry later", status=429, headers={"Retry-After": "1"})
        reply = _Reply(job, events, processor.tokenizer, params, model_name, metrics)
        if chat.stream:
            return StreamingResponse(reply.stream(chat.include_usage), media_type="text/event-stream")
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job, events))
        try:
            return await reply.whole()
        finally:
            job.cancel()
            watcher.cancel()

    return app


def _prepare(body: dict[str, Any], *, processor: Any, engine: Engine, defaults: Any, eos: list[int],
             max_tokens_limit: int, allow_remote: bool) -> tuple[ChatRequest, Any, SamplingParams]:
    """Worker thread: the checked request, its model inputs and its sampling parameters."""
    chat = parse_request(body, defaults, max_n=engine.max_batch_size, max_tokens_limit=max_tokens_limit,
                         allow_remote=allow_remote)
    prompt = processor.apply_chat_template(chat.messages, add_generation_prompt=True)
    inputs = processor(images=chat.images or None, text=prompt)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    room = engine.max_model_len - prompt_tokens
    max_tokens = chat.max_tokens if chat.max_tokens is not None else max(room, 1)
    if max_tokens > room:
        raise RequestError(f"the prompt takes {prompt_tokens} of the model's {engine.max_model_len} "
                           f"positions (images included), which leaves {max(room, 0)} for the answer; "
                           f"max_tokens asked for {max_tokens}", "messages" if room < 1 else "max_tokens")
    constraint = None
    if chat.constraint is not None:  # compiled here, off the event loop, so a bad schema is a 400 up front
        try:
            constraint = compiler_for(processor.tokenizer, engine.vocab_size).compile(chat.constraint)
        except ValueError as err:
            raise RequestError(str(err), chat.constraint_param) from None
    return chat, inputs, SamplingParams(max_tokens, eos, n=chat.n, logprobs=chat.logprobs,
                                        constraint=constraint, **chat.sampling)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body, at most `limit` bytes (413 beyond), as a JSON object (400 otherwise)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is {declared} bytes, more than the {limit} allowed", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is more than the {limit} bytes allowed", status=413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, huge integers, deep nesting
        raise RequestError(f"the request body is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


async def _cancel_on_disconnect(request: Request, job: EngineRequest, events: asyncio.Queue[Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()
    events.put_nowait(None)


class _Reply:
    """One request's events, turned into an OpenAI response or stream."""

    def __init__(self, job: EngineRequest, events: asyncio.Queue[TokenEvent | None], tokenizer: Any,
                 params: SamplingParams, model_name: str, metrics: ServerMetrics) -> None:
        self.job, self.events, self.metrics = job, events, metrics
        self.choices = [Choice(i, tokenizer, list(params.stop_strings), params.logprobs) for i in range(params.n)]
        self.prompt_tokens = int(job.input_ids.shape[1])
        self.id, self.created, self.model_name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_name
        self.open = params.n
        self.error: str | None = None
        self.last_token_at: dict[int, float] = {}  # choice index -> when its last token arrived

    async def next(self) -> tuple[Choice, str, list[dict[str, Any]]] | None:
        """The next choice update, or None when the request is over (finished, failed or cancelled)."""
        while self.open:
            event = await self.events.get()
            if event is None:
                return None
            last = self.last_token_at.get(event.index)
            self.last_token_at[event.index] = self.metrics.token(self.job, event, last)
            if event.finish_reason == "error":
                self.error, self.open = event.error, 0
                self.job.cancel()
                return None
            choice = self.choices[event.index]
            piece, entries = choice.add(event)
            if event.finish_reason is not None:
                self.open -= 1
                self.metrics.finished(self.job, self.prompt_tokens, event.finish_reason)
            return choice, piece, entries
        return None

    async def whole(self) -> Any:
        while await self.next() is not None:
            pass
        if self.error is not None:
            return error_response(f"generation failed: {self.error}"[:2000], status=500)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
                "choices": [c.message() for c in self.choices], "usage": usage(self.prompt_tokens, self.choices)}

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model_name, "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a role chunk per choice, content chunks, finish chunks, usage, [DONE].
        An error after the stream began cannot change the status: it is sent as an `error` event."""
        try:
            for c in self.choices:
                yield self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}])
            while (update := await self.next()) is not None:
                choice, piece, entries = update
                if piece or entries or choice.finish_reason is not None:
                    yield self._chunk([choice.delta(piece, entries)])
            if self.error is not None:
                yield f"data: {json.dumps({'error': {'message': self.error, 'type': 'server_error'}})}\n\n"
            elif include_usage:
                yield self._chunk([], usage=usage(self.prompt_tokens, self.choices))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (Starlette cancels this generator) or the answer is complete
            self.job.cancel()


def serve(model: Any, processor: Any, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          **app_options: Any) -> None:
    """Serve until interrupted (uvicorn); `app_options` go to `create_app`."""
    import uvicorn

    uvicorn.run(create_app(model, processor, model_name, **app_options), host=host, port=port, log_level="info")

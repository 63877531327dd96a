"""OpenAI chat requests -> Idefics2 chat messages, images and `SamplingParams`; every mistake a `RequestError`.

Runs in a worker thread, never on the event loop: base64 and image decoding can take a while.
Images arrive as `image_url` content parts holding `data:` URIs (base64); http(s) URLs are fetched
only when the server allows remote images, within one deadline for the whole request. An image's
pixel count is read from its header and checked before it is decoded.

Sampling defaults follow vLLM's server: a field the request leaves out comes from the checkpoint's
generation_config.json, else from OpenAI's defaults (temperature 1, top_p 1, no top-k), except that
a checkpoint saying `do_sample: false` decodes greedily.

Structured output: OpenAI's `response_format` (`json_object`, or `json_schema` with `strict`
honoured), vLLM's `structured_outputs` ({json | regex | choice | grammar | json_object}) and its
older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, at most one of them per
request, become one `Constraint` (compiled against the tokenizer by the server, so a schema that
cannot be enforced is a 400 before any decoding).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from PIL import Image

from idefics2.generation.config import GenerationConfig
from idefics2.generation.constraints import Constraint, lark_grammar
from idefics2.processing.image_file import DEFAULT_MAX_PIXELS, read_image
from idefics2.processing.processor import reserved_token_in

MAX_IMAGE_BYTES = 20 * 2**20  # per image, after base64 decoding or download
MAX_IMAGES = 32  # per request
REMOTE_DEADLINE_S = 10.0  # for all remote images of one request together
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = ("tools", "functions", "tool_choice", "logit_bias")  # rejected when set
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}
# vLLM's StructuredOutputsParams fields: the constraint (one of), and options
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
STRUCTURED_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                      "whitespace_pattern", "structural_tag")
SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RequestError(ValueError):
    """A mistake in the request: HTTP `status` with an OpenAI-style error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class ChatRequest:
    """A checked request: what to render and how to decode it (`max_tokens` None = as room allows)."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]
    stream: bool
    include_usage: bool
    n: int
    max_tokens: int | None
    sampling: dict[str, Any]  # SamplingParams fields: temperature, top_k, top_p, min_p, ..., stop_strings
    logprobs: int | None  # None: none; k: the chosen token's and the top k
    constraint: Constraint | None = None  # the answer's structure, if the request asks for one
    constraint_param: str | None = None  # the request field it came from, for errors


# ------------------------------------------------------------------------------------------- images
def load_image(url: str, param: str, allow_remote: bool, deadline: float) -> Image.Image:
    """A `data:` URI, or an http(s) URL when `allow_remote` (before `deadline`, a monotonic time),
    decoded to a PIL image after its header passed the size checks."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError("a data URI image must be base64: data:image/png;base64,<data>", param)
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise RequestError(f"image larger than {MAX_IMAGE_BYTES // 2**20} MiB", param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("the data URI's base64 payload is not valid base64", param) from None
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise RequestError("remote image URLs are off on this server (start it with --allow-remote-images); "
                               "send the image inline as a data:image/...;base64 URI", param)
        data = _fetch(url, param, deadline)
    else:
        raise RequestError("an image URL must be a data:image/...;base64 URI (or http(s) when remote images "
                           "are allowed)", param)
    if len(data) > MAX_IMAGE_BYTES:
        raise RequestError(f"image larger than {MAX_IMAGE_BYTES // 2**20} MiB", param)
    try:
        return read_image(io.BytesIO(data), max_pixels=DEFAULT_MAX_PIXELS)
    except ValueError as err:
        raise RequestError(f"cannot read the image: {err}", param) from None


def _fetch(url: str, param: str, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RequestError(f"fetching the request's remote images took over {REMOTE_DEADLINE_S:g} s", param)
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=left) as response:  # noqa: S310 - opt-in
            while size <= MAX_IMAGE_BYTES:
                if time.monotonic() > deadline:
                    raise RequestError(f"fetching the request's remote images took over {REMOTE_DEADLINE_S:g} s",
                                       param)
                chunk = response.read(2**16)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except OSError as err:
        raise RequestError(f"could not fetch the image URL: {err}", param) from None
    return b"".join(chunks)


# ----------------------------------------------------------------------------------------- messages
def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{param} must be a string", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{param} is not valid Unicode (a lone surrogate?)", param) from None
    reserved = reserved_token_in(value)
    if reserved:
        raise RequestError(f"{param} holds {reserved}, which the chat template writes itself; send an image "
                           "as an image_url part", param)
    return value


def convert_messages(raw: Any, allow_remote: bool) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI messages -> (Idefics2 chat messages, images in order of appearance)."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    deadline = time.monotonic() + REMOTE_DEADLINE_S
    messages: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
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
            if kind == "text":
                parts.append({"type": "text", "text": _text(part.get("text"), f"{at}.text")})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise RequestError(f"{at}.image_url needs a url string", f"{at}.image_url")
                if ROLES[role] != "user":
                    raise RequestError(f"{at}: images may only appear in user messages", at)
                if len(images) == MAX_IMAGES:
                    raise RequestError(f"at most {MAX_IMAGES} images per request", at)
                images.append(load_image(url, f"{at}.image_url", allow_remote, deadline))
                parts.append({"type": "image"})
            else:
                raise RequestError(f"{at} must be {{type: text, text}} or {{type: image_url, image_url: {{url}}}}", at)
        messages.append({"role": ROLES[role], "content": parts})
    if messages[-1]["role"] == "assistant":
        raise RequestError("the last message must not be the assistant's: there is nothing to answer",
                           f"messages[{len(messages) - 1}].role")
    return messages, images


# -------------------------------------------------------------------------------- structured output
def _only_keys(value: Any, allowed: tuple[str, ...], param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{param} must be an object", param)
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise RequestError(f"{param} has unknown field(s) {unknown}; it takes {list(allowed)}",
                           f"{param}.{unknown[0]}")
    return value


def _schema(value: Any, param: str) -> dict[str, Any] | bool:
    """A JSON schema given as an object (or true), or as a string holding one (vLLM allows both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RequestError(f"{param} is a string that is not JSON (give the schema as an object)",
                               param) from None
    if value is True or isinstance(value, dict):
        return value
    raise RequestError(f"{param} must be a JSON schema (an object)", param)


def _response_format(value: Any) -> tuple[Constraint, str] | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema {name, schema, strict}."""
    param = "response_format"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        _only_keys(value, ("type",), param)
        return None
    if kind == "json_object":
        _only_keys(value, ("type",), param)
        return Constraint("json_schema", {"type": "object"}, leading_space=True), param
    if kind != "json_schema":
        raise RequestError("response_format.type must be text, json_object or json_schema", f"{param}.type")
    _only_keys(value, ("type", "json_schema"), param)
    spec = _only_keys(value.get("json_schema"), ("name", "description", "schema", "strict"),
                      f"{param}.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
        raise RequestError("response_format.json_schema.name must be 1 to 64 letters, digits, _ or -",
                           f"{param}.json_schema.name")
    if "schema" not in spec:
        raise RequestError("response_format.json_schema.schema is missing: give the JSON schema the answer "
                           "must follow", f"{param}.json_schema.schema")
    strict = _flag(spec, "strict")
    where = f"{param}.json_schema.schema"
    return Constraint("json_schema", _schema(spec["schema"], where), strict=strict, leading_space=True), where


def _structured(fields: dict[str, Any], param: str) -> tuple[Constraint, str]:
    """vLLM's structured-output fields (structured_outputs' names); schemas there are strict."""
    given = [k for k in STRUCTURED_KINDS if fields.get(k) not in (None, False)]
    if len(given) != 1:
        raise RequestError(f"{param} must set exactly one of {list(STRUCTURED_KINDS)}, got {given or 'none'}",
                           param)
    for option in ("whitespace_pattern", "structural_tag"):
        if fields.get(option) is not None:
            raise RequestError(f"{param}.{option} is not supported by this server", f"{param}.{option}")
    for option in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
        _flag(fields, option)  # checked; answers never hold free whitespace, and there is no fallback backend
    if fields.get("disable_additional_properties"):
        raise RequestError(f"{param}.disable_additional_properties is not supported: set "
                           "additionalProperties: false in the schema", f"{param}.disable_additional_properties")
    kind = given[0]
    value, where = fields[kind], f"{param}.{kind}" if param == "structured_outputs" else param
    try:
        if kind == "json":
            return Constraint("json_schema", _schema(value, where), leading_space=True), where
        if kind == "json_object":
            if value is not True:
                raise RequestError(f"{where} must be true", where)
            return Constraint("json_schema", {"type": "object"}, leading_space=True), where
        if kind == "choice":
            if not isinstance(value, list):
                raise RequestError(f"{where} must be a list of strings", where)
            return Constraint("choices", tuple(value), leading_space=True), where
        if not isinstance(value, str):
            raise RequestError(f"{where} must be a string", where)
        if kind == "regex":
            return Constraint("regex", value, leading_space=True), where
        return Constraint("grammar", lark_grammar(value), leading_space=True), where
    except ValueError as err:
        if isinstance(err, RequestError):
            raise
        raise RequestError(f"{where}: {err}", where) from None


def parse_constraint(body: dict[str, Any]) -> tuple[Constraint, str] | None:
    """The request's structured-output constraint and the field it came from; None without one."""
    sources = [k for k in ("response_format", "structured_outputs", *GUIDED) if body.get(k) is not None]
    if len(sources) > 1:
        raise RequestError(f"set at most one of response_format, structured_outputs and guided_*, got "
                           f"{sources}", sources[1])
    for name in ("guided_whitespace_pattern", "guided_decoding_backend"):
        if body.get(name) is not None and not sources:
            raise RequestError(f"{name} needs a guided_* constraint", name)
    if body.get("guided_whitespace_pattern") is not None:
        raise RequestError("guided_whitespace_pattern is not supported by this server",
                           "guided_whitespace_pattern")
    if not sources:
        return None
    source = sources[0]
    if source == "response_format":
        return _response_format(body[source])
    if source == "structured_outputs":
        return _structured(_only_keys(body[source], (*STRUCTURED_KINDS, *STRUCTURED_OPTIONS), source), source)
    return _structured({GUIDED[source]: body[source]}, source)


# ----------------------------------------------------------------------------------------- sampling
def _number(body: dict[str, Any], name: str, kind: type, low: float, high: float, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}", name)
    if not low <= value <= high:  # NaN fails this too
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", name)
    return kind(value)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false", name)
    return value


def sampling_defaults(defaults: GenerationConfig) -> dict[str, Any]:
    """What a request (or the CLI) that sets nothing gets: the checkpoint's generation_config.json
    fields, else OpenAI's defaults; `do_sample: false` there means greedy (temperature 0)."""
    if defaults.do_sample is False:
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0,
                "repetition_penalty": defaults.repetition_penalty or 1.0, "max_tokens": defaults.max_new_tokens}
    return {"temperature": defaults.temperature if defaults.temperature is not None else 1.0,
            "top_p": defaults.top_p if defaults.top_p is not None else 1.0, "top_k": defaults.top_k or 0,
            "repetition_penalty": defaults.repetition_penalty or 1.0, "max_tokens": defaults.max_new_tokens}


def parse_request(body: dict[str, Any], defaults: GenerationConfig, *, max_n: int, max_tokens_limit: int,
                  allow_remote: bool) -> ChatRequest:
    """The whole request body, checked field by field (the model field is the caller's)."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(f"{name} is not supported by this server", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, float, -2.0, 2.0, 0.0) != 0.0:
            raise RequestError(f"{name} is not supported by this server (use 0)", name)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise RequestError("stream_options must be an object, and only with stream: true", "stream_options")
    include_usage = _flag(options or {}, "include_usage")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    fallback = sampling_defaults(defaults)
    max_tokens = _number(body, key, int, 1, max_tokens_limit, None)
    if max_tokens is None and fallback["max_tokens"] is not None:
        max_tokens = min(fallback["max_tokens"], max_tokens_limit)
    temperature = _number(body, "temperature", float, 0.0, 2.0, fallback["temperature"])
    top_p = _number(body, "top_p", float, 0.0, 1.0, fallback["top_p"])
    if top_p == 0.0:
        raise RequestError("top_p must be in (0, 1]", "top_p")
    top_k = _number(body, "top_k", int, -1, 2**31 - 1, fallback["top_k"])
    penalty = _number(body, "repetition_penalty", float, 0.01, 10.0, fallback["repetition_penalty"])
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, list) or len(stops) > 4
                              or not all(isinstance(s, str) and s for s in stops)):
        raise RequestError("stop must be a non-empty string or a list of up to 4 of them", "stop")
    min_tokens = _number(body, "min_tokens", int, 0, max_tokens_limit, 0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise RequestError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    logprobs = None
    if _flag(body, "logprobs"):
        logprobs = _number(body, "top_logprobs", int, 0, MAX_TOP_LOGPROBS, 0)
    elif body.get("top_logprobs") is not None:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    constraint = parse_constraint(body)
    messages, images = convert_messages(body.get("messages"), allow_remote)
    return ChatRequest(
        messages, images, stream, include_usage, _number(body, "n", int, 1, max_n, 1), max_tokens,
        {"temperature": temperature, "top_p": top_p, "top_k": max(top_k, 0),
         "min_p": _number(body, "min_p", float, 0.0, 1.0, 0.0), "repetition_penalty": penalty,
         "min_new_tokens": min_tokens,
         "seed": _number(body, "seed", int, 0, 2**63 - 1, None), "stop_strings": stops or []},
        logprobs, *(constraint or (None, None)))

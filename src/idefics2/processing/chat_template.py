"""Chat templates: render a list of chat messages into the prompt string the processor then expands.

Sits before `Idefics2Processor.__call__`: messages -> "User: ...<image>...<end_of_utterance>\\nAssistant:".
Must render exactly as transformers' `apply_chat_template` does: the same Jinja settings
(`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, loop controls) and the same helpers
(`raise_exception`, a non-escaping `tojson`, `strftime_now`). Spec §6.6 gives the default template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The Idefics2 template of docs/numerics.md §6.6 (built into transformers <= 4.42, shipped in the Hub files later).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

Message = Mapping[str, Any]


def _raise_exception(message: str) -> NoReturn:
    """Lets a template reject a conversation it cannot express (e.g. a role it does not know)."""
    raise ValueError(f"Chat template error: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Jinja's own `tojson` HTML-escapes `<`, `>`, `&` (would corrupt prompts); plain json.dumps does not."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per template string; the sandbox matters because Hub templates are untrusted code."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(
    messages: Sequence[Message],
    template: str = DEFAULT_CHAT_TEMPLATE,
    *,
    add_generation_prompt: bool = False,
    **variables: Any,
) -> str:
    """Render one conversation.

    Args:
        messages: dicts with `role` and `content` (a list of `{"type": "text", "text": ...}` /
            `{"type": "image"}` items for the Idefics2 template). Keys whose value is None are dropped,
            as transformers does, so `content=None` reads as absent rather than as the string "None".
        variables: extra template variables (special tokens such as `bos_token`, custom flags).
    """
    if isinstance(messages, (str, Mapping)) or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError(
            "A conversation must be a list of message dicts, got "
            f"{type(messages).__name__} with items {[type(m).__name__ for m in messages]}"
        )
    cleaned = [{key: value for key, value in message.items() if value is not None} for message in messages]
    try:
        return compile_template(template).render(
            messages=cleaned, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as error:  # syntax errors and sandbox violations: bad template, not bad code
        raise ValueError(f"Chat template failed: {error}") from error

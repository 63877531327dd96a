"""Chat templates: render a list of chat messages into the prompt string the processor then expands.

Sits before `Idefics2Processor.__call__`: messages -> "User: ...<image>...<end_of_utterance>\\nAssistant:".
Must render exactly as transformers' `apply_chat_template` does: the same Jinja settings
(`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, loop controls) and the same helpers
(`raise_exception`, a non-escaping `tojson`, `strftime_now`). Spec §6.6 gives the default template.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from idefics2.files import write_file_atomically

# The Idefics2 template of docs/numerics.md §6.6 (built into transformers <= 4.42, shipped in the Hub files later).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

Message = Mapping[str, Any]
ChatTemplate = str | dict[str, str]  # Jinja source, or named sources ("default" unless one is named)
CHAT_TEMPLATE_JSON = "chat_template.json"  # the 4.x layout: read, not written
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
NAMED_TEMPLATES_DIR = "additional_chat_templates"


class TemplateRaised(ValueError):
    """The template's own `raise_exception(message)`: passed on in its words."""


def _raise_exception(message: str) -> NoReturn:
    """Lets a template reject a conversation it cannot express (e.g. a role it does not know)."""
    raise TemplateRaised(f"Chat template error: {message}")


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


MAX_RENDERED_CHARS = 1_000_000  # far beyond any model's positions: a prompt that long is a runaway template
MAX_RENDER_SECONDS = 5.0
MAX_RANGE_STEPS = 1_000_000  # `range` items per render, all loops together
_budget: ContextVar[_RenderBudget | None] = ContextVar("chat_template_budget", default=None)


class _TemplateLimit(ValueError):
    """A bound of the render exceeded (steps, time, size)."""


class _RenderBudget:
    """What one render may still spend: `range` steps and time (checked at every step and chunk)."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS
        self.steps = MAX_RANGE_STEPS

    def spend(self, steps: int = 1) -> None:
        self.steps -= steps
        if self.steps < 0:
            raise _TemplateLimit(f"the chat template's loops ran over {MAX_RANGE_STEPS} range steps")
        if time.monotonic() > self.deadline:
            raise _TemplateLimit(f"the chat template ran for over {MAX_RENDER_SECONDS:g} s")


def _bounded_range(*args: int) -> Iterator[int]:
    budget = _budget.get()
    for value in range(*args):
        if budget is not None:
            budget.spend()
        yield value


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with `*`, `**` and `+` refused where their result would be huge."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64 and not -1 <= left <= 1:
            raise _TemplateLimit(f"the chat template computes {left!r} ** {right}, too large a number")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                        and len(seq) * times > MAX_RENDERED_CHARS:
                    raise _TemplateLimit(f"the chat template builds a value of {len(seq) * times} items, more "
                                     f"than the {MAX_RENDERED_CHARS} allowed")
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                and len(left) + len(right) > MAX_RENDERED_CHARS:
            raise _TemplateLimit(f"the chat template builds a value of over {MAX_RENDERED_CHARS} items")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per template string; the sandbox matters because Hub templates are untrusted code,
    and the bounds (`_BoundedSandbox`, `_bounded_range`, the render budget) because a template can
    also be slow or huge on purpose."""
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["range"] = _bounded_range
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
    budget = _RenderBudget()
    token = _budget.set(budget)
    try:
        chunks, size = [], 0
        for chunk in compile_template(template).generate(
                messages=cleaned, add_generation_prompt=add_generation_prompt, **variables):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise _TemplateLimit(f"the chat template's output is over {MAX_RENDERED_CHARS} characters")
            budget.spend(0)
            chunks.append(chunk)
        return "".join(chunks)
    except _TemplateLimit as error:
        raise ValueError(f"Chat template failed: {error}") from None
    except TemplateRaised:
        raise
    except jinja2.TemplateError as error:  # syntax errors and sandbox violations: bad template, not bad code
        raise ValueError(f"Chat template failed: {error}") from None
    except Exception as error:  # the template's own arithmetic and recursion (1/0, a macro calling itself)
        raise ValueError(f"Chat template failed: {type(error).__name__}: {str(error)[:200]}") from None
    finally:
        _budget.reset(token)


def template_source(template: ChatTemplate, name: str | None = None) -> str:
    """The Jinja source to render: `name` if it names one of the named templates, else `name` itself
    as source; None gives the template ("default" of named ones)."""
    named = template if isinstance(template, dict) else {"default": template}
    if name is not None:
        return named.get(name, name)
    if "default" not in named:
        raise ValueError(f"the chat templates are named {sorted(named)}, none 'default': "
                         "pass chat_template=NAME")
    return named["default"]


def _checked(template: Any, source: Path) -> ChatTemplate:
    if isinstance(template, str):
        return template
    if isinstance(template, dict) and template and all(
            isinstance(k, str) and isinstance(v, str) for k, v in template.items()):
        return template
    raise ValueError(f"{source}: chat_template must be a string or a non-empty {{name: template}} object of "
                     f"strings, got {type(template).__name__}")


def read_chat_template(folder: Path) -> ChatTemplate | None:
    """A folder's chat template files: chat_template.json (4.x; a string or named templates), else
    chat_template.jinja with additional_chat_templates/NAME.jinja (5.x); None when there are none."""
    if (folder / CHAT_TEMPLATE_JSON).is_file():
        template = json.loads((folder / CHAT_TEMPLATE_JSON).read_text(encoding="utf-8")).get("chat_template")
        if template is not None:
            return _checked(template, folder / CHAT_TEMPLATE_JSON)
    named = {path.stem: path.read_text(encoding="utf-8")
             for path in sorted((folder / NAMED_TEMPLATES_DIR).glob("*.jinja"))}
    if (folder / CHAT_TEMPLATE_JINJA).is_file():
        default = (folder / CHAT_TEMPLATE_JINJA).read_text(encoding="utf-8")
        return {**named, "default": default} if named else default
    return named or None


def write_chat_template(folder: Path, template: ChatTemplate) -> None:
    """The 5.x layout: "default" as chat_template.jinja, other named templates as
    additional_chat_templates/NAME.jinja. A chat_template.json or named template left from an earlier
    save is removed: it would win over, or add to, what is written now."""
    named = template if isinstance(template, dict) else {"default": template}
    (folder / CHAT_TEMPLATE_JSON).unlink(missing_ok=True)
    for stale in (folder / NAMED_TEMPLATES_DIR).glob("*.jinja"):
        stale.unlink()
    for name, source in named.items():
        if name == "default":
            path = folder / CHAT_TEMPLATE_JINJA
        else:
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"chat template name {name!r} cannot be a file name")
            path = folder / NAMED_TEMPLATES_DIR / f"{name}.jinja"
            path.parent.mkdir(exist_ok=True)
        write_file_atomically(path, source)  # a failure leaves the previous file whole

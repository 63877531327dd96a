"""Chat templates: docs/numerics.md §6.6 strings, transformers' Jinja settings, strict errors, template lookup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import HUB_LIKE_TOKENIZER
from idefics2.processing.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat
from idefics2.processing.processor import Idefics2Processor

SPEC_MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What do these images show?"},
            {"type": "image"},
            {"type": "image"},
        ],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "Two cats."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
]
SPEC_RENDERED = (
    "User: What do these images show?<image><image><end_of_utterance>\nAssistant: Two cats."
    "<end_of_utterance>\nUser:<image>And this one?<end_of_utterance>\n"
)

# Exercises trim_blocks/lstrip_blocks, loop controls, tojson on '<' and '&', and template variables.
WHITESPACE_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
  [{{ message['role'] }}] {{ message['content'] | tojson }}
{% endfor %}
{% if add_generation_prompt %}{{ bos_token }}>{% endif %}"""


def test_default_template_is_the_hub_template() -> None:
    hub = json.loads((HUB_LIKE_TOKENIZER / "chat_template.json").read_text())["chat_template"]
    assert hub == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_spec_example_renders_exactly(add_generation_prompt: bool) -> None:
    rendered = render_chat(SPEC_MESSAGES, add_generation_prompt=add_generation_prompt)
    assert rendered == SPEC_RENDERED + ("Assistant:" if add_generation_prompt else "")


def test_template_quirks_are_kept() -> None:
    """A plain-string content loses its text and a system role is just capitalised (docs/numerics.md §6.6)."""
    assert render_chat([{"role": "user", "content": "Hello"}]) == "User: <end_of_utterance>\n"
    system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    assert render_chat(system) == "System: Be brief.<end_of_utterance>\n"
    skipped = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, "not a dict", {"type": "text", "text": "b"}],
        }
    ]
    assert render_chat(skipped) == "User: ab<end_of_utterance>\n"


def test_none_valued_keys_are_dropped_like_transformers() -> None:
    template = "{% for m in messages %}{{ m.get('name', 'anon') }}{% endfor %}"
    assert render_chat([{"role": "user", "name": None, "content": []}], template) == "anon"


def test_whitespace_control_and_helpers() -> None:
    messages = [{"role": "system", "content": "skip me"}, {"role": "user", "content": "a<b & c"}]
    rendered = render_chat(messages, WHITESPACE_TEMPLATE, add_generation_prompt=True, bos_token="<s>")
    assert rendered == '  [user] "a<b & c"\n<s>>'


def test_raise_exception_becomes_value_error() -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    )
    with pytest.raises(ValueError, match="first message must be user"):
        render_chat([{"role": "assistant", "content": []}], template)


def test_sandbox_blocks_mutation_and_bad_syntax() -> None:
    with pytest.raises(ValueError, match="Chat template failed"):
        render_chat([{"role": "user", "content": []}], "{{ messages.append(1) }}")
    with pytest.raises(ValueError, match="Chat template failed"):
        render_chat([{"role": "user", "content": []}], "{% for %}")


@pytest.mark.parametrize("bad", ["hello", {"role": "user"}, [["nested"]], [1, 2]])
def test_conversation_must_be_a_list_of_dicts(bad: object) -> None:
    with pytest.raises(ValueError, match="list of message dicts"):
        render_chat(bad)  # type: ignore[arg-type]


@pytest.mark.oracle
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, WHITESPACE_TEMPLATE])
def test_rendering_matches_transformers(template: str, add_generation_prompt: bool) -> None:
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be <brief> & kind."}]},
        *SPEC_MESSAGES,
    ]
    theirs, _ = render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=add_generation_prompt, bos_token="<s>"
    )
    assert (
        render_chat(messages, template, add_generation_prompt=add_generation_prompt, bos_token="<s>")
        == theirs[0]
    )


@pytest.fixture(scope="module")
def processor() -> Idefics2Processor:
    return Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)


@pytest.fixture(scope="module")
def oracle() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)


def test_chat_template_lookup_order(tmp_path: Path) -> None:
    shutil.copytree(HUB_LIKE_TOKENIZER, tmp_path / "p")
    folder = tmp_path / "p"
    (folder / "chat_template.jinja").write_text("jinja")
    assert Idefics2Processor.from_pretrained(folder).chat_template != "jinja"  # chat_template.json first
    (folder / "chat_template.json").unlink()
    assert Idefics2Processor.from_pretrained(folder).chat_template == "jinja"
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "from tokenizer"}))
    assert Idefics2Processor.from_pretrained(folder).chat_template == "from tokenizer"
    (folder / "processor_config.json").write_text(
        json.dumps({"image_seq_len": 64, "chat_template": "from proc"})
    )
    assert Idefics2Processor.from_pretrained(folder).chat_template == "from proc"
    (folder / "processor_config.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    fallback = Idefics2Processor.from_pretrained(folder)
    assert fallback.image_seq_len == 64 and fallback.apply_chat_template(SPEC_MESSAGES) == SPEC_RENDERED


CONVERSATIONS = {
    "spec": SPEC_MESSAGES,
    "system_and_multi_image": [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Why"}, {"type": "image"}, {"type": "text", "text": "?"}],
        },
    ],
    "plain_string_content": [{"role": "user", "content": "Hello"}],
}


@pytest.mark.oracle
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_transformers(
    processor: Idefics2Processor, oracle: Any, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    theirs = oracle.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == theirs
    batch = [messages, SPEC_MESSAGES]
    assert processor.apply_chat_template(
        batch, add_generation_prompt=add_generation_prompt
    ) == oracle.apply_chat_template(batch, add_generation_prompt=add_generation_prompt)


def test_named_chat_templates_round_trip_both_ways(tmp_path: Path) -> None:
    """A named (dict) template saved with save_pretrained reloaded as the text of the dict before."""
    transformers = pytest.importorskip("transformers")
    named = {"default": "{{ 'plain:' }}{{ messages[0]['content'] }}",
             "tool_use": "{{ 'tool:' }}{{ messages[0]['content'] }}"}
    processor = Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)
    processor.chat_template = named
    processor.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "chat_template.jinja").is_file()
    assert (tmp_path / "ours" / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert not (tmp_path / "ours" / "chat_template.json").exists()
    again = Idefics2Processor.from_pretrained(tmp_path / "ours")
    reference = transformers.Idefics2Processor.from_pretrained(tmp_path / "ours")
    assert again.chat_template == named == reference.chat_template
    messages = [{"role": "user", "content": "hi"}]
    for name in (None, "tool_use"):
        assert again.apply_chat_template(messages, chat_template=name) == reference.apply_chat_template(
            messages, chat_template=name)
    reference.save_pretrained(tmp_path / "theirs")
    assert Idefics2Processor.from_pretrained(tmp_path / "theirs").chat_template == named
    # a save over an older 4.x folder must not leave its chat_template.json to win at the next load
    shutil.copytree(HUB_LIKE_TOKENIZER, tmp_path / "old")
    again.save_pretrained(tmp_path / "old")
    assert Idefics2Processor.from_pretrained(tmp_path / "old").chat_template == named


def test_a_dict_in_chat_template_json_is_read_as_named_templates(tmp_path: Path) -> None:
    shutil.copytree(HUB_LIKE_TOKENIZER, tmp_path / "p")
    named = {"chat_template": {"default": "A", "b": "B"}}
    (tmp_path / "p" / "chat_template.json").write_text(json.dumps(named))
    assert Idefics2Processor.from_pretrained(tmp_path / "p").chat_template == {"default": "A", "b": "B"}
    (tmp_path / "p" / "chat_template.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ValueError, match="chat_template must be a string or a non-empty"):
        Idefics2Processor.from_pretrained(tmp_path / "p")
    no_default = Idefics2Processor.from_pretrained(HUB_LIKE_TOKENIZER)
    no_default.chat_template = {"b": "B"}
    with pytest.raises(ValueError, match=r"named \['b'\], none 'default'"):
        no_default.apply_chat_template([{"role": "user", "content": "x"}])

"""Hostile chat templates: every failure is a ValueError naming the chat template, and the work and
the output of a render are bounded (a template can be slow or huge on purpose)."""

from __future__ import annotations

import time

import pytest

from idefics2.processing.chat_template import render_chat

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     r"Chat template failed: the chat template's loops ran over 1000000 range steps"),
    ("{{ 'x' * 10**9 }}", r"builds a value of 1000000000 items, more than the 1000000 allowed"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     r"builds a value of over 1000000 items"),
    ("{{ 7 ** 100000000 }}", r"computes 7 \*\* 100000000, too large a number"),
    ("{% for i in range(300) %}{{ 'y' * 5000 }}{% endfor %}", r"output is over 1000000 characters"),
    ("{{ 1/0 }}", r"Chat template failed: ZeroDivisionError"),
    ("{{ (2.0 ** 60) ** 60 }}", r"Chat template failed: OverflowError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", r"Chat template failed: RecursionError"),
    ("{{ int('x') }}", r"Chat template failed"),
    ("{{ messages.__class__ }}{{ ''.__class__.__mro__ }}", r"Chat template failed"),
    ("{% for %}", r"Chat template failed"),
])
def test_hostile_templates_fail_fast_with_a_value_error(template: str, message: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        render_chat(MESSAGES, template)
    assert time.perf_counter() - start < 6


def test_the_templates_own_exception_keeps_its_words_and_good_templates_render() -> None:
    with pytest.raises(ValueError, match=r"^Chat template error: roles must alternate$"):
        render_chat(MESSAGES, "{{ raise_exception('roles must alternate') }}")
    assert render_chat(MESSAGES, add_generation_prompt=True) == "User: hi<end_of_utterance>\nAssistant:"
    assert render_chat(MESSAGES, "{% for i in range(3) %}{{ i }}{% endfor %}") == "012"

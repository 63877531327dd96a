"""From the engine's token events to OpenAI's choices: text deltas, log-probabilities, finish reasons.

One `Choice` per sample of a request. The text goes through `IncrementalText` with the chat
answer's whitespace rule, so a streamed answer's deltas join to exactly the non-streamed content,
stop strings included (the text ends before the stop string, as in OpenAI's API).
"""

from __future__ import annotations

from typing import Any

from idefics2.generation.engine import TokenEvent
from idefics2.generation.streaming import IncrementalText


def token_text(tokenizer: Any, context: list[int], token: int) -> tuple[str, list[int]]:
    """The text `token` adds after the `context` ids (its last few tokens), and its UTF-8 bytes:
    what OpenAI's logprobs show, for SentencePiece and byte-level vocabularies alike."""
    before = tokenizer.decode(context, skip_special_tokens=False)
    text = tokenizer.decode([*context, token], skip_special_tokens=False)
    text = text[len(before):] if text.startswith(before) else tokenizer.decode([token], skip_special_tokens=False)
    return text, list(text.encode("utf-8", errors="replace"))


class Choice:
    def __init__(self, index: int, tokenizer: Any, stop_strings: list[str], logprobs: int | None) -> None:
        self.index, self.tokenizer, self.want_logprobs = index, tokenizer, logprobs
        self.text = IncrementalText(tokenizer, skip_special_tokens=True, stop_strings=stop_strings, strip=True)
        self.content: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def add(self, event: TokenEvent) -> tuple[str, list[dict[str, Any]]]:
        """The event's new text (possibly "") and its log-probability entries (possibly none)."""
        self.completion_tokens += 1
        piece = self.text.add([event.token])
        entries = []
        if event.logprob is not None and not self.text.stopped:
            entries.append(self._entry(event))
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            piece += self.text.finish()
        self.content.append(piece)
        self.logprobs.extend(entries)
        return piece, entries

    def _entry(self, event: TokenEvent) -> dict[str, Any]:
        context = self.text.tokens[-5:-1]  # the tokens before this one
        text, raw = token_text(self.tokenizer, context, event.token)
        top = []
        for token, logprob in event.top_logprobs or []:
            t, b = token_text(self.tokenizer, context, token)
            top.append({"token": t, "logprob": logprob, "bytes": b})
        return {"token": text, "logprob": event.logprob, "bytes": raw, "top_logprobs": top}

    def message(self) -> dict[str, Any]:
        """The non-streamed choice."""
        return {"index": self.index, "message": {"role": "assistant", "content": "".join(self.content)},
                "logprobs": {"content": self.logprobs} if self.want_logprobs is not None else None,
                "finish_reason": self.finish_reason}

    def delta(self, piece: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """A streamed chunk's choice (the finish reason on the last one)."""
        out: dict[str, Any] = {"index": self.index, "delta": {"content": piece} if piece else {},
                               "finish_reason": self.finish_reason}
        if self.want_logprobs is not None:
            out["logprobs"] = {"content": entries}
        return out


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}

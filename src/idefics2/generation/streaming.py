"""Streaming decoded text out of `generate`: an iterator of text pieces for one sequence.

`generate` calls `put(token_ids)` (the prompt first, then each new token) and `end()`, the same
protocol as transformers' streamers, so either side's streamer works with the other's generate.
Pieces are safe to show at once: a piece never ends inside a multi-byte character (text ending
in U+FFFD waits for more tokens) and never contains the start of a stop string that may still
complete (it is held back; a completed stop string and what follows are never emitted).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from torch import Tensor

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Any, skip_special_tokens: bool = ...) -> str: ...


def held_back_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = min(len(text), max((len(s) - 1 for s in stop_strings), default=0))
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stop_strings):
            return k
    return 0


class IncrementalText:
    """Token ids in, text pieces out, each safe to show at once (see the module docstring).

    `add(ids)` returns the new piece ("" when everything new is held back), `finish()` the rest.
    `stopped` turns True once a stop string completed; the text then ends before it. With
    `strip=True` (a chat answer) leading whitespace is dropped and trailing whitespace is held
    back until more text follows, so the joined pieces equal the stripped final text whether a
    client streams or not.
    """

    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = True,
                 stop_strings: Sequence[str] = (), strip: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings: list[str] = list(stop_strings)
        self.strip = strip
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.start = 0  # characters of leading whitespace skipped (strip=True)
        self.stopped = False

    def add(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.tokens.extend(ids)
        return self._emit(final=False)

    def finish(self) -> str:
        return "" if self.stopped else self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
        if self.strip and self.emitted == self.start:
            self.start = self.emitted = len(text) - len(text.lstrip())
        search_from = max(self.start, self.emitted - max((len(s) for s in self.stop_strings), default=0))
        hits = [i for i in (text.find(s, search_from) for s in self.stop_strings if s) if i >= 0]
        if hits:
            end = max(min(hits), self.emitted)
            self.stopped = True
        elif final:
            end = len(text)
        else:
            # Trailing U+FFFD is (usually) a character whose remaining bytes are still to come.
            end = len(text.rstrip(REPLACEMENT_CHAR))
            end -= held_back_length(text[self.emitted:end], self.stop_strings)
        if self.strip:  # trailing whitespace: dropped at the end, held back until then
            end = self.emitted + len(text[self.emitted:end].rstrip())
        piece = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


class TextIteratorStreamer:
    """Iterate over decoded pieces while (or after) `generate` runs; batch size 1 only.

    Args:
        tokenizer: anything with `decode(ids, skip_special_tokens=...)`.
        skip_prompt: drop the first `put` (the prompt), so only new text is streamed.
        skip_special_tokens: passed to `decode` (EOS and image tokens vanish from the text).
        stop_strings: text after which nothing is emitted; `generate(stop_strings=...)` adds its own.
        timeout: seconds `next()` waits for a piece before `queue.Empty` (None = forever).

    Use in the same thread (`generate(..., streamer=s)` then `for piece in s`) or run
    `generate` in a thread and consume as pieces arrive; `generate` always calls `end()`, even
    when it raises, so a consumer never waits forever.
    """

    _END = object()

    def __init__(self, tokenizer: Decoder, *, skip_prompt: bool = True, skip_special_tokens: bool = True,
                 stop_strings: Sequence[str] = (), timeout: float | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings: list[str] = list(stop_strings)
        self.timeout = timeout
        self._queue: queue.Queue[Any] = queue.Queue()
        self._reset()

    def _reset(self) -> None:
        self._text = IncrementalText(self.tokenizer, skip_special_tokens=self.skip_special_tokens,
                                     stop_strings=self.stop_strings)
        self._awaiting_prompt = self.skip_prompt

    def add_stop_strings(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings.extend(s for s in stop_strings if s not in self.stop_strings)
        self._text.stop_strings = list(self.stop_strings)

    def put(self, value: Tensor) -> None:
        """Receive token ids: shape (T,), (1, T) or (1,)."""
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError(f"TextIteratorStreamer supports batch size 1, got ids of shape "
                             f"{tuple(value.shape)}")
        if self._awaiting_prompt:
            self._awaiting_prompt = False
            return
        self._put_piece(self._text.add(value.reshape(-1).tolist()))

    def end(self) -> None:
        """Flush what was held back (the sequence is complete, so nothing more can change it)."""
        self._put_piece(self._text.finish())
        self._queue.put(self._END)
        self._reset()

    def _put_piece(self, piece: str) -> None:
        if piece:
            self._queue.put(piece)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        piece = self._queue.get(timeout=self.timeout)
        if piece is self._END:
            raise StopIteration
        return piece

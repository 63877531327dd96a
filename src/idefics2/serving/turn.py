"""One assistant turn from chat messages: template -> processor -> `generate` in a thread -> text pieces.

Shared by the CLI (prints the pieces) and the server (sends them as events), so both stop at the
same tokens, strip the same whitespace and count tokens the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from idefics2.generation.streaming import TextIteratorStreamer


@dataclass
class TurnResult:
    """What a finished turn produced; `finish_reason` is "stop" (EOS or a stop string) or "length"."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class TurnCancelled(Exception):
    """Raised inside `generate` (from the streamer) when the reader of a turn went away."""


class _CancellableStreamer(TextIteratorStreamer):
    cancelled = False

    def put(self, value: Any) -> None:
        if self.cancelled:
            raise TurnCancelled
        super().put(value)


class AssistantTurn:
    """Iterate for the answer's text pieces as they are generated; `result` is set once iteration ends.

    The prompt is built and processed in the constructor, so bad messages or images raise there,
    before any generation starts. `generate_kwargs` go to `model.generate` (max_new_tokens,
    do_sample, temperature, top_k, top_p, seed, stop_strings, ...); the turn ends at
    `<end_of_utterance>` or `</s>`. Leading whitespace of the answer is dropped (the chat
    template leaves a space after "Assistant:" to the model). Closing the iterator early (a
    client that disconnects) stops generation at the next token and waits for it to end.
    """

    def __init__(self, model: Any, processor: Any, messages: list[dict[str, Any]], images: Sequence[Any],
                 **generate_kwargs: Any) -> None:
        self.model = model
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        self.inputs = processor(images=list(images) or None, text=prompt).to(device=model.device)
        self.prompt_tokens = int(self.inputs["input_ids"].shape[1])  # image tokens included
        stops = generate_kwargs.pop("stop_strings", None) or []
        self.streamer = _CancellableStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        eos = [processor.end_of_utterance_id, processor.tokenizer.eos_token_id]
        self.eos = [i for i in eos if i is not None]
        self.kwargs = {"eos_token_id": self.eos, "streamer": self.streamer, **generate_kwargs}
        if stops:
            self.kwargs.update(stop_strings=list(stops), tokenizer=processor.tokenizer)
        self.result: TurnResult | None = None

    def __iter__(self) -> Iterator[str]:
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["ids"] = self.model.generate(**self.inputs, **self.kwargs)
            except BaseException as err:  # re-raised in the consuming thread
                outcome["error"] = err
                self.streamer.end()  # a failure before the first token must not leave the reader waiting

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces: list[str] = []
        try:
            for piece in self.streamer:
                if not pieces:
                    piece = piece.lstrip()
                    if not piece:
                        continue
                pieces.append(piece)
                yield piece
        finally:
            self.streamer.cancelled = worker.is_alive()  # only if the reader left before the end
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        new_ids = outcome["ids"][0, self.prompt_tokens:].tolist()
        max_new = self.kwargs.get("max_new_tokens")
        stopped = bool(new_ids) and new_ids[-1] in self.eos
        length = max_new is not None and len(new_ids) >= max_new and not stopped
        self.result = TurnResult("".join(pieces).rstrip(), self.prompt_tokens, len(new_ids),
                                 "length" if length else "stop")

    def run(self) -> TurnResult:
        """Generate without consuming pieces one by one."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

"""Continuous batching: one scheduler thread owns the model and serves many requests at once.

Requests wait in a bounded queue. Between two decode steps the scheduler admits one waiting
request: its images are encoded (through the vision-feature cache), its prompt prefilled alone
into a free slot of the `SlotKVCache`, its first token chosen; it then decodes together with the
others, one token per running sequence per step. A finished or cancelled sequence leaves at the
next step boundary and frees its slot. `n` samples of one request share its image features and
its prefill (the cache row is copied).

Per-sequence work (the logits processors, a constraint's matcher, sampling, stop checks) runs row
by row with the same functions as `generate`, so a sequence's tokens do not depend on which
others share its steps; greedy output equals the request run alone. Events go to each request's
`on_event` callback, from the scheduler thread: the caller hands them to its own thread or event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from idefics2.generation.constraints import CompiledConstraint, ConstraintProcessor
from idefics2.generation.sampling import LogitsProcessor, TokenRules, choose_tokens, filter_logits
from idefics2.generation.slot_cache import SlotKVCache
from idefics2.generation.steps import compile_decode_step, decode_step, prefill
from idefics2.generation.streaming import Decoder
from idefics2.generation.vision_cache import VisionFeatureCache

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """`Engine.submit` when `max_queue` requests already wait (a server answers 429)."""


@dataclass
class SamplingParams:
    """How one request's sequences are decoded. temperature 0 = greedy; top_k 0 = off."""

    max_new_tokens: int
    eos_token_ids: Sequence[int] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # EOS is banned before this many tokens
    seed: int | None = None
    stop_strings: Sequence[str] = ()
    n: int = 1
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    logits_processors: Callable[[], Sequence[LogitsProcessor]] | None = None  # a fresh list per sequence
    constraint: CompiledConstraint | None = None  # each sequence follows it with a matcher of its own


@dataclass
class TokenEvent:
    """One new token of sequence `index` (0..n-1). `finish_reason` is set on the sequence's last
    event: "stop" (EOS or a stop string), "length", or "error" with `error` (token -1 then).
    `logprob` / `top_logprobs` ([(id, log-probability)], most likely first) when asked for: the
    log-softmax of the model's logits, before any processing (vLLM's default)."""

    index: int
    token: int
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None


@dataclass
class EngineRequest:
    input_ids: Tensor  # (1, T)
    params: SamplingParams
    on_event: Callable[[TokenEvent], None]
    pixel_values: Tensor | None = None  # (1, M, 3, H, W)
    pixel_attention_mask: Tensor | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop decoding this request at the next step boundary (no further events)."""
        self.cancelled = True


@dataclass
class _Sequence:
    request: EngineRequest
    index: int
    rules: TokenRules
    tokens: list[int]  # prompt and generated
    prompt_len: int

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def length(self) -> int:
        """Positions held in the cache: every token but the last chosen one, which the next step feeds."""
        return len(self.tokens) - 1


class Engine:
    """Serve `EngineRequest`s with continuous batching on `model` (an `Idefics2ForConditionalGeneration`).

    `max_batch_size` sequences decode together at most, each up to `max_model_len` tokens (prompt
    included); the cache for both is allocated up front. `tokenizer` (anything with `decode`) is
    needed only for stop strings; `vision_cache` keeps image features across requests; `compile`
    runs the decode step through `torch.compile`. Call `close()` to stop the scheduler thread.
    """

    def __init__(self, model: nn.Module, *, max_batch_size: int = 16, max_model_len: int | None = None,
                 max_queue: int = 256, tokenizer: Decoder | None = None,
                 vision_cache: VisionFeatureCache | None = None, compile: bool = False) -> None:
        text_config = model.config.text_config
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_model_len = min(max_model_len or text_config.max_position_embeddings,
                                 text_config.max_position_embeddings)
        self.sliding_window = text_config.sliding_window
        self.vocab_size = text_config.vocab_size
        weight = model.get_input_embeddings().weight
        self.cache = SlotKVCache(text_config.num_hidden_layers, max_batch_size, self.max_model_len,
                                 text_config.num_key_value_heads, text_config.attention_head_dim,
                                 weight.dtype, weight.device)
        self.vision_cache = vision_cache
        self._decode = compile_decode_step() if compile else decode_step
        self.device = weight.device
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[_Sequence] = []  # sequence i lives in cache slot i
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="idefics2-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ public
    def submit(self, request: EngineRequest) -> EngineRequest:
        """Queue `request` (checked by the caller: prompt + max_new_tokens within max_model_len)."""
        prompt_len = request.input_ids.shape[1]
        if prompt_len + request.params.max_new_tokens > self.max_model_len:
            raise ValueError(f"the prompt takes {prompt_len} tokens and max_new_tokens is "
                             f"{request.params.max_new_tokens}: more than max_model_len {self.max_model_len}")
        if not 1 <= request.params.n <= self.max_batch_size:
            raise ValueError(f"n must be between 1 and max_batch_size ({self.max_batch_size}), "
                             f"got {request.params.n}")
        if request.params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need an engine built with a tokenizer")
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (max_queue)")
            self.waiting.append(request)
            self._wake.notify()
        return request

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def cache_usage(self) -> float:
        """Fraction of the KV cache's positions held by running sequences."""
        return sum(s.length for s in self.running) / (self.cache.slots * self.cache.max_len)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    # --------------------------------------------------------------------------- scheduler
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.waiting and not self.running:
                    self._wake.wait()
                if self._closed:
                    return
                request = self._next_admissible()
            with torch.inference_mode():
                if request is not None:
                    self._admit(request)
                self._drop_cancelled()
                if self.running:
                    self._step()

    def _next_admissible(self) -> EngineRequest | None:
        """The first waiting request, if its `n` sequences fit in the free slots (called locked)."""
        if any(r.cancelled for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        if self.waiting and len(self.running) + self.waiting[0].params.n <= self.max_batch_size:
            return self.waiting.popleft()
        return None

    def _admit(self, request: EngineRequest) -> None:
        """Encode the images, prefill into the next free slot, copy it for siblings, choose each
        sequence's first token."""
        try:
            params = request.params
            if params.seed is not None:
                request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
            input_ids = request.input_ids.to(self.device)
            features = None
            if request.pixel_values is not None:
                features = self.model.get_image_features(request.pixel_values.to(self.device),
                                                         _to(request.pixel_attention_mask, self.device),
                                                         self.vision_cache)
            first = len(self.running)
            logits, _ = prefill(self.model, input_ids, None, features, self.cache.prefill_view(first))
        except Exception as err:  # a request that cannot run fails alone
            _send(request, TokenEvent(0, -1, "error", error=f"{type(err).__name__}: {err}"))
            return
        T = input_ids.shape[1]
        mask = torch.ones_like(input_ids)
        for i in range(params.n):
            if i:
                self.cache.copy(first, first + i, T)
            extra = list(params.logits_processors()) if params.logits_processors else []
            constraint = None
            if params.constraint is not None:
                constraint = ConstraintProcessor.for_rows([params.constraint], params.eos_token_ids,
                                                          self.vocab_size)
            rules = TokenRules(input_ids, mask, self.vocab_size, repetition_penalty=params.repetition_penalty,
                               no_repeat_ngram_size=0, bad_words_ids=[], eos_ids=params.eos_token_ids,
                               min_new_tokens=params.min_new_tokens, extra=extra, constraint=constraint)
            self.running.append(_Sequence(request, i, rules, input_ids[0].tolist(), T))
        finished = [first + i for i in range(params.n) if not self._choose(first + i, logits)]
        self._remove(finished)

    def _step(self) -> None:
        """One token for every running sequence."""
        B = len(self.running)
        tokens = torch.tensor([[s.tokens[-1]] for s in self.running], device=self.device)  # (B, 1)
        lengths = torch.tensor([s.length for s in self.running], device=self.device)  # (B,)
        view = self.cache.step_view(lengths.clone())
        try:
            logits = self._decode(self.model, tokens, lengths[:, None], view.step_mask(self.sliding_window),
                                 view)  # (B, V)
        except Exception as err:  # the step failed for every row: fail them all, keep serving
            for s in self.running:
                _send(s.request, TokenEvent(s.index, -1, "error", error=f"{type(err).__name__}: {err}"))
            self.running.clear()
            return
        self._remove([b for b in range(B) if not self._choose(b, logits[b:b + 1])])

    def _choose(self, b: int, logits: Tensor) -> bool:
        """Pick sequence b's next token from its logits (1, V), send the event; False once it ends."""
        seq = self.running[b]
        request, params = seq.request, seq.request.params
        try:
            history = torch.tensor([seq.tokens], device=self.device) if seq.rules.extra else None
            scores = seq.rules(history, logits, seq.generated)  # type: ignore[arg-type]
            sampling = params.temperature > 0
            if sampling:
                scores = filter_logits(scores, params.temperature, params.top_k, params.top_p, params.min_p)
            token = int(choose_tokens(scores, sampling, request.generator))
        except Exception as err:  # e.g. a caller's logits processor: this sequence fails alone
            _send(request, TokenEvent(seq.index, -1, "error", error=f"{type(err).__name__}: {err}"))
            return False
        seq.rules.record(torch.tensor([token], device=self.device))
        seq.tokens.append(token)
        event = TokenEvent(seq.index, token)
        if params.logprobs is not None:
            logprobs = logits[0].log_softmax(dim=-1)
            event.logprob = float(logprobs[token])
            if params.logprobs:
                top = torch.topk(logprobs, params.logprobs)
                event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        if token in params.eos_token_ids or self._hits_stop(seq):
            event.finish_reason = "stop"
        elif seq.generated >= params.max_new_tokens:  # `submit` keeps this within max_model_len
            event.finish_reason = "length"
            if seq.rules.constraint is not None and seq.rules.constraint.incomplete():
                logger.warning("a sequence reached max_new_tokens=%d before its constraint's grammar was "
                               "complete: its answer is cut short (finish reason 'length')", params.max_new_tokens)
        _send(request, event)
        return event.finish_reason is None

    def _hits_stop(self, seq: _Sequence) -> bool:
        stops = seq.request.params.stop_strings
        if not stops:
            return False
        assert self.tokenizer is not None
        text = self.tokenizer.decode(seq.tokens[seq.prompt_len:], skip_special_tokens=False)
        return any(s in text for s in stops)

    def _drop_cancelled(self) -> None:
        self._remove([b for b, s in enumerate(self.running) if s.request.cancelled])

    def _remove(self, rows: list[int]) -> None:
        """Free the slots of `rows`, moving the last running sequence into each freed slot."""
        for b in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if b != last:
                self.cache.copy(last, b, self.running[last].length)
                self.running[b] = self.running[last]
            self.running.pop()


def _to(tensor: Tensor | None, device: torch.device) -> Tensor | None:
    return None if tensor is None else tensor.to(device)


def _send(request: EngineRequest, event: TokenEvent) -> None:
    """Hand `event` to the request's callback; a failing consumer cancels its request, nothing more."""
    try:
        request.on_event(event)
    except Exception:
        request.cancel()

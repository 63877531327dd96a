"""Autoregressive generation: image features once, one prefill, then cached one-token steps.

Data flow, through the model's stages only: (input_ids, pixels) -> `get_image_features` (once
per request, cached per image) -> `embed_inputs` -> prefill `run_decoder`, filling a `KVCache`
sized prompt + max_new_tokens -> `compute_logits` -> decode steps (`decode_step`) with mask-aware
positions (docs/numerics.md §4.8-4.9) -> `sampling` -> ids. Must give the tokens of
transformers 5.24's `generate` (greedy; same processors and order when sampling). Rows that finish
leave the batch; the output pads them with `pad_token_id`, like the reference. A dict output with
hidden states or the cache keeps them instead, fed the pad token as the reference does, so those
cover every row (`outputs.keeps_every_row`). The call's inputs and options are checked and made
ready first, in `request`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from idefics2.generation.beam_search import beam_search, check_beam_options
from idefics2.generation.checks import as_id_list, check_call_arguments, initial_cache_length
from idefics2.generation.config import GenerationConfig, check_unsupported, resolve
from idefics2.generation.constraints import Constraint, ConstraintProcessor
from idefics2.generation.outputs import GenerateOutput, StepRecorder, every_row, keeps_every_row
from idefics2.generation.request import (
    Plan,
    Streamer,
    compiled_constraints,
    prepared_embeds,
    prepared_inputs,
    random_source,
)
from idefics2.generation.sampling import LogitsProcessor, TokenRules, choose_tokens, filter_logits
from idefics2.generation.steps import compile_decode_step, decode_step, prefill
from idefics2.generation.streaming import Decoder, TextIteratorStreamer
from idefics2.generation.threads import ThreadTuner, check_decode_threads
from idefics2.generation.vision_cache import VisionFeatureCache
from idefics2.model.kv_cache import KVCache

logger = logging.getLogger(__name__)


def _hits_stop_string(tokenizer: Decoder, ids: list[int], stop_strings: list[str]) -> bool:
    """A stop string anywhere in the new text; checked after every token, so it ends with the last one."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return any(s in text for s in stop_strings)


class Generator:
    """Generation for one model, and what outlives a single call: the decode step (compiled once, on
    the first call that asks for it), the model's vision-feature cache and the thread tuner of CPU
    decode steps (`ThreadTuner`), which goes on learning from call to call. `model.generate` builds
    one on first use (`model.generator`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.vision_cache: VisionFeatureCache | None = VisionFeatureCache()  # None: no caching by default
        self._compiled_step: Callable[..., Tensor] | None = None
        self._thread_tuners: dict[int, ThreadTuner] = {}  # by torch's thread count at the call

    def step_function(self, compile: bool) -> Callable[..., Tensor]:
        """`decode_step`, or its `torch.compile`d form, compiled once for this generator."""
        if not compile:
            return decode_step
        if self._compiled_step is None:
            self._compiled_step = compile_decode_step()
        return self._compiled_step

    def thread_tuner(self, threads: int) -> ThreadTuner:
        """The tuner choosing between 1 and `threads` threads, kept for later calls."""
        if threads not in self._thread_tuners:
            self._thread_tuners[threads] = ThreadTuner([1, threads])
        return self._thread_tuners[threads]

    def vision_cache_for(self, choice: bool | VisionFeatureCache | None) -> VisionFeatureCache | None:
        """True: this generator's cache (`vision_cache`; set it to None to switch caching off for
        every call); False/None: no cache for this call; or a cache object to use."""
        if isinstance(choice, VisionFeatureCache):
            return choice
        return self.vision_cache if choice else None

    @torch.no_grad()
    def generate(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 pixel_values: Tensor | None = None, pixel_attention_mask: Tensor | None = None, *,
                 max_new_tokens: int | None = None, min_new_tokens: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, extra_eos_token_ids: Sequence[int] = (),
                 stop_strings: str | Sequence[str] | None = None,
                 bad_words_ids: Sequence[Sequence[int]] | None = None, pad_token_id: int | None = None,
                 bos_token_id: int | None = None, remove_invalid_values: bool | None = None,
                 inputs_embeds: Tensor | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 tokenizer: Decoder | None = None, streamer: Streamer | None = None,
                 output_scores: bool | None = None, output_logits: bool | None = None,
                 output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                 return_dict_in_generate: bool | None = None, num_return_sequences: int | None = None,
                 no_repeat_ngram_size: int | None = None, num_beams: int | None = None,
                 length_penalty: float | None = None, early_stopping: bool | str | None = None,
                 logits_processor: Sequence[LogitsProcessor] | None = None,
                 constraint: Constraint | Sequence[Constraint | None] | None = None, use_cache: bool = True,
                 compile: bool = False, vision_cache: bool | VisionFeatureCache | None = True,
                 decode_threads: int | None | str = "auto", **unsupported: Any) -> Tensor | GenerateOutput:
        """Prompt + new tokens (B, T + N) for `input_ids` (B, T) and optional images; without
        `input_ids`, each row starts from `bos_token_id` (batch size from the first tensor given).
        `inputs_embeds` (B, T, D) beside `input_ids`: the prompt's embeddings, used in the prefill
        instead of embedding the ids (which still place the images and begin the output).

        Unset arguments come from `model.generation_config`, then from the built-in defaults
        (`BUILTIN_DEFAULTS`: 20 new tokens, greedy) and the model config (EOS, pad, BOS). `eos_token_id`
        may be a list; `extra_eos_token_ids` adds to it (e.g. `<end_of_utterance>` for chat).
        `temperature=0` means greedy. `stop_strings` need `tokenizer` (anything with `decode`).
        Randomness comes from `generator`, or a new one seeded with `seed`, else torch's global RNG.
        `streamer` receives the prompt ids, then each step's new ids (B,) (`TextIteratorStreamer`:
        batch 1). `attention_mask` 0 hides a token (padding, normally on the left) from attention and
        from the positions.
        `compile=True` runs the decode step through `torch.compile`. Off by default because the
        first call compiles for up to a minute on a 2-core CPU (small config); after that a step
        takes 29 ms instead of 44 ms there (the ~300 small ops fuse into a few kernels; README), so it
        pays off for a server or a batch job, not for one question. Steps that record hidden states
        run uncompiled.
        `num_return_sequences` > 1 (sampling only): that many continuations per prompt, each
        prompt's rows together. `num_beams` > 1: beam search (`length_penalty`, `early_stopping`;
        `beam_search`), sampled with `do_sample=True`. `remove_invalid_values`: nan and inf scores
        become finite (transformers' `InfNanRemoveLogitsProcessor`).
        Dict output (`return_dict_in_generate`): `output_scores`, `output_logits`,
        `output_hidden_states`, `output_attentions` and the cache; see `GenerateOutput`.
        `logits_processor`: `LogitsProcessor`s (transformers' signature) run after the built-in rules.
        `constraint`: the answer follows a `Constraint` (`Constraint.json_schema(schema)`, `.regex`,
        `.choices`, `.grammar`), one for every row or a list with one (or None) per prompt; needs
        `tokenizer` (ours or a transformers fast one) and an EOS id, which the row takes as soon as
        its grammar is complete. A row that reaches `max_new_tokens` first is cut short, with a
        warning. One argument rather than one per kind: a list then means one per row for every
        kind, and two kinds at once cannot be asked for. Not with beam search.
        `no_repeat_ngram_size` n > 0: no n-gram occurs twice in a row's tokens (prompt included).
        `use_cache=False` gives the same tokens (decoding always uses the KV cache) and leaves the
        cache out of the dict output. `logits_to_keep` is accepted and has no effect.
        `vision_cache`: see `vision_cache_for`.
        `decode_threads`: torch intra-op threads for the CPU decode steps: "auto" times 1 and
        torch's setting and keeps the faster (`ThreadTuner`), an int fixes it, None leaves torch's
        setting; torch's setting is restored afterwards. With `compile=True`, "auto" keeps torch's
        setting: every thread count is a graph of its own (`fast_linear.linear`), compiled on first use.
        Other transformers options are refused by name (`config.check_unsupported`).
        """
        check_unsupported(unsupported)
        model = self.model
        extra_eos = check_call_arguments(model, seed, generator, extra_eos_token_ids, logits_processor,
                                         streamer, use_cache, compile, vision_cache)
        cfg = resolve(model, {
            "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "do_sample": do_sample,
            "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "repetition_penalty": repetition_penalty,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "bos_token_id": bos_token_id,
            "output_scores": output_scores, "output_logits": output_logits,
            "output_hidden_states": output_hidden_states, "output_attentions": output_attentions,
            "remove_invalid_values": remove_invalid_values, "num_return_sequences": num_return_sequences,
            "no_repeat_ngram_size": no_repeat_ngram_size, "num_beams": num_beams,
            "length_penalty": length_penalty, "early_stopping": early_stopping,
            "bad_words_ids": bad_words_ids, "return_dict_in_generate": return_dict_in_generate,
            "stop_strings": [stop_strings] if isinstance(stop_strings, str) else stop_strings,
        })
        eos_ids = list(dict.fromkeys(as_id_list(cfg.eos_token_id) + extra_eos))
        inputs = prepared_inputs(model, cfg, eos_ids, input_ids, attention_mask, pixel_values,
                                 pixel_attention_mask, inputs_embeds)
        embeds = prepared_embeds(model, inputs[0], inputs_embeds)
        plan = self._plan(cfg, eos_ids, inputs[0], embeds, constraint=constraint, tokenizer=tokenizer,
                          streamer=streamer, generator=generator, seed=seed,
                          logits_processor=logits_processor, use_cache=use_cache, compile=compile,
                          vision_cache=vision_cache, decode_threads=decode_threads)
        if int(cfg.num_beams) > 1:  # type: ignore[arg-type]
            return _run_beam_search(model, *inputs, plan)
        try:
            if streamer is not None:
                streamer.put(inputs[0].cpu())
            return _run(model, *inputs, plan)
        finally:
            if streamer is not None:
                streamer.end()

    def _plan(self, cfg: GenerationConfig, eos_ids: list[int], input_ids: Tensor,
              inputs_embeds: Tensor | None, *,
              constraint: Constraint | Sequence[Constraint | None] | None, tokenizer: Decoder | None,
              streamer: Streamer | None, generator: torch.Generator | None, seed: int | None,
              logits_processor: Sequence[LogitsProcessor] | None, use_cache: bool, compile: bool,
              vision_cache: bool | VisionFeatureCache | None, decode_threads: int | None | str) -> Plan:
        """The call's decoding options for the prepared `input_ids` (B, T), checked against each other
        (beam search, constraints, stop strings, threads) and joined with what this generator keeps
        (the compiled step, the vision cache, the thread tuner), so the loop only reads a `Plan`."""
        model = self.model
        if int(cfg.num_beams) > 1:  # type: ignore[arg-type]
            check_beam_options(cfg, streamer)
        constraints = compiled_constraints(model, constraint, tokenizer, cfg, input_ids.shape[0])
        stops = list(cfg.stop_strings or [])
        if stops and not callable(getattr(tokenizer, "decode", None)):
            raise ValueError("stop_strings need a tokenizer (with decode) to read new tokens: "
                             "pass tokenizer=")
        generator = random_source(generator, seed, model.device)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        sampling = bool(cfg.do_sample) and cfg.temperature != 0
        if isinstance(streamer, TextIteratorStreamer):
            streamer.add_stop_strings(stops)
        threads = check_decode_threads(decode_threads, model.device, compile)
        tuner = None
        if threads == "auto" and torch.get_num_threads() > 1:
            tuner = self.thread_tuner(torch.get_num_threads())
        return Plan(cfg, eos_ids, pad, sampling, stops, generator, tokenizer, streamer,
                    self.step_function(compile), self.vision_cache_for(vision_cache), threads, tuner,
                    list(logits_processor or []), use_cache, inputs_embeds, constraints)


def _run_beam_search(model: nn.Module, input_ids: Tensor, mask: Tensor, pixel_values: Tensor | None,
                     pixel_attention_mask: Tensor | None, plan: Plan) -> Tensor | GenerateOutput:
    """The validated request, each prompt repeated num_beams times, through `beam_search`."""
    features = None
    if pixel_values is not None:
        features = model.get_image_features(pixel_values, pixel_attention_mask, plan.vision_cache)
    rules = TokenRules.for_request(plan.cfg, plan.eos_ids, input_ids, mask,
                                   model.config.text_config.vocab_size, plan.logits_processor)
    record = StepRecorder(plan.cfg, plan.use_cache)
    found = beam_search(model, input_ids, mask, features, plan.cfg, plan.eos_ids, rules, record,
                        plan.sampling, plan.generator, plan.inputs_embeds)
    if not plan.cfg.return_dict_in_generate:
        return found.sequences
    out = GenerateOutput(sequences=found.sequences, sequences_scores=found.scores,
                         beam_indices=found.beam_indices)
    return record.fill(out, found.cache)


def _run(model: nn.Module, input_ids: Tensor, mask: Tensor, pixel_values: Tensor | None,
         pixel_attention_mask: Tensor | None, plan: Plan) -> Tensor | GenerateOutput:
    """The validated request: encode images, prefill, then decode until every row stops."""
    T = input_ids.shape[1]
    N = plan.cfg.max_new_tokens
    assert N is not None
    features = None
    if pixel_values is not None:
        # (R, L, D), computed once per request, before the prefill, never while decoding
        features = model.get_image_features(pixel_values, pixel_attention_mask, plan.vision_cache)
    cache = model.new_kv_cache(initial_cache_length(T, N, plan.step_fn is not decode_step))
    record = StepRecorder(plan.cfg, plan.use_cache)
    layers = record.layers()
    logits, next_positions = prefill(model, input_ids, mask, features, cache, layers, plan.inputs_embeds)
    del features
    threads = torch.get_num_threads()
    if isinstance(plan.decode_threads, int):
        torch.set_num_threads(plan.decode_threads)
    try:
        sequences = _decode(model, input_ids, mask, next_positions, (logits, layers), cache, plan, record)
    finally:
        torch.set_num_threads(threads)
    if not plan.cfg.return_dict_in_generate:
        return sequences
    out = record.fill(GenerateOutput(sequences=sequences), cache)
    if out.scores:
        stacked = torch.stack(out.scores, dim=1)  # (B, N_new, V)
        out.log_probs = stacked.log_softmax(dim=-1).gather(2, sequences[:, T:, None]).squeeze(2)  # (B, N_new)
    return out


def _live_to_batch(values: Tensor, *, live: Tensor, rows: Tensor, batch: int, pad: int) -> Tensor:
    """values (B_active, V) -> (batch, V): the rows still generating keep theirs (`every_row`)."""
    return every_row(values[live], rows[live], batch, pad)


def _warn_incomplete(rows: list[int], max_new_tokens: int) -> None:
    if rows:
        logger.warning("rows %s reached max_new_tokens=%d before their constraint's grammar was complete: "
                       "their answers are cut short (finish reason 'length'); raise max_new_tokens",
                       rows, max_new_tokens)


def _decode(model: nn.Module, input_ids: Tensor, mask: Tensor, next_positions: Tensor,
            first: tuple[Tensor, list[Tensor] | None], cache: KVCache, plan: Plan,
            record: StepRecorder) -> Tensor:
    """Choose a token from the prefill's logits (B, V), feed it, repeat; returns (B, T + N_new) ids,
    each step's scores, raw logits and hidden states (`first[1]`, the prefill's) into `record`.
    Finished rows leave the batch (and the cache), unless `keeps_every_row`: then they are fed the
    pad token."""
    cfg, device = plan.cfg, input_ids.device
    B, T = input_ids.shape
    N = cfg.max_new_tokens
    assert N is not None and cfg.min_new_tokens is not None
    logits, layers = first
    sequences = torch.full((B, T + N), plan.pad, dtype=torch.long, device=device)
    sequences[:, :T] = input_ids
    full_mask = torch.ones(B, T + N, dtype=torch.long, device=device)
    full_mask[:, :T] = mask
    rows = torch.arange(B, device=device)  # original row of each row still in the batch
    keep_all = keeps_every_row(cfg, plan.use_cache)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # with keep_all: rows that emit pad
    padded = not bool(mask.all())
    eos = torch.tensor(plan.eos_ids, dtype=torch.long, device=device)
    constraint = None
    if plan.constraints is not None:
        constraint = ConstraintProcessor.for_rows(plan.constraints, plan.eos_ids, logits.shape[-1])
    rules = TokenRules.for_request(cfg, plan.eos_ids, input_ids, mask, logits.shape[-1],
                                   plan.logits_processor, constraint)
    for step in range(N):
        scores = rules(sequences[rows, : T + step], logits, step)
        if plan.sampling:
            scores = filter_logits(scores, float(cfg.temperature), int(cfg.top_k), float(cfg.top_p))  # type: ignore[arg-type]
        tokens = choose_tokens(scores, plan.sampling, plan.generator)  # (B_active,)
        live = ~finished[rows]  # (B_active,)
        tokens = tokens.masked_fill(~live, plan.pad)
        sequences[rows, T + step] = tokens
        record.add(scores, logits, layers, functools.partial(_live_to_batch, live=live, rows=rows, batch=B,
                                                             pad=plan.pad))
        if plan.streamer is not None:
            plan.streamer.put(tokens.cpu())
        done = torch.isin(tokens, eos) | finished[rows]
        if plan.stops:
            assert plan.tokenizer is not None
            for i, row in enumerate(rows.tolist()):
                new_ids = sequences[row, T:T + step + 1].tolist()
                if not done[i] and _hits_stop_string(plan.tokenizer, new_ids, plan.stops):
                    done[i] = True
        rules.record(tokens)
        if keep_all and constraint is not None:
            constraint.end(done)  # rows kept in the batch after a stop string are fed padding
        if step == N - 1 and constraint is not None:
            _warn_incomplete([int(rows[i]) for i in constraint.incomplete() if not done[i]], N)
        if step == N - 1 or bool(done.all()):
            return sequences[:, : T + step + 1]
        if keep_all:
            finished = done
        elif bool(done.any()):  # finished rows stop costing compute
            keep = (~done).nonzero().squeeze(1)
            rows, tokens, next_positions = rows[keep], tokens[keep], next_positions[keep]
            full_mask = full_mask[keep]
            rules.select(keep)
            cache.select_rows(keep)
            padded = not bool(full_mask[:, :T].all())
        step_mask = full_mask[:, : T + step + 1] if padded else None
        layers = record.layers()
        tuner = plan.thread_tuner
        if tuner is not None:
            threads = tuner.pick()
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            start = time.perf_counter()
        step_fn = plan.step_fn if layers is None else functools.partial(decode_step, hidden_states=layers)
        logits = step_fn(model, tokens[:, None], next_positions, step_mask, cache)
        if tuner is not None:
            tuner.record(threads, time.perf_counter() - start)
        next_positions = next_positions + 1
    raise AssertionError("unreachable: the last step returns")

"""Beam search: the `num_beams` most probable continuations of each prompt, kept side by side.

Each step scores every (beam, token) pair by the beam's summed log-probability plus the token's,
keeps the best candidates, moves candidates that end (EOS or the length limit) into a store of
finished hypotheses scored with `length_penalty`, and continues the best unfinished ones. The
rules (how many candidates, when the search may stop early, which finished hypotheses are kept)
follow transformers 5.24's vectorised beam search, so the tokens are the same. Beam sampling
(`do_sample=True`) draws the candidates from the filtered distribution instead of taking the best,
as the reference does. Shape letters: B prompts, K beams, C candidates per prompt (at least 2K),
V vocabulary, S sequence length, N new tokens at most.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from idefics2.generation.config import GenerationConfig
from idefics2.generation.outputs import StepRecorder, keeps_every_row
from idefics2.generation.sampling import TokenRules, filter_logits, sampling_probabilities
from idefics2.generation.steps import decode_step, prefill
from idefics2.model.kv_cache import KVCache

_NEVER = -1.0e9  # the score of a candidate that must not be chosen


@dataclass
class Beams:
    """The search state of B prompts: running beams, and the best K finished hypotheses each."""

    running: Tensor  # (B, K, S) token ids
    running_scores: Tensor  # (B, K) summed log-probabilities
    finished: Tensor  # (B, K, S)
    finished_scores: Tensor  # (B, K) length-penalised scores, _NEVER where empty
    finished_lengths: Tensor  # (B, K) generated tokens of each finished hypothesis
    is_finished: Tensor  # (B, K) bool: a real hypothesis is stored there
    improvable: Tensor  # (B, 1) bool: a running beam may still beat the worst finished one
    running_origins: Tensor  # (B, K, N) int32: the flat beam row each token came from, -1 = none yet
    finished_origins: Tensor  # (B, K, N) int32, for the finished hypotheses


@dataclass
class BeamResult:
    """The best `num_return_sequences` (R <= K) hypotheses of each prompt, best first."""

    sequences: Tensor  # (B*R, T + N_max)
    scores: Tensor  # (B*R,) length-penalised
    beam_indices: Tensor  # (B*R, N_max) int32, transformers' `beam_indices`; -1 after a hypothesis ended
    cache: KVCache  # the running beams' keys and values, in the order of the last step's beams


def check_beam_options(cfg: GenerationConfig, streamer: object | None) -> None:
    """What beam search does not combine with, refused by name."""
    used = [name for name, on in (("stop_strings", bool(cfg.stop_strings)),
                                  ("streamer", streamer is not None)) if on]
    if used:
        raise ValueError(f"num_beams > 1 does not support {', '.join(used)}")


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor (B, N, ...) -> (B, M, ...) at index (B, M) along dim 1."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def beam_search(model: nn.Module, input_ids: Tensor, mask: Tensor, features: Tensor | None,
                cfg: GenerationConfig, eos_ids: list[int], rules: TokenRules, record: StepRecorder,
                sampling: bool = False, generator: torch.Generator | None = None,
                inputs_embeds: Tensor | None = None) -> BeamResult:
    """input_ids, mask (B*K, T): each prompt repeated K = cfg.num_beams times; features of the
    repeated images; `rules` the request's logits processors, applied to the log-probabilities,
    then with `sampling` the temperature / top-k / top-p filters. Each step's processed
    log-probabilities, raw logits and hidden states (B*K rows) go to `record`. `inputs_embeds`
    (B*K, T, D): the prompts' embeddings, when the caller gave them."""
    BK, T = input_ids.shape
    K = int(cfg.num_beams)  # type: ignore[arg-type]
    B = BK // K
    pad = cfg.pad_token_id
    length_penalty, early_stopping = float(cfg.length_penalty), cfg.early_stopping  # type: ignore[arg-type]
    N = int(cfg.max_new_tokens)  # type: ignore[arg-type]
    S = T + N
    device = input_ids.device
    V = model.config.text_config.vocab_size
    fill = (pad if pad else eos_ids[0]) if eos_ids else -1  # the reference's fill value
    C = max(2, 1 + len(eos_ids)) * K
    beams = _initial_beams(input_ids.view(B, K, T), S, fill)
    cache = model.new_kv_cache(S)
    layers = record.layers()
    logits, next_positions = prefill(model, input_ids, mask, features, cache, layers, inputs_embeds)  # (B*K, V)
    full_mask = torch.ones(BK, S, dtype=torch.long, device=device)
    full_mask[:, :T] = mask
    padded = not bool(mask.all())
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    returns_cache = keeps_every_row(cfg, record.use_cache)
    for step in range(N):
        history = beams.running[:, :, : T + step].reshape(BK, T + step)
        log_probs = rules(history, logits.log_softmax(dim=-1), step)  # the rules see log-probabilities
        if sampling:
            log_probs = filter_logits(log_probs, float(cfg.temperature), int(cfg.top_k),  # type: ignore[arg-type]
                                      float(cfg.top_p), min_tokens_to_keep=C // K)  # type: ignore[arg-type]
        record.add(log_probs, logits, layers)
        origin, tokens, candidate_scores, candidates, origins = _candidates(
            beams, log_probs.view(B, K, V), C, T + step, step, sampling, generator)
        ends = torch.isin(tokens, eos) | (T + step + 1 >= S)  # (B, C)
        _store_finished(beams, candidates, origins, candidate_scores, ends, K, step + 1, length_penalty,
                        early_stopping)
        running_scores = candidate_scores + ends.float() * _NEVER  # ended candidates run no further
        chosen = torch.topk(running_scores, k=K).indices  # (B, K)
        beams.running = _gather(candidates, chosen)
        beams.running_scores = _gather(running_scores, chosen)
        beams.running_origins = _gather(origins, chosen)
        parents = (_gather(origin, chosen) + torch.arange(B, device=device)[:, None] * K).view(BK)
        beams.improvable = _still_improvable(beams, step + 1, N, length_penalty, early_stopping)
        last = not _continues(beams, ends, early_stopping) or step == N - 1
        if not last or returns_cache:  # the returned cache holds the last step's beams, as the reference's
            cache.select_rows(parents)
        if last:
            break
        record.select(parents)
        new = beams.running[:, :, T + step].reshape(BK)
        rules.select(parents)
        rules.record(new)
        step_mask = full_mask[:, : T + step + 1] if padded else None
        layers = record.layers()
        logits = decode_step(model, new[:, None], next_positions, step_mask, cache, layers)
        next_positions = next_positions + 1
    R = int(cfg.num_return_sequences)  # type: ignore[arg-type]
    generated = int(beams.finished_lengths[:, :R].max())
    return BeamResult(beams.finished[:, :R, :T + generated].reshape(B * R, T + generated),
                      beams.finished_scores[:, :R].reshape(B * R),
                      beams.finished_origins[:, :R, :generated].reshape(B * R, generated), cache)


def _initial_beams(prompts: Tensor, S: int, fill: int) -> Beams:
    """The search state before the first step: prompts (B, K, T) in sequences of S tokens."""
    B, K, T = prompts.shape
    device = prompts.device
    sequences = torch.full((B, K, S), fill, dtype=torch.long, device=device)
    sequences[:, :, :T] = prompts
    origins = torch.full((B, K, S - T), -1, dtype=torch.int32, device=device)
    beams = Beams(running=sequences, running_scores=torch.zeros(B, K, device=device),
                  finished=sequences.clone(), finished_scores=torch.full((B, K), _NEVER, device=device),
                  finished_lengths=torch.zeros(B, K, dtype=torch.long, device=device),
                  is_finished=torch.zeros(B, K, dtype=torch.bool, device=device),
                  improvable=torch.ones(B, 1, dtype=torch.bool, device=device),
                  running_origins=origins, finished_origins=origins.clone())
    beams.running_scores[:, 1:] = _NEVER  # the K copies of a prompt must not all be continued alike
    return beams


def _candidates(beams: Beams, log_probs: Tensor, C: int, position: int, step: int, sampling: bool,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The C best (beam, token) continuations of each prompt, or with `sampling` C drawn
    without replacement from softmax of the summed log-probabilities and sorted best first: their
    beam (B, C), token (B, C), summed log-probability (B, C), sequences (B, C, S) with the token
    written at `position`, and origins (B, C, N) with the flat beam row written at `step`."""
    B, K, V = log_probs.shape
    totals = (log_probs + beams.running_scores[:, :, None]).view(B, K * V)
    if sampling:
        drawn = torch.multinomial(sampling_probabilities(totals), C, generator=generator)
        scores, order = totals.gather(1, drawn).sort(dim=-1, descending=True)
        flat = drawn.gather(1, order)
    else:
        scores, flat = torch.topk(totals, k=C)
    origin, tokens = flat // V, flat % V
    candidates = _gather(beams.running, origin)
    candidates[:, :, position] = tokens
    origins = _gather(beams.running_origins, origin)
    origins[:, :, step] = (origin + torch.arange(B, device=origin.device)[:, None] * K).to(origins.dtype)
    return origin, tokens, scores, candidates, origins


def _store_finished(beams: Beams, candidates: Tensor, origins: Tensor, scores: Tensor, ends: Tensor, K: int,
                    generated: int, length_penalty: float, early_stopping: bool | str) -> None:
    """Merge the candidates that end now (among the first K only) into the K best finished hypotheses,
    unless the prompt's store is closed (full with early_stopping=True) or cannot be improved."""
    B, C = scores.shape
    first_k = torch.arange(C, device=scores.device)[None, :] < K
    new = ends & first_k
    penalised = scores / (generated ** length_penalty)
    closed = torch.all(beams.is_finished, dim=-1, keepdim=True) & (early_stopping is True)
    # each reason adds its own _NEVER, as the reference does (the order of the refused ones follows it)
    penalised = (penalised + closed.float() * _NEVER + (~beams.improvable).float() * _NEVER
                 + (~new).float() * _NEVER)
    merged_scores = torch.cat([beams.finished_scores, penalised], dim=1)
    keep = torch.topk(merged_scores, k=K).indices
    beams.finished = _gather(torch.cat([beams.finished, candidates], dim=1), keep)
    beams.finished_scores = _gather(merged_scores, keep)
    beams.finished_origins = _gather(torch.cat([beams.finished_origins, origins], dim=1), keep)
    lengths = torch.full((B, C), generated, dtype=torch.long, device=scores.device)
    beams.finished_lengths = _gather(torch.cat([beams.finished_lengths, lengths], dim=1), keep)
    beams.is_finished = _gather(torch.cat([beams.is_finished, new], dim=1), keep)


def _still_improvable(beams: Beams, generated: int, max_new: int, length_penalty: float,
                      early_stopping: bool | str) -> Tensor:
    """Whether the best running beam could still beat the worst finished hypothesis (B, 1): with
    early_stopping="never" and a positive length penalty its best length is the longest allowed."""
    best_length = max_new if early_stopping == "never" and length_penalty > 0.0 else generated
    best_running = beams.running_scores[:, :1] / (best_length ** length_penalty)
    worst = beams.finished_scores.min(dim=1, keepdim=True).values
    worst_finished = torch.where(beams.is_finished, worst, _NEVER)
    return beams.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)


def _continues(beams: Beams, ends: Tensor, early_stopping: bool | str) -> bool:
    """The search goes on while some prompt can improve, some store is open (early_stopping=True) and
    some candidate (B, C) of this step has not ended."""
    improvable = bool(beams.improvable.any())
    open_store = not (bool(beams.is_finished.all()) and early_stopping is True)
    return improvable and open_store and not bool(ends.all())

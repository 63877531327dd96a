"""Next-token choice: logits processors (penalties, bans, minimum length) and sampling filters.

Last stage of each generation step: float32 logits of the last position (B, V) -> scores -> token
ids (B,). Order and arithmetic follow transformers 5.24's `generate` (repetition penalty, repeated
n-grams, bad words, min_new_tokens, invalid-value removal, the caller's processors; then, when
sampling, temperature, top-k, top-p) so that greedy choices and filtered distributions equal the
reference's. The rules
of one request are one `TokenRules`, shared by greedy, sampled and beam decoding (and open to
`LogitsProcessor`s of the caller); the rest are pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from idefics2.generation.config import GenerationConfig
from idefics2.generation.constraints import ConstraintProcessor


@dataclass
class BadWords:
    """Banned token sequences, split for speed: single tokens are a fixed mask, longer ones are
    matched against the end of each row's history (the prompt included, as the reference does)."""

    single: Tensor | None  # (V,) bool, True = never generate
    groups: list[tuple[Tensor, Tensor]]  # per prefix length k: prefixes (n, k), last tokens (n,)

    @classmethod
    def build(cls, bad_words_ids: Sequence[Sequence[int]], eos_ids: Sequence[int], vocab_size: int,
              device: torch.device) -> BadWords | None:
        # The reference drops a ban that is exactly one EOS id: it would make stopping impossible.
        sequences = [list(seq) for seq in bad_words_ids if not (len(seq) == 1 and seq[0] in eos_ids)]
        if not sequences:
            return None
        single = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        by_prefix: dict[int, list[list[int]]] = {}
        for seq in sequences:
            if len(seq) == 1:
                single[seq[0]] = True
            else:
                by_prefix.setdefault(len(seq) - 1, []).append(seq)
        groups = [(torch.tensor([s[:-1] for s in seqs], device=device), torch.tensor([s[-1] for s in seqs],
                                                                                      device=device))
                  for seqs in by_prefix.values()]
        return cls(single if bool(single.any()) else None, groups)

    def apply(self, scores: Tensor, history: Tensor) -> Tensor:
        """scores (B, V); history (B, S) every token so far. Banned next tokens get -inf."""
        if self.single is not None:
            scores = scores.masked_fill(self.single, float("-inf"))
        for prefixes, last in self.groups:
            k = prefixes.shape[1]
            if k > history.shape[1]:
                continue
            matches = (history[:, None, -k:] == prefixes).all(dim=-1)  # (B, n)
            bias = torch.zeros_like(scores)
            bias.index_add_(1, last, torch.where(matches, float("-inf"), 0.0).to(scores.dtype))
            scores = scores + bias
        return scores


def ban_repeated_ngrams(scores: Tensor, history: Tensor, n: int) -> Tensor:
    """scores (B, V); history (B, S) every token so far (padding included, as in the reference).
    A token that would repeat an n-gram already in its row's history gets -inf."""
    if n <= 0 or history.shape[1] + 1 < n:
        return scores
    banned = torch.zeros_like(scores, dtype=torch.bool)
    for b, row in enumerate(history.tolist()):
        prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
        for i in range(len(row) - n + 1):
            if tuple(row[i:i + n - 1]) == prefix:
                banned[b, row[i + n - 1]] = True
    return scores.masked_fill(banned, float("-inf"))


def seen_tokens(input_ids: Tensor, attention_mask: Tensor, vocab_size: int) -> Tensor:
    """(B, V) bool: which ids occur in each row of the prompt, left padding excluded.

    The reference penalises every id of the sequence after the first real token; a running mask
    updated with each new token gives the same set without rescanning the history every step.
    """
    first_real = attention_mask.int().argmax(dim=1, keepdim=True)  # (B, 1)
    keep = torch.arange(input_ids.shape[1], device=input_ids.device)[None] >= first_real
    seen = torch.zeros(input_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    # ids outside the output vocabulary and ignored positions land in a spare last column
    seen.scatter_(1, torch.where(keep, input_ids.clamp(max=vocab_size), vocab_size), True)
    return seen[:, :vocab_size]


def remove_invalid_values(scores: Tensor) -> Tensor:
    """nan -> 0, +inf / -inf -> the dtype's largest / smallest finite value (transformers'
    `InfNanRemoveLogitsProcessor`): banned ids then hold a huge negative score instead of -inf."""
    finfo = torch.finfo(scores.dtype)
    cleaned = torch.where(scores.isnan(), 0.0, scores)
    cleaned = torch.where(scores == float("inf"), finfo.max, cleaned)
    return torch.where(scores == float("-inf"), finfo.min, cleaned)


def apply_repetition_penalty(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Divide positive scores of already-seen ids by `penalty`, multiply negative ones (CTRL rule)."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


class LogitsProcessor(Protocol):
    """A rule on the next token, as transformers' logits processors take it: `input_ids` (B, S),
    every token of each row so far, prompt included; `scores` (B, V) -> new scores. Pass a list of
    them to `generate(logits_processor=[...])`; they run after the built-in rules, before sampling."""

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor: ...


class TokenRules:
    """The logits processors of one request in the reference's order: repetition penalty, repeated
    n-grams, bad words, min_new_tokens, invalid-value removal, then the caller's, then the
    constraint's mask (`constraints.ConstraintProcessor`: last, so no other rule can let a token
    outside the grammar back in). Greedy, sampled and beam decoding all
    run this one list. The repetition penalty keeps a per-row seen-token mask instead of rescanning
    the history, and the constraint a matcher per row: `record` each step's tokens and `select` the
    rows that go on (finished rows dropped, beams reordered)."""

    def __init__(self, input_ids: Tensor, mask: Tensor, vocab_size: int, *, repetition_penalty: float,
                 no_repeat_ngram_size: int, bad_words_ids: Sequence[Sequence[int]], eos_ids: Sequence[int],
                 min_new_tokens: int, extra: Sequence[LogitsProcessor] = (),
                 remove_invalid: bool = False, constraint: ConstraintProcessor | None = None) -> None:
        device = input_ids.device
        self.penalty = repetition_penalty
        self.seen = seen_tokens(input_ids, mask, vocab_size) if repetition_penalty != 1.0 else None
        self.ngram = no_repeat_ngram_size
        self.bans = BadWords.build(bad_words_ids, eos_ids, vocab_size, device)
        self.min_new_tokens = min_new_tokens if eos_ids else 0
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self.extra = list(extra)
        self.remove_invalid = remove_invalid
        self.constraint = constraint

    @classmethod
    def for_request(cls, cfg: GenerationConfig, eos_ids: Sequence[int], input_ids: Tensor, mask: Tensor,
                    vocab_size: int, extra: Sequence[LogitsProcessor] = (),
                    constraint: ConstraintProcessor | None = None) -> TokenRules:
        """The rules a resolved generation config asks for, on prompts `input_ids` (B, T) with `mask`."""
        penalty = float(cfg.repetition_penalty)  # type: ignore[arg-type]
        return cls(input_ids, mask, vocab_size, repetition_penalty=penalty,
                   no_repeat_ngram_size=int(cfg.no_repeat_ngram_size or 0),
                   bad_words_ids=cfg.bad_words_ids or [], eos_ids=eos_ids,
                   min_new_tokens=int(cfg.min_new_tokens or 0), extra=extra,
                   remove_invalid=bool(cfg.remove_invalid_values), constraint=constraint)

    def __call__(self, history: Tensor, scores: Tensor, step: int) -> Tensor:
        """history (B, S) every token so far; scores (B, V) of new token number `step` (from 0)."""
        if self.seen is not None:
            scores = apply_repetition_penalty(scores, self.seen, self.penalty)
        if self.ngram:
            scores = ban_repeated_ngrams(scores, history, self.ngram)
        if self.bans is not None:
            scores = self.bans.apply(scores, history)
        if step < self.min_new_tokens:
            scores = scores.index_fill(1, self.eos, float("-inf"))
        if self.remove_invalid:
            scores = remove_invalid_values(scores)
        for processor in self.extra:
            scores = processor(history, scores)
        if self.constraint is not None:
            scores = self.constraint.mask(scores)
        return scores

    def record(self, tokens: Tensor) -> None:
        """The tokens (B,) each row got this step."""
        if self.seen is not None:
            self.seen[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True
        if self.constraint is not None:
            self.constraint.record(tokens)

    def select(self, rows: Tensor) -> None:
        """Keep the rows `rows` (1-D index, repeats allowed), in that order."""
        if self.seen is not None:
            self.seen = self.seen[rows]
        if self.constraint is not None:
            self.constraint.select(rows)


def filter_logits(scores: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0, min_tokens_to_keep: int = 1) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus), then min-p, on scores (B, V); removed ids get -inf.

    Ties at the k-th score are all kept, top-p keeps the smallest set of highest-probability ids
    whose mass exceeds `top_p`, and min-p drops ids less likely than `min_p` times the most likely
    one, exactly as the reference's warpers do. Each filter keeps at least `min_tokens_to_keep` ids
    (beam sampling keeps one more than there are EOS ids, so a beam can always go on).
    """
    if temperature != 1.0:
        scores = apply_temperature(scores, temperature)
    if top_k > 0:
        k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted[..., -min_tokens_to_keep:] = False  # the most likely ids always stay
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    if min_p > 0.0:
        probs = scores.softmax(dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        if min_tokens_to_keep > 1:
            top = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
            remove = remove.scatter(-1, top, False)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def apply_temperature(scores: Tensor, temperature: float) -> Tensor:
    """scores / temperature (B, V), as the reference divides, made safe at the two limits.

    temperature = inf: -inf stays -inf (the reference's -inf / inf is nan), so banned ids stay
    banned and the rest are uniform. A temperature so small that a row overflows float32 (+inf or
    nan where the scores were finite, or every id -inf where some were not) gets its T -> 0 limit:
    the greedy choice, i.e. 0 on the row's highest scores and -inf elsewhere. Rows that do not
    overflow are exactly the reference's quotient.
    """
    scaled = scores / temperature
    if math.isinf(temperature):
        return torch.where(scores == float("-inf"), float("-inf"), scaled)
    invalid = scaled.isnan() | (scaled == float("inf"))
    was_invalid = scores.isnan() | (scores == float("inf"))
    all_banned = (scaled == float("-inf")).all(dim=-1) & ~(scores == float("-inf")).all(dim=-1)
    overflow = (invalid & ~was_invalid).any(dim=-1) | all_banned  # (B,)
    greedy = torch.where(scores == scores.amax(dim=-1, keepdim=True), 0.0, float("-inf")).to(scores.dtype)
    return torch.where(overflow[:, None], greedy, scaled)


def _unsampleable_reason(scores: Tensor, row: int) -> str:
    values = scores[row]
    if bool(values.isnan().any()):
        return ("some scores are nan (from the model's logits or a logits_processor); pass "
                "remove_invalid_values=True to replace them")
    if bool((values == float("inf")).any()):
        return ("some scores are +inf (a logits_processor, or a repetition_penalty so small that dividing "
                "by it overflows); pass remove_invalid_values=True to make them finite")
    return ("every token's score is -inf: bad_words_ids, min_new_tokens (which bans EOS), no_repeat_ngram_size "
            "or a logits_processor together ban the whole vocabulary")


def choose_tokens(scores: Tensor, do_sample: bool, generator: torch.Generator | None) -> Tensor:
    """(B, V) processed scores -> (B,) ids: argmax, or one draw from softmax(scores).

    Greedy takes the argmax even of a row that is all -inf (id 0, as transformers 5.24 does).
    Sampling a row with no valid distribution (all -inf, nan, or +inf scores) is a ValueError naming
    the cause; transformers 5.24 fails there inside `torch.multinomial` with a RuntimeError.
    """
    if not do_sample:
        return scores.argmax(dim=-1)
    return torch.multinomial(sampling_probabilities(scores), num_samples=1, generator=generator).squeeze(1)


def sampling_probabilities(scores: Tensor) -> Tensor:
    """softmax(scores) (B, N) to draw from; a row without a valid distribution (all -inf, nan or
    +inf scores) is a ValueError naming the cause, where `torch.multinomial` would raise its own."""
    probs = scores.softmax(dim=-1)
    broken = probs.isnan().any(dim=-1)  # softmax is nan exactly for rows without a distribution
    if bool(broken.any()):
        row = int(broken.nonzero()[0, 0])
        raise ValueError(f"cannot sample the next token of row {row}: {_unsampleable_reason(scores, row)}")
    return probs

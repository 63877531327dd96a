"""Constrained decoding: answers that follow a JSON schema, a regular expression, a list of choices
or a Lark grammar.

Before each token is chosen, the constraint's matcher (llguidance, imported only when a constraint
is used) gives the set of tokens that keep the text on the grammar; every other token's score
becomes -inf, after the other logits processors and before temperature, top-k and top-p, so a
sampled token is always allowed. Special tokens (`<image>`, `<end_of_utterance>`, ...) are never
allowed inside the text; the row's EOS ids are allowed exactly where the grammar may end, and
forced where it must. Tokens are matched as bytes, so a token may carry several characters of the
grammar or a part of one.

`Constraint` says what to follow (no llguidance needed to build one); `ConstraintCompiler` turns it
into matchers for one tokenizer (the llguidance tokenizer is built once per tokenizer and vocabulary,
about a second for a 32k vocabulary); `ConstraintProcessor` holds one matcher per row and masks
the scores (B, V). JSON is written compactly as `json.dumps` writes it (", " and ": ", no other
whitespace), which keeps answers short.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

KINDS = ("json_schema", "regex", "choices", "grammar")
# json.dumps' separators and no free whitespace: the answer reads like json.dumps' output
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
MAX_CHOICES = 10_000


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as err:  # a core dependency; only a broken install gets here
        raise ImportError(
            "constrained decoding needs the llguidance package (pip install llguidance)"
        ) from err
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What a row's answer must follow; build one with `json_schema`, `regex`, `choices` or `grammar`.

    `strict` (JSON schemas): True refuses a schema with keywords the matcher cannot enforce
    (`uniqueItems`, `if`/`then`, `not`, unknown formats, ...); False ignores those keywords (with a
    warning), so the answer follows the rest of the schema. `leading_space`: one optional space
    before the text, for chat answers, whose template leaves the space after "Assistant:" to the
    model (the chat text is stripped afterwards).
    """

    kind: str
    spec: Any
    strict: bool = True
    leading_space: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {list(KINDS)}, got {self.kind!r}")
        if not isinstance(self.strict, bool) or not isinstance(self.leading_space, bool):
            raise ValueError("strict and leading_space must be True or False")
        spec = self.spec
        if self.kind == "json_schema":
            if spec is False:
                raise ValueError("the JSON schema `false` matches no value: nothing can be generated")
            if not (spec is True or isinstance(spec, dict)):
                raise ValueError(
                    f"a JSON schema must be an object (a dict) or true, got {type(spec).__name__}"
                )
            try:
                json.dumps(spec, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"the JSON schema is not JSON: {err}") from None
        elif self.kind == "choices":
            if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec:
                raise ValueError(f"choices must be a non-empty list of strings, got {spec!r}"[:300])
            if len(spec) > MAX_CHOICES or not all(isinstance(c, str) and c for c in spec):
                raise ValueError(f"choices must be 1 to {MAX_CHOICES} non-empty strings")
        elif not isinstance(spec, str) or not spec:
            raise ValueError(f"a {self.kind} must be a non-empty string, got {spec!r}"[:300])

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, *, strict: bool = True) -> Constraint:
        """JSON that validates against `schema` (a dict; `true` allows any JSON value)."""
        return cls("json_schema", schema, strict)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Text that matches `pattern` as a whole (Rust `regex` syntax: no look-around, no backreferences)."""
        return cls("regex", pattern)

    @classmethod
    def choices(cls, options: Sequence[str]) -> Constraint:
        """Exactly one of `options`."""
        return cls("choices", tuple(options) if isinstance(options, list) else options)

    @classmethod
    def grammar(cls, lark: str) -> Constraint:
        """Text of a context-free grammar in llguidance's Lark syntax (rules, `start` first)."""
        return cls("grammar", lark)

    def describe(self) -> str:
        return {
            "json_schema": "JSON schema",
            "regex": "regular expression",
            "choices": "choice list",
            "grammar": "grammar",
        }[self.kind]

    def grammar_text(self) -> str:
        """The llguidance grammar (its JSON form): the constraint, behind an optional space if asked."""
        if self.kind == "json_schema":
            schema = {} if self.spec is True else self.spec
            options = {**schema.get("x-guidance", {}), **JSON_OPTIONS, "lenient": not self.strict}
            body: dict[str, Any] = {"json_schema": {**schema, "x-guidance": options}}
        elif self.kind == "regex":
            body = {"lark_grammar": "start: /" + _llguidance().regex_to_lark(self.spec) + "/"}
        elif self.kind == "choices":
            body = {"lark_grammar": "start: " + " | ".join(json.dumps(c) for c in self.spec)}
        else:
            body = {"lark_grammar": self.spec}
        if not self.leading_space:
            return json.dumps({"grammars": [body]})
        return json.dumps({"grammars": [{"lark_grammar": 'start: " "? @body'}, {"name": "body", **body}]})


def lark_grammar(text: str) -> str:
    """A grammar in Lark syntax, or in GBNF (llama.cpp's, `root ::= ...`, which vLLM's other backends
    take) converted to Lark by llguidance; a ValueError when the GBNF cannot be read."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a grammar must be a non-empty string")
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(text)
    except Exception as err:  # the converter raises bare Exceptions and assertion errors on bad GBNF
        raise ValueError(f"cannot read the GBNF grammar: {err}") from None


def tokenizer_json(tokenizer: Any) -> str:
    """The tokenizer.json text of our `Tokenizer`, a transformers fast one or a `tokenizers.Tokenizer`."""
    for backend in (
        getattr(tokenizer, "backend", None),
        getattr(tokenizer, "backend_tokenizer", None),
        tokenizer,
    ):
        if callable(getattr(backend, "to_str", None)):
            return backend.to_str()
    raise ValueError(
        f"a constraint needs a tokenizer with a tokenizers backend (tokenizer.json), got "
        f"{type(tokenizer).__name__}: pass tokenizer=processor.tokenizer"
    )


class ConstraintCompiler:
    """Constraints -> llguidance matchers for one tokenizer and a model with `vocab_size` logits.

    The llguidance tokenizer is built here once (keep the compiler: `compiler_for` caches one per
    tokenizer). Its own EOS is not used: `ConstraintProcessor` allows each request's EOS ids.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        ll = _llguidance()
        size = len(tokenizer)
        if size > vocab_size:
            raise ValueError(
                f"the tokenizer has {size} tokens but the model only {vocab_size} logits: "
                "they do not belong together"
            )
        self.vocab_size = vocab_size
        self.ll_tokenizer = ll.LLTokenizer(tokenizer_json(tokenizer), n_vocab=vocab_size)
        self._limits = ll.LLParserLimits(verbose_errors=False)

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """The checked grammar (~1 ms for a small schema); a ValueError naming the problem when it
        cannot be enforced. Keywords a lenient schema ignores are logged as a warning."""
        ll = _llguidance()
        if not isinstance(constraint, Constraint):
            raise ValueError(
                f"a constraint must be a Constraint (Constraint.json_schema(...), .regex(...), "
                f".choices(...), .grammar(...)), got {type(constraint).__name__}"
            )
        matcher = ll.LLMatcher(self.ll_tokenizer, constraint.grammar_text(), log_level=0, limits=self._limits)
        if matcher.is_error():
            raise ValueError(f"cannot enforce the {constraint.describe()}: {_clean(matcher.get_error())}")
        warnings = matcher.get_grammar_warnings()
        if warnings:
            logger.warning("%s: %s", constraint.describe(), "; ".join(_clean(w) for w in warnings))
        return CompiledConstraint(constraint, matcher)


@dataclass(frozen=True)
class CompiledConstraint:
    """A checked constraint: a matcher at the start of the answer, never advanced itself;
    `new_matcher()` copies it for one row (cheaper than compiling again)."""

    constraint: Constraint
    start: Any  # llguidance.LLMatcher

    def new_matcher(self) -> Any:
        return self.start.deep_copy()


def _clean(message: str) -> str:
    """llguidance's message on one line (its regex errors draw carets over several), at most 1000 chars."""
    text = " ".join(message.split())
    return text[:1000]


_COMPILERS: weakref.WeakKeyDictionary[Any, dict[int, tuple[int, ConstraintCompiler]]] = (
    weakref.WeakKeyDictionary()
)
_COMPILERS_LOCK = threading.Lock()  # the server compiles in several worker threads


def compiler_for(tokenizer: Any, vocab_size: int) -> ConstraintCompiler:
    """The `ConstraintCompiler` of `tokenizer` for `vocab_size` logits, built on first use and kept
    while the tokenizer lives (rebuilt if tokens were added since)."""
    with _COMPILERS_LOCK:
        try:
            per_tokenizer = _COMPILERS.setdefault(tokenizer, {})
        except TypeError:  # not weakly referenceable: no caching
            return ConstraintCompiler(tokenizer, vocab_size)
        size, compiler = per_tokenizer.get(vocab_size, (-1, None))
        if compiler is None or size != len(tokenizer):
            compiler = ConstraintCompiler(tokenizer, vocab_size)
            per_tokenizer[vocab_size] = (len(tokenizer), compiler)
        return compiler


class _Row:
    """One constrained row: its matcher, and whether it has ended (EOS taken)."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.ended = False


class ConstraintProcessor:
    """Masks scores (B, V) so each constrained row stays on its grammar; rows with None are free.

    As a `LogitsProcessor` (`processor(input_ids, scores)`, transformers' signature) it reads each
    row's new tokens from `input_ids` (B, S) itself: the first call's length is the prompt's. This
    works in any loop that keeps every row (transformers' `generate` does). Our decode loops drop
    finished rows, so they call `mask`, `record` and `select` instead (through `TokenRules`).

    A row whose grammar is complete may only take an EOS id (forced even where min_new_tokens
    bans it); a row that has taken one is left alone (it emits padding). A token the grammar
    refuses, or a row whose allowed tokens other rules all ban, is a ValueError.
    """

    def __init__(self, matchers: Sequence[Any | None], eos_ids: Sequence[int], vocab_size: int) -> None:
        if not eos_ids:
            raise ValueError("a constraint needs an EOS token id to end the answer on: set eos_token_id")
        self.rows = [None if m is None else _Row(m) for m in matchers]
        self.eos = list(eos_ids)
        self.vocab_size = vocab_size
        self._eos_index = torch.tensor(self.eos, dtype=torch.long)
        self._seen: int | None = None  # LogitsProcessor use: tokens of each row consumed so far

    @classmethod
    def for_rows(
        cls, constraints: Sequence[CompiledConstraint | None], eos_ids: Sequence[int], vocab_size: int
    ) -> ConstraintProcessor:
        return cls([None if c is None else c.new_matcher() for c in constraints], eos_ids, vocab_size)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._seen is not None:
            for column in input_ids[:, self._seen :].T:
                self.record(column)
        self._seen = input_ids.shape[1]
        return self.mask(scores)

    def mask(self, scores: Tensor) -> Tensor:
        """scores (B, V) -> the same with -inf wherever a row's grammar refuses the token."""
        live = [(b, r) for b, r in enumerate(self.rows) if r is not None and not r.ended]
        if not live:
            return scores
        B, V = scores.shape
        words = (V + 31) // 32
        bits = np.full((B, words), -1, dtype=np.int32)  # all allowed, for free and ended rows
        accepting = np.ones(B, dtype=bool)
        for b, row in live:
            row.matcher.unsafe_compute_mask_ptr(bits[b].ctypes.data, words * 4)
            accepting[b] = row.matcher.is_accepting()
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :V].view(
            np.bool_
        )  # (B, V)
        allowed[:, self.eos] = accepting[:, None]
        if scores.device.type == "cpu" and scores.dtype == torch.float32:
            # NumPy, one thread: torch's threaded kernels cost more than this work on small (B, V)
            values = np.where(allowed, scores.detach().numpy(), np.float32(-np.inf))
            stuck = (values.max(axis=1) == -np.inf).nonzero()[0].tolist()
            masked = torch.from_numpy(values)
        else:
            masked = scores.masked_fill(~torch.from_numpy(allowed).to(scores.device), float("-inf"))
            stuck = (masked.amax(dim=-1) == float("-inf")).nonzero()[:, 0].tolist()
        if stuck:
            blocked = [b for b in stuck if not accepting[b]]
            if blocked:
                raise ValueError(
                    f"row {blocked[0]}: every token the constraint allows next is banned by another "
                    "rule (bad_words_ids, no_repeat_ngram_size, a logits_processor)"
                )
            eos = self._eos_index.to(masked.device)
            forced = torch.tensor(stuck, device=masked.device)
            masked[forced[:, None], eos[None]] = 0.0  # the grammar is complete: end here
        return masked

    def record(self, tokens: Tensor) -> None:
        """The tokens (B,) the rows took; each constrained row's matcher consumes its own."""
        for row, token in zip(self.rows, tokens.tolist(), strict=True):
            if row is None or row.ended:
                continue
            if token in self.eos:
                row.ended = True
            elif not row.matcher.consume_token(token) or row.matcher.is_error():
                raise ValueError(
                    f"token {token} does not follow the constraint: {_clean(row.matcher.get_error())}"
                )

    def end(self, rows: Tensor) -> None:
        """Rows (B,) bool that ended otherwise (a stop string): left alone from now on."""
        for row, ended in zip(self.rows, rows.tolist(), strict=True):
            if row is not None and ended:
                row.ended = True

    def select(self, rows: Tensor) -> None:
        """Keep `rows` (1-D index, in that order); a repeated row gets a copy of its matcher."""
        kept: list[_Row | None] = []
        taken: set[int] = set()
        for i in rows.tolist():
            row = self.rows[i]
            if row is not None and i in taken:
                copy = _Row(row.matcher.deep_copy())
                copy.ended = row.ended
                row = copy
            taken.add(i)
            kept.append(row)
        self.rows = kept

    def incomplete(self) -> list[int]:
        """Rows (positions in the batch) whose answer is not yet a complete sentence of their grammar."""
        return [
            b
            for b, r in enumerate(self.rows)
            if r is not None and not r.ended and not r.matcher.is_accepting()
        ]


def per_row(constraint: Any, batch: int) -> list[Constraint | None]:
    """`generate`'s `constraint` argument (one `Constraint` for all rows, or a list with one
    `Constraint` or None per row) as a list of `batch` entries."""
    if isinstance(constraint, Constraint):
        return [constraint] * batch
    if isinstance(constraint, (list, tuple)):
        if len(constraint) != batch:
            raise ValueError(
                f"constraint is a list of {len(constraint)}, but there are {batch} prompts: pass one "
                "Constraint (or None) per row, or one Constraint for all"
            )
        if not all(c is None or isinstance(c, Constraint) for c in constraint):
            raise ValueError("constraint lists must hold Constraint objects or None")
        return list(constraint)
    raise ValueError(
        f"constraint must be a Constraint (Constraint.json_schema(...), .regex(...), .choices(...), "
        f".grammar(...)) or a list of them per row, got {type(constraint).__name__}"
    )

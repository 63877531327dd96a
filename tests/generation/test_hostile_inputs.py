"""Hostile generate inputs: each wrong tensor or argument is a ValueError naming it, before any
compute, and sampling never ends in a torch error (hardening issue, items 6 and 8)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_model, tiny_config_dict
from idefics2 import Idefics2ForConditionalGeneration
from idefics2.generation import generate as generate_module
from idefics2.generation.sampling import apply_temperature, choose_tokens, filter_logits

VOCAB = 120
IDS = torch.tensor([[1, 5, 6, 7]])
ALL_BUT_EOS = [[i] for i in range(VOCAB) if i != 2]


def tiny_model(**text: Any) -> Idefics2ForConditionalGeneration:
    config = tiny_config_dict()
    config["text_config"].update(text)
    return random_model(config)


@pytest.fixture(scope="module")
def model() -> Idefics2ForConditionalGeneration:
    return tiny_model()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_ids": torch.tensor([[1, 500]])}, r"input_ids must be token ids in \[0, 120\) .*from 1 to 500"),
    ({"input_ids": torch.tensor([[1, -3]])}, r"input_ids must be token ids in \[0, 120\) .*from -3 to 1"),
    ({"input_ids": torch.tensor([[1.0, 5.0]])}, r"input_ids must hold integer token ids .*float32"),
    ({"input_ids": torch.tensor([[True, False]])}, r"input_ids must hold integer token ids .*bool"),
    ({"input_ids": torch.zeros(0, 3, dtype=torch.long)}, r"input_ids must be \(batch, tokens\) .*\(0, 3\)"),
    ({"input_ids": [[1, 5]]}, r"input_ids must be a torch.Tensor .*got list"),
    ({"input_ids": IDS, "attention_mask": [[1, 1, 1, 1]]}, r"attention_mask must be a torch.Tensor"),
    ({"input_ids": IDS, "attention_mask": torch.full((1, 4), 2)}, r"attention_mask must hold only 0"),
    ({"input_ids": IDS, "pixel_values": torch.randn(1, 1, 2, 32, 32)},
     r"pixel_values must be \(batch, images, 3, height, width\) .*\(1, 1, 2, 32, 32\)"),
    ({"input_ids": IDS, "pixel_values": torch.ones(1, 1, 3, 32, 32, dtype=torch.long)},
     r"pixel_values must be floating point"),
    ({"input_ids": IDS, "pixel_values": torch.full((1, 1, 3, 32, 32), math.nan)}, r"pixel_values must be finite"),
    ({"input_ids": IDS, "pixel_attention_mask": torch.ones(1, 1, 32, 32)},
     r"pixel_attention_mask was given without pixel_values"),
    ({"input_ids": IDS, "inputs_embeds": torch.full((1, 4, 48), math.inf)}, r"inputs_embeds must be finite"),
    ({"input_ids": IDS, "seed": "x"}, r"seed must be an integer .*got 'x'"),
    ({"input_ids": IDS, "seed": 2**64}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
    ({"input_ids": IDS, "generator": 3}, r"generator must be a torch.Generator, got int"),
    ({"input_ids": IDS, "max_new_tokens": True}, r"max_new_tokens must be an integer >= 1, got True"),
    ({"input_ids": IDS, "max_new_tokens": 2.0}, r"max_new_tokens must be an integer >= 1, got 2.0"),
    ({"input_ids": IDS, "min_new_tokens": False}, r"min_new_tokens must be an integer"),
    ({"input_ids": IDS, "eos_token_id": "2"}, r"eos_token_id must be token ids \(an int or a list of ints\), got '2'"),
    ({"input_ids": IDS, "eos_token_id": [2, True]}, r"eos_token_id must be token ids"),
    ({"input_ids": IDS, "extra_eos_token_ids": "2"}, r"extra_eos_token_ids must be token ids"),
    ({"input_ids": IDS, "pad_token_id": "0"}, r"pad_token_id must be a token id in \[0, 120\), got '0'"),
    ({"input_ids": IDS, "temperature": "0.7"}, r"temperature must be >= 0 .*got '0.7'"),
    ({"input_ids": IDS, "temperature": math.nan}, r"temperature must be >= 0 .*got nan"),
    ({"input_ids": IDS, "top_k": 2.5}, r"top_k must be an integer >= 0 .*got 2.5"),
    ({"input_ids": IDS, "top_p": math.nan}, r"top_p must be in \(0, 1\], got nan"),
    ({"input_ids": IDS, "do_sample": "yes"}, r"do_sample must be True or False, got 'yes'"),
    ({"input_ids": IDS, "repetition_penalty": 1e-300}, r"repetition_penalty must be > 0 .*float32.*got 1e-300"),
    ({"input_ids": IDS, "repetition_penalty": math.inf}, r"repetition_penalty must be > 0 .*got inf"),
    ({"input_ids": IDS, "length_penalty": math.nan}, r"length_penalty must be a finite number, got nan"),
    ({"input_ids": IDS, "num_beams": True}, r"num_beams must be an integer >= 1"),
    ({"input_ids": IDS, "early_stopping": 1}, r"early_stopping must be True, False or 'never', got 1"),
    ({"input_ids": IDS, "bad_words_ids": [[True]]}, r"bad_words_ids must be non-empty lists of token ids"),
    ({"input_ids": IDS, "bad_words_ids": "5"}, r"bad_words_ids must be a list of lists"),
    ({"input_ids": IDS, "logits_processor": [3]}, r"logits_processor must be a list of callables"),
    ({"input_ids": IDS, "streamer": object()}, r"streamer must have put\(\) and end\(\) methods"),
    ({"input_ids": IDS, "use_cache": "no"}, r"use_cache must be True or False"),
    ({"input_ids": IDS, "vision_cache": "on"}, r"vision_cache must be True, False, None or a VisionFeatureCache"),
])
def test_hostile_arguments_are_value_errors_naming_the_argument(model: Any, kwargs: dict[str, Any],
                                                                message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model.generate(**{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_new_tokens": 2, "bad_words_ids": ALL_BUT_EOS}, r"row 0: every token's score is -inf: bad_words_ids"),
    ({"logits_processor": [lambda ids, s: s.fill_(math.nan)]}, r"row 0: some scores are nan .*remove_invalid_values"),
    ({"logits_processor": [lambda ids, s: s.fill_(math.inf)]}, r"row 0: some scores are \+inf"),
])
def test_sampling_a_row_with_no_valid_distribution_names_the_cause(model: Any, kwargs: dict[str, Any],
                                                                   message: str) -> None:
    """transformers 5.24 fails here in torch.multinomial ("probability tensor contains either inf, nan
    or element < 0", checked against the oracle); greedy takes id 0 of an all -inf row, as it does."""
    with pytest.raises(ValueError, match=r"cannot sample the next token of " + message):
        model.generate(IDS, max_new_tokens=3, do_sample=True, seed=0, **kwargs)
    greedy = model.generate(IDS, max_new_tokens=3, min_new_tokens=2, bad_words_ids=ALL_BUT_EOS)
    assert greedy[0, 4:].tolist() == [0, 0, 2]  # the oracle's tokens too


def test_temperatures_that_overflow_behave_like_greedy_and_inf_keeps_bans(model: Any) -> None:
    greedy = model.generate(IDS, max_new_tokens=4)
    for tiny in (1e-45, 1e-300, 5e-324):
        assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=True, temperature=tiny, seed=1), greedy)
    for extra in ({"min_new_tokens": 3}, {"bad_words_ids": [[5], [6]]}):
        out = model.generate(IDS, max_new_tokens=3, do_sample=True, temperature=math.inf, seed=0, **extra)
        assert out.shape == (1, 7) and not set(out[0, 4:].tolist()) & {2, 5, 6}
    scores = torch.tensor([[3.0, -1.0, 2.0, -math.inf], [-5.0, -6.0, -7.0, -8.0]])
    limit = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf], [0.0, -math.inf, -math.inf, -math.inf]])
    assert torch.equal(apply_temperature(scores, 1e-45), limit)
    assert torch.equal(apply_temperature(scores, 0.5), scores / 0.5)  # no overflow: the reference's quotient
    assert torch.equal(apply_temperature(scores, math.inf)[0], torch.tensor([0.0, -0.0, 0.0, -math.inf]))
    assert torch.equal(choose_tokens(filter_logits(scores, 1e-45), True, torch.Generator().manual_seed(0)),
                       torch.tensor([0, 0]))


def test_kv_cache_is_sized_by_the_request_and_a_huge_one_is_refused() -> None:
    """A config of 2**30 positions (10**15 is refused by the config) and max_new_tokens 10**6 used to
    allocate the whole cache for one token; now it starts at prompt + 1024 and grows."""
    big = tiny_model(max_position_embeddings=2**30)
    first = int(big.generate(IDS, max_new_tokens=1)[0, -1])
    sizes: list[int] = []
    original = big.new_kv_cache
    big.new_kv_cache = lambda n: sizes.append(n) or original(n)  # type: ignore[method-assign]
    out = big.generate(IDS, max_new_tokens=10**6, eos_token_id=first)
    assert out.shape == (1, 5) and sizes == [4 + 1024]
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000000 cannot fit: a KV cache for 1 row\(s\) of "
                                         r"4 \+ 1000000000 tokens needs [\d.]+ GiB"):
        big.generate(IDS, max_new_tokens=10**9)
    with pytest.raises(ValueError, match=r"exceeds text_config.max_position_embeddings \(1073741824\)"):
        big.generate(IDS, max_new_tokens=2**30)


def test_a_cache_that_grows_gives_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    long = tiny_model(max_position_embeddings=2048)
    grown = long.generate(IDS, max_new_tokens=1100, eos_token_id=[], do_sample=True, seed=3)
    monkeypatch.setattr(generate_module, "initial_cache_length", lambda T, N, compiled: T + N)
    assert torch.equal(long.generate(IDS, max_new_tokens=1100, eos_token_id=[], do_sample=True, seed=3), grown)


ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 130), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=3), st.lists(st.integers(-2, 130), max_size=3))


def arg(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, else anything (wrong types, bools, nan, inf, strings, lists)."""
    return st.one_of(valid, valid, valid, ANY)


ARGUMENTS = {
    "max_new_tokens": arg(st.integers(1, 3)), "min_new_tokens": arg(st.integers(0, 2)),
    "temperature": arg(st.one_of(st.floats(0, 5), st.sampled_from([1e-45, 5e-324, math.inf]))),
    "top_k": arg(st.integers(0, 200)), "top_p": arg(st.floats(0.01, 1)),
    "repetition_penalty": arg(st.floats(1e-310, 1e10)),
    "eos_token_id": arg(st.one_of(st.integers(0, 119), st.lists(st.integers(0, 119), max_size=3))),
    "seed": arg(st.integers(-2**63, 2**64 - 1)), "num_beams": arg(st.integers(1, 2)),
    "do_sample": arg(st.booleans()), "no_repeat_ngram_size": arg(st.integers(0, 3)),
    "num_return_sequences": arg(st.integers(1, 2)), "length_penalty": arg(st.floats(-2, 2)),
    "bad_words_ids": arg(st.lists(st.lists(st.integers(0, 119), min_size=1, max_size=2), max_size=3)),
    "pad_token_id": arg(st.integers(0, 119)), "early_stopping": arg(st.sampled_from([True, False, "never"])),
    "remove_invalid_values": arg(st.booleans()), "output_scores": arg(st.booleans()),
}
CALLS = {"n": 0, "seconds": 0.0}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=ARGUMENTS))
def test_any_generation_arguments_return_or_raise_a_named_value_error(model: Any, kwargs: dict[str, Any]) -> None:
    given_n = kwargs.get("max_new_tokens")
    if given_n is None:
        kwargs["max_new_tokens"] = 2  # keep each call tiny (the default is 20)
    elif isinstance(given_n, int) and not isinstance(given_n, bool):
        kwargs["max_new_tokens"] = min(given_n, 3)
    start = time.perf_counter()
    try:
        out = model.generate(IDS, **kwargs)
    except (ValueError, TypeError) as error:
        named = [name for name in (*ARGUMENTS, "extra_eos_token_ids") if name in str(error)]
        assert named, f"{error!r} names no argument for {kwargs}"
    else:
        assert out.dtype == torch.long and out.shape[1] >= 5 and out[:, :4].eq(IDS).all()
    finally:
        CALLS["n"] += 1
        CALLS["seconds"] += time.perf_counter() - start


def test_beam_sampling_that_cannot_draw_its_candidates_is_a_value_error() -> None:
    from conftest import tiny_config_dict
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(tiny_config_dict())).eval()
    banned = [[t] for t in range(120)]  # every token, with EOS kept out by min_new_tokens
    with pytest.raises(ValueError, match=r"cannot sample the next token of row 0: every token's score is -inf"):
        model.generate(torch.tensor([[1, 5, 6]]), num_beams=2, do_sample=True, max_new_tokens=3,
                       min_new_tokens=3, bad_words_ids=banned, seed=0)

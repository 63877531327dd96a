"""Generation: greedy parity with transformers, sampling, vision-feature reuse, streaming, errors.

Random tiny models have nearly flat logits, so the LM head is rebuilt as a scaled permutation of
the embedding table: greedy choices then have clear margins (far above the ~1e-5 kernel noise
between us and the oracle) while still depending on the context, so the tokens vary.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
import torch

from conftest import oracle_model, random_model, tiny_config_dict
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration
from idefics2.generation import GenerationConfig, ThreadTuner, load_generation_config
from idefics2.generation.sampling import choose_tokens, filter_logits
from idefics2.generation.streaming import TextIteratorStreamer
from idefics2.generation.vision_cache import VisionFeatureCache

CONFIG = tiny_config_dict(sliding_window=16)  # prompts + new tokens run past the window
L = CONFIG["perceiver_config"]["resampler_n_latents"]
IMAGE, FAKE, EOS = CONFIG["image_token_id"], 101, 2


def sharpen(model: Any) -> Any:
    """LM head = 10 x (0.3 x permuted embedding rows + 0.7 x noise of the same scale): margins of
    >= 0.04 between the two best logits on every case below, yet tokens that vary."""
    with torch.no_grad():
        perm = torch.randperm(120, generator=torch.Generator().manual_seed(5))
        rows = model.model.text_model.embed_tokens.weight[perm]
        noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(9)) * rows.std()
        model.lm_head.weight.copy_((0.3 * rows + 0.7 * noise) * 10)
        model.model.text_model.norm.weight.fill_(1.0)
    return model


@pytest.fixture(scope="module")
def oracle() -> Any:
    return sharpen(oracle_model(CONFIG, attn="sdpa"))


@pytest.fixture(scope="module")
def ours(oracle: Any) -> Idefics2ForConditionalGeneration:
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(CONFIG)).eval()
    model.load_state_dict(oracle.state_dict(), strict=True)
    return model


@pytest.fixture(scope="module")
def plain_model() -> Idefics2ForConditionalGeneration:
    """Ours without transformers, for the tests that need no oracle."""
    model = random_model(CONFIG)
    return sharpen(model)


def image_block(n: int = 1) -> list[int]:
    return [FAKE] + ([IMAGE] * L + [FAKE]) * n


def prompt(*parts: list[int], seed: int = 0, text: int = 6) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = [1]
    for part in parts:
        ids += torch.randint(3, 99, (text,), generator=g).tolist() + part
    return ids + torch.randint(3, 99, (text,), generator=g).tolist()


def pixels(sizes: list[tuple[int, int]], seed: int = 0,
           canvas: tuple[int, int] = (32, 28)) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, M, 3, H, W) random images of the given sizes on one canvas, and their pixel mask."""
    g = torch.Generator().manual_seed(seed)
    values = torch.zeros(1, len(sizes), 3, *canvas)
    mask = torch.zeros(1, len(sizes), *canvas, dtype=torch.long)
    for m, (h, w) in enumerate(sizes):
        values[0, m, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[0, m, :h, :w] = 1
    return values, mask


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


def batch_of_three() -> dict[str, torch.Tensor]:
    """Rows with 0, 1 and 2 images, different lengths (left padded), images of different sizes."""
    ids, mask = left_pad([prompt(seed=1, text=9), prompt(image_block(), seed=2),
                          prompt(image_block(), image_block(), seed=3)])
    values = torch.zeros(3, 2, 3, 32, 28)
    pmask = torch.zeros(3, 2, 32, 28, dtype=torch.long)
    values[1, :1], pmask[1, :1] = (t[0] for t in pixels([(30, 21)], seed=4))
    values[2], pmask[2] = (t[0] for t in pixels([(32, 28), (17, 26)], seed=5))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": values, "pixel_attention_mask": pmask}


def single(ids: list[int], sizes: list[tuple[int, int]] | None = None,
           seed: int = 0) -> dict[str, torch.Tensor]:
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if sizes:
        batch["pixel_values"], batch["pixel_attention_mask"] = pixels(sizes, seed)
    return batch


CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "one-image": (lambda: single(prompt(image_block()), [(30, 25)]), {}),
    "two-images": (lambda: single(prompt(image_block(), image_block()), [(32, 28), (21, 18)]), {}),
    # image splitting: 4 crops + the whole image, each with its own latents between fake tokens
    "splitting-shaped": (lambda: single(prompt(image_block(5)), [(16, 14)] * 3 + [(16, 12), (32, 28)]), {}),
    "batch-0-1-2-images": (batch_of_three, {}),
    "penalty-and-bans": (batch_of_three, {"repetition_penalty": 1.3, "bad_words_ids": [[63], [23, 77], [5]]}),
}


@pytest.mark.oracle
@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_equal_transformers(name: str, oracle: Any, ours: Any) -> None:
    make, kwargs = CASES[name]
    batch = make()
    expected = oracle.generate(**batch, max_new_tokens=24, do_sample=False, **kwargs)
    got = ours.generate(**batch, max_new_tokens=24, **kwargs)
    assert torch.equal(got, expected)
    new = got[:, batch["input_ids"].shape[1]:]
    assert len(set(new.flatten().tolist())) >= 4  # the test has teeth: tokens vary


def eos_after(oracle: Any, batch: dict[str, torch.Tensor], row: int, step: int) -> int:
    """A token the oracle generates for `row` at `step`, to use as an extra EOS id."""
    free = oracle.generate(**batch, max_new_tokens=step + 1, do_sample=False)
    return int(free[row, -1])


@pytest.mark.oracle
def test_eos_list_and_min_new_tokens_match_transformers_and_rows_leave_the_batch(oracle: Any,
                                                                                   ours: Any) -> None:
    batch = batch_of_three()
    stop = eos_after(oracle, batch, row=1, step=4)
    batch_sizes: list[int] = []
    text_model = ours.model.text_model
    original = text_model.forward
    text_model.forward = lambda x, *a, **k: batch_sizes.append(x.shape[0]) or original(x, *a, **k)
    try:
        for kwargs in ({"eos_token_id": [EOS, stop]}, {"eos_token_id": [EOS, stop], "min_new_tokens": 8}):
            batch_sizes.clear()
            expected = oracle.generate(**batch, max_new_tokens=20, do_sample=False, **kwargs)
            got = ours.generate(**batch, max_new_tokens=20, **kwargs)
            assert torch.equal(got, expected)
            assert (got == 0).any(dim=1)[1]  # row 1 finished early and was padded...
            assert min(batch_sizes) < 3  # ...and stopped costing compute
    finally:
        del text_model.forward


@pytest.mark.oracle
def test_each_row_of_a_batch_gives_the_tokens_of_that_row_alone(ours: Any) -> None:
    batch = batch_of_three()
    together = ours.generate(**batch, max_new_tokens=16)
    T = batch["input_ids"].shape[1]
    for b, n_images in enumerate([0, 1, 2]):
        alone: dict[str, Any] = {"input_ids": batch["input_ids"][b:b + 1, batch["attention_mask"][b] == 1]}
        if n_images:
            alone["pixel_values"] = batch["pixel_values"][b:b + 1, :n_images]
            alone["pixel_attention_mask"] = batch["pixel_attention_mask"][b:b + 1, :n_images]
        got = ours.generate(**alone, max_new_tokens=16)[0, alone["input_ids"].shape[1]:]
        assert got.tolist() == together[b, T:T + got.shape[0]].tolist()


@pytest.mark.oracle
def test_log_probs_equal_transformers_transition_scores(oracle: Any, ours: Any) -> None:
    batch = batch_of_three()
    kwargs = {"max_new_tokens": 10, "eos_token_id": [EOS, eos_after(oracle, batch, 0, 3)]}
    expected = oracle.generate(**batch, do_sample=False, output_scores=True, return_dict_in_generate=True,
                               **kwargs)
    got = ours.generate(**batch, output_scores=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    reference = oracle.compute_transition_scores(expected.sequences, expected.scores, normalize_logits=True)
    new = got.sequences[:, batch["input_ids"].shape[1]:]
    is_eos = torch.isin(new, torch.tensor(kwargs["eos_token_id"]))
    padding = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # after the row's EOS
    assert padding.any()
    torch.testing.assert_close(got.log_probs[~padding], reference[~padding], rtol=0, atol=1e-4)
    assert (got.log_probs[padding] == 0).all()  # a finished row emits its pad with certainty


@pytest.mark.oracle
def test_output_logits_equal_transformers_raw_logits(oracle: Any, ours: Any) -> None:
    """`output_logits` failed before: the raw logits of every step, as the reference's."""
    batch = batch_of_three()
    kwargs = {"max_new_tokens": 6, "repetition_penalty": 1.3, "output_logits": True,
              "return_dict_in_generate": True}
    expected = oracle.generate(**batch, do_sample=False, **kwargs)
    got = ours.generate(**batch, **kwargs)
    assert torch.equal(got.sequences, expected.sequences) and got.scores is None
    assert len(got.logits) == len(expected.logits) == 6
    for mine, theirs in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(mine, theirs.float(), rtol=0, atol=1e-4)  # raw: before the penalty


@pytest.mark.oracle
def test_num_return_sequences_samples_like_transformers(oracle: Any, ours: Any) -> None:
    """`num_return_sequences` failed before: each prompt's rows together, drawn as the reference
    draws them from the same global seed."""
    batch = batch_of_three()
    sample = {"do_sample": True, "temperature": 1.3, "top_k": 20, "max_new_tokens": 8,
              "num_return_sequences": 2}
    torch.manual_seed(11)
    expected = oracle.generate(**batch, **sample)
    torch.manual_seed(11)
    got = ours.generate(**batch, **sample)
    assert got.shape[0] == 6 and torch.equal(got, expected)
    T = batch["input_ids"].shape[1]
    assert torch.equal(got[0::2, :T], batch["input_ids"]) and torch.equal(got[1::2, :T], batch["input_ids"])
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True"):
        ours.generate(**batch, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences must be an integer >= 1, got 0"):
        ours.generate(**batch, do_sample=True, num_return_sequences=0)


@pytest.mark.oracle
def test_no_repeat_ngram_size_gives_the_tokens_of_transformers(oracle: Any, ours: Any) -> None:
    """no_repeat_ngram_size was refused before; with it, no n-gram repeats and the tokens are the reference's."""
    batch = batch_of_three()
    for n in (1, 2, 3):
        kwargs = {"max_new_tokens": 12, "no_repeat_ngram_size": n, "repetition_penalty": 1.1}
        expected = oracle.generate(**batch, do_sample=False, **kwargs)
        got = ours.generate(**batch, use_cache=False, **kwargs)
        assert torch.equal(got, expected), n
    T = batch["input_ids"].shape[1]
    row = got[2].tolist()
    for end in range(T, len(row)):  # no new token completes a 3-gram seen before it
        gram = row[end - 2:end + 1]
        assert all(row[i:i + 3] != gram for i in range(end - 2)), end
    assert not torch.equal(got[:, T:], ours.generate(**batch, max_new_tokens=12)[:, T:])
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an integer >= 0"):
        ours.generate(**batch, no_repeat_ngram_size=-1)


@pytest.mark.oracle
@pytest.mark.parametrize("options", [
    {"num_beams": 3},
    {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.5},
    {"num_beams": 3, "early_stopping": True, "repetition_penalty": 1.2},
    {"num_beams": 2, "early_stopping": "never", "length_penalty": 2.0, "no_repeat_ngram_size": 2},
], ids=["plain", "return-2", "early-stop", "never"])
def test_beam_search_gives_the_tokens_of_transformers(oracle: Any, ours: Any, options: dict[str, Any]) -> None:
    """generate(num_beams=3) failed before; now the reference's hypotheses and scores, for a batch with
    images and left padding, and with EOS ids that end some beams early."""
    batch = batch_of_three()
    kwargs = {"max_new_tokens": 10, "eos_token_id": [EOS, eos_after(oracle, batch, 0, 3)], **options}
    expected = oracle.generate(**batch, do_sample=False, output_scores=True, return_dict_in_generate=True,
                               **kwargs)
    got = ours.generate(**batch, return_dict_in_generate=True, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=0, atol=1e-4)
    assert torch.equal(ours.generate(**batch, **kwargs), expected.sequences)


class PreferEvenIds:
    """A caller's rule with transformers' processor signature: odd ids lose `bonus` after step 2."""

    def __init__(self, bonus: float) -> None:
        self.bonus, self.calls = bonus, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if input_ids.shape[1] < 2:
            return scores
        odd = torch.arange(scores.shape[-1]) % 2 == 1
        return scores - odd.to(scores.dtype) * self.bonus


@pytest.mark.oracle
@pytest.mark.parametrize("options", [{}, {"num_beams": 3}, {"repetition_penalty": 1.3}],
                         ids=["greedy", "beams", "penalty"])
def test_a_callers_logits_processor_runs_as_in_transformers(oracle: Any, ours: Any,
                                                            options: dict[str, Any]) -> None:
    """One processor list for greedy, sampled and beam decoding, open to the caller's processors."""
    from transformers import LogitsProcessorList

    batch = batch_of_three()
    kwargs = {"max_new_tokens": 8, **options}
    mine, theirs = PreferEvenIds(3.0), PreferEvenIds(3.0)
    expected = oracle.generate(**batch, do_sample=False, logits_processor=LogitsProcessorList([theirs]),
                               **kwargs)
    got = ours.generate(**batch, logits_processor=[mine], **kwargs)
    assert torch.equal(got, expected) and mine.calls > 0
    T = batch["input_ids"].shape[1]
    without = ours.generate(**batch, **kwargs)[:, T:]
    assert (got[:, T:] % 2 == 0).float().mean() > (without % 2 == 0).float().mean()


def test_transformers_options_we_do_not_implement_are_refused_by_name(plain_model: Any) -> None:
    """generate(num_beams=3) ended in a TypeError before; the switched-off values are accepted."""
    batch = batch_of_three()
    base = plain_model.generate(**batch, max_new_tokens=4)
    assert torch.equal(plain_model.generate(**batch, max_new_tokens=4, num_beams=1, output_attentions=False,
                                            num_beam_groups=1), base)
    with pytest.raises(ValueError, match=r"generate does not implement num_beam_groups=2 \(group beam search"):
        plain_model.generate(**batch, num_beam_groups=2)
    with pytest.raises(ValueError, match=r"num_beams > 1 does not support stop_strings"):
        plain_model.generate(**batch, num_beams=2, stop_strings=["x"], tokenizer=object())
    with pytest.raises(ValueError, match=r"unknown generate option\(s\) \['max_new_token'\]"):
        plain_model.generate(**batch, max_new_token=4)


def test_same_seed_same_tokens_and_top_k_1_is_greedy(plain_model: Any) -> None:
    batch = batch_of_three()
    sample = {"do_sample": True, "temperature": 1.5, "top_k": 0, "max_new_tokens": 12}
    first = plain_model.generate(**batch, seed=7, **sample)
    assert torch.equal(plain_model.generate(**batch, seed=7, **sample), first)
    assert not torch.equal(plain_model.generate(**batch, seed=8, **sample), first)
    greedy = plain_model.generate(**batch, max_new_tokens=12)
    top_1 = plain_model.generate(**batch, do_sample=True, top_k=1, seed=3, max_new_tokens=12)
    assert torch.equal(top_1, greedy)
    zero_temperature = plain_model.generate(**batch, do_sample=True, temperature=0.0, max_new_tokens=12)
    assert torch.equal(zero_temperature, greedy)


def test_sampled_frequencies_follow_the_filtered_softmax() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.6, 0.5, -1.0, 0.0, 1.2]])
    T, k, p = 0.8, 6, 0.85
    # independent expectation: temperature, keep the 6 best, then the smallest top set with mass > 0.85
    probs = torch.softmax(logits[0] / T, dim=0)
    kept = probs.argsort(descending=True)[:k]
    renorm = probs[kept] / probs[kept].sum()
    cut = int((renorm.cumsum(0) < p).sum()) + 1
    expected = torch.zeros(8)
    expected[kept[:cut]] = renorm[:cut] / renorm[:cut].sum()
    scores = filter_logits(logits, temperature=T, top_k=k, top_p=p)
    torch.testing.assert_close(scores.softmax(-1)[0], expected, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    draws = choose_tokens(scores.expand(40000, -1), do_sample=True, generator=g)
    counts = Counter(draws.tolist())
    freq = torch.tensor([counts[i] / 40000 for i in range(8)])
    assert (freq[expected == 0] == 0).all()
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.012)


@pytest.mark.oracle
def test_filters_equal_transformers_warpers() -> None:
    from transformers.generation import logits_process as lp

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    scores[:, 7] = scores[:, 8]  # a tie at the top-k boundary is kept by both
    expected = lp.TemperatureLogitsWarper(0.6)(None, scores)
    expected = lp.TopPLogitsWarper(0.7)(None, lp.TopKLogitsWarper(9)(None, expected))
    torch.testing.assert_close(filter_logits(scores, 0.6, 9, 0.7), expected, rtol=0, atol=0)


def count_vision_images(model: Any) -> list[int]:
    seen: list[int] = []
    tower = model.model.vision_model
    original = tower.forward
    tower.forward = lambda px, *a, **k: seen.append(px.shape[0]) or original(px, *a, **k)
    return seen


def test_vision_tower_runs_once_per_image_and_never_for_a_cached_image(plain_model: Any) -> None:
    model = plain_model
    cache = VisionFeatureCache()
    seen = count_vision_images(model)
    try:
        two = single(prompt(image_block(), image_block()), [(32, 28), (21, 18)], seed=11)
        first = model.generate(**two, max_new_tokens=8, vision_cache=cache)
        assert sum(seen) == 2  # once per image, not per step
        seen.clear()
        assert torch.equal(model.generate(**two, max_new_tokens=8, vision_cache=cache), first)
        assert sum(seen) == 0
        # one cached image (same bytes, now on a bigger canvas, second in the batch) and one new one
        values, mask = pixels([(29, 20), (1, 1)], seed=12, canvas=(32, 30))
        values[0, 1, :, :21, :18] = two["pixel_values"][0, 1, :, :21, :18]
        mask[0, 1, :21, :18] = 1
        model.generate(input_ids=two["input_ids"], pixel_values=values, pixel_attention_mask=mask,
                       max_new_tokens=4, vision_cache=cache)
        assert sum(seen) == 1
        seen.clear()
        model.generate(**two, max_new_tokens=4, vision_cache=False)
        assert sum(seen) == 2
    finally:
        del model.model.vision_model.forward


def test_feature_cache_is_lru_and_bounded_in_bytes() -> None:
    f = torch.zeros(4, 8)  # 128 bytes
    cache = VisionFeatureCache(max_bytes=300)
    cache.put(b"a", f)
    cache.put(b"b", f)
    assert cache.get(b"a") is not None  # "b" is now the least recently used
    cache.put(b"c", f)
    assert cache.get(b"b") is None and cache.get(b"a") is not None and len(cache) == 2
    assert cache.nbytes == 256


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is a special (EOS) token decoding to nothing when skipped."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        data = bytes(i for i in ids if i < 256)
        special = "" if skip_special_tokens else "</s>" * sum(1 for i in ids if i >= 256)
        return data.decode("utf-8", errors="replace") + special


def stream(text_ids: list[int], **kwargs: Any) -> list[str]:
    streamer = TextIteratorStreamer(ByteTokenizer(), **kwargs)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, skipped
    for i in text_ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    return list(streamer)


def test_streamer_never_splits_a_multibyte_character() -> None:
    text = "héllo → 😀 wörld"
    pieces = stream(ByteTokenizer().encode(text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 5  # it streams, not one flush at the end


def test_streamer_holds_back_partial_stop_strings_and_never_emits_a_stop_string() -> None:
    tok = ByteTokenizer()
    pieces = stream(tok.encode("ab STX cd STOP ef"), stop_strings=["STOP"])
    assert "".join(pieces) == "ab STX cd "
    assert "S" not in pieces[pieces.index(next(p for p in pieces if "X" in p)) - 1]  # "ST" waited for "X"
    assert not any("STOP" in p or p.endswith(("S", "ST", "STO")) for p in pieces)


def test_generate_streams_in_a_thread_and_stops_on_a_stop_string(plain_model: Any) -> None:
    class LetterTokenizer:
        def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
            return "".join(chr(97 + i % 26) for i in ids)

    batch = single(prompt(image_block()), [(30, 25)])
    T = batch["input_ids"].shape[1]
    free = plain_model.generate(**batch, max_new_tokens=12)[0, T:].tolist()
    text = LetterTokenizer().decode(free)
    stop = text[5:7]
    streamer = TextIteratorStreamer(LetterTokenizer(), timeout=60)
    result: dict[str, torch.Tensor] = {}
    worker = threading.Thread(target=lambda: result.update(out=plain_model.generate(
        **batch, max_new_tokens=12, stop_strings=[stop], tokenizer=LetterTokenizer(), streamer=streamer)))
    worker.start()
    pieces = list(streamer)
    worker.join()
    end = text.index(stop)
    assert "".join(pieces) == text[:end]
    assert result["out"][0, T:].tolist() == free[:end + len(stop)]  # stops on the token completing it


def test_generation_config_supplies_defaults_and_loads_from_a_folder(plain_model: Any, tmp_path: Any) -> None:
    (tmp_path / "generation_config.json").write_text('{"max_new_tokens": 3, "eos_token_id": [2, 32002], '
                                                     '"transformers_version": "4.40.0", "num_beams": 1, '
                                                     '"num_beam_groups": 1}')
    config = load_generation_config(tmp_path)
    assert config == GenerationConfig(max_new_tokens=3, eos_token_id=[2, 32002], num_beams=1)
    assert config.extra == {"num_beam_groups": 1}
    assert load_generation_config(tmp_path / "missing") is None
    batch = single(prompt())
    plain_model.generation_config = GenerationConfig(max_new_tokens=3)
    try:
        assert plain_model.generate(**batch).shape[1] == batch["input_ids"].shape[1] + 3
        assert plain_model.generate(**batch, max_new_tokens=5).shape[1] == batch["input_ids"].shape[1] + 5
    finally:
        plain_model.generation_config = None
    assert plain_model.generate(**batch).shape[1] == batch["input_ids"].shape[1] + 20  # built-in default


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, r"temperature must be >= 0 .*got -0.5"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -1}, r"top_k must be an integer >= 0 .*got -1"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": 4, "min_new_tokens": 5},
     r"min_new_tokens must be an integer in \[0, max_new_tokens=4\], got 5"),
    ({"eos_token_id": [2, 120]}, r"eos_token_id must be token ids in \[0, 120\) .*got \[120\]"),
    ({"extra_eos_token_ids": [-1]}, r"eos_token_id must be token ids in \[0, 120\) .*got \[-1\]"),
    ({"bad_words_ids": [[5], [7, 500]]},
     r"bad_words_ids must be non-empty lists of token ids in \[0, 120\), got \[7, 500\]"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be > 0 .*got 0.0"),
    ({"max_new_tokens": 500}, (r"prompt length \(\d+\) \+ max_new_tokens \(500\) exceeds text_config"
                               r".max_position_embeddings \(512\): max_new_tokens must be in \[1, \d+\]")),
    ({"stop_strings": ["x"]}, r"stop_strings need a tokenizer"),
    ({"seed": 1, "generator": torch.Generator()}, r"either generator or seed"),
    ({"attention_mask": torch.zeros(1, 16, dtype=torch.long)}, r"a row with no real token"),
    ({"decode_threads": 0}, r"decode_threads must be a positive integer, None or 'auto', got 0"),
])
def test_invalid_arguments_raise_before_any_compute(plain_model: Any, kwargs: dict[str, Any],
                                                    message: str) -> None:
    batch = single(prompt(image_block(), text=5), [(30, 25)])
    assert batch["input_ids"].shape[1] == 16
    batch.update(kwargs)
    calls = count_vision_images(plain_model)
    try:
        with pytest.raises(ValueError, match=message):
            plain_model.generate(**batch)
    finally:
        del plain_model.model.vision_model.forward
    assert calls == []


def test_a_prompt_that_fills_every_position_is_refused_before_any_compute(plain_model: Any) -> None:
    batch = single(prompt(image_block(), text=512 - len(image_block())), [(30, 25)])
    assert batch["input_ids"].shape[1] >= 512  # the config's max_position_embeddings
    calls = count_vision_images(plain_model)
    try:
        with pytest.raises(ValueError, match=r"prompt length \(\d+ tokens, images included\) leaves no room"):
            plain_model.generate(**batch, max_new_tokens=1)
    finally:
        del plain_model.model.vision_model.forward
    assert calls == []


def test_thread_tuner_keeps_the_faster_count_and_rechecks_the_other() -> None:
    tuner = ThreadTuner([1, 2], recheck=8)
    step_seconds = {1: 0.030, 2: 0.020}
    picks = []
    for step in range(24):
        threads = tuner.pick()
        picks.append(threads)
        tuner.record(threads, step_seconds[threads])
        if step == 11:
            step_seconds[2] = 0.200  # another process takes the second core
    assert picks[:4] == [1, 2, 1, 2] and set(picks[4:8]) == {2}
    assert picks[8] == 1  # the other count is re-timed every `recheck` steps
    assert picks[14:16] == [1, 1] and picks[16] == 2  # the slowdown was noticed; 2 is re-timed
    assert picks[-1] == 1


def test_the_generator_keeps_its_thread_tuner_between_calls(plain_model: Any) -> None:
    """Only the first call pays for timing both thread counts: the tuner counts every call's steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain_model.generate(**single(prompt()), max_new_tokens=6, min_new_tokens=6)
        tuner = plain_model.generator.thread_tuner(2)
        before = tuner.steps
        plain_model.generate(**single(prompt()), max_new_tokens=6, min_new_tokens=6)
        assert plain_model.generator.thread_tuner(2) is tuner
        assert before >= 5 and tuner.steps == before + 5  # 6 new tokens: 5 decode steps after the prefill
    finally:
        torch.set_num_threads(threads)


def test_generate_restores_the_callers_thread_count(plain_model: Any) -> None:
    threads = torch.get_num_threads()
    plain_model.generate(**single(prompt()), max_new_tokens=6, decode_threads=1)
    plain_model.generate(**single(prompt()), max_new_tokens=6)
    assert torch.get_num_threads() == threads


def test_decode_step_traces_as_one_graph_with_the_threaded_products(plain_model: Any) -> None:
    # A graph break splits the compiled step into pieces with Python between them; the one-row
    # products must stay the threaded split (a batched product), not fall back to F.linear.
    from idefics2.generation import decode_step
    from idefics2.model.fast_linear import prepare_for_compile
    from idefics2.model.kv_cache import KVCache

    prepare_for_compile()  # what generate(compile=True) does before compiling

    text_model = plain_model.model.text_model
    cache = KVCache(len(text_model.layers), 16)
    text_model.reserve_rotary(16, torch.device("cpu"))
    with torch.no_grad():
        text_model(text_model.embed_tokens(torch.tensor([[1, 5, 7]])), torch.arange(3)[None], None, cache)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            report = torch._dynamo.explain(decode_step)(plain_model, torch.tensor([[9]]), torch.tensor([[3]]),
                                                        None, cache)
        finally:
            torch.set_num_threads(threads)
    assert report.graph_break_count == 0, report.break_reasons
    ops = [str(node.target) for graph in report.graphs for node in graph.graph.nodes]
    assert sum("bmm" in op for op in ops) == 7 * len(text_model.layers) + 1  # q k v o gate up down, LM head


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(plain_model: Any) -> None:
    batch = batch_of_three()
    eager = plain_model.generate(**batch, max_new_tokens=12)
    assert torch.equal(plain_model.generate(**batch, max_new_tokens=12, compile=True), eager)

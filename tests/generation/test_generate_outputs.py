"""generate's transformers options beyond tokens: invalid-value removal, hidden states, the cache,
attentions, beam scores and beam indices, beam sampling, no input_ids, masks with holes.

Each is compared with transformers 5.24 (SDPA, its default attention) on the sharpened tiny model of
test_generation.py, on batches with images, left padding and rows that finish early, so that a
missing row, a wrong step or a wrong order of processors shows.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_generation import CONFIG, EOS, batch_of_three, oracle, ours, sharpen  # noqa: F401 - fixtures

pytestmark = pytest.mark.oracle
TOL = {"rtol": 0, "atol": 1e-4}


def real_positions(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool: which of the first `width` positions of prompt + new tokens are not padding (the
    reference leaves the hidden states of padding undefined: its eager and SDPA paths disagree there)."""
    new = torch.ones(mask.shape[0], max(width - mask.shape[1], 0), dtype=torch.bool)
    return torch.cat([mask.bool(), new], dim=1)[:, :width]


def assert_hidden_states_match(got: Any, expected: Any, mask: torch.Tensor, use_cache: bool) -> None:
    assert len(got.hidden_states) == len(expected.hidden_states) == len(got.scores)
    T = mask.shape[1]
    for step, (mine, theirs) in enumerate(zip(got.hidden_states, expected.hidden_states, strict=True)):
        assert len(mine) == len(theirs) == CONFIG["text_config"]["num_hidden_layers"] + 1
        width = T + step if not use_cache or step == 0 else 1
        real = real_positions(mask, T + step)[:, -width:]
        for a, b in zip(mine, theirs, strict=True):
            assert a.shape == b.shape == (mask.shape[0], width, CONFIG["text_config"]["hidden_size"])
            torch.testing.assert_close(a[real], b[real], **TOL)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_hidden_states_and_cache_of_greedy_decoding_equal_transformers(oracle: Any, ours: Any,
                                                                       use_cache: bool) -> None:
    """A row that ends early stays in the batch fed the pad token, as in the reference, so its hidden
    states and cache rows are there too; without the cache every step covers the whole sequence."""
    batch = batch_of_three()
    ban = [[CONFIG["image_token_id"]]]  # the reference re-reads generated image tokens without a cache
    stop = int(oracle.generate(**batch, max_new_tokens=2, do_sample=False, bad_words_ids=ban)[1, -1])
    kwargs = {"max_new_tokens": 6, "eos_token_id": [EOS, stop], "use_cache": use_cache, "bad_words_ids": ban,
              "output_hidden_states": True, "output_scores": True, "return_dict_in_generate": True}
    expected = oracle.generate(**batch, do_sample=False, **kwargs)
    got = ours.generate(**batch, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert (got.sequences[1, -2:] == 0).all()  # row 1 finished and was padded
    assert_hidden_states_match(got, expected, batch["attention_mask"], use_cache)
    if not use_cache:
        assert got.past_key_values is None
        return
    length = got.sequences.shape[1] - 1
    window = CONFIG["text_config"]["sliding_window"] - 1  # what the reference's sliding-window cache keeps
    real = real_positions(batch["attention_mask"], length)[:, -window:]
    assert len(got.past_key_values) == len(expected.cache.layers)
    for (keys, values), layer in zip(got.past_key_values, expected.cache.layers, strict=True):
        assert keys.shape == (3, 2, length, 12) and layer.keys.shape == (3, 2, window, 12)
        for mine, theirs in ((keys, layer.keys), (values, layer.values)):
            torch.testing.assert_close(mine[:, :, -window:].transpose(1, 2)[real], theirs.transpose(1, 2)[real],
                                       **TOL)
    assert got.cache is got.past_key_values


def test_rows_still_leave_the_batch_when_nothing_needs_them(ours: Any) -> None:
    """Only hidden states and the cache keep finished rows computing; plain scores do not."""
    batch = batch_of_three()
    sizes: list[int] = []
    text_model = ours.model.text_model
    original = text_model.forward
    text_model.forward = lambda x, *a, **k: sizes.append(x.shape[0]) or original(x, *a, **k)
    try:
        greedy = ours.generate(**batch, max_new_tokens=6)
        stop = int(greedy[1, -4])
        out = ours.generate(**batch, max_new_tokens=6, eos_token_id=[EOS, stop], output_scores=True,
                            return_dict_in_generate=True, use_cache=False)
    finally:
        del text_model.forward
    assert min(sizes) < 3 and out.past_key_values is None and out.hidden_states is None


def test_output_attentions_gives_empty_tuples_as_transformers_sdpa(oracle: Any, ours: Any,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    batch = batch_of_three()
    kwargs = {"max_new_tokens": 3, "output_attentions": True, "return_dict_in_generate": True}
    expected = oracle.generate(**batch, do_sample=False, **kwargs)
    got = ours.generate(**batch, **kwargs)
    assert got.attentions == expected.attentions == ((), (), ())
    assert "never form the attention probabilities" in caplog.text


class BanSeven:
    """A caller's processor that bans id 7 with -inf: it runs after invalid-value removal, so its -inf stays."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(1, torch.tensor([7]), float("-inf"))


def with_invalid_logits(model: Any) -> Any:
    """lm_head row 5 = (+inf, -inf, 0, ...): logit 5 is nan, +inf or -inf depending on the signs of the
    first two hidden features, which vary with the context."""
    with torch.no_grad():
        model.lm_head.weight[5].zero_()
        model.lm_head.weight[5, 0], model.lm_head.weight[5, 1] = float("inf"), float("-inf")
    return model


def test_remove_invalid_values_cleans_scores_before_the_callers_processors(oracle: Any, ours: Any) -> None:
    """nan -> 0, +-inf -> the float32 extremes, after the bans and before the caller's processors,
    as transformers' InfNanRemoveLogitsProcessor runs."""
    from transformers import LogitsProcessorList

    batch = batch_of_three()
    theirs, mine = with_invalid_logits(oracle), with_invalid_logits(ours)
    kwargs = {"max_new_tokens": 8, "bad_words_ids": [[9], [11]], "repetition_penalty": 1.2,
              "remove_invalid_values": True, "output_scores": True, "return_dict_in_generate": True}
    try:
        expected = theirs.generate(**batch, do_sample=False, logits_processor=LogitsProcessorList([BanSeven()]),
                                   **kwargs)
        got = mine.generate(**batch, logits_processor=[BanSeven()], **kwargs)
        assert torch.equal(got.sequences, expected.sequences)
        for a, b in zip(got.scores, expected.scores, strict=True):
            assert torch.equal(a.isfinite(), b.isfinite())
            torch.testing.assert_close(a, b, **TOL)
        stacked = torch.stack(got.scores)  # (N, B, V)
        assert (stacked[..., 9] == torch.finfo(torch.float32).min).all()  # a ban, made finite
        assert (stacked[..., 7] == float("-inf")).all()  # the caller's ban, after the removal
        assert (stacked[..., 5] == 0).any() and (stacked[..., 5].abs() == torch.finfo(torch.float32).max).any()
    finally:
        for model in (theirs, mine):
            sharpen(model)
    # sampling: the temperature divides the made-finite bans (-> -inf again), then top-k and top-p
    sample = {"do_sample": True, "temperature": 0.7, "top_k": 10, "top_p": 0.9, "max_new_tokens": 8,
              "bad_words_ids": [[9], [11]], "remove_invalid_values": True}
    torch.manual_seed(3)
    expected = oracle.generate(**batch, **sample)
    torch.manual_seed(3)
    assert torch.equal(ours.generate(**batch, **sample), expected)

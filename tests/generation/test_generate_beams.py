"""Beam search's dict output and beam sampling, generate without input_ids, masks with holes and
`logits_to_keep`, each against transformers 5.24 on the sharpened tiny model of test_generation.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_generate_outputs import assert_hidden_states_match
from test_generation import CONFIG, EOS, batch_of_three, oracle, ours, sharpen  # noqa: F401 - fixtures

from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

pytestmark = pytest.mark.oracle
TOL = {"rtol": 0, "atol": 1e-4}
BAN = [[CONFIG["image_token_id"]]]  # the reference re-reads generated image tokens without a cache


def early_eos(oracle: Any, batch: dict[str, torch.Tensor]) -> list[int]:
    """EOS ids that end some beams after a few tokens: row 0's third greedy token."""
    return [EOS, int(oracle.generate(**batch, max_new_tokens=3, do_sample=False, bad_words_ids=BAN)[0, -1])]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_beam_search_scores_logits_indices_and_hidden_states_equal_transformers(oracle: Any, ours: Any,
                                                                                use_cache: bool) -> None:
    """Per step the processed log-probabilities and raw logits of every beam (B*K rows), which beam
    each token came from, and the hidden states (reordered with the beams without the cache)."""
    batch = batch_of_three()
    kwargs = {"max_new_tokens": 7, "num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.5,
              "eos_token_id": early_eos(oracle, batch), "repetition_penalty": 1.2, "bad_words_ids": BAN,
              "output_scores": True, "output_logits": True, "output_hidden_states": True,
              "return_dict_in_generate": True, "use_cache": use_cache}
    expected = oracle.generate(**batch, do_sample=False, **kwargs)
    got = ours.generate(**batch, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, **TOL)
    assert got.beam_indices.dtype == expected.beam_indices.dtype
    assert torch.equal(got.beam_indices, expected.beam_indices)
    assert (got.beam_indices == -1).any()  # some hypothesis ended before the others
    assert len(got.scores) == len(expected.scores) == len(got.logits) == len(expected.logits)
    for mine, theirs in zip(got.scores + got.logits, expected.scores + expected.logits, strict=True):
        assert mine.shape == (9, CONFIG["text_config"]["vocab_size"])
        torch.testing.assert_close(mine, theirs, **TOL)
    assert_hidden_states_match(got, expected, batch["attention_mask"].repeat_interleave(3, 0), use_cache)
    if use_cache:
        assert [k.shape[0] for k, _ in got.past_key_values] == [9, 9]
    else:
        assert got.past_key_values is None


@pytest.mark.parametrize("options", [
    {"num_beams": 3, "temperature": 4.0, "top_k": 40, "top_p": 0.95},
    {"num_beams": 2, "num_return_sequences": 2, "temperature": 3.0, "early_stopping": True},
], ids=["filters", "return-2"])
def test_beam_sampling_draws_what_transformers_draws(oracle: Any, ours: Any, options: dict[str, Any]) -> None:
    """num_beams > 1 with do_sample=True was refused before: candidates drawn without replacement from
    the filtered beam scores (keeping EOS ids + 1 tokens), from the same global seed."""
    batch = batch_of_three()
    kwargs = {"do_sample": True, "max_new_tokens": 8, "eos_token_id": early_eos(oracle, batch),
              "output_scores": True, "return_dict_in_generate": True, **options}
    torch.manual_seed(5)
    expected = oracle.generate(**batch, **kwargs)
    torch.manual_seed(5)
    got = ours.generate(**batch, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, **TOL)
    for mine, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(mine, theirs, **TOL)
    greedy_beams = ours.generate(**batch, **{**kwargs, "do_sample": False})
    assert not torch.equal(got.sequences, greedy_beams.sequences)  # the draws matter


def test_generate_without_input_ids_starts_from_bos(oracle: Any, ours: Any) -> None:
    expected = oracle.generate(max_new_tokens=6, do_sample=False)
    got = ours.generate(max_new_tokens=6)
    assert got.shape == (1, 7) and got[0, 0] == CONFIG["text_config"]["bos_token_id"]
    assert torch.equal(got, expected)
    two = ours.generate(attention_mask=torch.ones(2, 1, dtype=torch.long), max_new_tokens=6)
    assert torch.equal(two, expected.expand(2, -1))
    with pytest.raises(ValueError, match="starts from bos_token_id"):
        without = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(CONFIG))
        without.config.text_config.bos_token_id = None
        without.generation_config = None
        without.generate(max_new_tokens=2)


def test_a_mask_with_holes_and_a_masked_last_token_give_the_tokens_of_transformers(
        oracle: Any, ours: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A 0 after real tokens was refused before; transformers hides the token from attention and
    from the positions, and generates after a masked last token (with a warning from us)."""
    batch = batch_of_three()
    mask = batch["attention_mask"].clone()
    mask[0, 5] = mask[1, -4] = mask[2, -1] = 0  # holes, one of them the last token
    batch["attention_mask"] = mask
    for kwargs in ({}, {"num_beams": 2}, {"repetition_penalty": 1.3}):
        expected = oracle.generate(**batch, max_new_tokens=8, do_sample=False, **kwargs)
        got = ours.generate(**batch, max_new_tokens=8, **kwargs)
        assert torch.equal(got, expected), kwargs
    assert "ends with padding" in caplog.text
    assert not torch.equal(got, ours.generate(**batch_of_three(), max_new_tokens=8, repetition_penalty=1.3))


def test_logits_to_keep_is_accepted_and_changes_nothing(ours: Any) -> None:
    batch = batch_of_three()
    base = ours.generate(**batch, max_new_tokens=5)
    for keep in (0, 1, 3):
        assert torch.equal(ours.generate(**batch, max_new_tokens=5, logits_to_keep=keep), base)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_inputs_embeds_are_the_prompt_as_in_transformers(oracle: Any, ours: Any, num_beams: int) -> None:
    batch = batch_of_three()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    options = {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": num_beams, "do_sample": False,
               "return_dict_in_generate": True, "output_scores": True}
    plain = ours.generate(ids, attention_mask=mask, **options)
    same = ours.generate(ids, attention_mask=mask, inputs_embeds=ours.get_input_embeddings()(ids), **options)
    assert torch.equal(plain.sequences, same.sequences)
    for a, b in zip(plain.scores, same.scores, strict=True):
        torch.testing.assert_close(a, b)
    embeds = torch.rand(*ids.shape, ours.config.text_config.hidden_size, generator=torch.Generator().manual_seed(4))
    mine = ours.generate(ids, attention_mask=mask, inputs_embeds=embeds, **options)
    theirs = oracle.generate(ids, attention_mask=mask, inputs_embeds=embeds, **options)
    assert torch.equal(mine.sequences, theirs.sequences)
    assert not torch.allclose(mine.scores[0], same.scores[0])
    with pytest.raises(ValueError, match=r"inputs_embeds must be \(batch, tokens, 48\) matching input_ids"):
        ours.generate(ids, attention_mask=mask, inputs_embeds=embeds[:, 1:], max_new_tokens=2)

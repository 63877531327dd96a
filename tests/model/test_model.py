"""Forward parity with transformers (eager attention, float32) on tiny random configs.

Norm weights and perceiver latents are randomised (transformers initialises them to 1), and the
inputs carry padding images, partial patches on a padded canvas and left padding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import make_batch, oracle_model, tiny_config_dict
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Model
from idefics2.model.vision import bucket_position_ids

pytestmark = pytest.mark.oracle

CONFIGS = {
    "gqa-window8": tiny_config_dict(sliding_window=8),
    "tied-mqa": tiny_config_dict(tie=True, kv_heads=1, perceiver_kv_heads=1, vision_heads=2, latents=2),
    "mha-no-window-default-eps": tiny_config_dict(kv_heads=4, perceiver_kv_heads=4, sliding_window=None,
                                                  perceiver_eps=None, patch=5, image_size=40, latents=4),
}


def models_and_batch(name: str) -> tuple[dict[str, Any], Any, Idefics2ForConditionalGeneration,
                                         dict[str, torch.Tensor]]:
    """The config of CONFIGS[name], the oracle built from it, ours with its weights, and a batch."""
    config = CONFIGS[name]
    reference = oracle_model(config)
    return config, reference, ours_from(reference, config), make_batch(config)


def ours_from(reference: Any, config: dict[str, Any]) -> Idefics2ForConditionalGeneration:
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config)).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def loss_labels(batch: dict[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
    """Labels that ignore padding, image tokens, and the first real token of each row: its logits
    come from a padding query, whose output the reference itself leaves undefined (eager and sdpa
    disagree there)."""
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[labels == image_token_id] = -100
    first_real = batch["attention_mask"].argmax(dim=1)
    labels[torch.arange(labels.shape[0]), first_real] = -100
    return labels


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_logits_and_loss_match_transformers(name: str) -> None:
    config, reference, ours, batch = models_and_batch(name)
    labels = loss_labels(batch, config["image_token_id"])
    expected = reference(**batch, labels=labels)
    got = ours(**batch, labels=labels)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], expected.logits[real], rtol=0, atol=1e-4)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)


@torch.no_grad()
def test_image_features_match_transformers_per_sample_order() -> None:
    config, reference, ours, batch = models_and_batch("gqa-window8")
    expected = reference.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])
    got = ours.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])
    L, D = config["perceiver_config"]["resampler_n_latents"], config["text_config"]["hidden_size"]
    assert got.shape == (3, L, D)  # 2 + 1 + 0 real images
    torch.testing.assert_close(got.reshape(-1, D), torch.cat(expected.pooler_output), rtol=0, atol=1e-5)


@torch.no_grad()
def test_inputs_embeds_give_the_same_logits_as_input_ids() -> None:
    config, reference, ours, batch = models_and_batch("gqa-window8")
    embeds = ours.get_input_embeddings()(batch["input_ids"])
    by_ids = ours(**batch).logits
    by_embeds = ours(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"]).logits
    expected = reference(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"],
                         pixel_attention_mask=batch["pixel_attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=0)
    torch.testing.assert_close(by_embeds[real], expected[real], rtol=0, atol=1e-4)


@torch.no_grad()
def test_cached_decode_equals_full_forward_beyond_the_sliding_window() -> None:
    config = CONFIGS["gqa-window8"]  # window 8, sequence 20
    reference = oracle_model(config)
    ours = ours_from(reference, config)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 99, (2, 20), generator=g)
    full = ours(input_ids=ids, use_cache=False).logits
    step = ours(input_ids=ids[:, :12], use_cache=True)
    logits = [step.logits]
    for t in range(12, 20):
        step = ours(input_ids=ids[:, t:t + 1], past_key_values=step.past_key_values, use_cache=True)
        logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=0, atol=1e-5)
    torch.testing.assert_close(full, reference(input_ids=ids).logits, rtol=0, atol=1e-4)


@torch.no_grad()
def test_logits_to_keep_selects_the_last_positions() -> None:
    config = CONFIGS["tied-mqa"]
    ours = ours_from(oracle_model(config), config)
    batch = make_batch(config)
    full = ours(**batch).logits
    torch.testing.assert_close(ours(**batch, logits_to_keep=1).logits, full[:, -1:], rtol=0, atol=1e-5)
    kept = ours(**batch, logits_to_keep=torch.tensor([0, 4])).logits
    torch.testing.assert_close(kept, full[:, [0, 4]], rtol=0, atol=1e-5)


@torch.no_grad()
def test_hidden_states_match_transformers_layer_by_layer() -> None:
    """`output_hidden_states=True` failed before; now: the embeddings, each layer's output, the last
    one after the final norm, as the reference gives them."""
    config, reference, ours, batch = models_and_batch("gqa-window8")
    real = batch["attention_mask"].bool()
    got = ours(**batch, output_hidden_states=True)
    expected = reference(**batch, output_hidden_states=True)
    assert len(got.hidden_states) == len(expected.hidden_states) == config["text_config"]["num_hidden_layers"] + 1
    for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine[real], theirs[real], rtol=0, atol=1e-4)
    assert ours(**batch).hidden_states is None
    with pytest.warns(UserWarning, match="`attentions` is None"):  # as transformers under SDPA
        assert ours(**batch, output_attentions=True).attentions is None


@torch.no_grad()
def test_outputs_index_and_unpack_like_transformers() -> None:
    """`outputs[0]` and `return_dict=False` failed before: set fields, in transformers' order."""
    config, reference, ours, batch = models_and_batch("tied-mqa")
    out = ours(**batch)
    assert torch.equal(out[0], out.logits) and torch.equal(out["logits"], out.logits)
    assert out.keys() == ["logits", "past_key_values", "image_hidden_states"] and out.cache is out.past_key_values
    labels = loss_labels(batch, config["image_token_id"])
    with_loss = ours(**batch, labels=labels, use_cache=False, return_dict=False)
    theirs = reference(**batch, labels=labels, use_cache=False, return_dict=False)
    assert isinstance(with_loss, tuple) and len(with_loss) == len(theirs) == 3  # loss, logits, images
    torch.testing.assert_close(with_loss[0], theirs[0], rtol=0, atol=1e-5)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(with_loss[1][real], theirs[1][real], rtol=0, atol=1e-4)
    loss, logits = with_loss[:2]
    assert loss.dim() == 0 and logits.shape[:2] == batch["input_ids"].shape
    base = ours.model(**batch, return_dict=False)
    assert torch.equal(base[0], ours.model(**batch).last_hidden_state)


@pytest.mark.parametrize("name", ["gqa-window8", "tied-mqa"])
def test_resize_token_embeddings_like_transformers(name: str) -> None:
    """resize_token_embeddings did not exist: kept rows, new rows at the old mean, config and tying follow."""
    config = CONFIGS[name]
    reference = oracle_model(config)
    ours = ours_from(reference, config)
    old_rows = ours.get_input_embeddings().weight.detach().clone()
    mine = ours.resize_token_embeddings(130, pad_to_multiple_of=8)
    theirs = reference.resize_token_embeddings(130, pad_to_multiple_of=8)
    assert mine.weight.shape == theirs.weight.shape == (136, config["text_config"]["hidden_size"])
    assert ours.config.text_config.vocab_size == reference.config.text_config.vocab_size == 136
    assert torch.equal(mine.weight[:120], old_rows)
    torch.testing.assert_close(mine.weight, theirs.weight, rtol=0, atol=1e-3)  # theirs: N(mean, 1e-9 cov)
    torch.testing.assert_close(ours.lm_head.weight, reference.lm_head.weight, rtol=0, atol=1e-3)
    tied = config["tie_word_embeddings"]
    assert (ours.lm_head.weight is mine.weight) == (reference.lm_head.weight is theirs.weight) == tied
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 133]])
        assert ours(input_ids=ids).logits.shape == (1, 3, 136)
    assert ours.resize_token_embeddings(100).weight.shape[0] == ours.lm_head.weight.shape[0] == 100
    assert ours.get_output_embeddings() is ours.lm_head and ours.can_generate()
    assert ours.main_input_name == "input_ids"
    with pytest.raises(ValueError, match="new_num_tokens must be a positive integer"):
        ours.resize_token_embeddings(0)


@torch.no_grad()
def test_a_4d_attention_mask_is_used_as_given_like_transformers() -> None:
    """A (B, 1, T, S) mask was refused before: float additive masks give the reference's logits;
    a bool one (True = may attend) gives ours with the 2-D mask it spells out."""
    config, reference, ours, batch = models_and_batch("mha-no-window-default-eps")
    B, T = batch["input_ids"].shape
    real = batch["attention_mask"].bool()
    visible = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & real[:, None, None, :]
    visible = visible | torch.eye(T, dtype=torch.bool)[None, None]  # a padding query sees itself
    additive = torch.where(visible, 0.0, torch.finfo(torch.float32).min)
    two_d = ours(**batch).logits
    for mask in (additive, visible):
        got = ours(**{**batch, "attention_mask": mask}).logits
        torch.testing.assert_close(got[real], two_d[real], rtol=0, atol=1e-5)
    expected = reference(**{**batch, "attention_mask": additive}).logits
    torch.testing.assert_close(ours(**{**batch, "attention_mask": additive}).logits[real], expected[real],
                               rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"a 4-D attention_mask must be \(3 or 1, 1, \d+, \d+\)"):
        ours(**{**batch, "attention_mask": additive[:, :, :-1]})


@torch.no_grad()
def test_assigning_use_cache_on_the_model_config_turns_the_cache_off() -> None:
    """Configs take assignments, as transformers' do: `model.config.use_cache = False` is read by forward."""
    config = CONFIGS["tied-mqa"]
    ours = ours_from(oracle_model(config), config)
    batch = make_batch(config)
    assert ours(**batch).past_key_values is not None
    ours.config.use_cache = False
    assert ours(**batch).past_key_values is None


@torch.no_grad()
def test_idefics2_model_hidden_states_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    config = CONFIGS["gqa-window8"]
    reference = oracle_model(config)
    ours = Idefics2Model(Idefics2Config.from_dict(config)).eval()
    ours.load_state_dict(reference.model.state_dict(), strict=True)
    batch = make_batch(config)
    real = batch["attention_mask"].bool()
    expected = transformers.Idefics2Model.forward(reference.model, **batch).last_hidden_state
    torch.testing.assert_close(ours(**batch).last_hidden_state[real], expected[real], rtol=0, atol=1e-4)


def test_position_buckets_equal_the_reference_for_every_size_up_to_70() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings

    N = 70
    cfg = transformers.Idefics2VisionConfig(hidden_size=1, image_size=N, patch_size=1, num_attention_heads=1)
    embeddings = Idefics2VisionEmbeddings(cfg)
    with torch.no_grad():  # output = position id: zero patch conv, table row i holds i
        embeddings.patch_embedding.weight.zero_()
        embeddings.patch_embedding.bias.zero_()
        embeddings.position_embedding.weight.copy_(torch.arange(N * N, dtype=torch.float32)[:, None])
    masks = torch.zeros(N, N, N, dtype=torch.bool)
    for n in range(1, N + 1):  # image n: n valid rows and 71 - n valid columns
        masks[n - 1, :n, : N + 1 - n] = True
    with torch.no_grad():
        expected = embeddings(torch.zeros(N, 3, N, N), masks)[..., 0].long()
    got = bucket_position_ids(masks, N)
    assert torch.equal(got, expected)
    # spot-check a float32 exception of docs/numerics.md §4.3.2: n = 25 gives 13 (not 14) at i = 5
    assert got[24].view(N, N)[5, 0] == 13 * N


def test_too_few_image_tokens_names_both_counts_and_causes() -> None:
    config = CONFIGS["gqa-window8"]
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config)).eval()
    batch = make_batch(config)
    batch["input_ids"][0, 2] = 5  # one <image> token fewer
    with pytest.raises(ValueError, match=r"8 <image> tokens but the images give 9 feature rows.*do_image_splitting"):
        model(**batch)


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(pixel_values=b["pixel_values"][0]), r"pixel_values must have 5 dimensions"),
    (lambda b: b.update(pixel_attention_mask=b["pixel_attention_mask"][:, :, :20]),
     r"pixel_attention_mask has shape \(3, 2, 20, 30\), expected \(3, 2, 27, 30\)"),
    (lambda b: b.update(inputs_embeds=torch.zeros(3, 4, 48)), r"exactly one of input_ids and inputs_embeds \(got both\)"),
    (lambda b: b.pop("input_ids"), r"exactly one of input_ids and inputs_embeds \(got neither\)"),
    (lambda b: b.update(image_hidden_states=torch.zeros(3, 3, 48)), r"either pixel_values or precomputed"),
    (lambda b: b.update(attention_mask=b["attention_mask"][:, 1:]), r"attention_mask has shape \(3, 22\), expected \(3, 23\)"),
])
def test_bad_inputs_raise_clear_value_errors(change: Any, message: str) -> None:
    config = CONFIGS["gqa-window8"]
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config)).eval()
    batch = make_batch(config)
    change(batch)
    with pytest.raises(ValueError, match=message):
        model(**batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_runs_and_stays_close_to_float32(dtype: torch.dtype) -> None:
    config, reference, ours, batch = models_and_batch("gqa-window8")
    full = ours(**batch).logits
    half = ours.to(dtype)(**batch).logits
    assert half.dtype == dtype
    real = batch["attention_mask"].bool()
    assert torch.isfinite(half[real]).all()
    scale = full[real].abs().max()
    assert (half[real].float() - full[real]).abs().max() < 0.1 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cuda_matches_the_reference_on_the_same_device(dtype: torch.dtype) -> None:
    config = CONFIGS["gqa-window8"]
    reference = oracle_model(config, attn="sdpa").to("cuda", dtype)
    ours = ours_from(reference, config).to("cuda", dtype)
    batch = {k: v.cuda() for k, v in make_batch(config).items()}
    real = batch["attention_mask"].bool()
    got, expected = ours(**batch).logits[real].float(), reference(**batch).logits[real].float()
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)


def test_images_smaller_than_a_patch_are_a_value_error() -> None:
    from conftest import tiny_config_dict
    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(tiny_config_dict(patch=4)))
    with pytest.raises(ValueError, match=r"at least the patch size 4, got \(1, 1, 3, 3, 9\)"):
        model.get_image_features(torch.zeros(1, 1, 3, 3, 9))

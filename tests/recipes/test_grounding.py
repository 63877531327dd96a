"""Grounding objectives: patch labels against the rendered pixels and hand-worked classes, the routing
and alignment losses at hand-computable points, and the two-stage training run end to end."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHIPPED
from idefics2.config import Idefics2Config
from idefics2.model.text import positions_from_mask
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.processing.tokenizer import Tokenizer
from recipes.shapes_vqa import grounding
from recipes.shapes_vqa import train as train_module
from recipes.shapes_vqa.data import ConversationBatches
from recipes.shapes_vqa.grounding import Grounding, latent_patch_order, patch_classes, pretrain_vision
from recipes.shapes_vqa.presets import build_processor, model_config_dict
from recipes.shapes_vqa.synthetic import COLORS, WORDS, Scene, Shape, patch_contents, render, sample_scene
from recipes.shapes_vqa.train import TrainConfig, train


@pytest.fixture(autouse=True)
def _restore_threads():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_patch_contents_agree_with_the_rendered_pixels() -> None:
    """Cells whose centre a shape covers show that shape's colour there; cells with nothing show the
    background; every shape and the text get at least one cell at the 8x8 grid we train with and finer.
    Noise-free scenes, odd canvases."""
    rng = random.Random(3)
    for _ in range(40):
        scene = sample_scene(rng, with_text=rng.random() < 0.5)
        scene = Scene(**{**scene.__dict__, "noise_std": 0.0})
        grid = rng.choice((8, 11, 13))
        pixels = np.asarray(render(scene), dtype=np.int32)
        shape_index, on_text = patch_contents(scene, grid)
        assert set(shape_index.tolist()) - {-1} == set(range(len(scene.shapes)))
        assert bool(on_text.any()) == (scene.text is not None)
        for cell in range(grid * grid):
            row, col = divmod(cell, grid)
            x, y = int((col + 0.5) * scene.width / grid), int((row + 0.5) * scene.height / grid)
            colour = pixels[y, x]
            if shape_index[cell] >= 0:
                shape = scene.shapes[shape_index[cell]]
                dx, dy = x - shape.cx, y - shape.cy
                if dx * dx + dy * dy <= (0.4 * shape.r) ** 2:  # well inside any of the three kinds
                    assert np.abs(colour - np.array(COLORS[shape.color])).max() <= 1
            elif not on_text[cell]:
                assert np.abs(colour - np.array(scene.background)).max() <= 1


def test_patch_classes_encode_kind_colour_and_rank_from_the_left() -> None:
    """Worked by hand on a 128 px canvas, 8 x 8 cells of 16 px: a red circle at x = 24 (rank 0,
    class 1 + (0 * 6 + 0) * 5 + 0 = 1), a blue square at x = 100 (rank 1, kind 1, colour 2:
    1 + (1 * 6 + 2) * 5 + 1 = 42), and "CAT" (word class 1 + 0) at the top left."""
    scene = Scene(width=128, height=128, background=(255, 255, 255), noise_std=0.0, noise_seed=0,
                  shapes=(Shape("square", "blue", 100, 72, 14), Shape("circle", "red", 24, 72, 14)),
                  text="CAT", text_xy=(4, 4), text_size=14)
    objects, words = patch_classes(scene, 8)
    assert objects.reshape(8, 8)[4, 1] == 1 and objects.reshape(8, 8)[4, 6] == 42
    assert set(objects.tolist()) == {0, 1, 42}
    assert words.reshape(8, 8)[0, 0] == 1 + WORDS.index("CAT") and words.reshape(8, 8)[7, 7] == 0
    assert list(COLORS).index("blue") == 2


def test_latent_patch_order_runs_column_by_column() -> None:
    assert latent_patch_order(3).tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]


def _grounded_model(preset: str = "cpu64") -> tuple[Idefics2ForConditionalGeneration, object, Tokenizer]:
    tokenizer = Tokenizer.from_pretrained(SHIPPED)
    processor = build_processor(preset, tokenizer)
    config = Idefics2Config.from_dict(model_config_dict(preset, len(tokenizer), processor.image_token_id))
    torch.manual_seed(0)
    return Idefics2ForConditionalGeneration(config), processor, tokenizer


def test_routing_and_alignment_losses_at_hand_computable_points() -> None:
    model, processor, tokenizer = _grounded_model()
    ground = Grounding(model, tokenizer, route_weight=1.0, align_weight=1.0, background_weight=1.0)
    attention = model.model.connector.perceiver_resampler.layers[0].self_attn
    torch.nn.init.zeros_(attention.q_proj.weight)  # uniform attention over 64 patches + 64 latents
    batch = ConversationBatches(processor, seed=0, batch_size=3, start=0, stop=1, max_turns=1, patch_grid=8)[0]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=positions_from_mask(batch["attention_mask"]), pixel_values=batch["pixel_values"].float(),
              pixel_attention_mask=batch["pixel_attention_mask"])
        assert ground.routing_loss().item() == pytest.approx(math.log(128), rel=1e-4)
        # alignment: a latent over a shape is scored on " <colour>" and " <kind>", half each
        objects, words = batch["patch_objects"], batch["patch_words"]
        order = latent_patch_order(8)
        image, latent = next((i, j) for i in range(objects.shape[0]) for j in range(64)
                             if objects[i, order[j]] > 0 and words[i, order[j]] == 0)
        pair = (int(objects[image, order[latent]]) - 1) // 5
        kind, colour = ("circle", "square", "triangle")[pair // 6], list(COLORS)[pair % 6]
        ids = [tokenizer(f" {w}", add_special_tokens=False)["input_ids"] for w in (colour, kind)]
        assert all(len(piece) == 1 for piece in ids)  # single tokens in the shipped vocabulary
        logp = (ground.captured["latents"][image, latent] @ model.lm_head.weight.T).log_softmax(-1)
        expected = -(0.5 * logp[ids[0][0]] + 0.5 * logp[ids[1][0]])
        only_this = torch.zeros_like(objects)
        only_this[image, order[latent]] = objects[image, order[latent]]
        content, background = ground.alignment_losses(only_this, torch.zeros_like(words))
        assert content.item() == pytest.approx(expected.item(), rel=1e-5)
        # background: every other latent, scored on <unk>
        others = torch.ones(objects.shape[0], 64, dtype=torch.bool)
        others[image, latent] = False
        all_logp = (ground.captured["latents"] @ model.lm_head.weight.T).log_softmax(-1)
        assert tokenizer.unk_token_id == 0
        assert background.item() == pytest.approx(-all_logp[others][:, 0].mean().item(), rel=1e-5)
        ground.captured["latents"] = torch.zeros_like(ground.captured["latents"])  # equal logits: log V
        vocab = model.lm_head.weight.shape[0]
        assert ground.alignment_losses(only_this, torch.zeros_like(words))[1].item() == pytest.approx(math.log(vocab))
    ground.close()
    assert not model.model.connector._forward_hooks


def test_target_rows_give_every_word_full_weight_even_with_a_repeated_piece() -> None:
    """A word class's row sums to 1 and a shape class's to 0.5 + 0.5; "11" is one token twice in the
    shipped vocabulary, so that token's share must be the whole row, not half of it."""
    tokenizer = Tokenizer.from_pretrained(SHIPPED)
    objects, words = Grounding._target_tables(tokenizer, len(tokenizer))
    assert torch.allclose(objects[1:].sum(-1), torch.ones(objects.shape[0] - 1))
    assert torch.allclose(words[1:].sum(-1), torch.ones(words.shape[0] - 1))
    pieces = tokenizer("11", add_special_tokens=False)["input_ids"]
    assert len(pieces) == 2 and pieces[0] == pieces[1]
    assert words[WORDS.index("11") + 1, pieces[0]].item() == pytest.approx(1.0)


def test_grounding_needs_one_latent_per_patch() -> None:
    model, _, tokenizer = _grounded_model("cpu")
    with pytest.raises(ValueError, match="one latent per patch: 64 latents"):
        Grounding(model, tokenizer, route_weight=1.0, align_weight=0.0)


def test_vision_pretraining_lowers_its_loss_and_leaves_a_frozen_tower_frozen() -> None:
    model, processor, _ = _grounded_model("tiny")
    vision = model.model.vision_model.requires_grad_(False)
    before = vision.embeddings.patch_embedding.weight.clone()
    records: list[dict] = []
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pretrain_vision(vision, processor.image_processor, seed=0, batch_size=8, lr=3e-3,
                    minutes=10, max_steps=60, warmup_steps=10, log=records.append)
    assert len(records) == 60
    first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-10:]])
    assert last < 0.7 * first  # 0.62 measured
    assert not any(p.requires_grad for p in vision.parameters())
    assert not torch.equal(vision.embeddings.patch_embedding.weight, before)


def test_two_stage_run_freezes_the_pretrained_tower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--vision-minutes` pretrains the tower, which then stays as it was through the main loop;
    the grounding terms are logged per step."""
    pretrained: dict[str, torch.Tensor] = {}

    def fake_pretraining(vision, *args, **kwargs):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            for p in vision.parameters():
                p.add_(0.01)
        pretrained.update({k: v.clone() for k, v in vision.state_dict().items()})
        kwargs["log"]({"vision_step": 1, "loss": 1.0})
        return {"pair": 0.0}

    monkeypatch.setattr(train_module, "pretrain_vision", fake_pretraining)
    cfg = TrainConfig(out_dir=str(tmp_path), preset="cpu64", steps=3, batch_size=2, lr=1e-2, warmup_steps=0,
                      eval_questions=0, checkpoint_every=10, tokenizer_dir=str(SHIPPED), max_turns=1, threads=1,
                      vision_minutes=1.0, route_weight=1.0, align_weight=1.0, background_weight=0.5)
    train(cfg)
    exported = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "model").model.vision_model.state_dict()
    for name, value in pretrained.items():
        torch.testing.assert_close(exported[name], value, msg=name)
    records = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    keys = ["align_loss", "background_loss", "elapsed", "grad_norm", "loss", "lr", "route_loss", "step"]
    assert [sorted(r) for r in records] == [keys] * 3
    assert (tmp_path / "vision_history.jsonl").read_text().strip() == '{"vision_step": 1, "loss": 1.0}'
    assert grounding.N_OBJECT_CLASSES == 91

"""Grounding: auxiliary objectives that let a CPU-sized Idefics2 learn the shapes task in minutes.

Trained end to end from the answers alone, our small models never learned to bind a colour to a shape
on a CPU budget (docs/training.md): a vision transformer from scratch learns "circle" slowly, the
perceiver's near-uniform attention averages a small shape away, and the decoder has no way to tell
which image token means what. Each of the three is given a direct signal here, all computed from the
scene geometry (`synthetic.patch_contents`); none of it changes the architecture or the checkpoint:

1. **Vision pretraining** (`pretrain_vision`): the vision tower alone, with a linear head per patch
   predicting what lies under it: the (kind, colour, rank from the left) of the shape, and the printed
   word. The heads are thrown away afterwards; the tower is frozen for the rest of the run.
2. **Routing** (`Grounding`, `route_weight`): with as many latents as patches, latent i is taught to
   attend to one patch, taken column by column, so the image tokens reach the decoder in left-to-right
   order, one small region each, instead of 64 averages of the whole image.
3. **Alignment** (`Grounding`, `align_weight`): each latent over a shape is pulled towards the word
   embeddings of that shape's colour and kind (" red", " circle"), and one over printed text towards the
   word's tokens, through the tied output embedding. A question's " circle" then matches the image
   token of the circle from the first step, as it would if the scene were written out in words.
4. **Background** (`Grounding`, `background_weight`): a latent over empty background is pulled towards
   the `<unk>` token's embedding, a direction no question word shares. Left free, such latents drift
   towards words such as " circle" or " purple", which a question's word can then match. (A uniform
   target would not do: a latent meets it by shrinking, and the decoder's RMSNorm undoes the
   shrinking.) This cleans the latents but did not by itself fix colour answers (docs/training.md).

Shape letters: B images, P patches, L latents, D text width, V vocabulary.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from idefics2.model.connector import PerceiverAttention
from idefics2.model.vision import VisionTransformer
from idefics2.modeling import Idefics2ForConditionalGeneration
from idefics2.processing.image_processor import Idefics2ImageProcessor
from recipes.shapes_vqa.synthetic import (
    COLORS,
    MAX_SHAPES,
    SHAPES,
    WORDS,
    Scene,
    patch_contents,
    render,
    sample_scene,
)

logger = logging.getLogger(__name__)

N_PAIRS = len(SHAPES) * len(COLORS)
N_OBJECT_CLASSES = 1 + N_PAIRS * MAX_SHAPES  # 0 = no shape, then (kind, colour, rank from the left)
N_WORD_CLASSES = 1 + len(WORDS)  # 0 = no text, then the word


def patch_classes(scene: Scene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (row-major): object class 1 + ((kind * 6 + colour) * 5 + rank from the left), 0 for
    background; word class 1 + index in WORDS, 0 off the text. Both (grid², ) int64."""
    shape_index, on_text = patch_contents(scene, grid)
    rank = {i: r for r, i in enumerate(sorted(range(len(scene.shapes)), key=lambda i: scene.shapes[i].cx))}
    classes = [0] + [1 + (SHAPES.index(s.kind) * len(COLORS) + list(COLORS).index(s.color)) * MAX_SHAPES + rank[i]
                     for i, s in enumerate(scene.shapes)]
    objects = np.asarray(classes, dtype=np.int64)[shape_index + 1]
    words = np.where(on_text, 1 + WORDS.index(scene.text) if scene.text is not None else 0, 0).astype(np.int64)
    return objects, words


def latent_patch_order(grid: int) -> Tensor:
    """(grid², ) row-major patch index of each latent: latents run column by column, left to right."""
    latent = torch.arange(grid * grid)
    return (latent % grid) * grid + latent // grid


# ------------------------------------------------------------------------------- 1. vision pretraining
class PatchBatches(Dataset[dict[str, Tensor]]):
    """Batch `index` is a pure function of (seed, index): pixels of fresh single scenes and their
    per-patch classes (`patch_classes`)."""

    def __init__(self, image_processor: Idefics2ImageProcessor, grid: int, seed: int, batch_size: int,
                 steps: int) -> None:
        self.image_processor, self.grid, self.seed = image_processor, grid, seed
        self.batch_size, self.steps = batch_size, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rng = random.Random(self.seed * 1_000_000_009 + index)
        scenes = [sample_scene(rng) for _ in range(self.batch_size)]
        pixels = self.image_processor([[render(s)] for s in scenes], return_tensors="pt")["pixel_values"][:, 0]
        objects, words = zip(*(patch_classes(s, self.grid) for s in scenes))
        return {"pixel_values": pixels, "objects": torch.from_numpy(np.stack(objects)),
                "words": torch.from_numpy(np.stack(words))}


def _weighted_ce(logits: Tensor, target: Tensor, weight_on: float = 5.0) -> Tensor:
    """Cross-entropy over patches with the rare non-background patches weighted `weight_on`."""
    weight = torch.where(target > 0, weight_on, 1.0).flatten()
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    return (loss * weight).sum() / weight.sum()


def pretrain_vision(vision: VisionTransformer, image_processor: Idefics2ImageProcessor, *, seed: int,
                    batch_size: int, lr: float, minutes: float, max_steps: int | None = None,
                    warmup_steps: int = 100, num_workers: int = 0,
                    log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, float]:
    """Train every parameter of `vision` in place (whatever its `requires_grad`, which is restored after)
    to tell, at every patch, the kind, colour and rank from the left of the shape under it and the
    printed word, for `minutes` of wall clock or `max_steps`, whichever ends first. Returns the
    accuracies over the last 50 steps.

    Dense labels make this fast: on 2 CPU cores the `cpu64` tower tells (kind, colour) on 96.6% of
    shape patches after 12 minutes (3,200 steps), where training on answers alone leaves kind near
    chance for far longer (docs/training.md).
    """
    cfg = vision.config
    grid = cfg.num_patches_per_side
    device = next(vision.parameters()).device
    frozen = [p for p in vision.parameters() if not p.requires_grad]  # trained here, frozen again after
    vision.requires_grad_(True)
    heads = nn.ModuleDict({"objects": nn.Linear(cfg.hidden_size, N_OBJECT_CLASSES),
                           "words": nn.Linear(cfg.hidden_size, N_WORD_CLASSES)}).to(device)
    params = [*vision.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    data = PatchBatches(image_processor, grid, seed, batch_size, steps=max_steps or 10**9)
    loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=num_workers,
                        prefetch_factor=4 if num_workers else None)
    patch_mask = torch.ones(batch_size, grid, grid, dtype=torch.bool, device=device)
    recent: dict[str, deque[float]] = {name: deque(maxlen=50) for name in ("pair", "rank", "word")}
    vision.train()
    start = time.monotonic()
    for step, batch in enumerate(loader, start=1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / warmup_steps)
        batch = {k: v.to(device) for k, v in batch.items()}
        features = vision(batch["pixel_values"], patch_mask)  # (B, P, D_v)
        logits = {name: head(features) for name, head in heads.items()}  # (B, P, classes)
        loss = _weighted_ce(logits["objects"], batch["objects"]) + _weighted_ce(logits["words"], batch["words"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            objects, predicted = batch["objects"], logits["objects"].argmax(-1)
            on_shape = objects > 0
            truth, guess = objects[on_shape] - 1, predicted[on_shape] - 1
            recent["pair"].append((guess // MAX_SHAPES == truth // MAX_SHAPES).float().mean().item())
            recent["rank"].append((guess % MAX_SHAPES == truth % MAX_SHAPES).float().mean().item())
            on_text = batch["words"] > 0
            if bool(on_text.any()):
                recent["word"].append((logits["words"].argmax(-1)[on_text] == batch["words"][on_text])
                                      .float().mean().item())
        accuracy = {name: round(float(np.mean(values)), 4) if values else 0.0 for name, values in recent.items()}
        elapsed = time.monotonic() - start
        if log is not None:
            log({"vision_step": step, "loss": round(loss.item(), 5), **accuracy, "elapsed": round(elapsed, 2)})
        if step % 200 == 0:
            logger.info("vision step %d: loss %.3f, patch accuracy %s", step, loss.item(), accuracy)
        if elapsed >= minutes * 60 or step == max_steps:
            break
    for param in frozen:
        param.requires_grad_(False)
    return accuracy


# -------------------------------------------------------------------- 2-4. routing, alignment, background
class Grounding:
    """Routing, alignment and background losses for a model whose perceiver has one latent per patch.

    Hooks capture the first perceiver layer's attention inputs and the connector's output during the
    model's own forward, so the model code is untouched; `loss(batch)` then needs only the batch's
    per-image `patch_objects`/`patch_words` (`patch_classes`, images in placeholder order).
    """

    def __init__(self, model: Idefics2ForConditionalGeneration, tokenizer: Any, route_weight: float,
                 align_weight: float, background_weight: float = 0.0) -> None:
        config = model.config
        grid = config.vision_config.num_patches_per_side
        if config.perceiver_config.resampler_n_latents != grid * grid:
            raise ValueError(f"routing needs one latent per patch: {grid * grid} latents for a {grid}x{grid} patch "
                             f"grid, the config has {config.perceiver_config.resampler_n_latents}")
        self.model, self.route_weight, self.align_weight = model, route_weight, align_weight
        self.background_weight = background_weight
        self.background_id = tokenizer.unk_token_id
        if background_weight > 0 and self.background_id is None:
            raise ValueError("the background term needs a tokenizer with an <unk> token")
        self.grid = grid
        device = model.lm_head.weight.device  # the tables are built once, where the latents will be
        self.order = latent_patch_order(grid).to(device)  # (L,)
        self.latent_index = torch.arange(grid * grid, device=device)  # (L,)
        self.targets = tuple(t.to(device) for t in self._target_tables(tokenizer, config.text_config.vocab_size))
        self.captured: dict[str, Any] = {}
        self.last: dict[str, float] = {}  # the latest loss terms, for the run's history
        attention = next(m for m in model.model.connector.modules() if isinstance(m, PerceiverAttention))
        self.hooks = [attention.register_forward_hook(self._keep_attention_inputs),
                      model.model.connector.register_forward_hook(
                          lambda _m, _args, output: self.captured.update(latents=output))]

    def close(self) -> None:
        """Remove the hooks (before the model is copied or exported)."""
        for hook in self.hooks:
            hook.remove()
        self.captured.clear()

    def _keep_attention_inputs(self, module: nn.Module, args: tuple[Any, ...], _output: Tensor) -> None:
        self.captured["attention"] = (module, args[0], args[1])

    @staticmethod
    def _target_tables(tokenizer: Any, vocab_size: int) -> tuple[Tensor, Tensor]:
        """Rows of token probabilities per object class (half on the colour word's tokens, half on the
        kind's, as they are written inside a sentence: " red", " circle") and per word class. A piece
        that occurs twice in a word ("11") gets twice the share."""
        def add(row: Tensor, text: str, weight: float) -> None:
            pieces = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
            row.index_add_(0, pieces, torch.full((len(pieces),), weight / len(pieces)))

        objects = torch.zeros(N_OBJECT_CLASSES, vocab_size)
        for cls in range(1, N_OBJECT_CLASSES):
            pair = (cls - 1) // MAX_SHAPES
            for word in (" " + SHAPES[pair // len(COLORS)], " " + list(COLORS)[pair % len(COLORS)]):
                add(objects[cls], word, 0.5)
        words = torch.zeros(N_WORD_CLASSES, vocab_size)
        for cls, word in enumerate(WORDS, start=1):
            add(words[cls], word, 1.0)
        return objects, words

    def routing_loss(self) -> Tensor:
        """-log of the attention mass each latent puts on its own patch (heads averaged)."""
        module, latents, context = self.captured["attention"]  # normed inputs (B, L, D), (B, P, D)
        B, L, _ = latents.shape
        kv_in = torch.cat([context, latents], dim=1)  # (B, P+L, D) as the layer builds it
        q = module.q_proj(latents).view(B, L, module.num_heads, module.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = module.k_proj(kv_in).view(B, -1, module.num_kv_heads, module.head_dim).transpose(1, 2)
        k = k.repeat_interleave(module.num_heads // module.num_kv_heads, dim=1)  # (B, H, P+L, hd)
        probs = ((q @ k.transpose(-1, -2)) * module.head_dim**-0.5).softmax(-1).mean(1)  # (B, L, P+L)
        mass = probs[:, self.latent_index, self.order]  # (B, L)
        return -(mass + 1e-6).log().mean()

    def alignment_losses(self, objects: Tensor, words: Tensor) -> tuple[Tensor, Tensor]:
        """(content, background) cross-entropies of each latent's tied-embedding log-probabilities: with
        its content's word tokens over latents on a shape or on text, and with `<unk>` over the other
        latents. objects/words (B, P) classes."""
        latents = self.captured["latents"]  # (B, L, D)
        object_table, word_table = self.targets
        target = object_table[objects[:, self.order]] + word_table[words[:, self.order]]  # (B, L, V)
        mass = target.sum(-1)  # (B, L)
        on_content = mass > 0
        logp = (latents @ self.model.lm_head.weight.T).log_softmax(-1)  # (B, L, V)
        per_latent = -(target * logp).sum(-1) / mass.clamp(min=1e-6)  # (B, L)
        content = per_latent[on_content].mean() if bool(on_content.any()) else latents.sum() * 0.0
        off_content = ~on_content
        background = (-logp[..., self.background_id][off_content].mean() if bool(off_content.any())
                      else latents.sum() * 0.0)  # the <unk> column first: no (B·L, V) copy of the rows
        return content, background

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The weighted sum of the terms switched on, for the forward pass just run on `batch`."""
        terms = {}
        if self.route_weight > 0:
            terms["route"] = self.route_weight * self.routing_loss()
        if self.align_weight > 0 or self.background_weight > 0:
            content, background = self.alignment_losses(batch["patch_objects"], batch["patch_words"])
            if self.align_weight > 0:
                terms["align"] = self.align_weight * content
            if self.background_weight > 0:
                terms["background"] = self.background_weight * background
        self.last = {f"{name}_loss": round(term.item(), 5) for name, term in terms.items()}
        return sum(terms.values())

"""Join one trained shapes model's vision tower to another's perceiver and decoder.

How the shipped model was made (docs/training.md): `gpu64` reads printed text but binds colour to
kind poorly, `cpu64kv2` binds colour but misreads digits. Both route one latent to each patch, so
the only part that cannot be carried over is the modality projection, whose input width is the
tower's. This script builds a `--preset` model from the tower of `--vision-from` and everything
after the projection from `--rest-from`, then fits a new projection so that, patch by patch, it
gives what the `--rest-from` model's own projection gives on the same image (mean squared error,
everything else frozen). The decoder then sees familiar inputs from the first step of the
fine-tune that follows (`train --init-from OUT --freeze-vision`).

`python -m recipes.shapes_vqa.stitch --vision-from D --rest-from C --preset gpu64-text128 --minutes 4 --out OUT`
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.finetune.run_folder import export
from recipes.shapes_vqa.grounding import PatchBatches
from recipes.shapes_vqa.model_init import init_weights
from recipes.shapes_vqa.presets import PRESETS, model_config_dict
from recipes.shapes_vqa.train import shapes_generation_config

logger = logging.getLogger("stitch")
# the projection's layers that read the tower's features: the only weights that are fitted anew
PROJECTION_INPUT = ("model.connector.modality_projection.gate", "model.connector.modality_projection.up")


def stitched_model(vision_from: Idefics2ForConditionalGeneration, rest_from: Idefics2ForConditionalGeneration,
                   config: Idefics2Config) -> Idefics2ForConditionalGeneration:
    """A `config` model: vision weights from one, all but the projection's input layers from the other."""
    model = Idefics2ForConditionalGeneration(config)
    init_weights(model)
    own = model.state_dict()
    taken = {name: value for name, value in vision_from.state_dict().items() if ".vision_model." in name}
    taken |= {name: value for name, value in rest_from.state_dict().items()
              if ".vision_model." not in name and not name.startswith(PROJECTION_INPUT)}
    mismatched = [name for name, value in taken.items() if name not in own or own[name].shape != value.shape]
    left_out = [name for name in own if name not in taken and not name.startswith(PROJECTION_INPUT)]
    if mismatched or left_out:
        raise ValueError(f"the preset does not fit the two models: {(mismatched + left_out)[:3]} are missing on "
                         "one side or differ in shape")
    model.load_state_dict(taken, strict=False)
    model.tie_weights()
    return model


def fit_projection(model: Idefics2ForConditionalGeneration, teacher: Idefics2ForConditionalGeneration,
                   processor: Idefics2Processor, *, minutes: float, batch_size: int, lr: float, seed: int) -> float:
    """Train only `model`'s modality projection to match `teacher`'s, per patch, on fresh scenes;
    returns the last 50 steps' mean loss relative to the targets' mean square."""
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    projection = model.model.connector.modality_projection
    optimizer = torch.optim.AdamW(projection.parameters(), lr=lr, weight_decay=0.0)
    data = DataLoader(PatchBatches(processor.image_processor, grid, seed, batch_size, 10**9), batch_size=None)
    start, recent = time.monotonic(), []
    for step, batch in enumerate(data, start=1):
        pixels = batch["pixel_values"]  # (B, 3, H, W)
        patch_mask = torch.ones(pixels.shape[0], grid, grid, dtype=torch.bool)
        with torch.no_grad():
            target = teacher.model.connector.modality_projection(teacher.model.vision_model(pixels, patch_mask))
            features = model.model.vision_model(pixels, patch_mask)  # (B, P, D_v)
        loss = F.mse_loss(projection(features), target)  # both (B, P, D)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [loss.item() / target.pow(2).mean().item()])[-50:]
        if step % 100 == 0:
            logger.info("step %d: relative error %.4f", step, sum(recent) / len(recent))
        if time.monotonic() - start >= minutes * 60:
            return sum(recent) / len(recent)
    raise AssertionError("unreachable: the data never ends")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-from", type=Path, required=True)
    parser.add_argument("--rest-from", type=Path, required=True)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vision_from = Idefics2ForConditionalGeneration.from_pretrained(args.vision_from, dtype="float32").eval()
    rest_from = Idefics2ForConditionalGeneration.from_pretrained(args.rest_from, dtype="float32").eval()
    processor = Idefics2Processor.from_pretrained(args.rest_from)
    config = Idefics2Config.from_dict(model_config_dict(args.preset, len(processor.tokenizer),
                                                        processor.image_token_id))
    model = stitched_model(vision_from, rest_from, config).eval()
    error = fit_projection(model, rest_from, processor, minutes=args.minutes, batch_size=args.batch_size,
                           lr=args.lr, seed=args.seed)
    logger.info("projection fitted: relative error %.4f", error)
    export(model, processor, args.out, shapes_generation_config(model, processor))


if __name__ == "__main__":
    main()

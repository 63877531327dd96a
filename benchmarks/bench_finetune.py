"""LoRA fine-tuning speed: ours (`idefics2.lora`) vs transformers + PEFT, same weights, same batch.

Each side runs in its own subprocess (so peak RSS is that side's alone), builds the model of
bench_generate.py's preset with the same per-name weights, attaches rank-r adapters to the same
modules (the decoder, modality-projection and perceiver projections), fills the adapters from the
same per-name seeds, and times full optimizer steps (forward with labels, backward, AdamW) on a
batch of photos with ~20-token prompts. Both sides print the loss of their first step (equal: the
same forward) and of their last (equal: the same updates as well). Prints a table, then one JSON line.

    .venv/bin/python benchmarks/bench_finetune.py                      # CPU, small config, float32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import PRESETS, build, make_inputs, peak_rss_gib


def attach_adapters(model: Any, side: str, rank: int) -> Any:
    from idefics2.lora import DEFAULT_TARGET_MODULES, LoRAConfig, add_lora

    if side == "oracle":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank,
                                                           target_modules=DEFAULT_TARGET_MODULES))
    else:
        add_lora(model, LoRAConfig(r=rank, lora_alpha=rank))
    with torch.no_grad():  # PEFT's names, normalised to ours, seed each adapter tensor on both sides
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = name.removeprefix("base_model.model.").replace(".default.", ".")
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
    return model


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    model = attach_adapters(build(args.worker, preset, "cpu", torch.float32), args.worker, args.rank).train()
    inputs = make_inputs(args.batch, preset["image_token_id"], 64)
    labels = inputs["input_ids"].clone()
    # No loss on image and fake tokens, padding, or BOS: a left-padded row's BOS would be predicted from a
    # padding position, whose logits neither implementation defines.
    labels[(labels >= 32000) | (labels == 1) | (inputs["attention_mask"] == 0)] = -100
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> float:
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()  # warm-up, and the loss before any update
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        last_loss = step()
        times.append(time.perf_counter() - start)
    return {"step_s": min(times), "step_median_s": statistics.median(times), "first_loss": first_loss,
            "last_loss": last_loss,
            "trainable_m": sum(p.numel() for p in trainable) / 1e6, "peak_gib": peak_rss_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=2, help="conversations per step (one photo each, up to 4)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (best reported)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of both sides, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["ours", "oracle"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import peft
    import transformers

    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, preset {args.preset}, batch {args.batch}, LoRA r={args.rank}, "
          f"threads {args.threads}, float32 CPU")
    results: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for side in ("oracle", "ours"):
            cmd = [sys.executable, __file__, "--worker", side, "--preset", args.preset, "--batch", str(args.batch),
                   "--rank", str(args.rank), "--steps", str(args.steps), "--threads", str(args.threads)]
            new = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            old = results.get(side)
            if old is not None:
                new.update(step_s=min(old["step_s"], new["step_s"]), peak_gib=max(old["peak_gib"], new["peak_gib"]))
            results[side] = new
    oracle, ours = results["oracle"], results["ours"]
    print(f"{'measure':<34}{'transformers+peft':>18}{'ours':>10}{'ratio':>8}")
    print(f"{'optimizer step s (best)':<34}{oracle['step_s']:18.3f}{ours['step_s']:10.3f}"
          f"{oracle['step_s'] / ours['step_s']:7.2f}x")
    print(f"{'peak RSS GiB':<34}{oracle['peak_gib']:18.3f}{ours['peak_gib']:10.3f}")
    print(f"{'trainable parameters (M)':<34}{oracle['trainable_m']:18.3f}{ours['trainable_m']:10.3f}")
    print(f"{'loss of the first step':<34}{oracle['first_loss']:18.5f}{ours['first_loss']:10.5f}")
    print(f"{f'loss of step {args.steps + 1}':<34}{oracle['last_loss']:18.5f}{ours['last_loss']:10.5f}")
    print(json.dumps({"oracle": oracle, "ours": ours, "speedup": oracle["step_s"] / ours["step_s"],
                      "batch": args.batch, "rank": args.rank, "preset": args.preset, "threads": args.threads}))


if __name__ == "__main__":
    main()

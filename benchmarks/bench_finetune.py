"""LoRA fine-tuning speed: ours (`idefics2.lora`) vs transformers + PEFT, same weights, same batch.

Each side runs in its own subprocess (so peak RSS is that side's alone), builds the model of
bench_generate.py's preset with the same per-name weights, attaches rank-r adapters to the same
modules (the decoder, modality-projection and perceiver projections), fills the adapters from the
same per-name seeds, and times full optimizer steps (forward with labels, backward, AdamW) on a
batch of photos with ~20-token prompts. Both sides print the loss of their first step (equal: the
same forward) and of their last (equal: the same updates as well). Prints a table, then one JSON line.

--compare checkpointing: ours alone, a LoRA step with and without gradient checkpointing on --batch
640x480 photos split into 4 crops + the whole (5 images each): the peak RSS of the steps (reset once
the model, inputs and optimizer are made) and the step-time ratio.
--compare fsdp: `torchrun --nproc-per-node 2` of our training step (`idefics2.finetune.loop`), DDP
against FSDP, LoRA and --full: the peak RSS of each process over the training steps (the peak is
reset once the model is built, sharded and its optimizer made) and over its whole life (every
process first builds the whole model, in both modes), with glibc's mmap threshold at 1 MiB.

    .venv/bin/python benchmarks/bench_finetune.py                      # CPU, small config, float32
    .venv/bin/python benchmarks/bench_finetune.py --compare checkpointing --batch 4 --steps 1
    .venv/bin/python benchmarks/bench_finetune.py --compare fsdp --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
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


def text_labels(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """No loss on image and fake tokens, padding, or BOS: a left-padded row's BOS would be predicted from a
    padding position, whose logits neither implementation defines."""
    labels = inputs["input_ids"].clone()
    labels[(labels >= 32000) | (labels == 1) | (inputs["attention_mask"] == 0)] = -100
    return labels


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def checkpointing_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One LoRA training step (after one warm-up) of ours on the split photos, with or without checkpointing."""
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    model = attach_adapters(build("ours", preset, "cpu", torch.float32), "ours", args.rank).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    inputs = make_inputs(args.batch, preset["image_token_id"], 64, split=True)
    labels = text_labels(inputs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    setup_gib = peak_rss_gib()
    reset_peak_rss()
    times, losses = [], []
    for _ in range(1 + args.steps):
        start = time.perf_counter()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"step_s": min(times[1:]), "losses": losses, "peak_gib": peak_rss_gib(), "setup_peak_gib": setup_gib,
            "images": int(inputs["pixel_values"].shape[0] * inputs["pixel_values"].shape[1]),
            "tokens": int(inputs["attention_mask"].sum())}


def distributed_worker(args: argparse.Namespace) -> dict[str, Any]:
    """A process of torchrun: our fine-tuning step over DDP or FSDP, `--batch` photos per process."""
    import torch.distributed as dist

    from idefics2.finetune.loop import optimizer_step, param_groups, shard_model, start_distributed

    torch.set_num_threads(args.threads)
    rank, world, device = start_distributed("cpu")
    preset = PRESETS[args.preset]
    model = build("ours", preset, "cpu", torch.float32)
    model = model.requires_grad_(True) if args.full else attach_adapters(model, "ours", args.rank)
    model.train()
    ddp = None
    if args.fsdp:
        shard_model(model, device, mixed_precision=False)
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5)
    inputs = make_inputs(world * args.batch, preset["image_token_id"], 64)
    mine = {k: v[rank * args.batch:(rank + 1) * args.batch] for k, v in inputs.items()}
    mine["labels"] = text_labels(mine)
    dist.barrier()
    setup_gib = peak_rss_gib()
    reset_peak_rss()
    times, losses = [], []
    for _ in range(1 + args.steps):
        start = time.perf_counter()
        loss, _ = optimizer_step(model, ddp, [mine], optimizer, 1.0, world, device)
        times.append(time.perf_counter() - start)
        losses.append(loss)
    result = {"rank": rank, "setup_peak_gib": setup_gib, "step_peak_gib": peak_rss_gib(), "losses": losses,
              "step_s": min(times[1:])}
    dist.destroy_process_group()
    return result


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    model = attach_adapters(build(args.worker, preset, "cpu", torch.float32), args.worker, args.rank).train()
    inputs = make_inputs(args.batch, preset["image_token_id"], 64)
    labels = text_labels(inputs)
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
    parser.add_argument("--compare", choices=["oracle", "checkpointing", "fsdp"], default="oracle",
                        help="oracle: ours vs transformers + PEFT; checkpointing: ours with and without gradient "
                             "checkpointing on split photos; fsdp: DDP vs FSDP over 2 processes")
    parser.add_argument("--worker", choices=["ours", "oracle", "checkpointing", "distributed"], help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = {"checkpointing": checkpointing_worker, "distributed": distributed_worker}.get(args.worker, worker)
        os.write(1, (json.dumps(run(args)) + "\n").encode())  # one write: torchrun's processes share the pipe
        return
    if args.compare == "checkpointing":
        compare_checkpointing(args)
        return
    if args.compare == "fsdp":
        compare_fsdp(args)
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


def run_worker(cmd: list[str], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def compare_checkpointing(args: argparse.Namespace) -> None:
    print(f"python {platform.python_version()}, torch {torch.__version__}, preset {args.preset}, batch {args.batch} "
          f"640x480 photos with image splitting, LoRA r={args.rank}, threads {args.threads}, float32 CPU")
    results = {}
    for checkpointed in (False, True):
        cmd = [sys.executable, __file__, "--worker", "checkpointing", "--preset", args.preset, "--batch",
               str(args.batch), "--rank", str(args.rank), "--steps", str(args.steps), "--threads", str(args.threads)]
        results[checkpointed] = run_worker(cmd + (["--gradient-checkpointing"] if checkpointed else []))[0]
    plain, checkpointed = results[False], results[True]
    print(f"{plain['images']} images, {plain['tokens']} tokens per step")
    print(f"{'measure':<34}{'plain':>10}{'checkpointed':>14}{'ratio':>8}")
    print(f"{'peak RSS of the steps GiB':<34}{plain['peak_gib']:10.3f}{checkpointed['peak_gib']:14.3f}"
          f"{checkpointed['peak_gib'] / plain['peak_gib']:7.2f}x")
    print(f"{'RSS before the steps GiB':<34}{plain['setup_peak_gib']:10.3f}{checkpointed['setup_peak_gib']:14.3f}")
    print(f"{'step time (relative)':<34}{1:10.2f}{checkpointed['step_s'] / plain['step_s']:14.2f}")
    print(f"{'losses':<34}{plain['losses']} {checkpointed['losses']}")
    print(json.dumps({"plain": plain, "checkpointed": checkpointed, "preset": args.preset, "batch": args.batch}))


def compare_fsdp(args: argparse.Namespace) -> None:
    print(f"python {platform.python_version()}, torch {torch.__version__}, preset {args.preset}, 2 processes (gloo), "
          f"{args.batch} photos per process, threads {args.threads} per process, float32 CPU")
    # glibc keeps freed blocks below its (growing) mmap threshold for reuse, which FSDP's gather buffers of
    # each layer then inflate; from 1 MiB up blocks are mapped and returned at once, so RSS follows live memory
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "1048576",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    results: dict[str, list[dict[str, Any]]] = {}
    for training in ("lora", "full"):
        for mode in ("ddp", "fsdp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29641",
                   __file__, "--worker", "distributed", "--preset", args.preset, "--batch", str(args.batch),
                   "--rank", str(args.rank), "--steps", str(args.steps), "--threads", str(args.threads)]
            cmd += ["--fsdp"] if mode == "fsdp" else []
            cmd += ["--full"] if training == "full" else []
            results[f"{training} {mode}"] = sorted(run_worker(cmd, env), key=lambda r: r["rank"])
    print(f"{'run':<12}{'step peak GiB/process':>24}{'lifetime peak GiB/process':>28}{'step s (rel.)':>15}  losses")
    for training in ("lora", "full"):
        base = max(r["step_s"] for r in results[f"{training} ddp"])
        for mode in ("ddp", "fsdp"):
            ranks = results[f"{training} {mode}"]
            step_peak = " / ".join(f"{r['step_peak_gib']:.3f}" for r in ranks)
            life = " / ".join(f"{max(r['step_peak_gib'], r['setup_peak_gib']):.3f}" for r in ranks)
            print(f"{training + ' ' + mode:<12}{step_peak:>24}{life:>28}"
                  f"{max(r['step_s'] for r in ranks) / base:15.2f}  {[round(x, 5) for x in ranks[0]['losses']]}")
    print(json.dumps({"results": results, "preset": args.preset, "batch": args.batch, "threads": args.threads}))


if __name__ == "__main__":
    main()

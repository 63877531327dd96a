"""Quantized weights: decode speed and loading memory of float32, bfloat16, int8 and int4, in one run.

The generation benchmark's ~166M config with its deterministic random weights is saved once in
float32 (read by the float32 side) and once in bfloat16 (read by the others); each side loads it
in its own subprocess (`from_pretrained(..., dtype=, quantization=)`), so its
peak RSS is its own, and decodes batch 1 and batch 4 (one 640x480 photo + ~20 tokens per row).
Sides alternate over --rounds and the best of each is kept, as the machine is shared; compare
within one run only. Prints a table with ratios against float32, then one JSON line.

    .venv/bin/python benchmarks/bench_quant.py --rounds 2

With `--preset idefics2-8b --folder DIR`, the real model's shapes with the same per-name random
weights are first written to DIR in bfloat16 shards of the Hub's layout (16.8 GB on disk, one tensor
in memory at a time; reused when DIR holds them), then int8 and int4 each load it in their own
subprocess: peak RSS and time of the load, time to the first token for one 640x480 photo (no image
splitting) and decode tokens/s at batch 1.

    .venv/bin/python benchmarks/bench_quant.py --preset idefics2-8b --folder /tmp/idefics2-8b-random
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import PRESETS, Stamps, build, fill_parameter, make_inputs, peak_rss_gib  # noqa: E402

SIDES = {  # name -> (dtype, quantization)
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "int8 (bf16 activations)": ("bfloat16", "int8"),
    "int4 (bf16 activations)": ("bfloat16", "int4"),
}


def write_random_checkpoint(folder: Path, max_shard_bytes: int = 5 * 10**9) -> None:
    """idefics2-8b's shapes, each tensor drawn by `fill_parameter` in bfloat16 and written in shards
    of at most `max_shard_bytes` with the index the Hub's folders carry."""
    from safetensors.torch import save_file

    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    config = Idefics2Config.from_dict(PRESETS["idefics2-8b"])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Idefics2ForConditionalGeneration(config).state_dict().items()}
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            shard[name] = torch.empty(shapes[name], dtype=torch.bfloat16)
            fill_parameter(name, shard[name])
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del shard
    total = sum(2 * shape.numel() for shape in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)  # last: its presence marks a complete folder


def worker_8b(folder: str, side: str, new_tokens: int, threads: int) -> dict[str, Any]:
    """One quantized side on the idefics2-8b shapes: its load, then one generate call."""
    from idefics2 import Idefics2ForConditionalGeneration

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype="bfloat16", quantization=side)
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "load_peak_gib": peak_rss_gib()}
    vision_dtype = next(model.model.vision_model.parameters()).dtype
    result["vision_dtype"] = str(vision_dtype).removeprefix("torch.")
    inputs = make_inputs(1, PRESETS["idefics2-8b"]["image_token_id"], 64)  # one 640x480 photo, no splitting
    stamps = Stamps()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=stamps, vision_cache=False)
    t = stamps.times  # [prompt, token 1, ..., token n]
    result.update(first_token_s=t[1] - start, decode_tokens_per_s=(new_tokens - 1) / (t[-1] - t[1]),
                  peak_gib=peak_rss_gib())
    return result


def main_8b(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    if not (folder / "config.json").exists():
        start = time.perf_counter()
        write_random_checkpoint(folder)
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
    results = {}
    for side in args.sides_8b:
        out = subprocess.run([sys.executable, __file__, "--worker-8b", str(folder), side, "--new-tokens",
                              str(args.new_tokens), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"idefics2-8b shapes, random weights stored in bfloat16, {args.threads} threads, one run; "
          f"first token: one 640x480 photo + ~20 tokens, no splitting; decode: {args.new_tokens - 1} steps")
    print("| side | load peak RSS GiB | load s | first token s | decode tokens/s | peak RSS GiB | vision tower |")
    print("|---" * 7 + "|")
    for side, r in results.items():
        print(f"| {side} (bf16 activations) | {r['load_peak_gib']:.2f} | {r['load_s']:.0f} | "
              f"{r['first_token_s']:.1f} | {r['decode_tokens_per_s']:.2f} | {r['peak_gib']:.2f} | "
              f"{r['vision_dtype']} |")
    print(json.dumps(results))


def worker(folder: str, side: str, batches: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    from idefics2 import Idefics2ForConditionalGeneration

    torch.set_num_threads(threads)
    dtype, quantization = SIDES[side]
    start = time.perf_counter()
    model = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype=dtype, quantization=quantization)
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "load_peak_gib": peak_rss_gib()}
    for batch in batches:
        inputs = make_inputs(batch, PRESETS["small"]["image_token_id"], 64)
        inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))
        steps = []
        for _ in range(3):
            stamps = Stamps()
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               streamer=stamps, vision_cache=False)
            steps.append((stamps.times[-1] - stamps.times[1]) / (new_tokens - 1))
        result[f"b{batch}_tokens_per_s"] = batch / min(steps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--preset", default="small", choices=["small", "idefics2-8b"])
    parser.add_argument("--folder", help="idefics2-8b: where its random bfloat16 checkpoint is (written if absent)")
    parser.add_argument("--sides-8b", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-8b", nargs=2, metavar=("FOLDER", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_sizes, args.new_tokens, args.threads)))
        return
    if args.worker_8b:
        print(json.dumps(worker_8b(*args.worker_8b, args.new_tokens, args.threads)))
        return
    if args.preset == "idefics2-8b":
        if not args.folder:
            parser.error("--preset idefics2-8b needs --folder (16.8 GB of disk)")
        main_8b(args)
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build("ours", PRESETS["small"], "cpu", torch.float32)
        model.save_pretrained(Path(tmp) / "float32")
        model.to(torch.bfloat16).save_pretrained(Path(tmp) / "bfloat16")  # as idefics2-8b is published
        for _ in range(args.rounds):
            for side in SIDES:
                folder = str(Path(tmp) / ("float32" if side == "float32" else "bfloat16"))
                out = subprocess.run([sys.executable, __file__, "--worker", folder, side, "--new-tokens",
                                      str(args.new_tokens), "--threads", str(args.threads), "--batch-sizes",
                                      *map(str, args.batch_sizes)], capture_output=True, text=True, check=True)
                new = json.loads(out.stdout.strip().splitlines()[-1])
                old = results.get(side)
                results[side] = new if old is None else {k: (max if "per_s" in k else min)(old[k], new[k])
                                                         for k in new}
    base = results["float32"]
    keys = [f"b{b}_tokens_per_s" for b in args.batch_sizes]
    print(f"~166M config, {args.threads} threads, best of {args.rounds} round(s); one run, compare within it only; "
          "peak RSS counts the checkpoint's pages read through the memory map")
    print("| side | " + " | ".join(f"decode tokens/s, batch {b}" for b in args.batch_sizes)
          + " | load peak RSS GiB | load s |")
    print("|---" * (len(keys) + 3) + "|")
    for side, r in results.items():
        cells = [f"{r[k]:.1f} ({r[k] / base[k]:.2f}x)" for k in keys]
        print(f"| {side} | " + " | ".join(cells) + f" | {r['load_peak_gib']:.3f} | {r['load_s']:.2f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

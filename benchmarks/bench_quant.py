"""Quantized weights: decode speed and loading memory of float32, bfloat16, int8 and int4, in one run.

The generation benchmark's ~166M config with its deterministic random weights is saved once in
float32 (read by the float32 side) and once in bfloat16 (read by the others); each side loads it
in its own subprocess (`from_pretrained(..., dtype=, quantization=)`), so its
peak RSS is its own, and decodes batch 1 and batch 4 (one 640x480 photo + ~20 tokens per row).
Sides alternate over --rounds and the best of each is kept, as the machine is shared; compare
within one run only. Prints a table with ratios against float32, then one JSON line.

    .venv/bin/python benchmarks/bench_quant.py --rounds 2
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

from bench_generate import PRESETS, build, make_inputs, peak_rss_gib  # noqa: E402

SIDES = {  # name -> (dtype, quantization)
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "int8 (bf16 activations)": ("bfloat16", "int8"),
    "int4 (bf16 activations)": ("bfloat16", "int4"),
}


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
        stamps: list[float] = []

        class Stamps:
            def put(self, value: torch.Tensor) -> None:
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        steps = []
        for _ in range(3):
            stamps.clear()
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               streamer=Stamps(), vision_cache=False)
            steps.append((stamps[-1] - stamps[1]) / (new_tokens - 1))
        result[f"b{batch}_tokens_per_s"] = batch / min(steps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_sizes, args.new_tokens, args.threads)))
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

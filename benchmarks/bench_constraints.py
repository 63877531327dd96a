"""Decode speed with and without a JSON-schema constraint, same model, same prompts, one process.

The ~166M config (`bench_generate.PRESETS`, random weights filled as there) decodes greedily
with a 32k-token Llama-style tokenizer (the test fixture's, which matches the config's vocabulary);
the constrained side follows a schema long enough that no row's grammar ends inside the timed
steps (a list of at least 40 {name, count} objects). Each call is timed per step by a streamer
that stamps each token (first token excluded), at a fixed thread count (no thread tuning that
could differ between the sides); the sides alternate call by call, --rounds times,
and the best step time of each side is kept, since other processes share the machine. Prints a
table with the per-step overhead of the constraint, then one JSON line. On a shared machine the
step times of two calls can differ by more than the constraint costs, so the constraint's own
work (`ConstraintProcessor.mask` and `.record`, timed inside the constrained calls) is reported
too, as a share of the plain step: the overhead that noise cannot hide or inflate.

    .venv/bin/python benchmarks/bench_constraints.py --batch-sizes 1 4 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import PRESETS, Stamps, build, make_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "hub-like-tokenizer"
SCHEMA = {
    "type": "array",
    "minItems": 40,
    "items": {
        "type": "object",
        "required": ["name", "count"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        },
    },
}


class Timed:
    """Wall time spent in the wrapped methods of `ConstraintProcessor` (the constraint's own work)."""

    def __init__(self) -> None:
        from idefics2.generation.constraints import ConstraintProcessor

        self.seconds = 0.0
        for name in ("mask", "record"):
            setattr(ConstraintProcessor, name, self._timed(getattr(ConstraintProcessor, name)))

    def _timed(self, method: Any) -> Any:
        def run(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.seconds += time.perf_counter() - start

        return run


def step_ms(
    model: Any, inputs: dict[str, torch.Tensor], n: int, sync: Any, **extra: Any
) -> tuple[float, Any]:
    """Mean ms per decode step (after the first token) of one greedy call of n new tokens (EOS banned
    until then, as in bench_generate, so every row decodes every step), and its tokens."""
    stamps = Stamps()
    sync()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            streamer=stamps,
            vision_cache=True,
            decode_threads=torch.get_num_threads(),
            **extra,
        )
    sync()
    steps = len(stamps.times) - 2  # the prompt's put, then one per token
    return 1e3 * (stamps.times[-1] - stamps.times[1]) / max(steps, 1), out[:, inputs["input_ids"].shape[1] :]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=48, help="decode steps per call")
    parser.add_argument("--rounds", type=int, default=5, help="calls per side, alternating; best kept")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import llguidance

    from idefics2.generation.constraints import Constraint
    from idefics2.processing.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    logging.getLogger("idefics2.generation.generate").setLevel(logging.ERROR)  # cut by length on purpose
    dtype = getattr(torch, args.dtype)
    preset = PRESETS["small"]
    model = build("ours", preset, args.device, dtype)
    tokenizer = Tokenizer.from_pretrained(TOKENIZER)
    constraint = Constraint.json_schema(SCHEMA)
    timed = Timed()
    on_gpu = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    device_name = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"llguidance {llguidance.__version__}, "
        f"device {args.device} ({device_name}), dtype {args.dtype}, threads {args.threads}, "
        f"{args.new_tokens} new tokens, best of {args.rounds}"
    )
    summary: dict[str, Any] = {"device": device_name, "dtype": args.dtype, "threads": args.threads}
    print(
        f"{'batch':>5} {'plain tok/s':>12} {'JSON tok/s':>12} {'plain ms/step':>14} {'JSON ms/step':>13} "
        f"{'overhead':>9} {'constraint ms/step':>19} {'its share':>10}"
    )
    for batch in args.batch_sizes:
        inputs = {k: v.to(args.device) for k, v in make_inputs(batch, preset["image_token_id"], 64).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        sides = {"plain": {}, "json": {"constraint": constraint, "tokenizer": tokenizer}}
        for extra in sides.values():  # warm-up: allocator, kernels, the vision cache, llguidance's tokenizer
            step_ms(model, inputs, 3, sync, **extra)
        best = {name: float("inf") for name in sides}
        own = float("inf")  # the constraint's own ms per step, best call
        for _ in range(args.rounds):
            for name, extra in sides.items():
                timed.seconds = 0.0
                ms, tokens = step_ms(model, inputs, args.new_tokens + 1, sync, **extra)
                if name == "json":
                    own = min(own, 1e3 * timed.seconds / (args.new_tokens + 1))
                if name == "json":
                    assert tokens.shape[1] == args.new_tokens + 1, (
                        "a constrained row ended inside the timed steps"
                    )
                best[name] = min(best[name], ms)
        overhead = best["json"] / best["plain"] - 1
        print(
            f"{batch:>5} {1e3 * batch / best['plain']:12.2f} {1e3 * batch / best['json']:12.2f} "
            f"{best['plain']:14.2f} {best['json']:13.2f} {100 * overhead:8.1f}% {own:19.2f} "
            f"{100 * own / best['plain']:9.1f}%"
        )
        summary[f"b{batch}"] = {
            "plain_step_ms": best["plain"],
            "json_step_ms": best["json"],
            "plain_tokens_per_s": 1e3 * batch / best["plain"],
            "json_tokens_per_s": 1e3 * batch / best["json"],
            "overhead": overhead,
            "constraint_ms_per_step": own,
            "constraint_share": own / best["plain"],
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

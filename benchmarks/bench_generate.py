"""Generation speed: ours vs transformers' `Idefics2ForConditionalGeneration.generate`, same weights.

Each (side, batch size) runs in its own subprocess, so peak RSS / GPU memory is that side's alone
and only one model is ever loaded. Both sides fill every parameter from a per-name seed, so the
weights are identical. Reports time to first token (vision + connector + prefill + 1 token),
decode tokens/s over --new-tokens steps (timed by a streamer that stamps each token, the same
on both sides; best of --repeats calls, and of --rounds alternating runs of the sides, since
other processes share the machine), peak memory,
and the decode's weight traffic next to the machine's measured bandwidth. With --compile, ours
also runs with `generate(compile=True)` as a third side (the compile itself is in its first,
warm-up call). Prints a table, then one JSON line.

    .venv/bin/python benchmarks/bench_generate.py --rounds 2 --compile  # CPU, small config, float32
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --preset idefics2-8b
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
from collections.abc import Callable
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "small": {  # spec reference-performance.md: ~166M parameters
        "image_token_id": 32001,
        "vision_config": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                          "num_attention_heads": 6, "image_size": 980, "patch_size": 14},
        "perceiver_config": {"hidden_size": 768, "resampler_n_latents": 64, "resampler_depth": 3,
                             "resampler_n_heads": 12, "resampler_head_dim": 64, "num_key_value_heads": 4},
        "text_config": {"model_type": "mistral", "vocab_size": 32003, "hidden_size": 768,
                        "intermediate_size": 2048,
                        "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
                        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "sliding_window": 4096,
                        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    },
    "idefics2-8b": {  # docs/numerics.md §2: the real shapes
        "image_token_id": 32001,
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "image_size": 980, "patch_size": 14},
        "perceiver_config": {"hidden_size": 4096, "resampler_n_latents": 64, "resampler_depth": 3,
                             "resampler_n_heads": 16, "resampler_head_dim": 96, "num_key_value_heads": 4},
        "text_config": {"model_type": "mistral", "vocab_size": 32003, "hidden_size": 4096,
                        "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "sliding_window": 4096,
                        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    },
}
PHOTOS = (("astronaut", (640, 480)), ("coffee", (600, 400)), ("chelsea", (451, 300)), ("rocket", (640, 427)))
FAKE, TEXT_LENGTHS = 32000, (20, 17, 23, 19)


def fill_weights(model: torch.nn.Module) -> None:
    """Deterministic per-name values, so both sides (different classes, same names) get equal weights."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            fill_parameter(name, p)


def fill_parameter(name: str, p: torch.Tensor) -> None:
    """The value `fill_weights` gives the parameter `name`, drawn in place."""
    g = torch.Generator(device=p.device).manual_seed(zlib.crc32(name.encode()))
    if name.endswith("bias"):
        p.zero_()
    elif p.dim() == 1:  # norm weights
        p.normal_(1.0, 0.1, generator=g)
    else:
        p.normal_(0.0, 0.02, generator=g)


def make_inputs(batch: int, image_token_id: int, latents: int, *, split: bool = False) -> dict[str, torch.Tensor]:
    """`batch` photos of different sizes (our image processor) and left-padded ~20-token prompts.

    `split`: every photo at 640x480, split by the image processor into 4 crops + the whole (5 images of
    `latents` image tokens per row, each after a fake token), as a fine-tune on photos sees them.
    """
    import numpy as np
    import skimage.data
    from PIL import Image

    from idefics2.processing.image_processor import Idefics2ImageProcessor

    images = []
    for name, size in PHOTOS[:batch]:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        images.append([photo.resize((640, 480) if split else size, Image.Resampling.BILINEAR)])  # one per sample
    pixels = Idefics2ImageProcessor(do_image_splitting=split)(images)
    image_tokens = ([FAKE] + [image_token_id] * latents) * pixels["pixel_values"].shape[1] + [FAKE]
    rng = np.random.default_rng(0)
    rows = []
    for b in range(batch):
        text = rng.integers(3, 31999, TEXT_LENGTHS[b]).tolist()
        rows.append([1] + text[:4] + image_tokens + text[4:])
    T = max(len(r) for r in rows)
    input_ids = torch.zeros(batch, T, dtype=torch.long)
    attention_mask = torch.zeros(batch, T, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, T - len(r):] = torch.tensor(r)
        attention_mask[b, T - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels["pixel_values"],
            "pixel_attention_mask": pixels["pixel_attention_mask"]}


def build(side: str, preset: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of an 8B model
    try:
        with torch.device(device):
            if side == "oracle":
                import transformers

                config = transformers.Idefics2Config(**json.loads(json.dumps(preset)))
                model = transformers.Idefics2ForConditionalGeneration(config)  # default attention: sdpa
            else:
                from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

                model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(preset))
    finally:
        torch.set_default_dtype(default)
    fill_weights(model)
    return model.eval()


class Stamps:
    """A streamer that only records when each put arrives: the prompt, then every step's tokens.

    Both generate implementations call `put` right after choosing each token, so the gaps time the
    same work on both sides: first token = first token's put - call start; decode = the rest.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def peak_rss_gib() -> float:
    """VmHWM of this process (ru_maxrss would include the parent's size at fork)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One side, one batch size: timings (best of --repeats) and peak memory, as a dict."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    model = build(args.worker, preset, args.device, dtype)
    inputs = {k: v.to(args.device) for k, v in make_inputs(args.batch, preset["image_token_id"], 64).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(n: int, **extra: Any) -> tuple[float, float, torch.Tensor]:
        """(first-token seconds, seconds per decode step, new tokens) of one generate call."""
        stamps = Stamps()
        kw: dict[str, Any] = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False,
                              "streamer": stamps, **extra}
        if args.worker != "oracle":
            kw.setdefault("vision_cache", False)
            kw["compile"] = args.worker == "ours-compiled"
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, **kw)
        sync()
        t = stamps.times  # [prompt, token 1, ..., token n]
        return t[1] - start, (t[-1] - t[1]) / max(n - 1, 1), out[:, inputs["input_ids"].shape[1]:]

    warmup_start = time.perf_counter()
    run(3)  # warm-up: lazy init, allocator, kernels (and compilation with --compile)
    warmup = time.perf_counter() - warmup_start
    runs = [run(args.new_tokens + 1) for _ in range(args.repeats)]
    first, step = min(r[0] for r in runs), min(r[1] for r in runs)
    result = {"first_token_s": first, "decode_step_ms": 1e3 * step,
              "first_token_median_s": statistics.median(r[0] for r in runs), "tokens": runs[0][2].tolist(),
              "warmup_call_s": warmup}
    if args.worker != "oracle":
        run(1, vision_cache=True)
        result["first_token_cached_s"] = min(run(1, vision_cache=True)[0] for _ in range(2))
    text = model.model.text_model
    per_step = sum(p.numel() * p.element_size() for p in text.parameters()) - text.embed_tokens.weight.nbytes
    result["weight_bytes_per_step"] = per_step + model.lm_head.weight.nbytes
    if args.device.startswith("cuda"):
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_gib"] = peak_rss_gib()
    return result


def bandwidth(device: str) -> dict[str, float]:
    """Copy (read + write counted) and one-row matrix-vector bandwidth over 512 MiB, best of 5.

    The matrix-vector product is timed as `F.linear` and, on the CPU, as our decode runs it
    (`fast_linear.linear`: one row block per thread); the better of the two bounds the decode.
    """
    from idefics2.model.fast_linear import linear

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    src = torch.ones(2**27, device=device)
    dst = torch.empty_like(src)
    weight = src.view(2**15, 2**12)
    x = torch.ones(1, 2**12, device=device)

    def best(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(6):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return min(times[1:])

    with torch.no_grad():
        return {"copy_gb_s": 2 * src.nbytes / best(lambda: dst.copy_(src)) / 1e9,
                "matvec_gb_s": max(src.nbytes / best(lambda: torch.nn.functional.linear(x, weight)) / 1e9,
                                   src.nbytes / best(lambda: linear(x, weight)) / 1e9)}


def best_of(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Merge two rounds of one (side, batch): the faster of each timing, the larger peak memory."""
    if old is None:
        return new
    merged = dict(new)
    for key in ("first_token_s", "decode_step_ms", "first_token_cached_s", "first_token_median_s", "warmup_call_s"):
        if key in old:
            merged[key] = min(old[key], new[key])
    merged["peak_gib"] = max(old["peak_gib"], new["peak_gib"])
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=48, help="decode steps timed after the first token")
    parser.add_argument("--repeats", type=int, default=3, help="generate calls per case (best reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="run both sides this many times, alternating; "
                        "best timings kept")
    parser.add_argument("--compile", action="store_true", help="also ours with generate(compile=True)")
    parser.add_argument("--worker", choices=["ours", "ours-compiled", "oracle"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import transformers

    torch.set_num_threads(args.threads)
    on_gpu = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, device {args.device} ({device_name}), "
          f"dtype {args.dtype}, preset {args.preset}, threads {args.threads}")
    del_keys = {"tokens"}
    sides = ("oracle", "ours", "ours-compiled") if args.compile else ("oracle", "ours")
    results: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):  # sides alternate, so a slow spell of a shared machine hits all
        for batch in args.batch_sizes:
            for side in sides:
                cmd = [sys.executable, __file__, "--worker", side, "--batch", str(batch), "--device", args.device,
                       "--dtype", args.dtype, "--preset", args.preset, "--new-tokens", str(args.new_tokens),
                       "--repeats", str(args.repeats), "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                key = f"{side}_b{batch}"
                results[key] = best_of(results.get(key), json.loads(out.strip().splitlines()[-1]))
                results[key]["decode_tokens_per_s"] = 1e3 * batch / results[key]["decode_step_ms"]

    bw = bandwidth(args.device)  # after the workers: its buffers must not inflate their memory
    memory = "peak GPU GiB" if args.device.startswith("cuda") else "peak RSS GiB"
    print(f"bandwidth: copy {bw['copy_gb_s']:.1f} GB/s, one-row matvec {bw['matvec_gb_s']:.1f} GB/s")
    print(f"{'batch':>5} {'measure':<28}" + "".join(f"{name:>14}{'ratio':>8}" if name != "oracle" else f"{name:>14}"
                                                 for name in sides))
    summary: dict[str, Any] = {"device": device_name, "dtype": args.dtype, "preset": args.preset,
                               "threads": args.threads, **bw}
    for batch in args.batch_sizes:
        per_side = [results[f"{side}_b{batch}"] for side in sides]
        ref = per_side[0]
        ceiling = bw["matvec_gb_s"] * 1e9 / ref["weight_bytes_per_step"]
        # (measure, value of one side, True if the ratio to the oracle is oracle/ours, False if ours/oracle)
        rows: list[tuple[str, Callable[[dict[str, Any]], float | None], bool | None]] = [
            ("first token s", lambda r: r["first_token_s"], True),
            ("first token s, cached image", lambda r: r.get("first_token_cached_s"), None),
            ("decode tokens/s", lambda r: r["decode_tokens_per_s"], False),
            ("decode step ms", lambda r: r["decode_step_ms"], True),
            ("weight traffic GB/s", lambda r: r["weight_bytes_per_step"] / r["decode_step_ms"] / 1e6, None),
            ("steps/s bound (matvec)", lambda r: ceiling, None),
            (memory, lambda r: r["peak_gib"], None),
            ("first (warm-up) call s", lambda r: r["warmup_call_s"], None)]
        for name, value, lower_is_better in rows:
            ref_v = value(ref)
            line = f"{batch:>5} {name:<28}" + (f"{ref_v:14.3f}" if ref_v is not None else f"{'':>14}")
            for r in per_side[1:]:
                v = value(r)
                line += f"{v:14.3f}" if v is not None else f"{'':>14}"
                if lower_is_better is None or ref_v is None or v is None:
                    line += f"{'':>8}"
                else:
                    line += f"{ref_v / v if lower_is_better else v / ref_v:7.2f}x"
            print(line)
        entry: dict[str, Any] = {"oracle": {k: v for k, v in ref.items() if k not in del_keys}}
        for side, r in zip(sides[1:], per_side[1:], strict=True):
            agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                     for x, y in zip(ref["tokens"], r["tokens"])]  # leading tokens equal, per row
            same = ref["tokens"] == r["tokens"]
            print(f"{batch:>5} {side}: greedy tokens identical to the oracle's: {same}"
                  + ("" if same else f"; leading tokens equal: {agree}"))
            entry[side] = {k: v for k, v in r.items() if k not in del_keys}
            entry[side].update(first_token_speedup=ref["first_token_s"] / r["first_token_s"],
                               decode_speedup=r["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
                               tokens_identical=same, leading_tokens_equal=agree)
        summary[f"b{batch}"] = entry
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

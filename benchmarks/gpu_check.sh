#!/usr/bin/env bash
# Every GPU check in one command, for a machine with a CUDA GPU:
#   1. the CUDA tests: the Triton rotary kernel compiled and against the formula, every
#      registered encoding's Transformer on the GPU against CPU (logits and gradients), and
#      FlexAttention's compiled backward against SDPA (tests/test_rope_triton.py,
#      tests/test_gpu.py; pytest-xdist spreads the compiles over the cores when installed);
#   2. benchmarks/rope_gpu.py: the kernel against the float64 formula at its CASES shapes,
#      timed against the copy yardstick, torch.compile, posenc's default and transformers.
# Uses the python that has torch with CUDA (PYTHON, default python3) and posenc from src/.
# `bash benchmarks/gpu_check.sh --tests-only` skips step 2. Logs go to $OUT (default
# ./gpu_check_out). Exit status: non-zero if any step failed.
set -u
out=${OUT:-gpu_check_out}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L || true
$python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
rc=0
xdist=$($python -c "import xdist" 2>/dev/null && echo "-n 8")
$python -m pytest -q -p no:cacheprovider $xdist tests/test_rope_triton.py tests/test_gpu.py 2>&1 | grep -v "^DEBUG" | tee "$out/pytest_gpu.txt"
rc=$((rc | PIPESTATUS[0]))
if [ "${1:-}" != "--tests-only" ]; then
    $python benchmarks/rope_gpu.py --reps 30 2>&1 | tee "$out/rope_gpu.txt"
    rc=$((rc | PIPESTATUS[0]))
fi
exit $rc

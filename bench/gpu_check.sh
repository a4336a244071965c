#!/usr/bin/env bash
# One script that checks n2n on a GPU machine (--device cuda, the default), sized to take under 8 minutes on
# one H100 (not yet run on one: no GPU was at hand when it was written), or the same steps on a CPU with every
# size cut down (--device cpu: 90 s on a quiet 2-core machine; CI runs it, tests/test_gpu_check_script.py).
#
#   bash bench/gpu_check.sh                      # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --device cpu         # anywhere
#
# Steps, each timed, its output shown as it comes; a missing package (pytest, Ray) skips its step, says so,
# and does not fail the run; any other failure does (exit 1), after every step ran:
#   1. the CUDA tests (tests/test_cuda_paths.py and every test named *cuda*; on a CPU they skip, and the
#      CPU runs of every convolution plan, tests/test_conv_plans.py, run instead)
#   2. the default U-Net in float64 against torch autograd, batch 16 of 64x64, both convolution paths
#   3. bench/core.py for each convolution path (taps, gemm): n2n against torch.nn
#   4. kernel launches per training step and per inference tile (bench/launches.py), both paths
#   5. denoise_image on a 6000x8000 image at tiles 512, 1024 and 2048, float32 and bfloat16, with peak memory
#   6. a training run on Ray with one GPU actor (a CPU actor with --device cpu), 20 steps (2 on a CPU)
# Record the figures in BENCHMARKS.md ("Core on CUDA" and "The GPU path") with the machine and the commit.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --device) [ $# -ge 2 ] || { echo "gpu_check.sh: --device needs a value (cuda or cpu)" >&2; exit 2; }
                  DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#--device=}"; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --device cuda|cpu)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
PY=${PYTHON:-python}
if [ "$DEVICE" = cuda ]; then
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: torch.cuda.is_available() is False here; use --device cpu" >&2; exit 2
    fi
    F64="--batch 16 --size 64"; CORE="--repeats 9 --warmup 3"; LAUNCH=""; TILES="--size 6000x8000 --tiles 512,1024,2048"
    TRAIN="--device cuda --steps 20 --batch-size 16"; CUDA_TESTS="tests/test_cuda_paths.py"
else
    F64="--batch 2 --size 32"; CORE="--cases seed-train --repeats 1 --warmup 0"
    LAUNCH="--step-shape 2,3,64,64 --tile-size 96"; TILES="--size 300x400 --tiles 64,128,256"
    TRAIN="--device cpu --steps 2 --batch-size 4"; CUDA_TESTS="tests/test_cuda_paths.py tests/test_conv_plans.py"
fi
SUMMARY=()
FAILED=0
step() {  # step NAME COMMAND...: run it, time it, remember how it went
    local name="$1"; shift
    echo; echo "== $name"; echo "\$ $*"
    local start=$SECONDS
    "$@"
    local status=$?
    local line
    line=$(printf '%-58s %4ds  %s' "$name" $((SECONDS - start)) "$([ $status -eq 0 ] && echo ok || echo "FAILED ($status)")")
    SUMMARY+=("$line")
    [ $status -eq 0 ] || FAILED=1
}
skip() { echo; echo "== $1"; echo "skipped: $2"; SUMMARY+=("$(printf '%-58s %4s   skipped: %s' "$1" - "$2")"); }

echo "n2n gpu check, --device $DEVICE, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u '+%Y-%m-%d %H:%M UTC')"
$PY -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>/dev/null

if $PY -c "import pytest" 2>/dev/null; then
    step "1. CUDA tests" $PY -m pytest -q -p no:cacheprovider -m "slow or not slow" $CUDA_TESTS
    step "1. tests named cuda" $PY -m pytest -q -p no:cacheprovider -m "slow or not slow" -k cuda \
        tests/test_layers.py tests/test_architectures.py tests/test_checkpoint.py tests/test_metrics.py \
        tests/test_optim.py tests/test_train_local.py tests/test_cuda_check.py
else
    skip "1. CUDA tests" "pytest is not installed here"
fi
step "2. float64 U-Net against torch autograd" $PY bench/gpu_check.py float64 --device "$DEVICE" $F64
for path in taps gemm; do
    step "3. bench/core.py --conv-path $path" $PY bench/core.py --device "$DEVICE" --conv-path "$path" $CORE
done
step "4. kernel launches per step and per tile" $PY bench/launches.py --device "$DEVICE" $LAUNCH
step "5. denoise_image on a large image at three tiles" $PY bench/gpu_check.py tiles --device "$DEVICE" $TILES
if $PY -c "import ray" 2>/dev/null; then
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    mkdir "$WORK/images"
    $PY -c "
import sys, numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).save(f'{sys.argv[1]}/img{i}.png')
" "$WORK/images"
    step "6. Ray training, one $DEVICE actor" $PY -m pipeline.cli train --data "$WORK/images" --out "$WORK/run" \
        --arch-arg depth=2 --arch-arg width=16 --crop-size 64 --workers 1 --address local \
        --checkpoint-every 1000 --validate-every 1000 --validation-images 1 $TRAIN
else
    skip "6. Ray training, one $DEVICE actor" "Ray is not installed here"
fi

echo; echo "== summary (--device $DEVICE, $SECONDS s)"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED

#!/usr/bin/env bash
# The CUDA check, in one go, on a machine with an NVIDIA GPU: build the `cuda` library (q4f16_1) of the
# default model and of the MobileVLM-1.7B shape, `verify` each against the PyTorch reference (fp16
# tolerances), then benchmark the 1.7B one (image encode, prefill, decode at batch 1 and 8) beside PyTorch
# fp16 eager on the same GPU. Results (JSON, the verify tables, the chart) go to OUT.
#
#   benchmarks/gpu_check.sh [OUT]        # default OUT: benchmarks/results/gpu-check
#
# Set-up: with PYTHON unset it makes .venv-gpu and installs the project there (needs a package registry;
# PyPI's torch for Linux is a CUDA build). PYTHON=/path/to/python uses an environment that has it.
# Sized for about 8 minutes on a 16-core host with an H100/H200-class GPU. On a machine without a GPU
# it runs up to the point that needs one (checkpoints, both builds, `inspect` of each) and stops there
# with exit status 2 and a line saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-benchmarks/results/gpu-check}")
WORK=$(realpath -m "${WORK:-dist/gpu-check}")
QUANT=q4f16_1
SIZES=${SIZES:-tiny 1.7b}  # the tests run it with SIZES=tiny
mkdir -p "$OUT" "$WORK"
say() { echo "[gpu-check $(date +%H:%M:%S)] $*" >&2; }

if [ -z "${PYTHON:-}" ]; then
    [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu
    PYTHON=.venv-gpu/bin/python
    say "installing the project into .venv-gpu"
    "$PYTHON" -m pip install -q -e ".[bench]"
fi
CLI=("$PYTHON" -m mobilevlm_mlc.cli)
"${CLI[@]}" --version

say "checkpoints: default (tiny) and 1.7b, random weights in the official layout"
for size in $SIZES; do
    [ -f "$WORK/ckpt-$size/config.json" ] || "$PYTHON" -c "
import sys; from pathlib import Path
from mobilevlm_mlc.check.synthetic import make_checkpoint
make_checkpoint(Path(sys.argv[1]), 'ldpnet', size=sys.argv[2])" "$WORK/ckpt-$size" "$size"
done

if ! "$PYTHON" -c "import tvm, sys; sys.exit(0 if tvm.cuda(0).exist else 1)"; then
    # No GPU: prove everything before it — both builds, and what their device code needs from a driver.
    for size in $SIZES; do
        [ -f "$WORK/$size-$QUANT/mlc-chat-config.json" ] ||
            "${CLI[@]}" convert "$WORK/ckpt-$size" --quantization $QUANT -o "$WORK/$size-$QUANT" --quiet
        "${CLI[@]}" compile "$WORK/$size-$QUANT" --target cuda -o "$WORK/$size-$QUANT-cuda.so"
        "${CLI[@]}" inspect "$WORK/$size-$QUANT-cuda.so" --json >"$OUT/inspect-$size.json"
        say "built $WORK/$size-$QUANT-cuda.so (inspect: $OUT/inspect-$size.json)"
    done
    say "stopping: no NVIDIA GPU on this machine (TVM's cuda(0) does not exist); verify and bench need one"
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.csv"

for size in $SIZES; do
    say "verify $size ($QUANT, cuda)"
    "${CLI[@]}" verify "$WORK/ckpt-$size" --target cuda --quantization $QUANT --workdir "$WORK/verify-$size" \
        | tee "$OUT/verify-$size.txt"
done

[[ " $SIZES " == *" 1.7b "* ]] || exit 0
say "bench 1.7b: ours (cuda) and PyTorch fp16 eager on the same GPU"
"$PYTHON" benchmarks/peers.py --size 1.7b --target cuda --device cuda --quantizations $QUANT \
    --peers pytorch-fp16 --prompt-lengths 128 --decode-tokens 64 --repeat 3 --warmup 1 \
    --workdir "$WORK" --out "$OUT/peers-1.7b"
"${CLI[@]}" bench "$WORK/1.7b-$QUANT" --lib "$WORK/1.7b-$QUANT-cuda.so" --device cuda --batch 8 \
    --prompt-lengths 128 --decode-tokens 64 --repeat 3 -o "$OUT/bench-1.7b-batch8.json"
say "done: $OUT"

#!/usr/bin/env bash
# The Z-Image GPU check, prepared to run in one `device` call (README of the device tool): imagegate's
# CUDA build against diffusers bf16 on the same GPU and the same full-size random checkpoint,
# 1024x1024, 8 steps, one image and a batch of 4; every figure to $OUT/zimage_gpu.txt.
#
# NOT YET RUN: no device was lent to the session that wrote it (2026-12-06). Carry, from this machine:
#   gpu/imagegate.xz      the CUDA binary, stripped and xz-compressed (../../shared/facts/gpu-build.md)
#   gpu/wheels/           diffusers==0.42.1 (pip download --no-deps diffusers==0.42.1 -d gpu/wheels)
# and run from the repository root: bash bench/gpu/zimage_gpu.sh
set -euo pipefail
out="${OUT:-/tmp/zimage-gpu}"
mkdir -p "$out"
log="$out/zimage_gpu.txt"
exec > >(tee -a "$log") 2>&1
work=/tmp/zimage-gpu-work
mkdir -p "$work"

python3 -m pip install -q --no-deps --target "$work/pylib" gpu/wheels/*.whl
export PYTHONPATH="$work/pylib"
xz -dc gpu/imagegate.xz > "$work/imagegate" && chmod +x "$work/imagegate"
# The CUDA libraries PyTorch's wheels carry (the binary links them dynamically).
nv="$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0] if hasattr(nvidia, "__path__") else nvidia.__file__))')"
export LD_LIBRARY_PATH="$(find "$nv" -name 'lib' -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

ckpt="$work/zimage-turbo-random"
[ -f "$ckpt/model_index.json" ] || python3 bench/make_zimage_checkpoint.py "$ckpt" > /dev/null

for n in 1 4; do
    python3 bench/gpu/zimage_diffusers_gpu.py --model "$ckpt" --n "$n" --runs 3
    for run in 1 2 3; do
        start=$(date +%s.%N)
        "$work/imagegate" generate "a cute baby sea otter" --model "$ckpt" --size 1024x1024 --steps 8 -n "$n" \
            --seed 1 --out "$work/ig.png" > "$work/ig.log" 2>&1 || { tail -20 "$work/ig.log"; exit 1; }
        end=$(date +%s.%N)
        awk -v s="$start" -v e="$end" -v n="$n" -v r="$run" \
            'BEGIN { printf "imagegate n=%d run %d: %.2f s whole process, %.3f images/s\n", n, r, e - s, n / (e - s) }'
    done
    grep -E "batch generated|prompt encoded|loaded" "$work/ig.log" | tail -4
done

#!/usr/bin/env bash
# CPU benchmark for the Z-Image family: imagegate's engine vs Hugging Face diffusers on the same
# full-size, random-weight Z-Image-Turbo-shaped checkpoint, as whole processes including model load.
#
#   bench/zimage_cpu_vs_diffusers.sh [RUNS]        (RUNS default 1; each run is minutes)
#
# 1. bench/setup.sh: the Python venv at .venv-bench (torch, diffusers, ...).
# 2. The checkpoint (bench/make_zimage_checkpoint.py: 20 GB of f16 shards), built once into
#    $BENCH_MODEL_DIR and reused.
# 3. cargo build --release -p imagegate.
# 4. RUNS rounds of: imagegate generate, then bench/diffusers_generate.py --dtype bfloat16 (the
#    model card's dtype; in float32 the 6B transformer alone is 24.6 GB, more than the 24 GB machine
#    has), same prompt, size, steps and seed, each under /usr/bin/time -v for wall time and peak RSS.
#    Prints every run and the medians.
#
# imagegate keeps the weights in f16 and computes in f32 on the CPU; diffusers computes in bf16.
# The files are larger than the page cache can hold beside a running model: each run reads part of
# them from the disk, both sides alike.
#
# Env (all optional): BENCH_MODEL_DIR (default target/bench/zimage-turbo-random), BENCH_PROMPT,
# BENCH_SIZE (512x512), BENCH_STEPS (1), BENCH_SEED (1), BENCH_ONLY ("imagegate" or "diffusers"),
# IMAGEGATE_BIN (a binary instead of building target/release/imagegate).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

runs="${1:-1}"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [RUNS]" >&2; exit 2; }
model_dir="${BENCH_MODEL_DIR:-target/bench/zimage-turbo-random}"
prompt="${BENCH_PROMPT:-a cute baby sea otter}"
size="${BENCH_SIZE:-512x512}"
steps="${BENCH_STEPS:-1}"
seed="${BENCH_SEED:-1}"
only="${BENCH_ONLY:-}"
want() { [ -z "$only" ] || [ "$only" = "$1" ]; }
note() { echo "zimage_cpu_vs_diffusers: $*" >&2; }

"$here/setup.sh"
py="$root/.venv-bench/bin/python"
if [ ! -f "$model_dir/.complete" ]; then
    note "building checkpoint $model_dir (about 20 GB, several minutes)"
    rm -rf "$model_dir.partial"
    mkdir -p "$(dirname "$model_dir")"
    "$py" "$here/make_zimage_checkpoint.py" "$model_dir.partial"
    touch "$model_dir.partial/.complete"
    mv "$model_dir.partial" "$model_dir"
fi
model_dir="$(cd "$model_dir" && pwd)"
bin="${IMAGEGATE_BIN:-}"
if [ -z "$bin" ] && want imagegate; then
    cargo build --release --locked -p imagegate >&2
    bin="$root/target/release/imagegate"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
timed() {
    local name="$1" run="$2"
    shift 2
    if ! /usr/bin/time -v -o "$work/$name.time" "$@" >"$work/$name.log" 2>&1; then
        tail -n 30 "$work/$name.log" >&2
        note "$name run $run failed: $*"
        exit 1
    fi
    local wall rss
    wall="$(awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0
        for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s }' "$work/$name.time")"
    rss="$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$work/$name.time")"
    echo "$wall $rss" >>"$work/$name"
    printf '  run %d %-10s wall %8.2f s   peak RSS %6.0f MiB\n' "$run" "$name" "$wall" "$((rss / 1024))"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "prompt '$prompt', size $size, steps $steps, seed $seed, $runs run(s), checkpoint $model_dir"
for i in $(seq 1 "$runs"); do
    if want imagegate; then
        timed imagegate "$i" "$bin" generate "$prompt" --model "$model_dir" --size "$size" --steps "$steps" \
            --seed "$seed" --out "$work/imagegate.png"
    fi
    if want diffusers; then
        timed diffusers "$i" "$py" "$here/diffusers_generate.py" --model "$model_dir" --prompt "$prompt" \
            --size "$size" --steps "$steps" --seed "$seed" --dtype bfloat16 --out "$work/diffusers.png"
        grep '^{' "$work/diffusers.log" | tail -1
    fi
done
for name in imagegate diffusers; do
    [ -f "$work/$name" ] || continue
    w="$(cut -d' ' -f1 "$work/$name" | median)"
    r="$(cut -d' ' -f2 "$work/$name" | median)"
    printf 'median %-10s wall %8.2f s   peak RSS %6.0f MiB\n' "$name" "$w" "$(awk -v r="$r" 'BEGIN { print r / 1024 }')"
done
if [ -f "$work/imagegate" ] && [ -f "$work/diffusers" ]; then
    awk -v g="$(cut -d' ' -f1 "$work/imagegate" | median)" -v d="$(cut -d' ' -f1 "$work/diffusers" | median)" \
        'BEGIN { printf "median ratio diffusers/imagegate: %.2fx\n", d / g }'
fi

#!/usr/bin/env bash
# CPU benchmark: imagegate's local engine vs Hugging Face diffusers (PyTorch) on the same
# full-size, random-weight SD-Turbo-shaped checkpoint, as whole processes including model load.
#
#   bench/cpu_vs_diffusers.sh [RUNS]        (RUNS default 3)
#
# 1. bench/setup.sh: the Python venv at .venv-bench (torch, diffusers, ...).
# 2. The checkpoint (bench/make_checkpoint.py), built once into $BENCH_MODEL_DIR and reused.
# 3. cargo build --release -p imagegate.
# 4. RUNS rounds of: imagegate generate --decoder full, imagegate generate with the tiny decoder
#    (a random TAESD from bench/make_taesd.py, built once into $BENCH_TAESD_DIR), then
#    bench/diffusers_generate.py (full VAE), same prompt, size, steps and seed, each under
#    /usr/bin/time -v for wall time and peak RSS. Prints every run, the medians, the median ratios
#    diffusers/imagegate (full and tiny decoder) and the peak memory of each.
#
# Env (all optional):
#   BENCH_MODEL_DIR  checkpoint dir, relative to the repo root (default target/bench/sd-turbo-random)
#   BENCH_TAESD_DIR  tiny decoder dir (default target/bench/taesd-random); BENCH_TINY=0 skips that series
#   BENCH_PROMPT     default "a cute baby sea otter"
#   BENCH_SIZE       default 512x512
#   BENCH_STEPS      default 1
#   BENCH_SEED       default 1
#   BENCH_THREADS    torch threads for diffusers (default: torch's choice = physical cores)
#   BENCH_ONLY       "imagegate" or "diffusers" to run one side only
#   IMAGEGATE_BIN    use this binary instead of building target/release/imagegate
#
# The checkpoint has both the fp32 files and their fp16 variants, like the hub repository. diffusers
# reads the fp32 files (its CPU default: float32 weights, mapped); imagegate reads the fp16 variants of
# the text encoder and the UNet, whose weights it keeps in f16 and computes with in f32 (with only the
# fp32 files it rounds them to f16 while loading: the same numbers, a slower load), and the fp32 VAE.
# Every file's pages are pulled into the page cache before the first run so neither side pays the
# disk. Other load on the machine skews the numbers: run it idle
# (each run prints "others N%", the CPU share the rest of the machine used while it ran).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

runs="${1:-3}"
if ! [[ "$runs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bench/cpu_vs_diffusers.sh [RUNS]   (RUNS: a positive integer, got '$runs')" >&2
    exit 2
fi
model_dir="${BENCH_MODEL_DIR:-target/bench/sd-turbo-random}"
taesd_dir="${BENCH_TAESD_DIR:-target/bench/taesd-random}"
tiny="${BENCH_TINY:-1}"
prompt="${BENCH_PROMPT:-a cute baby sea otter}"
size="${BENCH_SIZE:-512x512}"
steps="${BENCH_STEPS:-1}"
seed="${BENCH_SEED:-1}"
only="${BENCH_ONLY:-}"
case "$only" in "" | imagegate | diffusers) ;; *)
    echo "BENCH_ONLY must be 'imagegate' or 'diffusers', got '$only'" >&2
    exit 2
    ;;
esac
want() { [ -z "$only" ] || [ "$only" = "$1" ]; }

die() {
    echo "cpu_vs_diffusers: $*" >&2
    exit 1
}
note() { echo "cpu_vs_diffusers: $*" >&2; }

[ -x /usr/bin/time ] || die "/usr/bin/time not found (GNU time; apt-get install time)"
py="$root/.venv-bench/bin/python"
out_dir="$root/target/bench/out"
mkdir -p "$out_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- 1. Python environment --------------------------------------------------------------------
if want diffusers || [ ! -f "$model_dir/.complete" ]; then
    "$here/setup.sh"
fi

# --- 2. Checkpoint ------------------------------------------------------------------------------
# Built into a temporary sibling and renamed, so an interrupted build is never mistaken for a
# finished one; .complete marks a verified checkpoint.
if [ -f "$model_dir/.complete" ]; then
    note "reusing checkpoint $model_dir"
else
    [ ! -e "$model_dir" ] || die "$model_dir exists but is incomplete (no .complete); delete it to rebuild"
    note "building checkpoint $model_dir (about 5.2 GB, a minute or two)"
    mkdir -p "$(dirname "$model_dir")"
    rm -rf "$model_dir.partial"
    "$py" "$here/make_checkpoint.py" --fp16 "$model_dir.partial"
    touch "$model_dir.partial/.complete" "$model_dir.partial/.fp16"
    mv "$model_dir.partial" "$model_dir"
fi
# The fp16 variant files, as the hub repository has them (and `imagegate models pull` installs them):
# imagegate keeps the text encoder's and the UNet's weights in f16 and maps those files; diffusers
# reads the fp32 files. Added to a checkpoint built before the bench wrote them.
if [ ! -f "$model_dir/.fp16" ]; then
    note "adding the fp16 variant files to $model_dir"
    "$here/setup.sh"
    "$py" "$here/make_checkpoint.py" --add-fp16 "$model_dir"
    touch "$model_dir/.fp16"
fi
model_dir="$(cd "$model_dir" && pwd)"
if want imagegate && [ "$tiny" != 0 ] && [ ! -f "$taesd_dir/diffusion_pytorch_model.safetensors" ]; then
    note "building tiny decoder $taesd_dir"
    "$py" "$here/make_taesd.py" "$taesd_dir"
fi

# --- 3. imagegate ---------------------------------------------------------------------------------
if want imagegate; then
    if [ -n "${IMAGEGATE_BIN:-}" ]; then
        bin="$IMAGEGATE_BIN"
    else
        note "cargo build --release -p imagegate"
        cargo build --release -p imagegate
        bin="$root/target/release/imagegate"
    fi
    [ -x "$bin" ] || die "imagegate binary not found at $bin"
    # Fail early and clearly if this build's CLI lacks a flag the benchmark passes.
    help="$("$bin" generate --help 2>&1)" || die "'$bin generate --help' failed:
$help"
    for flag in --model --size --steps --seed --out --decoder; do
        grep -q -- "$flag" <<<"$help" ||
            die "'imagegate generate' has no $flag flag in this build (BENCH_ONLY=diffusers runs the other side alone)"
    done
fi

# --- 4. Runs ------------------------------------------------------------------------------------
# Pull the weights into the page cache so the first run of either side does not pay the disk.
cat "$model_dir"/*/*.safetensors >/dev/null

# Busy CPU seconds of the whole machine so far (all CPUs; /proc/stat counts in USER_HZ ticks).
hz="$(getconf CLK_TCK)"
ncpu="$(nproc)"
# Fields: user nice system idle iowait irq softirq steal; busy = all but idle and iowait.
machine_busy_s() {
    awk -v hz="$hz" '$1 == "cpu" { print ($2 + $3 + $4 + $7 + $8 + $9) / hz; exit }' /proc/stat
}

b0="$(machine_busy_s)"
sleep 2
busy_pct="$(awk -v a="$b0" -v b="$(machine_busy_s)" -v n="$ncpu" \
    'BEGIN { printf "%.0f", 100 * (b - a) / (2 * n) }')"
if [ "$busy_pct" -gt 10 ]; then
    note "WARNING: the machine is ${busy_pct}% busy before starting; other work will skew the timings"
fi

# seconds from GNU time's "Elapsed (wall clock) time (h:mm:ss or m:ss): M:SS.ss"
wall_seconds() {
    awk -F': ' '/Elapsed \(wall clock\)/ {
        n = split($2, p, ":"); s = 0
        for (i = 1; i <= n; i++) s = s * 60 + p[i]
        print s
    }' "$1"
}
max_rss_kb() { awk -F': ' '/Maximum resident set size/ { print $2 }' "$1"; }

own_cpu_seconds() { awk -F': ' '/User time|System time/ { s += $2 } END { print s }' "$1"; }

# timed NAME RUN CMD...: runs CMD under /usr/bin/time -v, appends "wall_s rss_kb" to $work/NAME
# and prints one line without a newline. "others" is the CPU time the rest of the machine used
# during the run, as a share of all CPUs: anything but ~0% means the run was disturbed.
timed() {
    local name="$1" run="$2"
    shift 2
    local t="$work/$name.time" log="$work/$name.log" before after
    before="$(machine_busy_s)"
    if ! /usr/bin/time -v -o "$t" "$@" >"$log" 2>&1; then
        echo "---- $name run $run failed; last output:" >&2
        tail -n 30 "$log" >&2
        die "$name run $run failed: $*"
    fi
    after="$(machine_busy_s)"
    local wall rss others
    wall="$(wall_seconds "$t")"
    rss="$(max_rss_kb "$t")"
    others="$(awk -v a="$before" -v b="$after" -v own="$(own_cpu_seconds "$t")" -v w="$wall" -v n="$ncpu" \
        'BEGIN { o = 100 * (b - a - own) / (w * n); printf "%.0f", o < 0 ? 0 : o }')"
    echo "$wall $rss" >>"$work/$name"
    printf '  run %d %-14s wall %7.2f s   peak RSS %6.0f MiB   others %3s%%' \
        "$run" "$name" "$wall" "$((rss / 1024))" "$others"
}

echo "prompt '$prompt', size $size, steps $steps, seed $seed, $runs run(s), checkpoint $model_dir"
for ((i = 1; i <= runs; i++)); do
    if want imagegate; then
        timed imagegate "$i" "$bin" generate "$prompt" --model "$model_dir" --size "$size" \
            --steps "$steps" --seed "$seed" --decoder full --out "$out_dir/imagegate.png"
        echo
        if [ "$tiny" != 0 ]; then
            timed imagegate-tiny "$i" "$bin" generate "$prompt" --model "$model_dir" --size "$size" \
                --steps "$steps" --seed "$seed" --decoder "$taesd_dir" --out "$out_dir/imagegate-tiny.png"
            echo
        fi
    fi
    if want diffusers; then
        timed diffusers "$i" "$py" "$here/diffusers_generate.py" --model "$model_dir" --prompt "$prompt" \
            --size "$size" --steps "$steps" --seed "$seed" --out "$out_dir/diffusers.png" \
            ${BENCH_THREADS:+--threads "$BENCH_THREADS"}
        # The script's last stdout line is its JSON report: show the in-process split.
        tail -n 1 "$work/diffusers.log" | "$py" -c '
import json, sys
print("   (import {import_s:.1f} load {load_s:.1f} text {text_encoder_s:.1f} unet {unet_s:.1f}"
      " vae {vae_decode_s:.1f} other {other_s:.1f} s, {threads} threads)".format(**json.load(sys.stdin)))
' || echo "   (no JSON report)"
    fi
done

# --- Summary ------------------------------------------------------------------------------------
median() {
    sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
echo
echo "| engine | median wall (s) | runs (s) | peak RSS (MiB) |"
echo "|---|---:|---:|---:|"
for name in imagegate imagegate-tiny diffusers; do
    [ -f "$work/$name" ] || continue
    med="$(cut -d' ' -f1 "$work/$name" | median)"
    all="$(cut -d' ' -f1 "$work/$name" | paste -sd' ' -)"
    peak="$(cut -d' ' -f2 "$work/$name" | sort -n | tail -n 1)"
    printf '| %s | %.2f | %s | %.0f |\n' "$name" "$med" "$all" "$((peak / 1024))"
    eval "median_${name//-/_}=$med"
done
if [ -n "${median_imagegate:-}" ] && [ -n "${median_diffusers:-}" ]; then
    awk -v d="$median_diffusers" -v g="$median_imagegate" \
        'BEGIN { printf "\nmedian ratio diffusers/imagegate: %.2fx (>1 means imagegate is faster)\n", d / g }'
fi
if [ -n "${median_imagegate_tiny:-}" ] && [ -n "${median_diffusers:-}" ]; then
    awk -v d="$median_diffusers" -v g="$median_imagegate_tiny" \
        'BEGIN { printf "median ratio diffusers (full VAE)/imagegate --decoder tiny: %.2fx\n", d / g }'
fi
echo "images: $out_dir/"

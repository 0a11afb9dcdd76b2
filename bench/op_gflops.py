#!/usr/bin/env python3
"""PyTorch CPU throughput of the operations that dominate SD-Turbo, in GFLOP/s.

    .venv-bench/bin/python bench/op_gflops.py [--runs 5] [--threads N] [--json]

Times 3x3 stride-1 padding-1 conv2d (batch 1, float32, with bias) at the channel counts and
resolutions where the VAE decoder (128..512 channels at 512..128 px) and the UNet (320/640
channels at 64/32 px) spend their time, plus a 4096^3 matmul. Prints a markdown table with the
median of --runs timed runs after one warm-up run. A Rust/candle counterpart is meant to print the
same rows so the two can be compared line by line.

FLOPs are counted as 2 per multiply-add: conv = 2 * Cout * H * W * Cin * 9, matmul = 2 * M * N * K.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

# (name, Cin, Cout, H, W)
CONVS = [
    ("conv3x3 128->128 @512x512", 128, 128, 512, 512),
    ("conv3x3 256->256 @256x256", 256, 256, 256, 256),
    ("conv3x3 512->512 @128x128", 512, 512, 128, 128),
    ("conv3x3 320->320 @64x64", 320, 320, 64, 64),
    ("conv3x3 640->640 @32x32", 640, 640, 32, 32),
]
MATMUL_N = 4096


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up: first-touch allocation, oneDNN primitive creation
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per op (median reported)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per op")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    with torch.inference_mode():
        for name, cin, cout, h, w in CONVS:
            x = torch.randn(1, cin, h, w)
            weight = torch.randn(cout, cin, 3, 3) * (cin * 9) ** -0.5
            bias = torch.randn(cout)
            s = median_seconds(lambda: F.conv2d(x, weight, bias, stride=1, padding=1), args.runs)
            rows.append((name, 2 * cout * h * w * cin * 9, s))
            del x, weight, bias

        n = MATMUL_N
        a, b = torch.randn(n, n), torch.randn(n, n)
        s = median_seconds(lambda: a @ b, args.runs)
        rows.append((f"matmul {n}x{n}x{n}", 2 * n**3, s))

    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of {args.runs}")
    print()
    print("| op | GFLOP | ms | GFLOP/s |")
    print("|---|---:|---:|---:|")
    for name, flops, s in rows:
        print(f"| {name} | {flops / 1e9:.1f} | {s * 1e3:.1f} | {flops / s / 1e9:.1f} |")
    if args.json:
        for name, flops, s in rows:
            row = {"engine": "torch", "op": name, "flops": flops, "seconds": s, "gflops": flops / s / 1e9}
            print(json.dumps(row))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""diffusers' ZImagePipeline in bf16 on the GPU: 1024x1024, 8 steps, guidance 0, `--n` images at once,
timed after one warm-up run (and as one whole process for the first). Part of bench/gpu/zimage_gpu.sh.
"""
import argparse
import time

import torch
from diffusers import ZImagePipeline

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--n", type=int, default=1)
ap.add_argument("--runs", type=int, default=3)
args = ap.parse_args()
t0 = time.perf_counter()
pipe = ZImagePipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to("cuda")
pipe.set_progress_bar_config(disable=True)
load_s = time.perf_counter() - t0
times = []
for run in range(args.runs + 1):
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe("a cute baby sea otter", height=1024, width=1024, num_inference_steps=8, guidance_scale=0.0,
         num_images_per_prompt=args.n, generator=torch.Generator("cuda").manual_seed(1))
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
warm = sorted(times[1:])[len(times[1:]) // 2]
print(f"diffusers n={args.n}: load {load_s:.1f} s, first run {times[0]:.2f} s, median warm run {warm:.2f} s, "
      f"{args.n / warm:.3f} images/s, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

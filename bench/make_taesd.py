#!/usr/bin/env python3
"""Write a random-weight tiny decoder with the layout and architecture of madebyollin/taesd.

    .venv-bench/bin/python bench/make_taesd.py OUT_DIR [--seed 0]

diffusers' AutoencoderTiny with its default config is TAESD's architecture (64-channel blocks, three
blocks per stage, latent_channels 4, scaling_factor 1.0); save_pretrained writes config.json and
diffusion_pytorch_model.safetensors with diffusers' own tensor names, as on the hub. The weights come
from PyTorch's seeded default initialization: for timing, what matters is the shapes.
"""
import argparse
import sys

import torch
from diffusers import AutoencoderTiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = AutoencoderTiny()
    params = sum(p.numel() for p in model.decoder.parameters())
    model.save_pretrained(args.out_dir, safe_serialization=True)
    print(f"make_taesd: decoder {params / 1e6:.2f}M parameters, written to {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""One text-to-image generation with Hugging Face diffusers on the CPU, timed per component.

    .venv-bench/bin/python bench/diffusers_generate.py --model DIR --prompt "a cute baby sea otter" \\
        --size 512x512 --steps 1 --out /tmp/d.png [--seed 1] [--threads N]

The reference side of bench/cpu_vs_diffusers.sh: loads a diffusers-layout pipeline (the class its
model_index.json names: StableDiffusionPipeline, ZImagePipeline; float32 unless --dtype, CPU), runs
it the way turbo models are meant to be run (guidance_scale=0.0, so no classifier-free guidance and
one UNet or transformer call per step), saves the PNG and prints one JSON line on
stdout:

    import_s          importing torch + diffusers
    load_s            StableDiffusionPipeline.from_pretrained
    text_encoder_s    CLIP text encoder forward passes
    unet_s            UNet (or transformer) forward passes (unet_calls of them)
    vae_decode_s      VAE decode of the final latents
    pipeline_s        the whole pipe(...) call; other_s = pipeline_s minus the three above
                      (tokenizing, scheduler, latent init, postprocessing to PIL)
    save_s            writing the PNG
    in_process_s      from the first line of this script to the end

The component times come from forward hooks / a wrapper around vae.decode, so the pipeline runs
its own code path unchanged. They are diagnostics; the number to compare is the process's wall
time measured from outside (cpu_vs_diffusers.sh uses /usr/bin/time), which also includes the
interpreter start that in_process_s cannot see.
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="diffusers-layout checkpoint directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--size", default="512x512", help="WIDTHxHEIGHT (default 512x512)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True, help="PNG file to write")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the pipeline's dtype (default float32, diffusers' CPU default; bfloat16 is what the "
                         "Z-Image model card loads it in)")
    args = ap.parse_args()
    try:
        w, h = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    if w % 8 or h % 8 or w <= 0 or h <= 0:
        ap.error("--size: width and height must be positive multiples of 8")
    args.width, args.height = w, h
    return args


class Stopwatch:
    """Accumulates the time spent inside calls of one component."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._t = 0.0

    def start(self, *_args, **_kwargs) -> None:
        self._t = time.perf_counter()

    def stop(self, *_args, **_kwargs) -> None:
        self.seconds += time.perf_counter() - self._t
        self.calls += 1

    def attach(self, module) -> None:
        """Time every forward call of an nn.Module."""
        module.register_forward_pre_hook(self.start)
        module.register_forward_hook(self.stop)

    def wrap(self, fn):
        """Time every call of a plain function/method (vae.decode is not a forward)."""

        def timed(*args, **kwargs):
            self.start()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop()

        return timed


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from diffusers import DiffusionPipeline
    from diffusers import __version__ as diffusers_version
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_imported = time.perf_counter()

    # The class model_index.json names: StableDiffusionPipeline, ZImagePipeline, ...
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    pipe = pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    t_loaded = time.perf_counter()

    text_enc, unet, vae_dec = Stopwatch(), Stopwatch(), Stopwatch()
    text_enc.attach(pipe.text_encoder)
    # The denoiser: a UNet (SD) or a transformer (Z-Image).
    unet.attach(pipe.unet if hasattr(pipe, "unet") else pipe.transformer)
    # The pipeline calls self.vae.decode(...); an instance attribute shadows the bound method.
    pipe.vae.decode = vae_dec.wrap(pipe.vae.decode)

    image = pipe(
        args.prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=0.0,  # turbo: no classifier-free guidance
        generator=torch.Generator("cpu").manual_seed(args.seed),
    ).images[0]
    t_generated = time.perf_counter()
    image.save(args.out)
    t_saved = time.perf_counter()

    pipeline_s = t_generated - t_loaded
    report = {
        "engine": "diffusers",
        "diffusers": diffusers_version,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "pipeline": type(pipe).__name__,
        "dtype": args.dtype,
        "size": f"{args.width}x{args.height}",
        "steps": args.steps,
        "import_s": round(t_imported - T_START, 3),
        "load_s": round(t_loaded - t_imported, 3),
        "text_encoder_s": round(text_enc.seconds, 3),
        "unet_s": round(unet.seconds, 3),
        "unet_calls": unet.calls,
        "vae_decode_s": round(vae_dec.seconds, 3),
        "other_s": round(pipeline_s - text_enc.seconds - unet.seconds - vae_dec.seconds, 3),
        "pipeline_s": round(pipeline_s, 3),
        "save_s": round(t_saved - t_generated, 3),
        "in_process_s": round(t_saved - T_START, 3),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)

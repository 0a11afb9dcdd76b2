#!/usr/bin/env python3
"""Write a random-weight checkpoint with the exact layout and architecture of stabilityai/sd-turbo.

    .venv-bench/bin/python bench/make_checkpoint.py OUT_DIR [--fp16] [--seed 0] [--no-verify]
    .venv-bench/bin/python bench/make_checkpoint.py --add-fp16 DIR

The Hugging Face hub is not reachable from the benchmark machines, so the real weights cannot be
downloaded. For a speed comparison they are not needed: what matters is that both engines load the
same files and run the same architecture at the same sizes. This script therefore writes

    OUT_DIR/model_index.json                       StableDiffusionPipeline
    OUT_DIR/scheduler/scheduler_config.json        EulerDiscreteScheduler, trailing spacing
    OUT_DIR/text_encoder/config.json               CLIPTextModel (OpenCLIP ViT-H/14 text tower, 23 layers)
    OUT_DIR/text_encoder/model.safetensors
    OUT_DIR/tokenizer/{vocab.json,merges.txt,tokenizer_config.json,special_tokens_map.json}
    OUT_DIR/unet/config.json                       UNet2DConditionModel (SD 2.1-base)
    OUT_DIR/unet/diffusion_pytorch_model.safetensors
    OUT_DIR/vae/config.json                        AutoencoderKL
    OUT_DIR/vae/diffusion_pytorch_model.safetensors

with the configs of the real sd-turbo repository (written out below from the published files), the
real CLIP BPE tokenizer (built from the vocabulary open_clip ships), and weights from the libraries'
own random initialization, seeded. With --fp16 the `*.fp16.safetensors` variant files the real repo
also has are written next to the fp32 ones; --add-fp16 writes them into an existing checkpoint, from
its fp32 files (each tensor rounded to float16, as --fp16 does).

Weights are saved with save_pretrained(safe_serialization=True), so file names and tensor names are
exactly the ones diffusers/transformers use. save_pretrained also rewrites config.json with every
default the installed library knows; the hand-written configs are put back afterwards so the files
match the published ones key for key (they load the same either way; verified at the end).

Random init: no scaling turned out to be needed. The default initializations (PyTorch's
kaiming-uniform for conv/linear in diffusers, transformers' CLIP init for the text encoder) keep
every activation finite and far inside the fp16 range, because every block is normalized
(GroupNorm/LayerNorm) and kaiming-uniform shrinks each layer's output. Measured on a 1-step
256x256 generation with torch 2.15 / diffusers 0.42 / transformers 5.23: largest |activation| 4.4
in the text encoder, 5.8 in the UNet, 219 in the VAE (post_quant_conv, whose input is the latent
divided by 0.18215). The verification pass repeats that measurement and fails if anything is
non-finite or would not fit in fp16. --init-scale multiplies every conv/linear weight by a factor,
should a future library version change its defaults.

Expect ~5.2 GB on disk (another ~2.6 GB with --fp16), ~7 GB of RAM and a minute or two.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

# The published sd-turbo configs. Keys and values follow stabilityai/sd-turbo's files; only the
# `_diffusers_version`/`transformers_version` stamps are whatever wrote them there.
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.24.0.dev0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "timestep_type": "discrete",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "torch_dtype": "float32",
    "transformers_version": "4.35.2",
    "vocab_size": 49408,
}

UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.24.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": None,
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None,
    # SD 2.x's historical naming: these are the numbers of heads (head dim is always 64).
    "attention_head_dim": [5, 10, 20, 20],
    "attention_type": "default",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 1024,
    "cross_attention_norm": None,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dropout": 0.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "sample_size": 64,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": 1,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "upcast_attention": None,
    "use_linear_projection": True,
}

VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.24.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": [
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
        "DownEncoderBlock2D",
    ],
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": [
        "UpDecoderBlock2D",
        "UpDecoderBlock2D",
        "UpDecoderBlock2D",
        "UpDecoderBlock2D",
    ],
}

# SD 2.x pads with "!" (id 0), which makes the padded ids identical to open_clip's zero padding.
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": "<|startoftext|>",
    "clean_up_tokenization_spaces": True,
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "!",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}

SPECIAL_TOKENS_MAP = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "!",
    "unk_token": "<|endoftext|>",
}

CHECK_PROMPT = "a cute baby sea otter"
FP16_MAX = 65504.0


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (256 entries).

    Printable Latin-1 bytes map to themselves; the rest are shifted to code points from 256 up, in
    byte order. The order of this dict is the order of the first 256 vocabulary entries.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def clip_bpe_path() -> Path:
    """The BPE merge list open_clip ships (the same file as OpenAI's CLIP repository)."""
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def write_tokenizer(out: Path) -> None:
    """vocab.json and merges.txt exactly as CLIP's SimpleTokenizer derives them from the .gz file."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    # Line 0 is a header; CLIP keeps the next 49152 - 256 - 2 lines (48894 merges), so that
    # 256 bytes + 256 byte</w> + merges + 2 specials = 49408 tokens.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    assert all(len(m) == 2 for m in merges), "unexpected line in the BPE file"
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == len(vocab)

    tok = out / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    # Compact, in id order, UTF-8 (not \u escapes), like the published CLIP vocab.json.
    (tok / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    # The "#version" header line is skipped by every reader (transformers, tokenizers, CLIP).
    (tok / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    write_json(tok / "tokenizer_config.json", TOKENIZER_CONFIG)
    write_json(tok / "special_tokens_map.json", SPECIAL_TOKENS_MAP)


def scale_weights(model, factor: float) -> None:
    """Multiply every conv/linear weight by `factor` (biases and norms untouched)."""
    import torch

    if factor == 1.0:
        return
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(factor)


def save_text_encoder(model, sub: Path, variant: str | None) -> None:
    """Save a CLIPTextModel under the tensor names of the published checkpoints.

    transformers >= 5 flattened CLIPTextModel (no `text_model` submodule) and, for a model built
    from scratch, save_pretrained writes the new names (`encoder.layers.0...`). Every published
    SD 2.x / sd-turbo text encoder, and every other loader, uses `text_model.encoder.layers.0...`,
    so the state dict is written with that prefix. transformers 5 strips it again on load (its
    CLIPTextModel conversion mapping); verify() checks that every tensor comes back unchanged.
    """
    from safetensors.torch import save_file

    state = {
        k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous()
        for k, v in model.state_dict().items()
    }
    name = "model.safetensors" if variant is None else f"model.{variant}.safetensors"
    sub.mkdir(parents=True, exist_ok=True)
    save_file(state, sub / name, metadata={"format": "pt"})


def save_model(model, sub: Path, config: dict, fp16: bool) -> None:
    import torch

    for variant in [None, "fp16"] if fp16 else [None]:
        if variant == "fp16":
            # Casting in place is fine: the fp32 copy is already on disk and the model is dropped next.
            model = model.to(torch.float16)
        if sub.name == "text_encoder":
            save_text_encoder(model, sub, variant)
        else:
            model.save_pretrained(sub, safe_serialization=True, variant=variant)
    write_json(sub / "config.json", config)  # the published config, also for the text encoder


def write_weights(out: Path, seed: int, fp16: bool, init_scale: float) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Each model is seeded on its own so one can be regenerated without the others.
    for name, build in [
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig.from_dict(TEXT_ENCODER))),
        ("unet", lambda: UNet2DConditionModel.from_config(UNET)),
        ("vae", lambda: AutoencoderKL.from_config(VAE)),
    ]:
        t = time.perf_counter()
        torch.manual_seed(seed)
        model = build().eval()
        scale_weights(model, init_scale)
        config = {"text_encoder": TEXT_ENCODER, "unet": UNET, "vae": VAE}[name]
        save_model(model, out / name, config, fp16)
        n = sum(p.numel() for p in model.parameters())
        del model
        log(f"{name}: {n / 1e6:.1f}M parameters, {time.perf_counter() - t:.1f}s")


def open_clip_tokenizer():
    """open_clip's CLIP tokenizer (the one SD 2.x was trained with): 77 tokens, zero-padded."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=77)


def verify(out: Path, fp16: bool) -> None:
    """Load everything back through the public APIs and check it behaves like sd-turbo would."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    # Tokenizer files: same vocabulary and merge ranks as open_clip's tokenizer, and the HF
    # tokenizer built from them must produce the same ids.
    oc = open_clip_tokenizer()
    vocab = json.loads((out / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    # open_clip 3.x spells the two specials <start_of_text>/<end_of_text>; the ids are the same and
    # the HF files use CLIP's original <|startoftext|>/<|endoftext|> spelling.
    renamed = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}
    if {renamed.get(t, t): i for t, i in vocab.items()} != oc.encoder:
        fail("vocab.json differs from open_clip's encoder")
    merges = (out / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    if {tuple(m.split()): i for i, m in enumerate(merges)} != oc.bpe_ranks:
        fail("merges.txt differs from open_clip's bpe_ranks")
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    ids = tok(CHECK_PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    ref = oc([CHECK_PROMPT])[0].tolist()
    if ids != ref:
        fail(f"tokenizer mismatch for {CHECK_PROMPT!r}:\n  transformers {ids}\n  open_clip    {ref}")
    log(f"tokenizer OK: {CHECK_PROMPT!r} -> {ids[: ids.index(49407) + 1]} (then 0-padding to 77)")

    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32)
    # The published configs must round-trip without surprises.
    u, v, te = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    if not (
        list(u.block_out_channels) == [320, 640, 1280, 1280]
        and u.use_linear_projection
        and list(v.block_out_channels) == [128, 256, 512, 512]
        and v.scaling_factor == 0.18215
        and te.num_hidden_layers == 23
        and te.hidden_size == 1024
        and pipe.scheduler.config.timestep_spacing == "trailing"
    ):
        fail("the loaded pipeline's configs differ from the ones written")
    counts = {
        n: sum(p.numel() for p in m.parameters())
        for n, m in pipe.components.items()
        if hasattr(m, "parameters")
    }
    log("pipeline loads: " + ", ".join(f"{n} {c / 1e6:.1f}M" for n, c in counts.items()))
    check_weights_loaded(pipe, out, None)

    # One turbo step (small size to keep this quick), recording the largest activation of each model.
    peak = {c: (0.0, "") for c in ("text_encoder", "unet", "vae")}

    def track(name):
        def hook(_module, _inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for o in outs:
                if isinstance(o, torch.Tensor) and o.is_floating_point():
                    if not torch.isfinite(o).all():
                        fail(f"non-finite activation in {name}")
                    m = o.abs().max().item()
                    comp = name.split(".")[0]
                    if m > peak[comp][0]:
                        peak[comp] = (m, name)

        return hook

    handles = [
        mod.register_forward_hook(track(f"{comp}.{name}"))
        for comp in ("text_encoder", "unet", "vae")
        for name, mod in getattr(pipe, comp).named_modules()
        if name  # skip the root (its output is a ModelOutput, covered by its children)
    ]
    image = pipe(
        CHECK_PROMPT,
        height=256,
        width=256,
        num_inference_steps=1,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="np",
    ).images[0]
    for h in handles:
        h.remove()
    if not np.isfinite(image).all() or image.std() == 0:
        fail("the 1-step image is NaN or constant")
    log(f"1-step 256x256 image finite (mean {image.mean():.3f}, std {image.std():.3f})")
    for value, where in peak.values():
        log(f"largest |activation| {value:.1f} in {where}")
        if value >= FP16_MAX:
            fail("an activation exceeds the fp16 range; lower --init-scale")
    del pipe

    if fp16:
        pipe = StableDiffusionPipeline.from_pretrained(out, variant="fp16", dtype=torch.float16)
        dtypes = {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()}
        if dtypes != {torch.float16}:
            fail(f"fp16 variant loaded as {dtypes}")
        check_weights_loaded(pipe, out, "fp16")
        log("fp16 variant loads (float16 parameters)")


def check_weights_loaded(pipe, out: Path, variant: str | None) -> None:
    """Every tensor in each weights file must be in the loaded model, bit for bit, and vice versa.

    Guards against a loader silently leaving a randomly initialized module behind (e.g. after a
    tensor-name mismatch), which would make the benchmark run on different weights than the file.
    """
    import torch
    from safetensors import safe_open

    suffix = "" if variant is None else f".{variant}"
    for comp, fname in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ]:
        state = getattr(pipe, comp).state_dict()
        # transformers 5 drops the `text_model.` level; map file names onto the module's names.
        flat = comp == "text_encoder" and not any(k.startswith("text_model.") for k in state)
        strip = "text_model." if flat else ""
        with safe_open(out / comp / f"{fname}{suffix}.safetensors", "pt") as f:
            keys = {k: k[len(strip) :] if strip and k.startswith(strip) else k for k in f.keys()}
            # position_ids is a constant buffer some versions save and others do not.
            missing = {k for k in keys.values() if not k.endswith("position_ids")} ^ {
                k for k in state if not k.endswith("position_ids")
            }
            if missing:
                fail(f"{comp}: names differ between file and model: {sorted(missing)[:5]}")
            for fk, mk in keys.items():
                if mk in state and not torch.equal(f.get_tensor(fk), state[mk]):
                    fail(f"{comp}: {fk} was not loaded from the file")
        log(f"{comp}{suffix}: all {len(keys)} tensors loaded from the file unchanged")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log(msg: str) -> None:
    print(f"make_checkpoint: {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    log(f"FAILED: {msg}")
    sys.exit(1)


def add_fp16(out: Path) -> None:
    """Write the *.fp16.safetensors variants of an existing checkpoint's fp32 weight files."""
    import torch
    from safetensors.torch import load_file, save_file

    for sub in ("text_encoder", "unet", "vae"):
        for stem in ("model", "diffusion_pytorch_model"):
            full = out / sub / f"{stem}.safetensors"
            if not full.is_file():
                continue
            half = {k: v.to(torch.float16).contiguous() for k, v in load_file(full).items()}
            target = out / sub / f"{stem}.fp16.safetensors"
            save_file(half, target, metadata={"format": "pt"})
            target.chmod(0o644)
            log(f"wrote {target}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--fp16", action="store_true", help="also write the *.fp16.safetensors variant files")
    ap.add_argument("--add-fp16", action="store_true", help="write the fp16 variants into an existing checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building each model")
    ap.add_argument("--init-scale", type=float, default=1.0, help="multiply conv/linear weights by this")
    ap.add_argument("--no-verify", action="store_true", help="skip loading the result back")
    args = ap.parse_args()

    out: Path = args.out_dir
    if args.add_fp16:
        add_fp16(out)
        return
    if out.exists() and any(out.iterdir()):
        # Refuse rather than mix old and new files (e.g. stale *.fp16.safetensors).
        fail(f"{out} is not empty; delete it or pick another directory")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "model_index.json", MODEL_INDEX)
    write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER)
    write_tokenizer(out)
    write_weights(out, args.seed, args.fp16, args.init_scale)
    if not args.no_verify:
        verify(out, args.fp16)
    for f in out.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # safetensors files are created 0600
    for f in ("tokenizer/vocab.json", "tokenizer/merges.txt"):
        log(f"sha256 {f} {sha256(out / f)}")
    log(f"done: {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

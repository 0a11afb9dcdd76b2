#!/usr/bin/env python3
"""Reference-parity fixtures: tiny random checkpoints saved by diffusers and transformers themselves,
and what diffusers and transformers compute on them, for the engine's Rust tests to match
(crates/engine/tests/parity.rs). CI needs no torch: the checkpoints and outputs live in the repository.

    bench/setup.sh && .venv-bench/bin/python tests/parity/make_fixtures.py

Writes tests/parity/sd15-tiny/ and sd2-tiny/ (StableDiffusionPipelines saved with save_pretrained, f16
weights: see build() for what each is like), and <name>-reference.safetensors for each:
  ids, ids_uncond                 token ids of PROMPT and "" (int64 [1, 77])
  text, text_uncond               the text encoder's last hidden state ([1, 77, 16])
  unet_sample, unet_out           a batch of 2 non-square latents through the UNet at UNET_TIMESTEP,
                                  conditioned on [text, text_uncond]
  vae_latents, vae_out            a batch of 3 latents through the VAE decoder (before post-processing)
  sched.<class>.<spacing>.<steps>.timesteps / .sigmas   every scheduler's schedule (float64; sd15 only)
  step_sample, step_model_output, step.<class>.<spacing>.<prediction>
                                  the second of four steps of Euler and DDIM (clip_sample on, its
                                  default; sd15 only)
  pipe_noise, pipe_g0, pipe_g75   the initial latents and the whole pipeline's image (float [0, 1],
                                  [1, 80, 64, 3]) at guidance 0 and 7.5, two steps
  eulera_noise, pipe_eulera       Euler ancestral's noise at each of 3 steps, and its image at
                                  guidance 7.5 (sd15 only)
Norms and biases are perturbed so that a swapped or missing one shows. Versions: bench/requirements.txt.
"""

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = Path(__file__).resolve().parent
PROMPT = "a cute baby sea otter!"
UNET_TIMESTEP = 801
# The tiny vocabulary of engine::testing::write_tokenizer: byte-level alphabet, then these words whole.
WORDS = ["a", "cute", "baby", "sea", "otter", "red", "cat", "photo"]


def byte_alphabet() -> list[str]:
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_tokenizer(directory: Path, pad_token: str) -> CLIPTokenizer:
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = ["#version: 0.2"]
    for word in WORDS:
        acc = word[0]
        for i, c in enumerate(word[1:], 1):
            right = c + "</w>" if i + 1 == len(word) else c
            merges.append(f"{acc} {right}")
            acc += right
            if acc not in vocab:
                vocab.append(acc)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights away from 1 and every bias away from 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=generator))


def build(name: str, sd2: bool, g: torch.Generator) -> None:
    """Writes tests/parity/<name>/ and <name>-reference.safetensors. SD 1.x style: QuickGELU, pad token
    <|endoftext|>, Euler (leading), epsilon. SD 2.x style: GELU, pad token `!`, a linear-projection UNet
    with heads per block, DDIM (its default spacing, clip_sample off), v-prediction."""
    work = Path(tempfile.mkdtemp())
    tokenizer = write_tokenizer(work / "tokenizer", "!" if sd2 else "<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2,
        norm_num_groups=4).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16).eval()
    for m in (text_encoder, unet, vae):
        perturb(m, g)
        # Weights are stored in f16 (half the size); the reference computes in f32 on the same values.
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.half().float())
    if sd2:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, steps_offset=1, clip_sample=False,
                                  set_alpha_to_one=False, prediction_type="v_prediction")
    else:
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

    ref: dict[str, torch.Tensor] = {}
    # The config without diffusers' bookkeeping: `_use_default_values` would make `from_config` drop the
    # overrides below (prediction_type) in favour of the class's defaults.
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    with torch.no_grad():
        for key, text in (("", PROMPT), ("_uncond", "")):
            ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            ref["ids" + key] = ids.to(torch.int64)
            ref["text" + key] = text_encoder(ids)[0]
        ref["unet_sample"] = torch.randn((2, 4, 8, 6), generator=g)
        context = torch.cat([ref["text"], ref["text_uncond"]])
        ref["unet_out"] = unet(ref["unet_sample"], UNET_TIMESTEP, encoder_hidden_states=context).sample
        ref["vae_latents"] = torch.randn((3, 4, 8, 6), generator=g)
        ref["vae_out"] = vae.decode(ref["vae_latents"]).sample

        # The schedules and steps depend on the config alone: written once, with the SD 1.x fixture.
        for cls in () if sd2 else (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler):
            for spacing in ("leading", "linspace", "trailing"):
                for steps in (1, 2, 4, 16, 25):
                    s = cls.from_config({**config, "timestep_spacing": spacing})
                    s.set_timesteps(steps)
                    key = f"sched.{cls.__name__}.{spacing}.{steps}"
                    ref[key + ".timesteps"] = s.timesteps.to(torch.float64)
                    if hasattr(s, "sigmas"):
                        ref[key + ".sigmas"] = s.sigmas.to(torch.float64)

        # One step (the second of four) of each deterministic sampler, each spacing and prediction type.
        ref["step_sample"] = torch.randn((1, 4, 8, 6), generator=g)
        ref["step_model_output"] = torch.randn((1, 4, 8, 6), generator=g)
        for cls in () if sd2 else (EulerDiscreteScheduler, DDIMScheduler):
            for spacing in ("leading", "linspace", "trailing"):
                for prediction in ("epsilon", "v_prediction"):
                    s = cls.from_config({**config, "timestep_spacing": spacing, "prediction_type": prediction})
                    assert s.config.prediction_type == prediction
                    s.set_timesteps(4)
                    t = s.timesteps[1]
                    if cls is EulerDiscreteScheduler:
                        s._step_index = 1
                    prev = s.step(ref["step_model_output"], t, ref["step_sample"]).prev_sample
                    ref[f"step.{cls.__name__}.{spacing}.{prediction}"] = prev

        ref["pipe_noise"] = torch.randn((1, 4, 40, 32), generator=g)
        for key, guidance in (("pipe_g0", 0.0), ("pipe_g75", 7.5)):
            image = pipe(PROMPT, height=80, width=64, num_inference_steps=2, guidance_scale=guidance,
                         latents=ref["pipe_noise"].clone(), output_type="np").images
            ref[key] = torch.from_numpy(image)
        if not sd2:
            # Euler ancestral, 3 steps at guidance 7.5: with the latents given, the generator's only
            # draws are each step's fresh noise, in order.
            pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(config)
            image = pipe(PROMPT, height=80, width=64, num_inference_steps=3, guidance_scale=7.5,
                         latents=ref["pipe_noise"].clone(), generator=torch.Generator().manual_seed(7),
                         output_type="np").images
            ref["pipe_eulera"] = torch.from_numpy(image)
            replay = torch.Generator().manual_seed(7)
            ref["eulera_noise"] = torch.cat([torch.randn((1, 4, 40, 32), generator=replay) for _ in range(3)])
            pipe.scheduler = scheduler
    save_file({k: v.contiguous() for k, v in ref.items()}, HERE / f"{name}-reference.safetensors")
    out = HERE / name
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"{f.relative_to(HERE)}: {f.stat().st_size} bytes")




def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    build("sd15-tiny", False, g)
    build("sd2-tiny", True, g)


if __name__ == "__main__":
    main()

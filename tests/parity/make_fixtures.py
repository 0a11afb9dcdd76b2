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
  step_sample, step_model_output, step.<class>.<spacing>.<prediction>.<steps>
                                  the second step (the only one at 1) of Euler and DDIM at 1, 2, 4,
                                  16 and 25 steps (clip_sample on, its default; sd15 only)
  pipe_noise, pipe_g0, pipe_g75   the initial latents and the whole pipeline's image at guidance 0 and
                                  7.5, two steps (every pipe_* image is diffusers' 8-bit image, uint8
                                  [1, 80, 64, 3])
  eulera_noise, pipe_eulera       Euler ancestral's noise at each of 3 steps, and its image at
                                  guidance 7.5 (sd15 only)
Norms and biases are perturbed so that a swapped or missing one shows. Versions: bench/requirements.txt.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
import numpy as np
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


def build(name: str, sd2: bool, g: torch.Generator) -> StableDiffusionPipeline:
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

        # One step (the second, or the only one) of each deterministic sampler, each spacing and
        # prediction type, at each step count.
        ref["step_sample"] = torch.randn((1, 4, 8, 6), generator=g)
        ref["step_model_output"] = torch.randn((1, 4, 8, 6), generator=g)
        for cls in () if sd2 else (EulerDiscreteScheduler, DDIMScheduler):
            for spacing in ("leading", "linspace", "trailing"):
                for prediction in ("epsilon", "v_prediction"):
                    for steps in (1, 2, 4, 16, 25):
                        s = cls.from_config({**config, "timestep_spacing": spacing, "prediction_type": prediction})
                        assert s.config.prediction_type == prediction
                        s.set_timesteps(steps)
                        index = min(1, steps - 1)
                        t = s.timesteps[index]
                        if cls is EulerDiscreteScheduler:
                            s._step_index = index
                        prev = s.step(ref["step_model_output"], t, ref["step_sample"]).prev_sample
                        ref[f"step.{cls.__name__}.{spacing}.{prediction}.{steps}"] = prev

        ref["pipe_noise"] = torch.randn((1, 4, 40, 32), generator=g)
        for key, guidance in (("pipe_g0", 0.0), ("pipe_g75", 7.5)):
            image = pipe(PROMPT, height=80, width=64, num_inference_steps=2, guidance_scale=guidance,
                         latents=ref["pipe_noise"].clone(), output_type="np").images
            ref[key] = to_u8(image)
        if not sd2:
            # Euler ancestral, 3 steps at guidance 7.5: with the latents given, the generator's only
            # draws are each step's fresh noise, in order.
            pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(config)
            image = pipe(PROMPT, height=80, width=64, num_inference_steps=3, guidance_scale=7.5,
                         latents=ref["pipe_noise"].clone(), generator=torch.Generator().manual_seed(7),
                         output_type="np").images
            ref["pipe_eulera"] = to_u8(image)
            replay = torch.Generator().manual_seed(7)
            ref["eulera_noise"] = torch.cat([torch.randn((1, 4, 40, 32), generator=replay) for _ in range(3)])
            pipe.scheduler = scheduler
            dpm_references(pipe, config, ref)
            edit_references(pipe, ref)
    save_file({k: v.contiguous() for k, v in ref.items()}, HERE / f"{name}-reference.safetensors")
    out = HERE / name
    shutil.rmtree(out, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    list_files(out)
    return pipe.to(torch.float32)


def to_u8(image: np.ndarray) -> torch.Tensor:
    """A pipeline's float image ([1, h, w, 3] in 0..1) as diffusers makes its 8-bit images: round(x * 255)."""
    return torch.from_numpy((image * 255).round().astype(np.uint8))


def list_files(out: Path) -> None:
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"{f.relative_to(HERE)}: {f.stat().st_size} bytes")


def replay(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """The first draws of a generator seeded `seed`, as a pipeline given it draws them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in shapes]


DPM = "DPMSolverMultistepScheduler"


def dpm_references(pipe: StableDiffusionPipeline, config: dict, ref: dict[str, torch.Tensor]) -> None:
    """DPM-Solver++ (SD 1.x config): schedules at every spacing and step count, with and without Karras
    sigmas; whole multistep runs over given model outputs (`dpm_sample`, `dpm_outputs`: 16 steps' worth)
    for each prediction type, solver type and final sigma; and a whole pipeline with DPM++ 2M Karras:
      sched.DPMSolverMultistepScheduler.<spacing | karras>.<steps>.timesteps / .sigmas
      dpm.<karras|plain>.<prediction>.<midpoint|heun>.<zero|sigma_min>.<steps>    the final sample
      pipe_dpm                 4 steps of DPM++ 2M Karras at guidance 7.5 from pipe_noise
    """
    base = {**config, "timestep_spacing": "linspace"}
    for spacing in ("leading", "linspace", "trailing", "karras"):
        for steps in (1, 2, 4, 16, 25):
            extra = {"use_karras_sigmas": True} if spacing == "karras" else {"timestep_spacing": spacing}
            s = DPMSolverMultistepScheduler.from_config({**base, **extra})
            s.set_timesteps(steps)
            key = f"sched.{DPM}.{spacing}.{steps}"
            ref[key + ".timesteps"] = s.timesteps.to(torch.float64)
            ref[key + ".sigmas"] = s.sigmas.to(torch.float64)
    g = torch.Generator().manual_seed(3)
    ref["dpm_sample"] = torch.randn((1, 4, 8, 6), generator=g)
    ref["dpm_outputs"] = torch.randn((16, 4, 8, 6), generator=g)
    for karras in (False, True):
        for prediction in ("epsilon", "v_prediction"):
            for solver in ("midpoint", "heun"):
                for final in ("zero", "sigma_min"):
                    for steps in (4, 16):
                        if karras and solver == "heun" and final == "sigma_min":
                            continue  # Karras sigmas end at sigma_min: a last step of h = 0, NaN in heun's formula
                        s = DPMSolverMultistepScheduler.from_config(
                            {**base, "use_karras_sigmas": karras, "prediction_type": prediction,
                             "solver_type": solver, "final_sigmas_type": final})
                        s.set_timesteps(steps)
                        x = ref["dpm_sample"].clone()
                        for k, t in enumerate(s.timesteps):
                            x = s.step(ref["dpm_outputs"][k:k + 1], t, x).prev_sample
                        name = "karras" if karras else "plain"
                        ref[f"dpm.{name}.{prediction}.{solver}.{final}.{steps}"] = x
    scheduler = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config({**base, "use_karras_sigmas": True})
    ref["pipe_dpm"] = to_u8(pipe(PROMPT, height=80, width=64, num_inference_steps=4, guidance_scale=7.5,
                                 latents=ref["pipe_noise"].clone(), output_type="np").images)
    pipe.scheduler = scheduler


def edit_inputs() -> tuple[Image.Image, Image.Image]:
    """The edits' input image (64x80, a gradient with noise) and mask (a rectangle whose edges are not
    on the 8-pixel latent grid, 255 repaints)."""
    g = torch.Generator().manual_seed(2)
    y, x = torch.meshgrid(torch.arange(80), torch.arange(64), indexing="ij")
    base = torch.stack([x * 3, y * 2, (x + y) * 2], dim=-1).float()
    pixels = (base + 40 * torch.randn((80, 64, 3), generator=g)).clamp(0, 255).to(torch.uint8)
    mask = torch.zeros((80, 64), dtype=torch.uint8)
    mask[13:50, 10:45] = 255
    return Image.fromarray(pixels.numpy()), Image.fromarray(mask.numpy())


def edit_references(pipe: StableDiffusionPipeline, ref: dict[str, torch.Tensor]) -> None:
    """Image-to-image and inpainting by blending (a 4-channel UNet), Euler (leading), guidance 7.5:
      edit_image, edit_mask            the inputs (uint8 [80, 64, 3] and [80, 64])
      i2i.image_noise, i2i.noise       the generator's draws: the input's latent sample, the initial noise
      pipe_i2i                         strength 0.6 of 4 steps (int(2.4) = 2 run)
      inpaint4.image_noise, .noise     the same for inpainting (its third draw, the masked image's sample,
                                       is not used with a 4-channel UNet)
      pipe_inpaint4                    strength 0.75 of 4 steps (3 run), diffusers' own output (no overlay)
    """
    image, mask = edit_inputs()
    ref["edit_image"] = torch.from_numpy(np.array(image))
    ref["edit_mask"] = torch.from_numpy(np.array(mask))
    latent = (1, 4, 40, 32)
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    out = i2i(PROMPT, image=image, strength=0.6, num_inference_steps=4, guidance_scale=7.5,
              generator=torch.Generator().manual_seed(11), output_type="np").images
    ref["pipe_i2i"] = to_u8(out)
    ref["i2i.image_noise"], ref["i2i.noise"] = replay(11, latent, latent)
    inpaint = StableDiffusionInpaintPipeline(**pipe.components)
    out = inpaint(PROMPT, image=image, mask_image=mask, height=80, width=64, strength=0.75, num_inference_steps=4,
                  guidance_scale=7.5, generator=torch.Generator().manual_seed(12), output_type="np").images
    ref["pipe_inpaint4"] = to_u8(out)
    ref["inpaint4.image_noise"], ref["inpaint4.noise"] = replay(12, latent, latent)


def build_inpaint9(sd15: StableDiffusionPipeline) -> None:
    """tests/parity/sd15-inpaint-tiny: a 9-channel inpainting UNet with sd15-tiny's other parts (links to
    them), and sd15-inpaint-tiny-reference.safetensors:
      unet_sample, unet_out             a batch of 2 [9-channel] inputs through the UNet at UNET_TIMESTEP
      pipe_inpaint9, inpaint9.noise, .masked_noise
                                        strength 1, 3 steps: the generator draws the initial noise, then
                                        the masked image's latent sample
      pipe_inpaint9s, inpaint9s.image_noise, .noise, .masked_noise
                                        strength 0.7 of 4 steps (2 run): the input's sample comes first
    """
    g = torch.Generator().manual_seed(4)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
    perturb(unet, g)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.half().float())
    components = {**sd15.components, "unet": unet}
    pipe = StableDiffusionInpaintPipeline(**components)
    image, mask = edit_inputs()
    latent = (1, 4, 40, 32)
    ref: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        ref["unet_sample"] = torch.randn((2, 9, 8, 6), generator=g)
        context = torch.randn((2, 77, 16), generator=g)
        ref["unet_context"] = context
        ref["unet_out"] = unet(ref["unet_sample"], UNET_TIMESTEP, encoder_hidden_states=context).sample
        out = pipe(PROMPT, image=image, mask_image=mask, height=80, width=64, strength=1.0, num_inference_steps=3,
                   guidance_scale=7.5, generator=torch.Generator().manual_seed(13), output_type="np").images
        ref["pipe_inpaint9"] = to_u8(out)
        ref["inpaint9.noise"], ref["inpaint9.masked_noise"] = replay(13, latent, latent)
        out = pipe(PROMPT, image=image, mask_image=mask, height=80, width=64, strength=0.7, num_inference_steps=4,
                   guidance_scale=7.5, generator=torch.Generator().manual_seed(14), output_type="np").images
        ref["pipe_inpaint9s"] = to_u8(out)
        ref["inpaint9s.image_noise"], ref["inpaint9s.noise"], ref["inpaint9s.masked_noise"] = \
            replay(14, latent, latent, latent)
    save_file({k: v.contiguous() for k, v in ref.items()}, HERE / "sd15-inpaint-tiny-reference.safetensors")
    out = HERE / "sd15-inpaint-tiny"
    shutil.rmtree(out, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    # The parts it shares with sd15-tiny are links to them (checked identical first).
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        for f in (out / part).iterdir():
            same = (HERE / "sd15-tiny" / part / f.name).read_bytes() == f.read_bytes()
            assert same, f"{part}/{f.name} differs from sd15-tiny's"
        shutil.rmtree(out / part)
        (out / part).symlink_to(Path("..") / "sd15-tiny" / part)
    list_files(out)


def build_sdxl(g: torch.Generator) -> None:
    """tests/parity/sdxl-tiny: SDXL-style (a CLIPTextModel with QuickGELU and a CLIPTextModelWithProjection
    with GELU and pad token `!`, both read at their penultimate layer; a UNet with attention only in the
    deeper block, 2 transformer layers there, `text_time` conditioning on the pooled projection and six size
    ids; a VAE that upcasts; Euler, leading), and sdxl-tiny-reference.safetensors:
      ids, ids_2                        token ids of PROMPT by each tokenizer
      prompt_embeds, pooled             the pipeline's conditioning of PROMPT ([1, 77, 40], [1, 12])
      unet_sample, unet_context, unet_text_embeds, unet_time_ids, unet_out
                                        a batch of 2 through the UNet with added conditioning
      pipe_noise, pipe_g0, pipe_g75     2 steps at guidance 0 and 7.5 (its empty negative prompt is zeros)
    """
    work = Path(tempfile.mkdtemp())
    tokenizer = write_tokenizer(work / "tokenizer", "<|endoftext|>")
    tokenizer_2 = write_tokenizer(work / "tokenizer_2", "!")
    common = dict(vocab_size=len(tokenizer.get_vocab()), max_position_embeddings=77,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2, hidden_act="quick_gelu",
        pad_token_id=tokenizer.pad_token_id, **common)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=24, intermediate_size=32, num_hidden_layers=3, num_attention_heads=3, hidden_act="gelu",
        projection_dim=12, pad_token_id=tokenizer_2.pad_token_id, **common)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=16 + 24, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 12, norm_num_groups=4).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16, scaling_factor=0.13025, force_upcast=True).eval()
    for m in (text_encoder, text_encoder_2, unet, vae):
        perturb(m, g)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.half().float())
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    ref: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, tok in (("ids", tokenizer), ("ids_2", tokenizer_2)):
            ids = tok(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            ref[key] = ids.to(torch.int64)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        ref["prompt_embeds"], ref["pooled"] = embeds, pooled
        ref["unet_sample"] = torch.randn((2, 4, 8, 6), generator=g)
        ref["unet_context"] = torch.randn((2, 77, 40), generator=g)
        ref["unet_text_embeds"] = torch.randn((2, 12), generator=g)
        ref["unet_time_ids"] = torch.tensor([[80.0, 64, 0, 0, 80, 64], [64, 48, 8, 0, 72, 56]])
        ref["unet_out"] = unet(ref["unet_sample"], UNET_TIMESTEP, encoder_hidden_states=ref["unet_context"],
                               added_cond_kwargs={"text_embeds": ref["unet_text_embeds"],
                                                  "time_ids": ref["unet_time_ids"]}).sample
        ref["pipe_noise"] = torch.randn((1, 4, 40, 32), generator=g)
        for key, guidance in (("pipe_g0", 0.0), ("pipe_g75", 7.5)):
            image = pipe(PROMPT, height=80, width=64, num_inference_steps=2, guidance_scale=guidance,
                         latents=ref["pipe_noise"].clone(), output_type="np").images
            ref[key] = to_u8(image)
    save_file({k: v.contiguous() for k, v in ref.items()}, HERE / "sdxl-tiny-reference.safetensors")
    out = HERE / "sdxl-tiny"
    shutil.rmtree(out, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    list_files(out)


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    sd15 = build("sd15-tiny", False, g)
    build("sd2-tiny", True, g)
    build_inpaint9(sd15)
    build_sdxl(g)


if __name__ == "__main__":
    main()

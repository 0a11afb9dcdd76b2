#!/usr/bin/env python3
"""Reference-parity fixtures for the Z-Image family: a tiny random Z-Image checkpoint saved by diffusers
and transformers themselves, and what they compute on it, for crates/engine/tests/zimage_parity.rs.
CI needs no torch: the checkpoint and the outputs live in the repository.

    bench/setup.sh && .venv-bench/bin/python tests/parity/make_zimage_fixtures.py

Writes tests/parity/zimage-tiny/ (a ZImagePipeline saved with save_pretrained: a 3-layer Qwen3 text
encoder whose head_dim * heads is not its hidden size, a 2-layer DiT with one refiner layer each, a
two-block 16-channel VAE with a shift factor, FlowMatch Euler with shift 3, a byte-level BPE tokenizer
with ChatML's special tokens and Qwen3's chat template) and zimage-tiny-reference.safetensors:
  ids                      the chat-templated prompt's token ids (int64 [L])
  text                     the text encoder's hidden_states[-2] at those tokens ([L, 32]), as diffusers
                           takes them; text_uncond / ids_uncond the same for the empty prompt
  tr_x, tr_t, tr_out       two non-square latents through the transformer at one timestep (0..1),
                           conditioned on `text` (360 image tokens: padded to 384; the caption padded too)
  tr_out_uncond            the same latents conditioned on `text_uncond`
  sched.<steps>.sigmas / .timesteps   the pipeline's schedule (default sigmas, shift 3) at 1, 2, 4, 8 steps
  sched_dyn.<steps>.sigmas            the same with use_dynamic_shifting (mu from the image's 360 tokens)
  vae_latents, vae_out     two latents through the VAE decoder (raw decode, before post-processing)
  pipe_noise, pipe_g0      initial latents and the whole pipeline's uint8 image [1, 80, 72, 3], 2 steps
  pipe_g3                  the same at guidance 3 (against the empty negative prompt), 2 steps
  i2i.image_noise, i2i.noise, pipe_i2i    image-to-image at strength 0.6, 4 steps: the generator's
                           draws (the input's latent sample, then the noise) and the image
  inp.image_noise, inp.noise, pipe_inp    inpainting at strength 1, 3 steps, mask as in edit_inputs()
  edit_image, edit_mask    the inputs of the edits (uint8 [80, 72, 3] and [80, 72])
Norms, biases and pad tokens are perturbed so that a swapped or missing one shows. Versions:
bench/requirements.txt.
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageImg2ImgPipeline,
                       ZImageInpaintPipeline, ZImagePipeline, ZImageTransformer2DModel)
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

HERE = Path(__file__).resolve().parent
PROMPT = "a cute baby sea otter!"
HEIGHT, WIDTH = 80, 72
WORDS = ["a", "cute", "baby", "sea", "otter", "user", "assistant"]
# Qwen3's chat template as Z-Image-Turbo's tokenizer ships it, cut to what one user message renders
# (the engine renders ChatML for one user message and checks the template is ChatML).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def byte_level_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE (as Qwen2's) over the byte alphabet and a few whole words, with ChatML tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for word in WORDS + ["Ġ" + w for w in WORDS]:
        acc = word[0]
        for c in word[1:]:
            merges.append((acc, c))
            acc += c
            vocab.setdefault(acc, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            pattern=__import__("tokenizers").Regex(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   model_max_length=131072)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def perturb(model: torch.nn.Module, g: torch.Generator) -> None:
    """Norm weights away from 1, biases and pad tokens away from 0; then rounded to f16's values (the
    weights are saved in f16, the reference computes in f32 on the same values)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "pad_token" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())


def to_u8(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((image * 255).round().astype(np.uint8))


def edit_inputs() -> tuple[Image.Image, Image.Image]:
    g = torch.Generator().manual_seed(21)
    base = torch.linspace(0, 255, WIDTH).repeat(HEIGHT, 1).unsqueeze(-1).repeat(1, 1, 3)
    pixels = (base + 40 * torch.randn((HEIGHT, WIDTH, 3), generator=g)).clamp(0, 255).to(torch.uint8)
    mask = torch.zeros((HEIGHT, WIDTH), dtype=torch.uint8)
    mask[16:52, 12:40] = 255
    return Image.fromarray(pixels.numpy()), Image.fromarray(mask.numpy())


def replay(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """The first draws of a generator seeded `seed`, as a pipeline given it draws them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in shapes]


def main() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp())
    tokenizer = byte_level_tokenizer(work / "tokenizer")
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[4, 6, 6], axes_lens=[128, 64, 64]).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=16, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        sample_size=32).eval()
    for m in (text_encoder, transformer, vae):
        perturb(m, g)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)

    ref: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, text in (("", PROMPT), ("_uncond", "")):
            chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
            inputs = tokenizer([chat], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
            mask = inputs.attention_mask.bool()
            ref["ids" + key] = inputs.input_ids[mask].to(torch.int64)
            embeds = pipe._encode_prompt(text, device="cpu", max_sequence_length=64)
            ref["text" + key] = embeds[0]
        lh, lw = HEIGHT // 2, WIDTH // 2
        ref["tr_x"] = torch.randn((2, 16, lh, lw), generator=g)
        ref["tr_t"] = torch.tensor([0.37])
        t = ref["tr_t"].repeat(2)
        xs = list(ref["tr_x"].unsqueeze(2).unbind(0))
        ref["tr_out"] = torch.stack(transformer(xs, t, [ref["text"]] * 2, return_dict=False)[0]).squeeze(2)
        xs = list(ref["tr_x"].unsqueeze(2).unbind(0))
        ref["tr_out_uncond"] = torch.stack(
            transformer(xs, t, [ref["text_uncond"]] * 2, return_dict=False)[0]).squeeze(2)

        seq_len = (lh // 2) * (lw // 2)
        dynamic = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
        mu = calculate_shift(seq_len)
        for steps in (1, 2, 4, 8):
            scheduler.set_timesteps(steps, sigmas=get_default_z_image_sigmas(steps), mu=mu)
            ref[f"sched.{steps}.sigmas"] = scheduler.sigmas.clone()
            ref[f"sched.{steps}.timesteps"] = scheduler.timesteps.clone()
            dynamic.set_timesteps(steps, sigmas=get_default_z_image_sigmas(steps), mu=mu)
            ref[f"sched_dyn.{steps}.sigmas"] = dynamic.sigmas.clone()

        ref["vae_latents"] = torch.randn((2, 16, lh, lw), generator=g)
        ref["vae_out"] = vae.decode(ref["vae_latents"]).sample

        ref["pipe_noise"] = torch.randn((1, 16, lh, lw), generator=g)
        for key, guidance in (("pipe_g0", 0.0), ("pipe_g3", 3.0)):
            image = pipe(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=2, guidance_scale=guidance,
                         latents=ref["pipe_noise"].clone(), max_sequence_length=64, output_type="np").images
            ref[key] = to_u8(image[0])

        image, mask = edit_inputs()
        ref["edit_image"] = torch.from_numpy(np.array(image))
        ref["edit_mask"] = torch.from_numpy(np.array(mask))
        components = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
        shape = (1, 16, lh, lw)
        i2i = ZImageImg2ImgPipeline(**components)
        out = i2i(PROMPT, image=image, strength=0.6, height=HEIGHT, width=WIDTH, num_inference_steps=4,
                  guidance_scale=0.0, generator=torch.Generator().manual_seed(11), max_sequence_length=64,
                  output_type="np").images
        ref["pipe_i2i"] = to_u8(out[0])
        ref["i2i.image_noise"], ref["i2i.noise"] = replay(11, shape, shape)
        inp = ZImageInpaintPipeline(**components)
        out = inp(PROMPT, image=image, mask_image=mask, strength=1.0, height=HEIGHT, width=WIDTH,
                  num_inference_steps=3, guidance_scale=0.0, generator=torch.Generator().manual_seed(12),
                  max_sequence_length=64, output_type="np").images
        ref["pipe_inp"] = to_u8(out[0])
        ref["inp.image_noise"], ref["inp.noise"] = replay(12, shape, shape)

    out = HERE / "zimage-tiny"
    shutil.rmtree(out, ignore_errors=True)
    for m in (text_encoder, transformer, vae):
        m.half()
    pipe.save_pretrained(out, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in ref.items()}, HERE / "zimage-tiny-reference.safetensors")
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(HERE)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()

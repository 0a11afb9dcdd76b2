#!/usr/bin/env python3
"""Write a random-weight checkpoint with the layout and architecture of Tongyi-MAI/Z-Image-Turbo.

    .venv-bench/bin/python bench/make_zimage_checkpoint.py OUT_DIR [--seed 0]

The hub is not reachable from the benchmark machines; for a speed and memory comparison the weights'
values do not matter, only that both engines load the same files and run the same architecture. The
configs are the published ones (transformer: dim 3840, 30 layers, 2 refiner layers each, 30 heads;
text encoder: Qwen3-4B, 36 layers, hidden 2560, 32 heads / 8 KV heads of 128; VAE: FLUX's, 16
latent channels; FlowMatch Euler, shift 3), read from the hub repository's files through the
project's search tool (see BENCHMARKS.md). The tokenizer is a byte-level BPE with Qwen's chat
tokens but no learned merges (the real vocabulary cannot be downloaded here): a prompt is a few
more tokens than with Qwen's, which changes nothing that matters at 512x512.

Weights are created by the libraries' own initialization in float16 (torch's default dtype set to
float16 while the models are built, so the 6B transformer never exists in float32: 12 GB instead of
24) and written with save_pretrained in shards, as the hub repository is (whose transformer is
float32 and text encoder bfloat16; imagegate keeps both in f16 on the CPU either way).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "parity"))
from make_zimage_fixtures import byte_level_tokenizer  # noqa: E402

TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                   n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                   rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
TEXT = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
            max_position_embeddings=40960, tie_word_embeddings=True)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
           norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
           use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.float16)
    with torch.no_grad():
        model = ZImageTransformer2DModel(**TRANSFORMER).eval()
        model.save_pretrained(out / "transformer", max_shard_size="5GB")
        del model
        tokenizer = byte_level_tokenizer(out / "tokenizer")
        text = Qwen3Model(Qwen3Config(**TEXT, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)).eval()
        text.save_pretrained(out / "text_encoder", max_shard_size="5GB")
        del text
        torch.set_default_dtype(torch.float32)
        AutoencoderKL(**VAE).eval().save_pretrained(out / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False).save_pretrained(
        out / "scheduler")
    index = {"_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(out)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()

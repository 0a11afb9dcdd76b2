//! Tiny checkpoints with random weights in the real diffusers layout, for tests and benchmarks.
//!
//! The weights are created by building the very modules the loader builds, over a variable map, so every
//! tensor has the name and shape a real checkpoint has; they are then refilled from a seeded generator
//! (candle's CPU RNG cannot be seeded) and written as safetensors next to configs in diffusers' format.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::json;

use crate::EngineError;
use crate::layers::Kernels;
use crate::sd::candle_unet::Unet;
use crate::sd::checkpoint::Checkpoint;
use crate::sd::taesd::{TinyConfig, TinyDecoder};
use crate::text::clip::TextEncoder;
use crate::text::clip_tokenizer::byte_alphabet;
use crate::weights::Weights;

/// What varies between the tiny test checkpoints.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// 4 for an ordinary UNet, 9 for an inpainting one.
    pub in_channels: usize,
    pub scheduler: String,
    pub prediction_type: String,
    pub timestep_spacing: String,
    pub hidden_act: String,
    /// Context length of the text encoder (77 in real models).
    pub max_tokens: usize,
    pub seed: u64,
    /// An SDXL-shaped checkpoint: a second text encoder with a projection, `text_time` conditioning,
    /// several transformer layers per block, and SDXL's VAE scale.
    pub sdxl: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            in_channels: 4,
            scheduler: "EulerDiscreteScheduler".into(),
            prediction_type: "epsilon".into(),
            timestep_spacing: "trailing".into(),
            hidden_act: "gelu".into(),
            max_tokens: 16,
            seed: 7,
            sdxl: false,
        }
    }
}

/// Words the tiny vocabulary knows whole; anything else falls back to bytes.
const WORDS: [&str; 8] = ["a", "cute", "baby", "sea", "otter", "red", "cat", "photo"];

/// Writes a tiny CLIP tokenizer (`vocab.json`, `merges.txt`, `tokenizer_config.json`) to `dir`, and
/// returns its vocabulary size.
pub fn write_tokenizer(dir: &Path, pad_token: Option<&str>) -> Result<usize, EngineError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let alphabet = byte_alphabet();
    let mut vocab: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    vocab.extend(alphabet.iter().map(|c| format!("{c}</w>")));
    let mut merges = vec!["#version: 0.2".to_owned()];
    for word in WORDS {
        // Merge left to right: c u -> cu, cu t -> cut, cut e</w> -> cute</w>.
        let chars: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        let mut acc = chars[0].clone();
        for (i, c) in chars.iter().enumerate().skip(1) {
            let right = if i + 1 == chars.len() { format!("{c}</w>") } else { c.clone() };
            merges.push(format!("{acc} {right}"));
            acc = format!("{acc}{right}");
            if !vocab.contains(&acc) {
                vocab.push(acc.clone());
            }
        }
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let map: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    write(&dir.join("vocab.json"), &serde_json::Value::Object(map).to_string())?;
    write(&dir.join("merges.txt"), &(merges.join("\n") + "\n"))?;
    let pad = pad_token.unwrap_or("<|endoftext|>");
    let config = json!({"tokenizer_class": "CLIPTokenizer", "pad_token": pad, "model_max_length": 77});
    write(&dir.join("tokenizer_config.json"), &config.to_string())?;
    Ok(vocab.len())
}

/// Writes a complete tiny checkpoint to `dir` (UNet 32/64 channels, a 2-level VAE, a 2-layer text
/// encoder): a few megabytes, a fraction of a second per image on a CPU.
pub fn write_checkpoint(dir: &Path, spec: &TinySpec) -> Result<(), EngineError> {
    let vocab_size = write_tokenizer(&dir.join("tokenizer"), Some("!"))?;
    let inpaint = spec.in_channels == 9;
    let pipeline = match (spec.sdxl, inpaint) {
        (true, _) => "StableDiffusionXLPipeline",
        (false, true) => "StableDiffusionInpaintPipeline",
        (false, false) => "StableDiffusionPipeline",
    };
    let mut index = json!({
        "_class_name": pipeline,
        "_diffusers_version": "0.30.0",
        "scheduler": ["diffusers", spec.scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    let mut unet = json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": spec.in_channels,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 32,
        "norm_num_groups": 32,
        "use_linear_projection": true,
        "sample_size": 32,
    });
    let mut vae_scale = json!(0.18215);
    if spec.sdxl {
        // SDXL's layout: attention only in the deeper block, with two transformer layers there (and in the
        // mid block); the context is both encoders' states side by side (32 + 32); the added conditioning
        // is the second encoder's 16-wide projection plus six 8-channel size ids.
        index["text_encoder_2"] = json!(["transformers", "CLIPTextModelWithProjection"]);
        index["tokenizer_2"] = json!(["transformers", "CLIPTokenizer"]);
        index["force_zeros_for_empty_prompt"] = json!(true);
        unet["down_block_types"] = json!(["DownBlock2D", "CrossAttnDownBlock2D"]);
        unet["up_block_types"] = json!(["CrossAttnUpBlock2D", "UpBlock2D"]);
        unet["transformer_layers_per_block"] = json!([1, 2]);
        unet["cross_attention_dim"] = json!(64);
        unet["addition_embed_type"] = json!("text_time");
        unet["addition_time_embed_dim"] = json!(8);
        unet["projection_class_embeddings_input_dim"] = json!(16 + 6 * 8);
        vae_scale = json!(0.13025);
        write_tokenizer(&dir.join("tokenizer_2"), Some("!"))?;
        write_json(
            &dir.join("text_encoder_2/config.json"),
            &json!({
                "architectures": ["CLIPTextModelWithProjection"],
                "vocab_size": vocab_size,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "max_position_embeddings": spec.max_tokens,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-5,
                "projection_dim": 16,
            }),
        )?;
    }
    write_json(&dir.join("model_index.json"), &index)?;
    write_json(&dir.join("unet/config.json"), &unet)?;
    write_json(
        &dir.join("vae/config.json"),
        &json!({
            "_class_name": "AutoencoderKL",
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": [32, 32],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "scaling_factor": vae_scale,
            "force_upcast": spec.sdxl,
        }),
    )?;
    write_json(
        &dir.join("text_encoder/config.json"),
        &json!({
            "architectures": ["CLIPTextModel"],
            // SD 2.x configs name a projection their CLIPTextModel does not have.
            "projection_dim": 16,
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": spec.max_tokens,
            "hidden_act": spec.hidden_act,
            "layer_norm_eps": 1e-5,
        }),
    )?;
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &json!({
            "_class_name": spec.scheduler,
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": spec.prediction_type,
            "timestep_spacing": spec.timestep_spacing,
            "steps_offset": 1,
            "set_alpha_to_one": false,
        }),
    )?;

    let ckpt = Checkpoint::open(dir)?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let unet_cfg = ckpt.unet_config()?;
    save_random(&dir.join("unet/diffusion_pytorch_model.safetensors"), &mut rng, |vb| {
        Unet::new(vb, &unet_cfg, false).map(drop)
    })?;
    let vae_cfg = ckpt.vae_config()?;
    save_random(&dir.join("vae/diffusion_pytorch_model.safetensors"), &mut rng, |vb| {
        AutoEncoderKL::new(vb, 3, 3, vae_cfg.clone()).map(drop)
    })?;
    // The hub's layout: the encoder under `text_model.` (its projection, if any, at the root).
    save_random(&dir.join("text_encoder/model.safetensors"), &mut rng, |vb| {
        TextEncoder::new(Weights::from(vb).pp("text_model"), &ckpt.text_encoder).map(drop)
    })?;
    if let Some(config) = &ckpt.text_encoder_2 {
        save_random(&dir.join("text_encoder_2/model.safetensors"), &mut rng, |vb| {
            TextEncoder::new(Weights::from(vb).pp("text_model"), config).map(drop)
        })?;
    }
    Ok(())
}

/// What varies between tiny test decoders (diffusers' `AutoencoderTiny`, TAESD's layout).
#[derive(Debug, Clone)]
pub struct TinyDecoderSpec {
    /// Width of every stage (64 in TAESD).
    pub channels: usize,
    /// Blocks per decoder stage; one 2x upsampling between stages (TAESD: `[3, 3, 3, 1]`, 8x).
    pub num_blocks: Vec<usize>,
    pub latent_channels: usize,
    pub seed: u64,
}

impl Default for TinyDecoderSpec {
    /// 16 channels in two stages: 2 pixels per latent, like [`write_checkpoint`]'s 2-level VAE.
    fn default() -> Self {
        TinyDecoderSpec { channels: 16, num_blocks: vec![2, 1], latent_channels: 4, seed: 11 }
    }
}

impl TinyDecoderSpec {
    /// The published TAESD's shape (64 channels, `[3, 3, 3, 1]` blocks, 8 pixels per latent).
    pub fn taesd() -> TinyDecoderSpec {
        TinyDecoderSpec { channels: 64, num_blocks: vec![3, 3, 3, 1], ..TinyDecoderSpec::default() }
    }
}

/// Writes a tiny decoder with random weights to `dir` as the hub repositories hold one: `config.json`
/// with the keys `madebyollin/taesd` has, and `diffusion_pytorch_model.safetensors` with every tensor of
/// the encoder and the decoder under diffusers' names. The last convolution's bias is moved to 0.5 so
/// that random images sit mid-range (0..1 before the map to -1..1) rather than clipped to black.
pub fn write_tiny_decoder(dir: &Path, spec: &TinyDecoderSpec) -> Result<(), EngineError> {
    let stages = spec.num_blocks.len();
    let encoder_blocks: Vec<usize> = spec.num_blocks.iter().rev().copied().collect();
    write_json(
        &dir.join(crate::sd::taesd::CONFIG_FILE),
        &json!({
            "_class_name": "AutoencoderTiny",
            "_diffusers_version": "0.20.0.dev0",
            "act_fn": "relu",
            "decoder_block_out_channels": vec![spec.channels; stages],
            "encoder_block_out_channels": vec![spec.channels; stages],
            "force_upcast": false,
            "in_channels": 3,
            "latent_channels": spec.latent_channels,
            "latent_magnitude": 3,
            "latent_shift": 0.5,
            "num_decoder_blocks": spec.num_blocks,
            "num_encoder_blocks": encoder_blocks,
            "out_channels": 3,
            "scaling_factor": 1.0,
            "upsampling_scaling_factor": 2,
        }),
    )?;
    let config = TinyConfig::read(dir)?;
    let path = dir.join(crate::sd::taesd::WEIGHT_FILES[0]);
    let mut rng = StdRng::seed_from_u64(spec.seed);
    save_random(&path, &mut rng, |vb| {
        encoder_tensors(vb.pp("encoder").pp("layers"), spec.channels, spec.latent_channels, &encoder_blocks)?;
        TinyDecoder::new(vb.into(), &config, Kernels::Reference).map(drop)
    })?;
    // conv_in and its ReLU, the blocks, an upsampling between stages, a conv closing each stage.
    let last = 2 + spec.num_blocks.iter().sum::<usize>() + stages.saturating_sub(1) + stages - 1;
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    tensors.insert(format!("decoder.layers.{last}.bias"), Tensor::new(&[0.5f32; 3], &Device::Cpu)?);
    candle_core::safetensors::save(&tensors, &path)?;
    Ok(())
}

/// Declares the tensors of diffusers' `EncoderTiny` (the decoder never reads them, but real files hold
/// them): per stage a 3x3 conv (from RGB with a bias first, then stride 2 without one) and its blocks,
/// then a 3x3 conv to the latent channels.
fn encoder_tensors(vb: VarBuilder, channels: usize, latent: usize, num_blocks: &[usize]) -> candle_core::Result<()> {
    let c = channels;
    let mut index = 0;
    for (i, &blocks) in num_blocks.iter().enumerate() {
        let conv = vb.pp(index);
        if i == 0 {
            conv.get((c, 3, 3, 3), "weight")?;
            conv.get(c, "bias")?;
        } else {
            conv.get((c, c, 3, 3), "weight")?;
        }
        index += 1;
        for _ in 0..blocks {
            for j in [0, 2, 4] {
                let conv = vb.pp(index).pp("conv").pp(j);
                conv.get((c, c, 3, 3), "weight")?;
                conv.get(c, "bias")?;
            }
            index += 1;
        }
    }
    vb.pp(index).get((latent, c, 3, 3), "weight")?;
    vb.pp(index).get(latent, "bias")?;
    Ok(())
}

/// Builds a module over a fresh variable map, refills every variable from `rng` in name order, and saves
/// the map as safetensors.
fn save_random(
    path: &Path,
    rng: &mut StdRng,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> Result<(), EngineError> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    {
        let data = varmap.data().lock().map_err(|_| EngineError::InvalidInput("variable map poisoned".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let shape = var.shape().clone();
            let dims = shape.dims();
            let count = shape.elem_count();
            let (mean, std) = if dims.len() >= 2 {
                // Weights: variance 1/fan_in keeps activations in range through the layers.
                let fan_in: usize = dims[1..].iter().product();
                (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
            } else if name.ends_with("weight") {
                // Norm scales near one.
                (1.0, 0.1)
            } else {
                (0.0, 0.02)
            };
            let values: Vec<f32> = (0..count)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(rng);
                    mean + std * z
                })
                .collect();
            var.set(&Tensor::from_vec(values, shape, &Device::Cpu)?)?;
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    varmap.save(path)?;
    Ok(())
}

/// Writes the `.fp16.safetensors` variant next to every component's weight file of the checkpoint at
/// `dir` (each tensor rounded to f16), as the hub repositories ship them; with `drop_full`, removes the
/// full-precision files (what `imagegate models pull` installs).
pub fn write_fp16_variants(dir: &Path, drop_full: bool) -> Result<(), EngineError> {
    for component in ["text_encoder", "text_encoder_2", "unet", "vae"] {
        for stem in ["model", "diffusion_pytorch_model"] {
            let full = dir.join(component).join(format!("{stem}.safetensors"));
            if !full.is_file() {
                continue;
            }
            let tensors = candle_core::safetensors::load(&full, &Device::Cpu)?;
            let half = tensors
                .into_iter()
                .map(|(name, t)| Ok((name, t.to_dtype(DType::F16)?)))
                .collect::<candle_core::Result<HashMap<_, _>>>()?;
            candle_core::safetensors::save(&half, full.with_file_name(format!("{stem}.fp16.safetensors")))?;
            if drop_full {
                std::fs::remove_file(&full).map_err(|e| io(&full, e))?;
            }
        }
    }
    Ok(())
}

/// Removes one tensor from a safetensors file (a checkpoint that lacks it).
pub fn remove_tensor(path: &Path, name: &str) -> Result<(), EngineError> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    tensors.remove(name);
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

/// Replaces one tensor of a safetensors file with a 2x2 one (a checkpoint whose shapes do not match its
/// config).
pub fn replace_tensor(path: &Path, name: &str) -> Result<(), EngineError> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    tensors.insert(name.to_owned(), Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?);
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), EngineError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
    write(path, &text)
}

fn write(path: &Path, text: &str) -> Result<(), EngineError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    std::fs::write(path, text).map_err(|e| io(path, e))
}

fn io(path: &Path, e: std::io::Error) -> EngineError {
    EngineError::InvalidFile { path: path.to_path_buf(), why: e.to_string() }
}

//! The tiny decoder: the decoder half of diffusers' `AutoencoderTiny` (TAESD by Ollin Boer Bohan:
//! `madebyollin/taesd` for SD 1.x/2.x latents, `madebyollin/taesdxl` for SDXL's), on the engine's
//! layers so its convolutions run on imagegate's kernels.
//!
//! About 1.2M parameters of plain 3x3 convolutions and ReLUs, against the KL decoder's 50M with group
//! norms and attention: about 1/18 of its arithmetic (0.14 against 2.5 TFLOP at 512x512), at visibly
//! lower quality (softer detail, slight colour shifts). The pipeline uses it for partial images when one is loaded, and for
//! the final images when a request asks for [`Decoder::Tiny`].
//!
//! A tiny decoder is a directory with `config.json` and `diffusion_pytorch_model.safetensors` (the
//! layout of the hub repositories). The architecture, as diffusers builds `DecoderTiny`:
//!
//! ```text
//! decoder.layers.0                 3x3 conv, latent_channels -> C (bias), then ReLU (layers.1)
//! per stage i (num_decoder_blocks[i] blocks of C channels):
//!   decoder.layers.K.conv.{0,2,4}  AutoencoderTinyBlock: conv-ReLU-conv-ReLU-conv, plus the input,
//!                                  then ReLU (a 1x1 `skip` conv only when channels change: never here)
//!   (not the last stage)           nearest upsampling by upsampling_scaling_factor (no weights)
//!   decoder.layers.K               3x3 conv C -> C without bias; the last stage's is C -> 3 with bias
//! ```
//!
//! where `K` counts every module of the sequence, weightless ones included. Before the layers the
//! input is soft-clamped, `tanh(x / 3) * 3`; the layers produce 0..1 and diffusers maps that to -1..1
//! (`x * 2 - 1`), the range the KL decoder produces too.
//!
//! Scale: the tiny autoencoder was trained on the latents the UNet works in, i.e. the KL VAE's latents
//! already multiplied by the KL VAE's `scaling_factor` (0.18215 for SD, 0.13025 for SDXL). Its own
//! `scaling_factor` is 1.0, and diffusers' pipelines decode `latents / vae.config.scaling_factor`
//! whichever VAE they hold, so the tiny decoder takes the UNet's latents divided by the tiny config's
//! `scaling_factor` (by 1.0: unchanged), where the KL decoder takes them divided by the KL's.
//! `latent_magnitude` and `latent_shift` only matter for storing encoder outputs as bytes; the decoder
//! ignores them.

use std::path::{Path, PathBuf};

use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::EngineError;
use crate::layers::{Conv, Fused, Kernels};
use crate::sd::checkpoint::Checkpoint;

/// The tiny decoder's config file inside its directory.
pub const CONFIG_FILE: &str = "config.json";
/// The weight files looked for inside the directory, in order.
pub const WEIGHT_FILES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"];

/// Which decoder turns a request's final latents into pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Decoder {
    /// The checkpoint's own KL VAE decoder: the best images.
    #[default]
    Full,
    /// The tiny decoder (TAESD) loaded with [`crate::LoadOptions::tiny_decoder`]: far cheaper, softer.
    Tiny,
}

/// `config.json` of an `AutoencoderTiny`, the keys the decoder reads (defaults as diffusers has them).
#[derive(Debug, Clone, Deserialize)]
pub struct TinyConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_out_channels")]
    pub out_channels: usize,
    #[serde(default = "default_block_out_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_num_decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "default_upsampling")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_upsample_fn")]
    pub upsample_fn: String,
    /// 1.0 for every published TAESD: it decodes the UNet's latents as they are.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
}

fn default_latent_channels() -> usize {
    4
}
fn default_out_channels() -> usize {
    3
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64; 4]
}
fn default_num_decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn default_upsampling() -> usize {
    2
}
fn default_act_fn() -> String {
    "relu".into()
}
fn default_upsample_fn() -> String {
    "nearest".into()
}
fn default_scaling_factor() -> f64 {
    1.0
}

impl TinyConfig {
    /// Reads and checks `dir/config.json`, refusing (with the file and key) what the decoder cannot run.
    pub fn read(dir: &Path) -> Result<TinyConfig, EngineError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|_| EngineError::MissingFile(path.clone()))?;
        let config: TinyConfig = serde_json::from_str(&text)
            .map_err(|e| EngineError::InvalidFile { path: path.clone(), why: e.to_string() })?;
        config.check(&path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), EngineError> {
        let bad = |key: &str, why: String| EngineError::Unsupported {
            file: path.display().to_string(),
            key: key.into(),
            why,
        };
        if let Some(class) = self.class_name.as_deref().filter(|c| *c != "AutoencoderTiny") {
            return Err(bad("_class_name", format!("'{class}' is not a tiny decoder (AutoencoderTiny)")));
        }
        let channels = &self.decoder_block_out_channels;
        let Some(&width) = channels.first() else {
            return Err(bad("decoder_block_out_channels", "is empty".into()));
        };
        // diffusers feeds each stage the previous stage's output, built for its own width: the stages
        // only fit together when they are all equally wide (64 in every published TAESD).
        if width == 0 || channels.iter().any(|&c| c != width) {
            return Err(bad(
                "decoder_block_out_channels",
                format!("{channels:?}: every stage must have the same non-zero width"),
            ));
        }
        if self.num_decoder_blocks.len() != channels.len() {
            return Err(bad(
                "num_decoder_blocks",
                format!(
                    "{} entries for {} stages in decoder_block_out_channels",
                    self.num_decoder_blocks.len(),
                    channels.len()
                ),
            ));
        }
        if !(1..=8).contains(&self.upsampling_scaling_factor) {
            return Err(bad(
                "upsampling_scaling_factor",
                format!("{} is not within 1..=8", self.upsampling_scaling_factor),
            ));
        }
        if self.act_fn != "relu" {
            return Err(bad("act_fn", format!("'{}' is not supported (only 'relu', TAESD's)", self.act_fn)));
        }
        if self.upsample_fn != "nearest" {
            return Err(bad("upsample_fn", format!("'{}' is not supported (only 'nearest')", self.upsample_fn)));
        }
        if self.latent_channels == 0 {
            return Err(bad("latent_channels", "must be at least 1".into()));
        }
        if self.out_channels != 3 {
            return Err(bad("out_channels", format!("{}: only RGB (3) images are supported", self.out_channels)));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(bad("scaling_factor", format!("{} is not a positive number", self.scaling_factor)));
        }
        Ok(())
    }

    /// Pixels per latent: the upsampling factor to the number of stages minus one (8 for TAESD).
    pub fn factor(&self) -> usize {
        let ups = self.decoder_block_out_channels.len().saturating_sub(1) as u32;
        self.upsampling_scaling_factor.saturating_pow(ups)
    }

    /// Checks that this decoder reads `checkpoint`'s latents: the same latent channels and the same
    /// pixels per latent as its VAE. (Which latent space it was trained on, SD's or SDXL's, the config
    /// does not say: `registry::tiny_decoder_for` picks the right repository.)
    pub fn check_matches(&self, checkpoint: &Checkpoint, dir: &Path) -> Result<(), EngineError> {
        let file = dir.join(CONFIG_FILE).display().to_string();
        if self.latent_channels != checkpoint.vae.latent_channels {
            return Err(EngineError::Unsupported {
                file,
                key: "latent_channels".into(),
                why: format!(
                    "{} latent channels, but the model's VAE has {}: this tiny decoder is for another model family",
                    self.latent_channels, checkpoint.vae.latent_channels
                ),
            });
        }
        if self.factor() != checkpoint.vae_factor() {
            return Err(EngineError::Unsupported {
                file,
                key: "upsampling_scaling_factor".into(),
                why: format!(
                    "it decodes {} pixels per latent, the model's VAE {}",
                    self.factor(),
                    checkpoint.vae_factor()
                ),
            });
        }
        Ok(())
    }
}

/// `AutoencoderTinyBlock`: conv-ReLU-conv-ReLU-conv, plus the input (its channel count never changes
/// in the decoder, so the `skip` is the identity), then ReLU.
struct Block {
    convs: [Conv; 3],
}

impl Block {
    fn load(vb: Weights, channels: usize, kernels: Kernels) -> candle_core::Result<Block> {
        let conv = |i: usize| Conv::same3(vb.pp("conv").pp(i), (channels, channels), kernels);
        Ok(Block { convs: [conv(0)?, conv(2)?, conv(4)?] })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let relu = Fused { residual: None, relu: true };
        // One binding, reassigned: each intermediate is freed as soon as the next exists.
        let mut h = self.convs[0].forward_fused(xs, relu)?;
        h = self.convs[1].forward_fused(&h, relu)?;
        self.convs[2].forward_fused(&h, Fused { residual: Some(xs), relu: true })
    }

    /// 3x3 convolutions in the block.
    const CONVS: usize = 3;
}

struct Stage {
    blocks: Vec<Block>,
    /// Nearest upsampling by this factor before the conv (every stage but the last).
    upsample: Option<usize>,
    conv: Conv,
}

/// The decoder of an `AutoencoderTiny`.
pub struct TinyDecoder {
    conv_in: Conv,
    stages: Vec<Stage>,
    scaling_factor: f64,
}

impl TinyDecoder {
    /// Reads the tiny decoder in `dir` (`config.json` and the weights), in `dtype` on `device`. Errors
    /// name the file, and a missing or misshapen tensor by its name.
    pub fn load(dir: &Path, dtype: DType, device: &Device, kernels: Kernels) -> Result<TinyDecoder, EngineError> {
        let config = TinyConfig::read(dir)?;
        let path = weights_file(dir)?;
        let invalid = |why: String| EngineError::InvalidFile { path: path.clone(), why };
        let tensors = crate::weights::load(&path, device)?;
        let vb = Weights::from(candle_nn::VarBuilder::from_tensors(tensors, dtype, device));
        TinyDecoder::new(vb, &config, kernels).map_err(|e| invalid(e.to_string()))
    }

    /// [`TinyDecoder::load`], after checking that the decoder reads `checkpoint`'s latents
    /// ([`TinyConfig::check_matches`]).
    pub fn load_for(
        dir: &Path,
        checkpoint: &Checkpoint,
        dtype: DType,
        device: &Device,
        kernels: Kernels,
    ) -> Result<TinyDecoder, EngineError> {
        TinyConfig::read(dir)?.check_matches(checkpoint, dir)?;
        TinyDecoder::load(dir, dtype, device, kernels)
    }

    /// Builds the decoder from `vb` at the weight file's root (its tensors are under `decoder.`; the
    /// encoder's `encoder.` tensors are not read). `config` must have passed [`TinyConfig::read`]'s
    /// checks.
    pub fn new(vb: Weights, config: &TinyConfig, kernels: Kernels) -> candle_core::Result<TinyDecoder> {
        let vb = vb.pp("decoder").pp("layers");
        let channels = &config.decoder_block_out_channels;
        let (Some(&width), true) = (channels.first(), config.num_decoder_blocks.len() == channels.len()) else {
            candle_core::bail!("tiny decoder config: decoder_block_out_channels and num_decoder_blocks do not match")
        };
        let conv_in = Conv::same3(vb.pp(0), (config.latent_channels, width), kernels)?;
        // Index 1 is the ReLU after conv_in; every module of the sequence counts, weightless or not.
        let mut index = 2;
        let mut stages = Vec::with_capacity(channels.len());
        for (i, &blocks) in config.num_decoder_blocks.iter().enumerate() {
            let last = i + 1 == channels.len();
            let mut stage = Vec::with_capacity(blocks);
            for _ in 0..blocks {
                stage.push(Block::load(vb.pp(index), width, kernels)?);
                index += 1;
            }
            let upsample = if last {
                None
            } else {
                index += 1;
                Some(config.upsampling_scaling_factor)
            };
            let conv = if last {
                Conv::same3(vb.pp(index), (width, config.out_channels), kernels)?
            } else {
                Conv::same3_unbiased(vb.pp(index), (width, width), kernels)?
            };
            index += 1;
            stages.push(Stage { blocks: stage, upsample, conv });
        }
        Ok(TinyDecoder { conv_in, stages, scaling_factor: config.scaling_factor })
    }

    /// Latents as the UNet produces them, `[n, latent, h, w]`, to pixels `[n, 3, f*h, f*w]` in -1..1
    /// (f = [`TinyConfig::factor`]), like [`crate::vae::decoder::VaeDecoder::decode`]'s. See the module
    /// documentation for why the UNet's latents go in unscaled.
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        self.decode_in_strips(latents, STRIP_ROWS)
    }

    /// [`TinyDecoder::decode`], with everything after the last upsampling (at the output's full
    /// resolution: at 512x512, five convolutions over 64 MiB tensors) run on horizontal strips of
    /// `strip_rows` output rows (rounded up to a multiple of the upsampling factor), each computed with
    /// enough rows of margin that its own rows come out as the whole image's would. That keeps the
    /// working memory of this part to a few strip-sized buffers, which reuse what the UNet freed,
    /// instead of a dozen fresh 64 MiB ones (on the development VM fresh pages cost about as much as
    /// the arithmetic). Images no taller than 1.5 strips are decoded whole.
    pub fn decode_in_strips(&self, latents: &Tensor, strip_rows: usize) -> candle_core::Result<Tensor> {
        let xs = if self.scaling_factor == 1.0 { latents.clone() } else { (latents / self.scaling_factor)? };
        // The soft clamp of DecoderTiny: tanh(x / 3) * 3.
        let xs = ((xs / 3.0)?.tanh()? * 3.0)?;
        let mut xs = self.conv_in.forward_fused(&xs, Fused { residual: None, relu: true })?;
        // The stages up to the last one that upsamples run whole; from its upsampling on, by strips.
        let split = self.stages.iter().rposition(|s| s.upsample.is_some()).unwrap_or(self.stages.len());
        for stage in &self.stages[..split] {
            xs = stage.forward(&xs)?;
        }
        if let Some(last) = self.stages.get(split) {
            for block in &last.blocks {
                xs = block.forward(&xs)?;
            }
            let factor = last.upsample.unwrap_or(1);
            let rest = &self.stages[split + 1..];
            // Each 3x3 convolution at padding 1 spoils one more row at a strip's cut edges.
            let convs = 1 + rest.iter().map(|s| s.blocks.len() * Block::CONVS + 1).sum::<usize>();
            let tail = |strip: &Tensor| -> candle_core::Result<Tensor> {
                let (_, _, h, w) = strip.dims4()?;
                let mut ys = last.conv.forward(&kernels::upsample_nearest2d(strip, h * factor, w * factor)?)?;
                for stage in rest {
                    ys = stage.forward(&ys)?;
                }
                Ok(ys)
            };
            xs = by_strips(&xs, factor, convs, strip_rows, tail)?;
        }
        // 0..1 to diffusers' -1..1.
        (xs * 2.0)? - 1.0
    }
}

/// Output rows per strip of [`TinyDecoder::decode`]: four strips at 512x512 (about 10% of the last
/// level's arithmetic again, for the margins).
pub const STRIP_ROWS: usize = 128;

impl Stage {
    /// The blocks, the upsampling if any, then the convolution.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for block in &self.blocks {
            xs = block.forward(&xs)?;
        }
        if let Some(f) = self.upsample {
            let (_, _, h, w) = xs.dims4()?;
            xs = kernels::upsample_nearest2d(&xs, h * f, w * f)?;
        }
        self.conv.forward(&xs)
    }
}

/// `tail(xs)` for a `tail` that upsamples rows by `factor` and then applies `convs` 3x3 convolutions
/// at padding 1, computed strip by strip: output rows `o0..o1` come from input rows widened by enough
/// margin (`convs` output rows, in input rows rounded up) that the zero padding at a strip's cut edges
/// reaches none of them; the strips' own rows are then joined.
fn by_strips(
    xs: &Tensor,
    factor: usize,
    convs: usize,
    strip_rows: usize,
    tail: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (_, _, h, _) = xs.dims4()?;
    let (factor, out_h) = (factor.max(1), h * factor.max(1));
    let strip = strip_rows.max(1).checked_next_multiple_of(factor).unwrap_or(usize::MAX);
    if out_h <= strip.saturating_add(strip / 2) {
        return tail(xs);
    }
    let margin = convs.div_ceil(factor);
    let mut parts = Vec::with_capacity(out_h.div_ceil(strip));
    for o0 in (0..out_h).step_by(strip) {
        let o1 = (o0 + strip).min(out_h);
        let i0 = (o0 / factor).saturating_sub(margin);
        let i1 = (o1.div_ceil(factor) + margin).min(h);
        let ys = tail(&xs.narrow(2, i0, i1 - i0)?)?;
        parts.push(ys.narrow(2, o0 - i0 * factor, o1 - o0)?);
    }
    candle_core::Tensor::cat(&parts, 2)
}

/// The weight file of a tiny decoder directory.
fn weights_file(dir: &Path) -> Result<PathBuf, EngineError> {
    WEIGHT_FILES
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| EngineError::MissingFile(dir.join(WEIGHT_FILES[0])))
}

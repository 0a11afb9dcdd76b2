//! The Z-Image family (Tongyi-MAI's Z-Image-Turbo and its fine-tunes): diffusers' `ZImagePipeline`,
//! `ZImageImg2ImgPipeline` and `ZImageInpaintPipeline` over one checkpoint.
//!
//! A checkpoint is a diffusers-layout directory: `transformer/` (the DiT, [`transformer`]),
//! `text_encoder/` (a Qwen3 model, [`crate::text::qwen3`]) and `tokenizer/`, `vae/` (FLUX's 16-channel
//! KL autoencoder, with a `shift_factor`), `scheduler/` (FlowMatch Euler, [`crate::flow_match`]).
//!
//! The prompt is encoded once per request; each batch of images starts from its seeds' noise (or, for an
//! edit, from the inputs' latents noised to the edit's first step), and every step runs the transformer
//! on the batch, turns its output into a velocity (its negation; with guidance
//! `pos + g * (pos - neg)` first, the negative prompt's output from a pass of its own) and takes an Euler
//! step. Inpainting blends the inputs' latents, noised to the next step's level, back in outside the
//! mask after every step, and composites the input's pixels outside the mask at the end.

pub mod transformer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::flow_match::{FlowMatch, FlowMatchFile};
use crate::layers::Kernels;
use crate::pipeline::{
    Draw, Edit, GenerateParams, Hooks, LoadOptions, MAX_SIDE, OnFirstUse, composite, latent_mask, partial_points,
    release, resize_inputs, seeded_noise, to_images, to_pixels, with_weights,
};
use crate::sd::taesd::Decoder;
use crate::text::qwen3::{ChatTokenizer, Qwen3Encoder, Qwen3File};
use crate::vae::VaeFile;
use crate::vae::decoder::VaeDecoder;
use crate::vae::encoder::{LatentDist, VaeEncoder};
use crate::weights::MappedFile;
use crate::{EngineError, config};
use transformer::{Transformer, TransformerFile};

/// The pipeline class in `model_index.json` that selects this family.
pub const PIPELINE_CLASS: &str = "ZImagePipeline";
/// diffusers' `max_sequence_length`: prompt tokens beyond it are dropped.
pub const MAX_PROMPT_TOKENS: usize = 512;

/// A Z-Image checkpoint's configs, read and checked.
#[derive(Debug, Clone)]
pub struct ZImageCheckpoint {
    pub dir: PathBuf,
    pub transformer: TransformerFile,
    pub text_encoder: Qwen3File,
    pub vae: VaeFile,
    pub scheduler: FlowMatchFile,
}

impl ZImageCheckpoint {
    /// Reads and checks every config of the checkpoint at `dir`.
    pub fn open(dir: &Path) -> Result<ZImageCheckpoint, EngineError> {
        let ckpt = ZImageCheckpoint {
            dir: dir.to_path_buf(),
            transformer: config::read_json(&dir.join("transformer/config.json"))?,
            text_encoder: config::read_json(&dir.join("text_encoder/config.json"))?,
            vae: config::read_json(&dir.join("vae/config.json"))?,
            scheduler: FlowMatchFile::read(&dir.join("scheduler/scheduler_config.json"))?,
        };
        ckpt.transformer.check()?;
        ckpt.text_encoder.check()?;
        ckpt.vae.kl_config()?;
        let bad =
            |file: &str, key: &str, why: String| EngineError::Unsupported { file: file.into(), key: key.into(), why };
        if ckpt.vae.latent_channels != ckpt.transformer.in_channels {
            return Err(bad(
                "transformer/config.json",
                "in_channels",
                format!(
                    "{} is not the VAE's {} latent channels",
                    ckpt.transformer.in_channels, ckpt.vae.latent_channels
                ),
            ));
        }
        if ckpt.text_encoder.hidden_size != ckpt.transformer.cap_feat_dim {
            return Err(bad(
                "transformer/config.json",
                "cap_feat_dim",
                format!(
                    "{} is not the text encoder's hidden size {}",
                    ckpt.transformer.cap_feat_dim, ckpt.text_encoder.hidden_size
                ),
            ));
        }
        if ckpt.vae.scaling_factor.is_none() {
            return Err(bad("vae/config.json", "scaling_factor", "missing: this family's latents need it".into()));
        }
        Ok(ckpt)
    }

    /// Image sides are multiples of this: two latent pixels per patch, `vae factor` pixels per latent.
    pub fn size_multiple(&self) -> usize {
        self.vae.factor() * 2
    }

    /// The size the model was trained at: 1024x1024.
    pub fn native_size(&self) -> usize {
        1024
    }

    /// The longest image side the transformer's position table reaches (two latent pixels per patch
    /// row or column), at most [`MAX_SIDE`], in whole multiples of [`ZImageCheckpoint::size_multiple`].
    pub fn max_side(&self) -> u32 {
        let m = self.size_multiple() as u32;
        let patches = self.transformer.axes_lens[1].min(self.transformer.axes_lens[2]) as u32;
        (patches * m).min(MAX_SIDE) / m * m
    }

    /// The weight files of a component: one file, or the shards an `*.safetensors.index.json` lists.
    pub fn weight_files(&self, component: &str) -> Result<Vec<PathBuf>, EngineError> {
        crate::weights::component_files(&self.dir.join(component))
    }

    fn vae_scale(&self) -> f64 {
        self.vae.scaling_factor.unwrap_or(1.0)
    }

    fn vae_shift(&self) -> f64 {
        self.vae.shift_factor.unwrap_or(0.0)
    }
}

pub struct ZImagePipeline {
    pub checkpoint: ZImageCheckpoint,
    device: Device,
    /// The transformer's and the text encoder's compute dtype: f32 on the CPU, bf16 on GPUs.
    dtype: DType,
    tokenizer: ChatTokenizer,
    text_encoder: Qwen3Encoder,
    transformer: Transformer,
    /// Mapped weight files (CPU, f16), released once their model has run in a generation.
    text_files: Vec<Arc<MappedFile>>,
    transformer_files: Vec<Arc<MappedFile>>,
    vae: OnFirstUse<VaeDecoder>,
    vae_encoder: OnFirstUse<VaeEncoder>,
    /// f32 when the VAE says `force_upcast` (FLUX's does) or on the CPU, else the model dtype.
    vae_dtype: DType,
    kernels: Kernels,
    /// Images per forward pass.
    pub max_batch: usize,
}

impl ZImagePipeline {
    pub fn load(dir: &Path, device: &Device, options: LoadOptions) -> Result<ZImagePipeline, EngineError> {
        let checkpoint = ZImageCheckpoint::open(dir)?;
        if options.tiny_decoder.is_some() {
            return Err(EngineError::InvalidInput(
                "no tiny decoder exists for Z-Image's 16-channel latents yet; leave tiny_decoder unset".into(),
            ));
        }
        let started = std::time::Instant::now();
        let dtype = if device.is_cpu() { DType::F32 } else { DType::BF16 };
        // Weights are kept in f16 on the CPU (unless asked otherwise) and widened one layer at a time.
        let store = if device.is_cpu() && !options.f32_weights { DType::F16 } else { dtype };
        let tokenizer = ChatTokenizer::load(&dir.join("tokenizer"))?;
        let text_paths = checkpoint.weight_files("text_encoder")?;
        let (text_encoder, text_files) =
            with_weights(&text_paths, store, device, |vb| Qwen3Encoder::new(vb, &checkpoint.text_encoder, dtype))?;
        let transformer_paths = checkpoint.weight_files("transformer")?;
        let (transformer, transformer_files) = with_weights(&transformer_paths, store, device, |vb| {
            Transformer::new(vb, &checkpoint.transformer, options.kernels)
        })?;
        let vae_dtype = if checkpoint.vae.force_upcast || device.is_cpu() { DType::F32 } else { dtype };
        for path in checkpoint.weight_files("vae")? {
            crate::weights::check_file(&path)?;
        }
        tracing::info!(dir = %dir.display(), ?dtype, secs = started.elapsed().as_secs_f64(), "Z-Image checkpoint loaded");
        Ok(ZImagePipeline {
            checkpoint,
            device: device.clone(),
            dtype,
            tokenizer,
            text_encoder,
            transformer,
            text_files,
            transformer_files,
            vae: OnFirstUse::default(),
            vae_encoder: OnFirstUse::default(),
            vae_dtype,
            kernels: options.kernels,
            max_batch: 4,
        })
    }

    /// The prompt's caption features: the text encoder's hidden states before its last layer at the
    /// chat-templated prompt's tokens, `[tokens, hidden]`.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor, EngineError> {
        let ids = self.tokenizer.encode(prompt, MAX_PROMPT_TOKENS)?;
        Ok(self.text_encoder.forward(&ids, &self.device)?)
    }

    /// The token ids [`ZImagePipeline::encode_prompt`] encodes.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode(prompt, MAX_PROMPT_TOKENS)
    }

    pub fn transformer(&self) -> &Transformer {
        &self.transformer
    }

    /// Raw latents `[n, 16, h, w]` (as the VAE has them, before scaling) to pixels in about -1..1.
    pub fn decode_raw(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        Ok(self.vae_decoder()?.decode(&latents.to_dtype(self.vae_dtype)?)?)
    }

    /// Checks a requested size, with a message that says what is allowed.
    pub fn check_size(&self, width: u32, height: u32) -> Result<(), String> {
        crate::pipeline::check_sides(width, height, self.checkpoint.size_multiple() as u32, self.checkpoint.max_side())
    }

    /// Runs one request and returns its `n` images.
    pub fn generate(&self, p: &GenerateParams, hooks: &mut dyn Hooks) -> Result<Vec<RgbImage>, EngineError> {
        self.check_size(p.width, p.height).map_err(EngineError::InvalidInput)?;
        crate::pipeline::check_request(p)?;
        if p.decoder == Decoder::Tiny {
            return Err(EngineError::InvalidInput("this model has no tiny decoder".into()));
        }
        if p.sampler != crate::Sampler::Checkpoint {
            return Err(EngineError::InvalidInput(
                "Z-Image models run their own FlowMatch scheduler: no other sampler".into(),
            ));
        }
        let started = std::time::Instant::now();
        let cond = self.encode_prompt(&p.prompt)?;
        let uncond = if p.guidance_scale > 1.0 { Some(self.encode_prompt(&p.negative_prompt)?) } else { None };
        release(&self.text_files);
        tracing::info!(secs = started.elapsed().as_secs_f64(), tokens = cond.dim(0)?, "prompt encoded");
        let inputs = match &p.edit {
            Some(edit) => Some(self.prepare_edit(edit, p.width, p.height)?),
            None => None,
        };
        let mut images = crate::pipeline::in_batches(p, self.max_batch, |first, seeds| {
            let latents = self.denoise(p, first, seeds, &cond, uncond.as_ref(), inputs.as_ref(), hooks)?;
            release(&self.transformer_files);
            self.decode(&latents)
        })?;
        if let Some(EditInputs { mask_pixels: Some(mask), first_image, .. }) = &inputs {
            for img in &mut images {
                composite(img, first_image, mask);
            }
        }
        Ok(images)
    }

    fn latent_size(&self, width: u32, height: u32) -> (usize, usize) {
        let m = self.checkpoint.size_multiple();
        (2 * (height as usize / m), 2 * (width as usize / m))
    }

    fn prepare_edit(&self, edit: &Edit, width: u32, height: u32) -> Result<EditInputs, EngineError> {
        let (resized, mask_pixels) = resize_inputs(edit, width, height);
        let encoder = self.vae_encoder()?;
        let images = resized
            .iter()
            .map(|img| Ok(encoder.encode(&to_pixels(img, &self.device, self.vae_dtype)?)?))
            .collect::<Result<_, EngineError>>()?;
        let (lh, lw) = self.latent_size(width, height);
        let latent_mask = match &mask_pixels {
            Some(m) => Some(Tensor::from_vec(latent_mask(m, lh, lw), (1, 1, lh, lw), &self.device)?),
            None => None,
        };
        Ok(EditInputs { images, latent_mask, first_image: resized.into_iter().next().unwrap_or_default(), mask_pixels })
    }

    /// The batch's input latents: per image, each input's distribution sampled with its noise, scaled
    /// as the transformer sees them (`(z - shift) * scale`), averaged over the inputs. f32 `[n, c, h, w]`.
    fn sample_inputs(
        &self,
        edit: &EditInputs,
        rngs: &mut [StdRng],
        seeds: &[u64],
        shape: (usize, usize, usize),
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor, EngineError> {
        let mut sum: Option<Tensor> = None;
        for (j, dist) in edit.images.iter().enumerate() {
            let noise = seeded_noise(rngs, seeds, Draw::Image(j), shape, hooks, &self.device)?;
            let z = dist.sample(&noise.to_dtype(dist.mean.dtype())?)?.to_dtype(DType::F32)?;
            let lat = ((z - self.checkpoint.vae_shift())? * self.checkpoint.vae_scale())?;
            sum = Some(match sum {
                Some(s) => (s + lat)?,
                None => lat,
            });
        }
        let sum = sum.ok_or_else(|| EngineError::InvalidInput("an edit needs at least one image".into()))?;
        Ok((sum / edit.images.len() as f64)?)
    }

    /// The denoising loop for one batch (the request's images `first..first + seeds.len()`); returns
    /// the final latents (f32, as the transformer sees them).
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        p: &GenerateParams,
        first: usize,
        seeds: &[u64],
        cond: &Tensor,
        uncond: Option<&Tensor>,
        edit: Option<&EditInputs>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor, EngineError> {
        let (lh, lw) = self.latent_size(p.width, p.height);
        let channels = self.checkpoint.transformer.in_channels;
        let shape = (channels, lh, lw);
        let sched = FlowMatch::new(&self.checkpoint.scheduler, p.steps, (lh / 2) * (lw / 2))?;
        let mut rngs: Vec<StdRng> = seeds.iter().map(|s| StdRng::seed_from_u64(*s)).collect();
        let strength = p.edit.as_ref().map_or(1.0, |e| e.strength);
        let run = if edit.is_some() { crate::flow_match::steps_run(p.steps, strength) } else { p.steps };
        let start = p.steps - run;
        let init = match edit {
            Some(e) => Some(self.sample_inputs(e, &mut rngs, seeds, shape, hooks)?),
            None => None,
        };
        let noise = seeded_noise(&mut rngs, seeds, Draw::Initial, shape, hooks, &self.device)?;
        let mut latents = match &init {
            Some(init) => sched.scale_noise(init, &noise, start)?,
            None => noise.clone(),
        };
        let blend_mask = edit.and_then(|e| e.latent_mask.as_ref());
        let partial_after = partial_points(run, p.partial_images);
        let mut emitted = 0;
        for (k, i) in (start..p.steps).enumerate() {
            hooks.before_step(k);
            if hooks.cancelled() {
                return Err(EngineError::Cancelled);
            }
            let t = sched.model_time(i);
            let input = latents.to_dtype(self.dtype)?;
            let pos = self.transformer.forward(&input, t, cond)?.to_dtype(DType::F32)?;
            let pred = match uncond {
                Some(u) => {
                    let neg = self.transformer.forward(&input, t, u)?.to_dtype(DType::F32)?;
                    (&pos + ((&pos - neg)? * p.guidance_scale)?)?
                }
                None => pos,
            };
            let velocity = pred.neg()?;
            if partial_after.contains(&(k + 1)) {
                let clean = sched.predict_original(&velocity, i, &latents)?;
                for (j, img) in self.decode(&clean)?.into_iter().enumerate() {
                    hooks.partial(first + j, emitted, img);
                }
                emitted += 1;
            }
            latents = sched.step(&velocity, i, &latents)?;
            if let (Some(mask), Some(init)) = (blend_mask, &init) {
                let known = if i + 1 < p.steps { sched.scale_noise(init, &noise, i + 1)? } else { init.clone() };
                latents = (latents.broadcast_mul(mask)? + known.broadcast_mul(&(1.0 - mask)?)?)?;
            }
            hooks.after_step(k);
        }
        Ok(latents)
    }

    /// Latents as the transformer sees them to images: `z / scale + shift`, decoded by the VAE.
    fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>, EngineError> {
        let raw = ((latents.to_dtype(DType::F32)? / self.checkpoint.vae_scale())? + self.checkpoint.vae_shift())?;
        to_images(&self.decode_raw(&raw)?)
    }

    fn vae_files(&self) -> Result<PathBuf, EngineError> {
        let files = self.checkpoint.weight_files("vae")?;
        match files.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(EngineError::InvalidInput("the VAE's weights must be one file".into())),
        }
    }

    fn vae_decoder(&self) -> Result<Arc<VaeDecoder>, EngineError> {
        self.vae.get_or_load(|| {
            let path = self.vae_files()?;
            let cfg = self.checkpoint.vae.kl_config()?;
            Ok(with_weights(std::slice::from_ref(&path), self.vae_dtype, &self.device, |vb| {
                VaeDecoder::load(vb, &cfg, self.kernels)
            })?
            .0)
        })
    }

    fn vae_encoder(&self) -> Result<Arc<VaeEncoder>, EngineError> {
        self.vae_encoder.get_or_load(|| {
            let path = self.vae_files()?;
            let cfg = self.checkpoint.vae.kl_config()?;
            Ok(with_weights(std::slice::from_ref(&path), self.vae_dtype, &self.device, |vb| {
                VaeEncoder::new(vb.vb().clone(), &cfg)
            })?
            .0)
        })
    }
}

struct EditInputs {
    /// The latent distributions of the inputs (unscaled, batch 1), first the image being edited.
    images: Vec<LatentDist>,
    /// The mask at latent size (f32), 1 = repaint.
    latent_mask: Option<Tensor>,
    first_image: RgbImage,
    mask_pixels: Option<GrayImage>,
}

//! The Stable Diffusion family (SD 1.x, SD 2.x, SD-Turbo, SDXL, SDXL-Turbo, inpainting checkpoints and
//! fine-tunes): diffusers' `StableDiffusion*` and `StableDiffusionXL*` pipelines over one checkpoint.
//!
//! [`checkpoint`] reads `model_index.json`, `unet/`, `vae/`, `text_encoder/` (and SDXL's second
//! encoder), `scheduler/`; [`unet`] is the conditional UNet on the engine's layers ([`candle_unet`] the
//! same assembled from candle's blocks, which tiny test checkpoints are written from); [`taesd`] the
//! tiny decoders (TAESD, TAESDXL) for SD latents. Text-to-image, image-to-image and inpainting
//! (latent blending, or 9-channel UNets) with classifier-free guidance, on the checkpoint's scheduler
//! or a [`Sampler`] chosen per request.

pub mod candle_unet;
pub mod checkpoint;
pub mod taesd;
pub mod unet;

use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use image::{GrayImage, RgbImage};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::EngineError;
use crate::layers::Kernels;
use crate::pipeline::{
    Draw, Edit, GenerateParams, Hooks, LoadOptions, MAX_SIDE, OnFirstUse, Sampler, composite, latent_mask,
    partial_points, release, resize_inputs, seeded_noise, to_images, to_pixels, with_weights,
};
use crate::scheduler::{Kind, Scheduler};
use crate::text::clip::TextEncoder;
use crate::text::clip_tokenizer::ClipTokenizer;
use crate::vae::decoder::VaeDecoder;
use crate::vae::encoder::{LatentDist, VaeEncoder};
use crate::weights::MappedFile;
pub use checkpoint::{Checkpoint, SchedulerFile};
use taesd::{Decoder, TinyDecoder};
use unet::{AddedCond, Unet};

impl Sampler {
    /// The scheduler config this sampler runs on a checkpoint whose own config is `own`.
    pub fn config(self, own: &SchedulerFile) -> SchedulerFile {
        match self {
            Sampler::Checkpoint => own.clone(),
            Sampler::DpmSolver2mKarras => {
                let mut config = SchedulerFile { class_name: "DPMSolverMultistepScheduler".into(), ..own.clone() };
                for (key, value) in [
                    ("use_karras_sigmas", serde_json::json!(true)),
                    ("algorithm_type", serde_json::json!("dpmsolver++")),
                    ("solver_order", serde_json::json!(2)),
                    ("solver_type", serde_json::json!("midpoint")),
                    ("lower_order_final", serde_json::json!(true)),
                    ("euler_at_final", serde_json::json!(false)),
                    ("final_sigmas_type", serde_json::json!("zero")),
                ] {
                    config.other.insert(key.into(), value);
                }
                config
            }
        }
    }
}

/// A Stable Diffusion checkpoint loaded: SD 1.x, 2.x, SDXL, their turbo and inpainting variants.
pub struct SdPipeline {
    pub checkpoint: Checkpoint,
    device: Device,
    dtype: DType,
    tokenizer: ClipTokenizer,
    text_encoder: TextEncoder,
    /// SDXL's second tokenizer and encoder.
    second: Option<(ClipTokenizer, TextEncoder, Vec<Arc<MappedFile>>)>,
    unet: Unet,
    /// The mapped weight files of the text encoders and of the UNet (on the CPU), whose pages are
    /// released once the model has run in a generation.
    text_file: Vec<Arc<MappedFile>>,
    unet_file: Vec<Arc<MappedFile>>,
    /// The KL VAE decoder, read on the first full decode: a generation with the tiny decoder never
    /// needs it (its file's header is checked at load all the same).
    vae: OnFirstUse<VaeDecoder>,
    /// f32 when the VAE overflows in f16 (`force_upcast`), else the model dtype.
    vae_dtype: DType,
    /// The tiny decoder (TAESD), when loaded: partial images, and final ones on request.
    tiny: Option<TinyDecoder>,
    /// Built on the first edit (text-to-image never needs it).
    vae_encoder: OnFirstUse<VaeEncoder>,
    kernels: Kernels,
    /// Images per forward pass.
    pub max_batch: usize,
}

impl SdPipeline {
    /// Loads the checkpoint at `dir`: configs first (refusing what cannot run), then every weight file.
    pub fn load(dir: &Path, device: &Device) -> Result<SdPipeline, EngineError> {
        SdPipeline::load_with(dir, device, LoadOptions::default())
    }

    /// [`Pipeline::load`] with chosen [`LoadOptions`].
    pub fn load_with(dir: &Path, device: &Device, options: LoadOptions) -> Result<SdPipeline, EngineError> {
        let checkpoint = Checkpoint::open(dir)?;
        let u = &checkpoint.unet;
        if !matches!(u.in_channels, 4 | 9) || u.out_channels != checkpoint.vae.latent_channels {
            return Err(EngineError::Unsupported {
                file: "unet/config.json".into(),
                key: "in_channels".into(),
                why: format!(
                    "in_channels {} / out_channels {}: expected 4 (or 9 for inpainting) in and the VAE's {} latent channels out",
                    u.in_channels, u.out_channels, checkpoint.vae.latent_channels
                ),
            });
        }
        let dtype = if device.is_cpu() { DType::F32 } else { DType::F16 };
        let tokenizer = ClipTokenizer::load(&dir.join("tokenizer"), checkpoint.text_encoder.max_position_embeddings)?;

        let started = std::time::Instant::now();
        // How the text encoders' and the UNet's weights are kept: f16 on the CPU unless asked otherwise
        // (computed in f32 all the same), the model dtype elsewhere.
        let store = if device.is_cpu() && !options.f32_weights { DType::F16 } else { dtype };
        let text_path = checkpoint.weights_for("text_encoder", store)?;
        let (text_encoder, text_file) = with_weights(std::slice::from_ref(&text_path), store, device, |vb| {
            TextEncoder::new(vb, &checkpoint.text_encoder)
        })?;
        let second = match &checkpoint.text_encoder_2 {
            Some(config) => {
                let tokenizer = ClipTokenizer::load(&dir.join("tokenizer_2"), config.max_position_embeddings)?;
                let path = checkpoint.weights_for("text_encoder_2", store)?;
                let (encoder, file) =
                    with_weights(std::slice::from_ref(&path), store, device, |vb| TextEncoder::new(vb, config))?;
                Some((tokenizer, encoder, file))
            }
            None => None,
        };
        let unet_path = checkpoint.weights_for("unet", store)?;
        let unet_cfg = checkpoint.unet_config()?;
        let (unet, unet_file) = with_weights(std::slice::from_ref(&unet_path), store, device, |vb| {
            Unet::new(vb, &unet_cfg, options.kernels)
        })?;
        if unet.needs_added_cond() && second.is_none() {
            return Err(EngineError::MissingFile(dir.join("text_encoder_2/config.json")));
        }
        // The VAE is read when first needed; a missing or malformed file is refused now.
        checkpoint.vae_config()?;
        let vae_dtype = if checkpoint.vae.force_upcast { DType::F32 } else { dtype };
        crate::weights::check_file(&checkpoint.weights_for("vae", vae_dtype)?)?;
        let tiny = options.tiny_decoder.as_deref();
        let tiny = tiny.map(|d| TinyDecoder::load_for(d, &checkpoint, dtype, device, options.kernels)).transpose()?;
        tracing::info!(dir = %dir.display(), ?dtype, secs = started.elapsed().as_secs_f64(), "checkpoint loaded");
        let class = checkpoint.scheduler.class_name.as_str();
        if crate::scheduler::kind_of(class).is_some_and(|k| k == Kind::Euler) && class != "EulerDiscreteScheduler" {
            tracing::warn!(
                scheduler = class,
                "the checkpoint's scheduler runs as Euler on its noise schedule, not as diffusers' {class}"
            );
        }
        Ok(SdPipeline {
            checkpoint,
            device: device.clone(),
            dtype,
            tokenizer,
            text_encoder,
            second,
            text_file,
            unet_file,
            unet,
            vae: OnFirstUse::default(),
            vae_dtype,
            tiny,
            vae_encoder: OnFirstUse::default(),
            kernels: options.kernels,
            max_batch: 4,
        })
    }

    /// Whether a tiny decoder is loaded ([`Decoder::Tiny`] can be asked for).
    pub fn has_tiny_decoder(&self) -> bool {
        self.tiny.is_some()
    }

    /// Whether the UNet is a 9-channel inpainting model.
    pub fn is_inpainting(&self) -> bool {
        self.checkpoint.unet.in_channels == 9
    }

    /// Image sides must be multiples of this: one latent pixel per `vae_factor` pixels (8 for every SD
    /// VAE). The UNet copes with latent sides its down blocks do not halve evenly.
    pub fn size_multiple(&self) -> u32 {
        self.checkpoint.vae_factor() as u32
    }

    /// Checks a requested size, with a message that says what is allowed.
    pub fn check_size(&self, width: u32, height: u32) -> Result<(), String> {
        crate::pipeline::check_sides(width, height, self.size_multiple(), MAX_SIDE)
    }

    /// Runs one request and returns its `n` images.
    pub fn generate(&self, p: &GenerateParams, hooks: &mut dyn Hooks) -> Result<Vec<RgbImage>, EngineError> {
        self.check_size(p.width, p.height).map_err(EngineError::InvalidInput)?;
        crate::pipeline::check_request(p)?;
        if p.decoder == Decoder::Tiny && self.tiny.is_none() {
            let name = crate::registry::tiny_decoder_for(&self.checkpoint).name;
            return Err(EngineError::InvalidInput(format!(
                "the tiny decoder was asked for, but this model has none loaded: `imagegate models pull {name}` \
                 installs the one for its latents"
            )));
        }
        let guided = p.guidance_scale > 1.0;
        let started = std::time::Instant::now();
        let cond = self.embed(&p.prompt)?;
        let uncond = if !guided {
            None
        } else if p.negative_prompt.is_empty() && self.checkpoint.index.force_zeros_for_empty_prompt {
            Some(cond.zeros_like()?)
        } else {
            Some(self.embed(&p.negative_prompt)?)
        };
        release(self.text_file.iter().chain(self.second.iter().flat_map(|s| &s.2)));
        tracing::info!(secs = started.elapsed().as_secs_f64(), "prompt encoded");
        let inputs = match &p.edit {
            Some(edit) => Some(self.prepare_edit(edit, p.width, p.height)?),
            // An inpainting UNet asked for a plain image repaints a blank canvas everywhere (its masked
            // image is all zeros whatever the canvas).
            None if self.is_inpainting() => {
                let blank = RgbImage::from_pixel(p.width, p.height, image::Rgb([127, 127, 127]));
                let all = GrayImage::from_pixel(p.width, p.height, image::Luma([255]));
                let edit = Edit { images: vec![blank], mask: Some(all), strength: 1.0 };
                let mut inputs = self.prepare_edit(&edit, p.width, p.height)?;
                inputs.mask_pixels = None;
                Some(inputs)
            }
            None => None,
        };

        let mut images = crate::pipeline::in_batches(p, self.max_batch, |first, seeds| {
            let latents = self.denoise(p, first, seeds, &cond, uncond.as_ref(), inputs.as_ref(), hooks)?;
            release(&self.unet_file);
            self.decode(&latents, p.decoder)
        })?;
        if let Some(EditInputs { mask_pixels: Some(mask), first_image, .. }) = &inputs {
            // Outside the mask the result is the input, pixel for pixel.
            for img in &mut images {
                composite(img, first_image, mask);
            }
        }
        Ok(images)
    }

    /// The conditioning of one prompt: the text context, and for SDXL the pooled embedding.
    fn embed(&self, prompt: &str) -> Result<TextCond, EngineError> {
        let tokens = |tokenizer: &ClipTokenizer| -> Result<(Tensor, usize), EngineError> {
            let ids = tokenizer.encode(prompt)?;
            let eos = tokenizer.eos_position(&ids);
            Ok((Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?, eos))
        };
        let (ids, eos) = tokens(&self.tokenizer)?;
        match &self.second {
            None => Ok(TextCond { context: self.text_encoder.forward(&ids)?, pooled: None }),
            // SDXL: both encoders' penultimate states side by side, the second's pooled output.
            Some((tokenizer_2, encoder_2, _)) => {
                let first = self.text_encoder.forward_sdxl(&ids, eos)?;
                let (ids_2, eos_2) = tokens(tokenizer_2)?;
                let second = encoder_2.forward_sdxl(&ids_2, eos_2)?;
                let context = Tensor::cat(&[&first.penultimate, &second.penultimate], D::Minus1)?;
                Ok(TextCond { context, pooled: Some(second.pooled) })
            }
        }
    }

    fn prepare_edit(&self, edit: &Edit, width: u32, height: u32) -> Result<EditInputs, EngineError> {
        let (resized, mask_pixels) = resize_inputs(edit, width, height);
        let encoder = self.vae_encoder()?;
        // The latent distribution of each image; each generated image samples them with its own seed.
        let images =
            resized.iter().map(|img| Ok(encoder.encode(&self.to_pixels(img)?)?)).collect::<Result<_, EngineError>>()?;

        // diffusers' mask processor: resized like the image (Lanczos), then binarized at one half.
        let (lh, lw) = self.latent_size(width, height);
        let latent_mask = match &mask_pixels {
            Some(m) => {
                Some(Tensor::from_vec(latent_mask(m, lh, lw), (1, 1, lh, lw), &self.device)?.to_dtype(self.dtype)?)
            }
            None => None,
        };
        // Inpainting UNets also see the mask and the image with the repainted area blanked out.
        let masked = if self.is_inpainting() {
            let mask = match &latent_mask {
                Some(m) => m.clone(),
                None => Tensor::ones((1, 1, lh, lw), self.dtype, &self.device)?,
            };
            // diffusers' masked image: the image in -1..1 where the mask keeps it, exactly 0 where it
            // repaints (everywhere without a mask).
            let keep: Vec<f32> = match &mask_pixels {
                Some(m) => m.pixels().map(|p| if p.0[0] >= 128 { 0.0 } else { 1.0 }).collect(),
                None => vec![0.0; (width * height) as usize],
            };
            let keep = Tensor::from_vec(keep, (1, 1, height as usize, width as usize), &self.device)?;
            let pixels = self.to_pixels(&resized[0])?.to_dtype(DType::F32)?;
            let masked = pixels.broadcast_mul(&keep)?.to_dtype(self.vae_dtype)?;
            Some((mask, encoder.encode(&masked)?))
        } else {
            None
        };
        Ok(EditInputs {
            images,
            has_mask: edit.mask.is_some(),
            latent_mask,
            masked,
            first_image: resized.into_iter().next().unwrap_or_default(),
            mask_pixels,
        })
    }

    /// The batch's starting latents of an edit: per image, each input's latent distribution sampled with
    /// its noise, averaged over the inputs, scaled as the UNet sees them. `[n, c, h, w]`.
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
            let lat = self.sample(dist, seeded_noise(rngs, seeds, Draw::Image(j), shape, hooks, &self.device)?)?;
            sum = Some(match sum {
                Some(s) => (s + lat)?,
                None => lat,
            });
        }
        let sum = sum.ok_or_else(|| EngineError::InvalidInput("an edit needs at least one image".into()))?;
        Ok((sum / edit.images.len() as f64)?)
    }

    /// A latent distribution sampled with `noise` (`[n, c, h, w]`), scaled and in the model's dtype.
    fn sample(&self, dist: &LatentDist, noise: Tensor) -> Result<Tensor, EngineError> {
        let latents = dist.sample(&noise.to_dtype(dist.mean.dtype())?)?.to_dtype(self.dtype)?;
        Ok((latents * self.checkpoint.vae_scale())?)
    }

    fn vae_encoder(&self) -> Result<Arc<VaeEncoder>, EngineError> {
        self.vae_encoder.get_or_load(|| {
            let path = self.checkpoint.weights_for("vae", self.vae_dtype)?;
            let cfg = self.checkpoint.vae_config()?;
            Ok(with_weights(std::slice::from_ref(&path), self.vae_dtype, &self.device, |vb| {
                VaeEncoder::new(vb.vb().clone(), &cfg)
            })?
            .0)
        })
    }

    fn vae_decoder(&self) -> Result<Arc<VaeDecoder>, EngineError> {
        self.vae.get_or_load(|| {
            let path = self.checkpoint.weights_for("vae", self.vae_dtype)?;
            let cfg = self.checkpoint.vae_config()?;
            let started = std::time::Instant::now();
            let vae = with_weights(std::slice::from_ref(&path), self.vae_dtype, &self.device, |vb| {
                VaeDecoder::load(vb, &cfg, self.kernels)
            })?
            .0;
            tracing::info!(secs = started.elapsed().as_secs_f64(), "VAE decoder loaded");
            Ok(vae)
        })
    }

    fn latent_size(&self, width: u32, height: u32) -> (usize, usize) {
        let f = self.checkpoint.vae_factor();
        (height as usize / f, width as usize / f)
    }

    /// The denoising loop for one batch, whose images are the request's `first..first + seeds.len()`;
    /// returns the final latents (scaled as the UNet sees them).
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        p: &GenerateParams,
        first: usize,
        seeds: &[u64],
        cond: &TextCond,
        uncond: Option<&TextCond>,
        edit: Option<&EditInputs>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor, EngineError> {
        let mut sched = Scheduler::new(&p.sampler.config(&self.checkpoint.scheduler), p.steps)?;
        let n = seeds.len();
        let (lh, lw) = self.latent_size(p.width, p.height);
        let channels = self.checkpoint.vae.latent_channels;
        let mut rngs: Vec<StdRng> = seeds.iter().map(|s| StdRng::seed_from_u64(*s)).collect();
        let shape = (channels, lh, lw);
        let strength = p.edit.as_ref().map_or(1.0, |e| e.strength);
        // diffusers' inpainting pipelines start from pure noise at full strength (a 9-channel UNet then
        // never needs the input's latents); image-to-image noises the input even then.
        let from_noise = strength >= 1.0 && edit.is_some_and(|e| e.has_mask);
        let init = match edit {
            Some(e) if !(from_noise && self.is_inpainting()) => {
                Some(self.sample_inputs(e, &mut rngs, seeds, shape, hooks)?)
            }
            _ => None,
        };
        let noise = seeded_noise(&mut rngs, seeds, Draw::Initial, shape, hooks, &self.device)?.to_dtype(self.dtype)?;
        let extra = match edit.and_then(|e| e.masked.as_ref()) {
            Some((mask, dist)) => {
                let noise = seeded_noise(&mut rngs, seeds, Draw::MaskedImage, shape, hooks, &self.device)?;
                Some(Tensor::cat(&[&mask.repeat((n, 1, 1, 1))?, &self.sample(dist, noise)?], 1)?)
            }
            None => None,
        };

        // Where the schedule starts: the top for text-to-image, `strength` of the way down for edits.
        let run = steps_run(p.steps, strength);
        let start = p.steps - run;
        let mut latents = match &init {
            Some(init) if !from_noise => sched.add_noise(init, &noise, start)?,
            _ => (&noise * sched.init_noise_sigma())?,
        };

        let context = match uncond {
            Some(u) => Tensor::cat(&[u.context.repeat((n, 1, 1))?, cond.context.repeat((n, 1, 1))?], 0)?,
            None => cond.context.repeat((n, 1, 1))?,
        };
        let added = match &cond.pooled {
            Some(pooled) => {
                let text_embeds = match uncond.and_then(|u| u.pooled.as_ref()) {
                    Some(u) => Tensor::cat(&[u.repeat((n, 1))?, pooled.repeat((n, 1))?], 0)?,
                    None => pooled.repeat((n, 1))?,
                };
                // SDXL's size conditioning: generated at the requested size, uncropped.
                let (h, w) = (f64::from(p.height), f64::from(p.width));
                let ids = Tensor::new(&[[h, w, 0.0, 0.0, h, w]], &self.device)?.to_dtype(DType::F32)?;
                let time_ids = ids.repeat((text_embeds.dim(0)?, 1))?;
                Some(AddedCond { text_embeds, time_ids })
            }
            None => None,
        };
        let blend_mask = if self.is_inpainting() { None } else { edit.and_then(|e| e.latent_mask.as_ref()) };

        let partial_after: Vec<usize> = partial_points(run, p.partial_images);
        let mut emitted = 0;
        for (k, i) in (start..p.steps).enumerate() {
            hooks.before_step(k);
            if hooks.cancelled() {
                return Err(EngineError::Cancelled);
            }
            let t = sched.timesteps()[i];
            let scaled = sched.scale_model_input(&latents, i)?;
            let mut input = match &extra {
                Some(x) => Tensor::cat(&[&scaled, x], 1)?,
                None => scaled,
            };
            if uncond.is_some() {
                input = Tensor::cat(&[&input, &input], 0)?;
            }
            let out = self.unet.forward(&input, t, &context, added.as_ref())?;
            let out = if uncond.is_some() {
                let (u, c) = (out.i(0..n)?, out.i(n..2 * n)?);
                (&u + ((c - &u)? * p.guidance_scale)?)?
            } else {
                out
            };
            if partial_after.contains(&(k + 1)) {
                let clean = sched.predict_original(&latents, &out, i)?;
                // Previews are what the tiny decoder is for: cheap, and thrown away.
                let preview = if self.tiny.is_some() { Decoder::Tiny } else { Decoder::Full };
                for (j, img) in self.decode(&clean, preview)?.into_iter().enumerate() {
                    hooks.partial(first + j, emitted, img);
                }
                emitted += 1;
            }
            let step_noise = if sched.needs_noise() {
                Some(seeded_noise(&mut rngs, seeds, Draw::Step(k), shape, hooks, &self.device)?.to_dtype(self.dtype)?)
            } else {
                None
            };
            latents = sched.step(&out, i, &latents, step_noise.as_ref())?;
            if let (Some(mask), Some(init)) = (blend_mask, &init) {
                // Keep the original outside the mask, noised to the level the next step expects.
                let known = if i + 1 < p.steps { sched.add_noise(init, &noise, i + 1)? } else { init.clone() };
                let keep = (1.0 - mask)?;
                latents = (latents.broadcast_mul(mask)? + known.broadcast_mul(&keep)?)?;
            }
            hooks.after_step(k);
        }
        Ok(latents)
    }

    /// Latents (as the UNet has them) to images, by the chosen decoder. The KL decoder takes them
    /// divided by the VAE's `scaling_factor`; the tiny one as they are (see [`crate::sd::taesd`]).
    fn decode(&self, latents: &Tensor, decoder: Decoder) -> Result<Vec<RgbImage>, EngineError> {
        let pixels = match (decoder, &self.tiny) {
            (Decoder::Tiny, Some(tiny)) => tiny.decode(&latents.to_dtype(self.dtype)?)?,
            (Decoder::Tiny, None) => return Err(EngineError::InvalidInput("no tiny decoder is loaded".into())),
            (Decoder::Full, _) => {
                let scaled = (latents / self.checkpoint.vae_scale())?.to_dtype(self.vae_dtype)?;
                self.vae_decoder()?.decode(&scaled)?
            }
        };
        to_images(&pixels)
    }

    /// An image as `[1, 3, h, w]` in -1..1, in the VAE's dtype.
    fn to_pixels(&self, img: &RgbImage) -> Result<Tensor, EngineError> {
        to_pixels(img, &self.device, self.vae_dtype)
    }
}
/// A prompt's conditioning.
struct TextCond {
    /// `[1, tokens, context width]`.
    context: Tensor,
    /// SDXL's pooled text embedding, `[1, pooled_dim]`.
    pooled: Option<Tensor>,
}

impl TextCond {
    /// The same shapes, all zeros (SDXL's empty negative prompt).
    fn zeros_like(&self) -> Result<TextCond, EngineError> {
        Ok(TextCond {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }
}

struct EditInputs {
    /// The latent distributions of the inputs (unscaled, batch 1), first the image being edited.
    images: Vec<LatentDist>,
    /// Whether the edit has a mask (diffusers' inpainting pipelines rather than image-to-image).
    has_mask: bool,
    /// The mask at latent size, 1 = repaint.
    latent_mask: Option<Tensor>,
    /// For 9-channel UNets: the latent mask (`[1, 1, h, w]`) and the masked image's latent distribution.
    masked: Option<(Tensor, LatentDist)>,
    first_image: RgbImage,
    mask_pixels: Option<GrayImage>,
}
/// How many of `steps` an edit of `strength` runs: diffusers' `int(steps * strength)` (truncated, in
/// the same f64 arithmetic), and at least one, where diffusers refuses the request instead (a one-step
/// turbo edit at strength 0.5 is what users ask for).
fn steps_run(steps: usize, strength: f64) -> usize {
    ((steps as f64 * strength) as usize).clamp(1, steps.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_runs_diffusers_share_of_the_steps() {
        // int(steps * strength) as Python computes it: 4 * 0.65 = 2.6 runs 2 (not 3), 100 * 0.29 =
        // 28.999999999999996 runs 28; never fewer than one.
        for (steps, strength, run) in
            [(4, 0.65, 2), (4, 0.5, 2), (100, 0.29, 28), (10, 0.3, 3), (1, 0.3, 1), (25, 1.0, 25)]
        {
            assert_eq!(steps_run(steps, strength), run, "{steps} steps at strength {strength}");
        }
    }
}

//! What every model family's pipeline shares: the request ([`GenerateParams`], [`Edit`]), what the
//! caller hears while it runs ([`Hooks`], [`Draw`]), how a model is loaded ([`LoadOptions`]), the
//! loaded model of any family ([`Pipeline`], picked by the pipeline class in `model_index.json`), and
//! the pieces the families' pipelines are made of: seeded noise, weight loading and release, input
//! images and masks to tensors, decoded pixels to images.
//!
//! Every random number comes from a generator seeded by the request (`seed + image index`), so a seed
//! reproduces an image exactly, also inside a batch. Sizes and inputs are checked before candle,
//! which asserts, sees them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::EngineError;
use crate::layers::Kernels;
use crate::sd::SdPipeline;
use crate::sd::taesd::Decoder;
use crate::weights::{MappedFile, Weights};
use crate::zimage::ZImagePipeline;

/// Smallest and largest image side in pixels.
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 2048;

/// One generation request, in the engine's terms.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    /// What classifier-free guidance steers away from (empty: the unconditional embedding).
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub n: usize,
    /// Denoising steps of the full schedule (an edit runs the last `strength` share of them).
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off (turbo models).
    pub guidance_scale: f64,
    pub seed: u64,
    pub edit: Option<Edit>,
    /// How many intermediate images of each image to hand to [`Hooks::partial`] (at most one per
    /// intermediate step).
    /// They come from the tiny decoder when one is loaded, else from the full one.
    pub partial_images: usize,
    /// Which decoder makes the final images; [`Decoder::Tiny`] needs [`LoadOptions::tiny_decoder`].
    pub decoder: Decoder,
    /// Which sampler denoises.
    pub sampler: Sampler,
}

/// The sampler a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampler {
    /// The checkpoint's own scheduler config, as diffusers runs it.
    #[default]
    Checkpoint,
    /// DPM-Solver++ 2M on Karras sigmas over the checkpoint's noise schedule and prediction type:
    /// diffusers' `DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)`. Reaches
    /// in 10-15 steps what Euler reaches in 40-50 (BENCHMARKS.md); not for distilled (turbo) models,
    /// which are trained for their own schedule.
    DpmSolver2mKarras,
}

/// The inputs of an edit.
#[derive(Debug, Clone)]
pub struct Edit {
    /// The image to edit first, then reference images; all are resized to the output size.
    pub images: Vec<RgbImage>,
    /// Where to repaint: 255 repaints, 0 keeps the first image's pixel exactly, values between blend.
    pub mask: Option<GrayImage>,
    /// How far into the noise the edit starts, 0..=1 (1 ignores the input's content where repainted).
    pub strength: f64,
}

/// What a caller hears while a generation runs.
pub trait Hooks {
    /// Called before every denoising step (`step` counts the run's steps from 0), before
    /// [`Hooks::cancelled`]: the caller may do other work here (the server runs urgent jobs between
    /// the steps of a background one); the run holds only its latents meanwhile.
    fn before_step(&mut self, _step: usize) {}
    /// Called when denoising step `step` is done.
    fn after_step(&mut self, _step: usize) {}
    /// Checked before every step: `true` stops the run with [`EngineError::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
    /// Intermediate image number `index` (from 0) of the request's image `image` (from 0 to `n - 1`):
    /// every image of a request gets its partial images, each at the same steps.
    fn partial(&mut self, _image: usize, _index: usize, _partial: RgbImage) {}
    /// Noise for the image seeded `seed` (`[channels, height, width]` latents, unit gaussian) in place of
    /// the engine's own seeded draw `what`. Reference-parity tests give diffusers' noise here; `None`
    /// keeps the engine's.
    fn noise(&mut self, _seed: u64, _what: Draw, _shape: (usize, usize, usize)) -> Option<Tensor> {
        None
    }
}

/// The random draws of one image, each `[channels, height, width]` latents of unit gaussian noise from
/// the image's seeded generator, in this order (diffusers' order for one generator): the input images'
/// latent samples (when their latents are used), the initial noise, the masked image's latent sample
/// (9-channel inpainting), then the ancestral sampler's noise at each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// The VAE encoder's sample of input image `index` of an edit (0 is the image being edited).
    Image(usize),
    /// The initial noise.
    Initial,
    /// The VAE encoder's sample of the masked image a 9-channel inpainting UNet sees.
    MaskedImage,
    /// The ancestral sampler's fresh noise at step `k` of the run (counting from 0).
    Step(usize),
}

/// Hooks that do nothing.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// The device the engine runs on: the first GPU when built with `cuda` or `metal`, else the CPU.
pub fn default_device() -> Result<Device, EngineError> {
    #[cfg(feature = "cuda")]
    return Ok(Device::new_cuda(0)?);
    #[cfg(all(feature = "metal", not(feature = "cuda")))]
    return Ok(Device::new_metal(0)?);
    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    Ok(Device::Cpu)
}

/// How a [`Pipeline`] is built.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// The CPU kernels the UNet and the VAE decoders run on.
    pub kernels: Kernels,
    /// On the CPU, keep the text encoders' and the UNet's weights in f32 instead of f16. By default they
    /// are stored in f16 (half the memory: SD-Turbo fits in under 4 GB) and widened to f32 one layer at a
    /// time as they are used; every computation is in f32 either way.
    pub f32_weights: bool,
    /// A tiny decoder directory (`config.json` + `diffusion_pytorch_model.safetensors` of an
    /// `AutoencoderTiny`: TAESD for SD 1.x/2.x, TAESDXL for SDXL) to load next to the checkpoint's VAE.
    pub tiny_decoder: Option<PathBuf>,
}

/// A model family, by the pipeline class its `model_index.json` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `StableDiffusionPipeline`, `StableDiffusionXLPipeline` and their img2img/inpaint classes.
    StableDiffusion,
    /// `ZImagePipeline` (and its img2img/inpaint classes).
    ZImage,
}

impl Family {
    /// The family of the checkpoint at `dir`, from `model_index.json`'s `_class_name`; a class no
    /// family runs is refused by name.
    pub fn of(dir: &Path) -> Result<Family, EngineError> {
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(rename = "_class_name", default)]
            class_name: Option<String>,
        }
        let index: Index = crate::config::read_json(&dir.join("model_index.json"))?;
        match index.class_name.as_deref() {
            Some(c) if c.starts_with("ZImage") && !c.contains("Omni") && !c.contains("ControlNet") => {
                Ok(Family::ZImage)
            }
            // SD checkpoints, including ones whose index names no class.
            None => Ok(Family::StableDiffusion),
            Some(c) if c.starts_with("StableDiffusion") && !c.starts_with("StableDiffusion3") => {
                Ok(Family::StableDiffusion)
            }
            Some(c) => Err(EngineError::Unsupported {
                file: "model_index.json".into(),
                key: "_class_name".into(),
                why: format!(
                    "'{c}' is not a pipeline the engine runs (StableDiffusionPipeline, StableDiffusionXLPipeline, \
                     ZImagePipeline and their image-to-image and inpainting classes)"
                ),
            }),
        }
    }
}

/// What serving a checkpoint needs to know before loading it: its family and its sizes.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub family: Family,
    /// Image sides are multiples of this.
    pub size_multiple: u32,
    /// The size the model was trained at (`auto`), in pixels, within `max_side`.
    pub native_size: u32,
    /// The longest side it can generate (its position table's reach, at most [`MAX_SIDE`]).
    pub max_side: u32,
    /// The built-in tiny decoder for its latents, when its family has one (`taesd`, `taesdxl`).
    pub tiny_decoder: Option<&'static crate::registry::BuiltinModel>,
}

/// Reads and checks every config of the checkpoint at `dir` and finds its weight files (not reading
/// them): what cannot run is refused now, naming the file and the key.
pub fn inspect(dir: &Path) -> Result<ModelInfo, EngineError> {
    match Family::of(dir)? {
        Family::StableDiffusion => {
            let ckpt = crate::sd::Checkpoint::open(dir)?;
            for component in ["unet", "vae", "text_encoder"] {
                ckpt.weights(component)?;
            }
            Ok(ModelInfo {
                family: Family::StableDiffusion,
                size_multiple: ckpt.vae_factor() as u32,
                native_size: (ckpt.native_size() as u32).clamp(MIN_SIDE, MAX_SIDE),
                max_side: MAX_SIDE,
                tiny_decoder: Some(crate::registry::tiny_decoder_for(&ckpt)),
            })
        }
        Family::ZImage => {
            let ckpt = crate::zimage::ZImageCheckpoint::open(dir)?;
            for component in ["transformer", "vae", "text_encoder"] {
                ckpt.weight_files(component)?;
            }
            let max_side = ckpt.max_side();
            Ok(ModelInfo {
                family: Family::ZImage,
                size_multiple: ckpt.size_multiple() as u32,
                native_size: (ckpt.native_size() as u32).min(max_side),
                max_side,
                tiny_decoder: None,
            })
        }
    }
}

/// A loaded checkpoint of any family.
pub enum Pipeline {
    StableDiffusion(Box<SdPipeline>),
    ZImage(Box<ZImagePipeline>),
}

impl Pipeline {
    /// Loads the checkpoint at `dir`: configs first (refusing what cannot run), then every weight file.
    pub fn load(dir: &Path, device: &Device) -> Result<Pipeline, EngineError> {
        Pipeline::load_with(dir, device, LoadOptions::default())
    }

    /// [`Pipeline::load`] with chosen [`LoadOptions`].
    pub fn load_with(dir: &Path, device: &Device, options: LoadOptions) -> Result<Pipeline, EngineError> {
        Ok(match Family::of(dir)? {
            Family::StableDiffusion => {
                Pipeline::StableDiffusion(Box::new(SdPipeline::load_with(dir, device, options)?))
            }
            Family::ZImage => Pipeline::ZImage(Box::new(ZImagePipeline::load(dir, device, options)?)),
        })
    }

    pub fn family(&self) -> Family {
        match self {
            Pipeline::StableDiffusion(_) => Family::StableDiffusion,
            Pipeline::ZImage(_) => Family::ZImage,
        }
    }

    /// Runs one request and returns its `n` images.
    pub fn generate(&self, p: &GenerateParams, hooks: &mut dyn Hooks) -> Result<Vec<RgbImage>, EngineError> {
        match self {
            Pipeline::StableDiffusion(sd) => sd.generate(p, hooks),
            Pipeline::ZImage(z) => z.generate(p, hooks),
        }
    }

    /// Checks a requested size, with a message that says what is allowed.
    pub fn check_size(&self, width: u32, height: u32) -> Result<(), String> {
        match self {
            Pipeline::StableDiffusion(sd) => sd.check_size(width, height),
            Pipeline::ZImage(z) => z.check_size(width, height),
        }
    }

    /// Whether a tiny decoder is loaded ([`Decoder::Tiny`] can be asked for).
    pub fn has_tiny_decoder(&self) -> bool {
        match self {
            Pipeline::StableDiffusion(sd) => sd.has_tiny_decoder(),
            Pipeline::ZImage(_) => false,
        }
    }

    /// Images per forward pass.
    pub fn set_max_batch(&mut self, max_batch: usize) {
        match self {
            Pipeline::StableDiffusion(sd) => sd.max_batch = max_batch,
            Pipeline::ZImage(z) => z.max_batch = max_batch,
        }
    }

    /// The Stable Diffusion pipeline, when it is one.
    pub fn as_sd(&self) -> Option<&SdPipeline> {
        match self {
            Pipeline::StableDiffusion(sd) => Some(sd),
            Pipeline::ZImage(_) => None,
        }
    }
}

/// Runs a request's `n` images in batches of at most `max_batch`: `run(first, seeds)` makes the images
/// `first..first + seeds.len()`, each from its seed (`seed + index`), and its time is logged.
pub(crate) fn in_batches(
    p: &GenerateParams,
    max_batch: usize,
    mut run: impl FnMut(usize, &[u64]) -> Result<Vec<RgbImage>, EngineError>,
) -> Result<Vec<RgbImage>, EngineError> {
    let mut images = Vec::with_capacity(p.n);
    let mut first = 0;
    while first < p.n {
        let batch = (p.n - first).min(max_batch.max(1));
        let seeds: Vec<u64> = (first..first + batch).map(|i| p.seed.wrapping_add(i as u64)).collect();
        let started = std::time::Instant::now();
        images.extend(run(first, &seeds)?);
        tracing::info!(images = batch, secs = started.elapsed().as_secs_f64(), "batch generated");
        first += batch;
    }
    Ok(images)
}

/// Checks a requested size against a model's rule (sides multiples of `multiple`, from [`MIN_SIDE`] to
/// `max_side`), with a message that says what is allowed.
pub(crate) fn check_sides(width: u32, height: u32, multiple: u32, max_side: u32) -> Result<(), String> {
    let ok = |s: u32| (MIN_SIDE..=max_side).contains(&s) && s.is_multiple_of(multiple);
    if ok(width) && ok(height) {
        Ok(())
    } else {
        Err(format!(
            "{width}x{height} is not a size this model can generate: each side must be a multiple of {multiple} from {MIN_SIDE} to {max_side}"
        ))
    }
}

/// Checks what every family checks before it runs a request.
pub(crate) fn check_request(p: &GenerateParams) -> Result<(), EngineError> {
    if p.n == 0 || p.steps == 0 {
        return Err(EngineError::InvalidInput("n and steps must be at least 1".into()));
    }
    if let Some(edit) = &p.edit {
        if edit.images.is_empty() {
            return Err(EngineError::InvalidInput("an edit needs at least one image".into()));
        }
        if !(0.0..=1.0).contains(&edit.strength) {
            return Err(EngineError::InvalidInput(format!("strength {} is not within 0..=1", edit.strength)));
        }
    }
    Ok(())
}

/// An image as `[1, 3, h, w]` in -1..1, in `dtype`.
pub(crate) fn to_pixels(img: &RgbImage, device: &Device, dtype: DType) -> Result<Tensor, EngineError> {
    let (w, h) = img.dimensions();
    let t = Tensor::from_vec(img.as_raw().clone(), (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?;
    Ok(((t / 127.5)? - 1.0)?.unsqueeze(0)?.to_dtype(dtype)?)
}

/// Decoded pixels `[n, 3, h, w]` in about -1..1 to 8-bit images, as diffusers post-processes them.
pub(crate) fn to_images(pixels: &Tensor) -> Result<Vec<RgbImage>, EngineError> {
    let pixels = ((pixels.to_dtype(DType::F32)? + 1.0)? * 127.5)?.clamp(0.0, 255.0)?.round()?.to_dtype(DType::U8)?;
    let (n, _, h, w) = pixels.dims4()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let hwc = pixels.i(i)?.permute((1, 2, 0))?.flatten_all()?.to_vec1::<u8>()?;
        let img = RgbImage::from_raw(w as u32, h as u32, hwc)
            .ok_or_else(|| EngineError::InvalidInput("decoded image has the wrong size".into()))?;
        out.push(img);
    }
    Ok(out)
}

/// Input images resized to `width x height` (Lanczos, as diffusers' image processor), and the mask too.
pub(crate) fn resize_inputs(edit: &Edit, width: u32, height: u32) -> (Vec<RgbImage>, Option<GrayImage>) {
    let images = edit
        .images
        .iter()
        .map(|img| {
            if img.dimensions() == (width, height) {
                img.clone()
            } else {
                image::imageops::resize(img, width, height, FilterType::Lanczos3)
            }
        })
        .collect();
    let mask = edit.mask.as_ref().map(|m| {
        if m.dimensions() == (width, height) {
            m.clone()
        } else {
            image::imageops::resize(m, width, height, FilterType::Lanczos3)
        }
    });
    (images, mask)
}

/// A part of the model read the first time it is needed, then kept.
pub(crate) struct OnFirstUse<T>(Mutex<Option<Arc<T>>>);

impl<T> Default for OnFirstUse<T> {
    fn default() -> Self {
        OnFirstUse(Mutex::new(None))
    }
}

impl<T> OnFirstUse<T> {
    /// The part, loaded by `load` on the first call (a failed load is tried again on the next one).
    pub(crate) fn get_or_load(&self, load: impl FnOnce() -> Result<T, EngineError>) -> Result<Arc<T>, EngineError> {
        let mut slot =
            self.0.lock().map_err(|_| EngineError::InvalidInput("a model part's lock is poisoned".into()))?;
        if let Some(part) = slot.as_ref() {
            return Ok(Arc::clone(part));
        }
        let part = Arc::new(load()?);
        *slot = Some(Arc::clone(&part));
        Ok(part)
    }
}
/// After how many completed steps the partial images are taken: evenly spread, never after the last.
pub(crate) fn partial_points(run: usize, wanted: usize) -> Vec<usize> {
    let mut points: Vec<usize> = (1..=wanted).map(|k| k * run / (wanted + 1)).filter(|&j| j >= 1 && j < run).collect();
    points.dedup();
    points
}

/// The batch's noise, `[n, c, h, w]` f32: each image's from its own generator, or what `hooks` give for
/// its seed (the generators advance either way, so that what follows does not depend on it).
pub(crate) fn seeded_noise(
    rngs: &mut [StdRng],
    seeds: &[u64],
    what: Draw,
    shape: (usize, usize, usize),
    hooks: &mut dyn Hooks,
    device: &Device,
) -> Result<Tensor, EngineError> {
    let noise = gaussian(rngs, shape, device)?;
    let given: Vec<Option<Tensor>> = seeds.iter().map(|s| hooks.noise(*s, what, shape)).collect();
    if given.iter().all(Option::is_none) {
        return Ok(noise);
    }
    let each = given
        .into_iter()
        .enumerate()
        .map(|(i, g)| match g {
            Some(t) => t.to_device(device)?.to_dtype(DType::F32),
            None => noise.get(i),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&each, 0)?)
}

fn gaussian(rngs: &mut [StdRng], (c, h, w): (usize, usize, usize), device: &Device) -> Result<Tensor, EngineError> {
    let per = c * h * w;
    let mut values = Vec::with_capacity(rngs.len() * per);
    for rng in rngs.iter_mut() {
        values.extend((0..per).map(|_| -> f32 { StandardNormal.sample(rng) }));
    }
    Ok(Tensor::from_vec(values, (rngs.len(), c, h, w), device)?)
}

/// The latent mask diffusers makes of a pixel mask: binarized at one half (1 repaints), then taken
/// nearest-neighbour down to the `lh x lw` latent grid (`F.interpolate`'s default: source index
/// `floor(i * in / out)`).
pub(crate) fn latent_mask(mask: &GrayImage, lh: usize, lw: usize) -> Vec<f32> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    (0..lh)
        .flat_map(|y| (0..lw).map(move |x| (x * w / lw, y * h / lh)))
        .map(|(x, y)| if mask.get_pixel(x as u32, y as u32).0[0] >= 128 { 1.0 } else { 0.0 })
        .collect()
}

/// `out = input * (1 - m) + out * m` per pixel, with `m` the mask (255 = repaint).
pub(crate) fn composite(out: &mut RgbImage, input: &RgbImage, mask: &GrayImage) {
    for (x, y, px) in out.enumerate_pixels_mut() {
        let m = u32::from(mask.get_pixel(x, y).0[0]);
        let src = input.get_pixel(x, y).0;
        for (value, source) in px.0.iter_mut().zip(src) {
            *value = ((u32::from(source) * (255 - m) + u32::from(*value) * m + 127) / 255) as u8;
        }
    }
}

/// Builds a module from one safetensors file, naming the file in any error (a missing tensor or a shape
/// that does not match the config). On the CPU a file stored all in f16 for a component kept in f16
/// (the fp16 files of the text encoders and the UNet) is mapped and its weights used in place; any
/// other is read into buffers of `dtype`.
pub(crate) fn with_weights<T>(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
    build: impl FnOnce(Weights) -> candle_core::Result<T>,
) -> Result<(T, Vec<Arc<MappedFile>>), EngineError> {
    let named = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    let invalid = |why: String| EngineError::InvalidFile { path: PathBuf::from(&named), why };
    // Only f16: such weights are widened on every use anyway, so reading them from the map costs
    // nothing more, where a mapped f32 weight would be copied on every use instead of never.
    let mut mapped = Vec::new();
    if device.is_cpu() && dtype == DType::F16 {
        for path in paths {
            mapped.push(MappedFile::open(path)?);
        }
        if !mapped.iter().all(|file| file.all_of(dtype)) {
            mapped.clear();
        }
    }
    let weights = if mapped.is_empty() {
        let store = if dtype == DType::F16 { Some(DType::F16) } else { None };
        let mut tensors = std::collections::HashMap::new();
        for path in paths {
            tensors.extend(crate::weights::load_as(path, device, store)?);
        }
        Weights::from(VarBuilder::from_tensors(tensors, dtype, device))
    } else {
        Weights::mapped_shards(mapped.clone(), dtype)
    };
    Ok((build(weights).map_err(|e| invalid(e.to_string()))?, mapped))
}

/// Drops the pages of mapped weight files from the process ([`MappedFile::release`]) once their model
/// has run; a failure only costs memory, so it is logged, not returned.
pub(crate) fn release<'a>(files: impl IntoIterator<Item = &'a Arc<MappedFile>>) {
    for file in files {
        if let Err(e) = file.release() {
            tracing::warn!(error = %e, "could not release a weight file's pages");
        }
    }
}
#[cfg(test)]
mod tests {
    use image::Luma;

    use super::*;

    #[test]
    fn the_latent_mask_is_binarized_then_taken_nearest_neighbour() {
        // 8x4 pixels to a 2x1 latent grid: source pixels (0, 0) and (4, 0) decide, binarized at 128.
        let mask = GrayImage::from_fn(8, 4, |x, _| Luma([if x < 4 { 127 } else { 128 }]));
        assert_eq!(latent_mask(&mask, 1, 2), vec![0.0, 1.0]);
        // A soft edge is not averaged: only the sampled pixel counts.
        let mask = GrayImage::from_fn(8, 8, |x, y| Luma([if x == 0 && y == 0 { 255 } else { 0 }]));
        assert_eq!(latent_mask(&mask, 2, 2), vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn partial_points_spread_and_skip_the_end() {
        assert_eq!(partial_points(1, 3), Vec::<usize>::new());
        assert_eq!(partial_points(4, 1), vec![2]);
        assert_eq!(partial_points(4, 3), vec![1, 2, 3]);
        assert_eq!(partial_points(10, 2), vec![3, 6]);
        assert_eq!(partial_points(2, 3), vec![1]);
    }
}

//! The local engine as a provider: OpenAI requests mapped onto diffusion runs on this machine.
//!
//! Generation runs on one dedicated worker thread per engine (candle spreads each operation over the
//! cores itself), never on the async runtime. In front of it sits a bounded queue: a request that finds
//! it full gets 429 with `Retry-After` at once. Models load on first use and stay resident (the least
//! recently used is dropped beyond `resident_models`). A request whose client went away is skipped if
//! still queued and stopped at the next step if running.
//!
//! Background work (flex, batch) waits in the provider's [`Queue`] until the engine has nothing
//! interactive to do, and runs one job at a time; interactive work that arrives meanwhile runs between
//! two of its steps (the background job keeps only its latents while it waits), so a background job
//! delays interactive work by at most the step it is in.
//!
//! How the OpenAI controls map (the table is in README.md):
//! - `quality` low/medium/high (auto: medium) picks the steps of the model's [`Profile`]; `low` also
//!   picks the tiny decoder (TAESD) when the model has one, and the `decoder` extension (`full` or
//!   `tiny`) overrides that. A model has a tiny decoder when [`LocalModel::tiny_decoder`] names one,
//!   or else when the one for its latents (`taesd`, or `taesdxl` for SDXL) is installed in
//!   [`LocalOptions::models_dir`]; streamed partial images then come from it too;
//! - `size` is any WIDTHxHEIGHT in multiples of the VAE factor (8) from 64 to 2048, `auto` being the
//!   model's native size (or the input's, scaled down to fit, for edits);
//! - edits with a mask repaint the masked area (strength 1); edits without one, and reference images,
//!   run image-to-image at strength 0.6 (0.4 with `input_fidelity=high`), with the steps scaled so the
//!   steps actually run match the quality; variations run image-to-image of their input with no
//!   prompt at strength 0.7 ([`VARIATION_STRENGTH`]);
//! - `seed` fixes every random number; without it a random seed is drawn.
//!
//! With [`LocalOptions::provenance`], every image (final or partial) carries a signed C2PA manifest
//! naming the model and its checkpoint (`provenance` crate); a model with `provenance: false` is left
//! unsigned. The checkpoint's identity is read once, on a thread of its own, when the provider starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use api::ApiError;
use async_trait::async_trait;
use base64::Engine as _;
use domain::{
    Background, GeneratedImage, ImageJob, ImagePayload, ImageResult, OutputFormat, Quality, Resolved, Size, SizeChoice,
    StreamEvent,
};
use engine::encode::Format;
use engine::pipeline::{MAX_SIDE, MIN_SIDE};
use engine::sd::taesd::TinyConfig;
use engine::{Checkpoint, Decoder, Edit, EngineError, GenerateParams, Hooks, LoadOptions, Pipeline, Sampler, registry};
use futures_util::StreamExt;
use image::{GrayImage, RgbImage};
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use crate::schedule::{Permit, Place, Priority, Queue, QueueLimits};
use crate::{CancellationToken, Provider, ProviderError, ProviderOutput};

/// How far a variation moves from its input: image-to-image at this strength, with an empty prompt.
pub const VARIATION_STRENGTH: f64 = 0.7;

/// Steps per quality, the guidance scale and the sampler of a model family.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Steps for low, medium and high.
    pub steps: [usize; 3],
    /// Classifier-free guidance; 0 for distilled (turbo) models, which are trained without it.
    pub guidance: f64,
    pub sampler: Sampler,
}

impl Profile {
    /// Adversarially distilled models (SD-Turbo, SDXL-Turbo): 1, 2 or 4 steps of their own schedule,
    /// no guidance.
    pub const TURBO: Profile = Profile { steps: [1, 2, 4], guidance: 0.0, sampler: Sampler::Checkpoint };
    /// Ordinary Stable Diffusion checkpoints, on DPM-Solver++ 2M Karras: 10, 15 or 25 steps land
    /// closer to the model's exact sample than Euler's 15, 25 or 40 (BENCHMARKS.md, "Samplers").
    pub const STANDARD: Profile = Profile { steps: [10, 15, 25], guidance: 7.5, sampler: Sampler::DpmSolver2mKarras };
    /// Ordinary checkpoints on their own scheduler config (Euler for PNDM and LMS configs).
    pub const STANDARD_OWN_SAMPLER: Profile =
        Profile { steps: [15, 25, 40], guidance: 7.5, sampler: Sampler::Checkpoint };
    /// Z-Image-Turbo: distilled for 8 steps of its FlowMatch scheduler without guidance (the model
    /// card's setting, `high`); fewer steps are softer.
    pub const Z_IMAGE: Profile = Profile { steps: [4, 6, 8], guidance: 0.0, sampler: Sampler::Checkpoint };

    /// This profile with the sampler named `name` (`dpm++2m-karras` or `checkpoint`); a standard
    /// profile takes the steps its sampler needs.
    pub fn with_sampler(self, name: &str) -> Result<Profile, String> {
        let sampler = match name {
            "dpm++2m-karras" => Sampler::DpmSolver2mKarras,
            "checkpoint" => Sampler::Checkpoint,
            other => return Err(format!("'{other}' is not one of 'dpm++2m-karras', 'checkpoint'")),
        };
        if self == Profile::Z_IMAGE {
            return match sampler {
                Sampler::Checkpoint => Ok(self),
                Sampler::DpmSolver2mKarras => {
                    Err("Z-Image models run their own FlowMatch scheduler: only 'checkpoint'".to_owned())
                }
            };
        }
        Ok(match (self == Profile::TURBO, sampler) {
            (true, _) => Profile { sampler, ..self },
            (false, Sampler::DpmSolver2mKarras) => Profile::STANDARD,
            (false, Sampler::Checkpoint) => Profile::STANDARD_OWN_SAMPLER,
        })
    }

    /// Turbo when the model's name or directory says so, else standard.
    pub fn guess(name: &str, dir: &Path) -> Profile {
        if engine::Family::of(dir).is_ok_and(|f| f == engine::Family::ZImage) {
            return Profile::Z_IMAGE;
        }
        let says_turbo = |s: &str| s.to_ascii_lowercase().contains("turbo");
        if says_turbo(name) || says_turbo(&dir.to_string_lossy()) { Profile::TURBO } else { Profile::STANDARD }
    }

    pub fn steps_for(&self, quality: Quality) -> usize {
        match quality {
            Quality::Low => self.steps[0],
            Quality::High | Quality::Hd => self.steps[2],
            _ => self.steps[1],
        }
    }
}

/// One model the provider serves.
#[derive(Debug, Clone)]
pub struct LocalModel {
    pub name: String,
    pub dir: PathBuf,
    pub profile: Profile,
    /// A tiny decoder directory (an `AutoencoderTiny`: `config.json` and its weights) for this model;
    /// `None` uses the one for its latents from [`LocalOptions::models_dir`] when it is installed there.
    pub tiny_decoder: Option<PathBuf>,
    /// Its images are signed when the provider has a signer ([`LocalOptions::provenance`]).
    pub provenance: bool,
}

/// How a provider signs its images.
#[derive(Clone)]
pub struct Provenance {
    pub signer: Arc<provenance::Signer>,
    /// The prompt is written into manifests only when set: prompts can be private.
    pub include_prompt: bool,
    /// Where checkpoint digests are remembered between starts (`provenance::DIGEST_CACHE`).
    pub cache_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Provenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provenance").field("include_prompt", &self.include_prompt).finish_non_exhaustive()
    }
}

/// Told the duration of every denoising step the engine runs, with the model's name (for metrics).
#[derive(Clone)]
pub struct StepObserver(pub Arc<StepFn>);

/// What a [`StepObserver`] calls: the model's name and the step's duration.
pub type StepFn = dyn Fn(&str, Duration) + Send + Sync;

impl std::fmt::Debug for StepObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepObserver")
    }
}

#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Interactive requests waiting or running at most; beyond, 429.
    pub queue_capacity: usize,
    /// Background (flex, batch) requests that may wait; beyond, 429 `resource_unavailable`.
    pub background_queue: usize,
    /// A background request expected to wait longer is refused at once.
    pub max_background_wait: Duration,
    /// Told every denoising step's duration.
    pub step_observer: Option<StepObserver>,
    /// Models kept loaded at once.
    pub resident_models: usize,
    /// Where pulled models live (hub-cache layout, `engine::registry`): a model without a tiny decoder
    /// of its own uses `taesd` (SD 1.x/2.x) or `taesdxl` (SDXL) from here when it is installed.
    pub models_dir: Option<PathBuf>,
    /// Signs every image of the models that have [`LocalModel::provenance`]; `None` signs nothing.
    pub provenance: Option<Provenance>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        let background = QueueLimits::default();
        LocalOptions {
            queue_capacity: 8,
            background_queue: background.background_queue,
            max_background_wait: background.max_background_wait,
            step_observer: None,
            resident_models: 2,
            models_dir: None,
            provenance: None,
        }
    }
}

struct Served {
    /// With `tiny_decoder` resolved: the model's own, the installed one, or none.
    model: LocalModel,
    /// Pixels per latent, from the checkpoint's VAE.
    size_multiple: u32,
    native: u32,
    /// The longest side it generates.
    max_side: u32,
    /// The built-in tiny decoder for the model's latents (`taesd` or `taesdxl`), for messages; none
    /// for families that have none.
    tiny_name: Option<&'static str>,
    /// The checkpoint's identity, read on a thread of its own at start (`None` inside: unreadable);
    /// absent when the model's images are not signed.
    checkpoint: Option<Arc<CheckpointCell>>,
}

/// A checkpoint's identity, filled once by whoever asks first (signing waits for the start-up thread).
struct CheckpointCell {
    dir: PathBuf,
    cache_dir: Option<PathBuf>,
    id: OnceLock<Option<provenance::Checkpoint>>,
}

impl CheckpointCell {
    fn get(&self) -> Option<&provenance::Checkpoint> {
        self.id
            .get_or_init(|| {
                let id = match &self.cache_dir {
                    Some(cache) => provenance::Checkpoint::identify_cached(&self.dir, cache),
                    None => provenance::Checkpoint::identify(&self.dir),
                };
                match id {
                    Ok(id) => Some(id),
                    Err(e) => {
                        tracing::warn!(dir = %self.dir.display(), error = %e, "cannot identify the checkpoint for its images' manifests");
                        None
                    }
                }
            })
            .as_ref()
    }
}

pub struct LocalProvider {
    name: String,
    models: BTreeMap<String, Served>,
    queue: mpsc::Sender<Task>,
    pending: Arc<AtomicUsize>,
    capacity: usize,
    /// Recent generation time, for `Retry-After`.
    recent_ms: Arc<AtomicU64>,
    /// Where background work waits for the engine (interactive work is ordered by the worker).
    schedule: Queue,
    provenance: Option<Provenance>,
}

impl LocalProvider {
    /// Reads every model's configs now (so a broken checkpoint fails at start, naming the file) and
    /// starts the worker. Weights load on first use.
    pub fn new(name: &str, models: Vec<LocalModel>, options: LocalOptions) -> Result<LocalProvider, EngineError> {
        let mut served = BTreeMap::new();
        for mut m in models {
            let info = engine::inspect(&m.dir)?;
            m.tiny_decoder = match (info.tiny_decoder, m.tiny_decoder.take()) {
                (None, Some(dir)) => {
                    return Err(EngineError::InvalidInput(format!(
                        "model '{}': tiny_decoder {} is set, but no tiny decoder reads this model's latents",
                        m.name,
                        dir.display()
                    )));
                }
                (None, None) => None,
                // Named for this model: it must fit, or the model does not start.
                (Some(_), Some(dir)) => {
                    TinyConfig::read(&dir)?.check_matches(&Checkpoint::open(&m.dir)?, &dir)?;
                    Some(dir)
                }
                // Found among the pulled models: used when it fits, else passed over with a warning.
                (Some(tiny), None) => {
                    let installed = options.models_dir.as_deref().and_then(|dir| registry::installed_dir(dir, tiny));
                    match installed {
                        Some(dir) => {
                            let ckpt = Checkpoint::open(&m.dir)?;
                            Some(dir).filter(|dir| fits(dir, &ckpt, &m.name))
                        }
                        None => None,
                    }
                }
            };
            if let Some(dir) = &m.tiny_decoder {
                tracing::info!(model = %m.name, tiny_decoder = %dir.display(), "tiny decoder for quality=low and previews");
            }
            let tiny_name = info.tiny_decoder.map(|t| t.name);
            let signer = options.provenance.as_ref().filter(|_| m.provenance);
            let checkpoint = signer.map(|p| {
                let cell = Arc::new(CheckpointCell {
                    dir: m.dir.clone(),
                    cache_dir: p.cache_dir.clone(),
                    id: OnceLock::new(),
                });
                let reading = Arc::clone(&cell);
                // Hashing a directory's weights takes seconds per gigabyte: never on a request's path.
                let started = std::thread::Builder::new().name("imagegate-checkpoint-id".into()).spawn(move || {
                    reading.get();
                });
                if let Err(e) = started {
                    tracing::warn!(error = %e, "the checkpoint's identity will be read on first use");
                }
                cell
            });
            served.insert(
                m.name.clone(),
                Served {
                    model: m,
                    size_multiple: info.size_multiple,
                    native: info.native_size,
                    max_side: info.max_side,
                    tiny_name,
                    checkpoint,
                },
            );
        }
        let (queue, tasks) = mpsc::channel::<Task>();
        let recent_ms = Arc::new(AtomicU64::new(0));
        let resident = options.resident_models.max(1);
        let recent = Arc::clone(&recent_ms);
        let observer = options.step_observer.clone();
        std::thread::Builder::new()
            .name("imagegate-engine".into())
            .spawn(move || worker(tasks, resident, recent, observer))
            .map_err(|e| EngineError::InvalidInput(format!("cannot start the engine thread: {e}")))?;
        Ok(LocalProvider {
            name: name.to_owned(),
            models: served,
            queue,
            pending: Arc::new(AtomicUsize::new(0)),
            capacity: options.queue_capacity.max(1),
            recent_ms,
            schedule: Queue::preemptive(QueueLimits {
                capacity: 1,
                background_queue: options.background_queue,
                max_background_wait: options.max_background_wait,
            }),
            provenance: options.provenance,
        })
    }

    /// The model names served, in order.
    pub fn model_names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    fn plan(&self, served: &Served, job: &ImageJob) -> Result<Plan, ApiError> {
        let options = job.options();
        let quality = match options.quality {
            Some(q @ (Quality::Low | Quality::Medium | Quality::High)) => q,
            _ => Quality::Medium,
        };
        // Input images are decoded on the worker thread, not here on the async runtime; their sizes
        // were read from the headers when the request was checked.
        let edit = match job {
            ImageJob::Generate(_) => None,
            ImageJob::Edit(e) => {
                let strength = if e.mask.is_some() {
                    1.0
                } else if e.input_fidelity == Some(domain::InputFidelity::High) {
                    0.4
                } else {
                    0.6
                };
                Some((e.clone(), strength))
            }
            // A variation: image-to-image of the input with no prompt.
            ImageJob::Variation(v) => {
                let request = domain::EditRequest {
                    prompt: String::new(),
                    images: vec![v.image.clone()],
                    mask: None,
                    input_fidelity: None,
                    options: v.options.clone(),
                };
                Some((request, VARIATION_STRENGTH))
            }
        };
        let size = match options.size {
            Some(SizeChoice::Exact(s)) => {
                let m = served.size_multiple;
                let max = served.max_side;
                let ok = |v: u32| (MIN_SIDE..=max).contains(&v) && v.is_multiple_of(m);
                if !ok(s.width) || !ok(s.height) {
                    return Err(ApiError::invalid_value_msg(
                        "size",
                        format!(
                            "Invalid value: '{s}'. The local model '{}' takes 'auto' or WIDTHxHEIGHT with each side a multiple of {m} from {MIN_SIDE} to {max}, such as '{n}x{n}'.",
                            served.model.name,
                            n = served.native
                        ),
                    ));
                }
                s
            }
            _ => match &edit {
                Some((e, _)) => {
                    let first = e.images.first().map_or(Size::new(served.native, served.native), |i| i.size);
                    fit((first.width, first.height), served.size_multiple, served.native.max(1024).min(served.max_side))
                }
                None => Size::new(served.native, served.native),
            },
        };
        let steps = options.steps.map_or_else(|| served.model.profile.steps_for(quality), usize::from);
        let has_tiny = served.model.tiny_decoder.is_some();
        let decoder = match options.decoder {
            Some(domain::Decoder::Tiny) if !has_tiny => {
                let how = match served.tiny_name {
                    Some(name) => format!("install one with `imagegate models pull {name}`, or use 'full'"),
                    None => "none exists for its latents yet: use 'full'".to_owned(),
                };
                return Err(ApiError::invalid_value_msg(
                    "decoder",
                    format!("The local model '{}' has no tiny decoder: {how}.", served.model.name),
                ));
            }
            Some(domain::Decoder::Tiny) => Decoder::Tiny,
            Some(domain::Decoder::Full) => Decoder::Full,
            // Low quality trades the decoder's detail for time too, when there is a tiny one.
            None if quality == Quality::Low && has_tiny => Decoder::Tiny,
            None => Decoder::Full,
        };
        let (edit, steps) = match edit {
            None => (None, steps),
            Some((request, strength)) => {
                // Run about as many steps as the quality asks for, whatever the strength.
                let total = (steps as f64 / strength).ceil() as usize;
                (Some(PendingEdit { request, strength }), total.max(1))
            }
        };
        let params = GenerateParams {
            prompt: job.prompt().to_owned(),
            negative_prompt: String::new(),
            width: size.width,
            height: size.height,
            n: usize::from(options.n.max(1)),
            steps,
            guidance_scale: served.model.profile.guidance,
            seed: options.seed.unwrap_or_else(rand::random),
            edit: None,
            partial_images: if options.stream { usize::from(options.partial_images) } else { 0 },
            decoder,
            sampler: served.model.profile.sampler,
        };
        let format = options.output_format.unwrap_or(OutputFormat::Png);
        let resolved = Resolved {
            size: Some(size),
            quality: Some(quality),
            background: Some(Background::Opaque),
            output_format: Some(format),
        };
        let credentials = match (&self.provenance, &served.checkpoint) {
            (Some(p), Some(checkpoint)) => Some(Credentials {
                signer: Arc::clone(&p.signer),
                model: served.model.name.clone(),
                checkpoint: Arc::clone(checkpoint),
                prompt: p.include_prompt.then(|| job.prompt().to_owned()).filter(|p| !p.is_empty()),
            }),
            _ => None,
        };
        Ok(Plan { params, edit, format, compression: options.output_compression, resolved, credentials })
    }

    fn retry_after(&self) -> u64 {
        let per_job = self.recent_ms.load(Ordering::Relaxed).max(1000);
        (per_job * self.capacity as u64).div_ceil(1000).clamp(1, 600)
    }
}

/// Whether the installed tiny decoder in `dir` reads `ckpt`'s latents (a warning when not).
fn fits(dir: &Path, ckpt: &Checkpoint, model: &str) -> bool {
    match TinyConfig::read(dir).and_then(|c| c.check_matches(ckpt, dir)) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(model, error = %e, "the installed tiny decoder does not fit the model: not used");
            false
        }
    }
}

/// The largest size with the input's aspect within `max_side`, in multiples of `multiple`.
fn fit((w, h): (u32, u32), multiple: u32, max_side: u32) -> Size {
    let scale = (f64::from(max_side) / f64::from(w.max(h))).min(1.0);
    let side = |v: u32| {
        let scaled = (f64::from(v) * scale) as u32;
        (scaled / multiple * multiple).clamp(MIN_SIDE, MAX_SIDE)
    };
    Size::new(side(w), side(h))
}

/// Decodes an edit's inputs (on the worker thread).
fn decode_edit(e: &domain::EditRequest, strength: f64) -> Result<Edit, ApiError> {
    let mut images = Vec::with_capacity(e.images.len());
    for (i, input) in e.images.iter().enumerate() {
        let img = image::load_from_memory(&input.bytes).map_err(|err| {
            tracing::debug!(image = i, error = %err, "an edit's input image does not decode");
            ApiError::invalid_value_msg("image", format!("Invalid image {i}: it could not be decoded."))
        })?;
        images.push(img.to_rgb8());
    }
    let mask = match &e.mask {
        None => None,
        Some(m) => {
            let rgba = image::load_from_memory(&m.bytes)
                .map_err(|err| {
                    tracing::debug!(error = %err, "an edit's mask does not decode");
                    ApiError::invalid_value_msg("mask", "Invalid mask: it could not be decoded.".to_owned())
                })?
                .to_rgba8();
            // OpenAI's masks: fully transparent pixels are edited, opaque ones kept.
            Some(GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| image::Luma([255 - rgba.get_pixel(x, y).0[3]])))
        }
    };
    Ok(Edit { images, mask, strength })
}

/// An edit whose input images are still encoded (the input bytes are shared, not copied).
struct PendingEdit {
    request: domain::EditRequest,
    strength: f64,
}

struct Plan {
    /// Everything but the edit's decoded inputs.
    params: GenerateParams,
    edit: Option<PendingEdit>,
    format: OutputFormat,
    compression: Option<u8>,
    resolved: Resolved,
    /// Signs the images, when the model's are signed.
    credentials: Option<Credentials>,
}

/// What a task's images are signed with.
struct Credentials {
    signer: Arc<provenance::Signer>,
    model: String,
    checkpoint: Arc<CheckpointCell>,
    prompt: Option<String>,
}

/// A task's credentials with its inputs, as the signer takes them.
struct Signing<'a> {
    credentials: &'a Credentials,
    images: Vec<provenance::Input<'a>>,
    mask: Option<provenance::Input<'a>>,
}

impl Signing<'_> {
    fn sign(
        &self,
        bytes: &[u8],
        format: OutputFormat,
        partial: Option<u32>,
    ) -> Result<Vec<u8>, provenance::ProvenanceError> {
        let origin = if self.images.is_empty() {
            provenance::Origin::Generated
        } else {
            provenance::Origin::Edited { images: &self.images, mask: self.mask }
        };
        let c = self.credentials;
        let generation = provenance::Generation {
            model: &c.model,
            checkpoint: c.checkpoint.get(),
            prompt: c.prompt.as_deref(),
            partial_image_index: partial,
        };
        c.signer.sign(bytes, media_type(format), origin, &generation)
    }
}

fn media_type(format: OutputFormat) -> provenance::MediaType {
    match format {
        OutputFormat::Png => provenance::MediaType::Png,
        OutputFormat::Jpeg => provenance::MediaType::Jpeg,
        OutputFormat::Webp => provenance::MediaType::Webp,
    }
}

fn input(image: &domain::InputImage) -> provenance::Input<'_> {
    let media_type = match image.format {
        domain::InputFormat::Png => provenance::MediaType::Png,
        domain::InputFormat::Jpeg => provenance::MediaType::Jpeg,
        domain::InputFormat::Webp => provenance::MediaType::Webp,
    };
    provenance::Input { bytes: &image.bytes, media_type }
}

enum Reply {
    Complete(oneshot::Sender<Result<ImageResult, ProviderError>>),
    Stream(tokio_mpsc::UnboundedSender<Result<StreamEvent, ProviderError>>),
}

struct Task {
    model: LocalModel,
    plan: Plan,
    reply: Reply,
    /// Set when the request's future or stream is dropped.
    cancel: Arc<AtomicBool>,
    /// Cancelled when the client went away while the caller still waits for the outcome.
    abandoned: CancellationToken,
    slot: QueueSlot,
}

impl Task {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.abandoned.is_cancelled()
    }
}

/// A task's place in the queue's count (`LocalProvider::pending`) and its permit, given back when
/// dropped: by the worker just before it replies (so that a client that has its answer finds the place
/// free), or with a task that never ran.
struct QueueSlot {
    pending: Arc<AtomicUsize>,
    /// Given back to the provider's queue with the slot.
    permit: Permit,
}

impl QueueSlot {
    fn priority(&self) -> Priority {
        self.permit.priority()
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sets the cancel flag when the request's future (or stream) is dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn queue(&self) -> &Queue {
        &self.schedule
    }

    /// A job whose client went away (`abandoned`) is skipped if still queued and stopped at the next
    /// step if running; it ends with [`ProviderError::Cancelled`] and the compute time it had used.
    async fn run(
        &self,
        model: &str,
        job: &ImageJob,
        place: Place,
        abandoned: &CancellationToken,
    ) -> Result<ProviderOutput, ProviderError> {
        let served = self
            .models
            .get(model)
            .ok_or_else(|| ProviderError::Api(ApiError::model_not_found(model, &self.model_names())))?;
        let plan = self.plan(served, job).map_err(ProviderError::Api)?;
        let slot = match place.priority() {
            Priority::Interactive => {
                // Admission: a slot in the queue or an honest 429 now.
                if self.pending.fetch_add(1, Ordering::AcqRel) >= self.capacity {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    let retry = self.retry_after();
                    let mut e = ApiError::new(
                        429,
                        "requests",
                        None,
                        Some("engine_busy"),
                        format!(
                            "The local engine is busy: {} requests are queued or running for this device. Retry in about {retry} s.",
                            self.capacity
                        ),
                    );
                    e.retry_after = Some(retry);
                    return Err(ProviderError::Api(e));
                }
                let pending = Arc::clone(&self.pending);
                // Never waits: the worker orders interactive work itself.
                QueueSlot { pending, permit: place.ready().await }
            }
            // Its turn comes when the engine has nothing interactive to do; a client that leaves
            // before then costs nothing.
            Priority::Background => {
                let permit = tokio::select! {
                    permit = place.ready() => permit,
                    () = abandoned.cancelled() => return Err(ProviderError::Cancelled { compute_ms: 0 }),
                };
                self.pending.fetch_add(1, Ordering::AcqRel);
                QueueSlot { pending: Arc::clone(&self.pending), permit }
            }
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let guard = CancelOnDrop(Arc::clone(&cancel));
        let stream = job.options().stream;
        let model = served.model.clone();
        if stream {
            let (tx, rx) = tokio_mpsc::unbounded_channel();
            let task = Task { model, plan, reply: Reply::Stream(tx), cancel, abandoned: abandoned.clone(), slot };
            self.queue.send(task).map_err(|_| engine_gone())?;
            let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |e| {
                let _keep = &guard;
                e
            });
            Ok(ProviderOutput::Stream(events.boxed()))
        } else {
            let (tx, rx) = oneshot::channel();
            let task = Task { model, plan, reply: Reply::Complete(tx), cancel, abandoned: abandoned.clone(), slot };
            self.queue.send(task).map_err(|_| engine_gone())?;
            let result = rx.await.map_err(|_| engine_gone())?;
            drop(guard);
            result.map(ProviderOutput::Complete)
        }
    }
}

fn engine_gone() -> ProviderError {
    ProviderError::Api(ApiError::new(500, "server_error", None, None, "The local engine stopped.".to_owned()))
}

/// What a loaded pipeline is cached by: the model's directory and its tiny decoder's.
type Resident = (PathBuf, Option<PathBuf>);

/// The worker: one task at a time, models cached by directory; interactive tasks that arrive while a
/// background one runs run between its steps.
fn worker(tasks: mpsc::Receiver<Task>, resident: usize, recent_ms: Arc<AtomicU64>, observer: Option<StepObserver>) {
    let device = match engine::default_device() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "no device for the local engine");
            for task in tasks {
                task.fail(ProviderError::Api(ApiError::new(
                    500,
                    "server_error",
                    None,
                    Some("engine_unavailable"),
                    format!("The local engine has no device: {e}"),
                )));
            }
            return;
        }
    };
    let mut worker = Worker { device, tasks, loaded: Vec::new(), resident, recent_ms, observer };
    while let Ok(task) = worker.tasks.recv() {
        worker.handle(task);
    }
}

struct Worker {
    device: engine::Device,
    tasks: mpsc::Receiver<Task>,
    loaded: Vec<(Resident, Arc<Pipeline>)>,
    resident: usize,
    recent_ms: Arc<AtomicU64>,
    observer: Option<StepObserver>,
}

impl Worker {
    fn handle(&mut self, task: Task) {
        if task.cancelled() {
            // Never started: nothing was spent on it.
            task.fail(ProviderError::Cancelled { compute_ms: 0 });
            return;
        }
        let Some(pipeline) = self.pipeline(&task) else {
            let msg = format!(
                "The local model '{}' could not be loaded: its files are broken or incomplete. The server log has the details.",
                task.model.name
            );
            task.fail(ProviderError::Api(ApiError::new(500, "server_error", None, Some("model_load_failed"), msg)));
            return;
        };
        let observer = self.observer.clone();
        let compute = if task.slot.priority() == Priority::Background {
            // Interactive tasks queued behind it run between its steps (only interactive ones can be:
            // background work waits for an idle engine); their time is not its own.
            let mut between = || {
                let before = Instant::now();
                self.run_waiting();
                before.elapsed()
            };
            task.run(&pipeline, Some(&mut between), observer.as_ref())
        } else {
            task.run(&pipeline, None, observer.as_ref())
        };
        self.recent_ms.store(compute.as_millis() as u64, Ordering::Relaxed);
    }

    /// Runs every task already queued.
    fn run_waiting(&mut self) {
        while let Ok(task) = self.tasks.try_recv() {
            self.handle(task);
        }
    }

    /// The task's model, loaded (or resident); `None` when it failed to load (the task is answered).
    fn pipeline(&mut self, task: &Task) -> Option<Arc<Pipeline>> {
        let key = (task.model.dir.clone(), task.model.tiny_decoder.clone());
        if let Some(i) = self.loaded.iter().position(|(k, _)| *k == key) {
            let entry = self.loaded.remove(i);
            let p = Arc::clone(&entry.1);
            self.loaded.push(entry);
            return Some(p);
        }
        let options = LoadOptions { tiny_decoder: key.1.clone(), ..LoadOptions::default() };
        match Pipeline::load_with(&task.model.dir, &self.device, options) {
            Ok(p) => {
                let p = Arc::new(p);
                if self.loaded.len() >= self.resident {
                    self.loaded.remove(0);
                }
                self.loaded.push((key, Arc::clone(&p)));
                Some(p)
            }
            Err(e) => {
                // The details (file paths, library errors) are for the log, never the client.
                tracing::error!(model = %task.model.name, error = %e, "local model failed to load");
                None
            }
        }
    }
}

struct StreamHooks<'a, 'f> {
    /// Runs the engine's other waiting work (a background task's), returning the time it took.
    between: Option<&'a mut (dyn FnMut() -> Duration + 'f)>,
    /// Time spent on other work between this task's steps.
    nested: Duration,
    observer: Option<&'a StepObserver>,
    model: &'a str,
    step_started: Instant,
    cancel: &'a AtomicBool,
    abandoned: &'a CancellationToken,
    sender: Option<&'a tokio_mpsc::UnboundedSender<Result<StreamEvent, ProviderError>>>,
    format: OutputFormat,
    compression: Option<u8>,
    resolved: Resolved,
    signing: Option<&'a Signing<'a>>,
}

impl Hooks for StreamHooks<'_, '_> {
    fn before_step(&mut self, _step: usize) {
        if let Some(between) = self.between.as_mut() {
            self.nested += between();
        }
        self.step_started = Instant::now();
    }

    fn after_step(&mut self, _step: usize) {
        if let Some(observer) = self.observer {
            (observer.0)(self.model, self.step_started.elapsed());
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
            || self.abandoned.is_cancelled()
            || self.sender.is_some_and(|s| s.is_closed())
    }

    /// Every image of `n` has its partial images (their events carry only their index, as OpenAI's).
    fn partial(&mut self, _image: usize, index: usize, image: RgbImage) {
        let Some(sender) = self.sender else { return };
        match encode(&image, self.format, self.compression, self.signing, Some(index as u32)) {
            Ok(b64_json) => {
                let _ = sender.send(Ok(StreamEvent::Partial {
                    b64_json,
                    partial_image_index: index as u32,
                    created_at: now(),
                    resolved: self.resolved,
                }));
            }
            Err(e) => tracing::warn!(error = %e, "a partial image could not be encoded or signed"),
        }
    }
}

impl Task {
    fn fail(self, e: ProviderError) {
        let Task { reply, slot, .. } = self;
        drop(slot);
        reply.send_err(e);
    }

    /// Runs the task and answers it; returns the device time it used (other work run between its
    /// steps by `between` left out).
    fn run(
        self,
        pipeline: &Pipeline,
        between: Option<&mut dyn FnMut() -> Duration>,
        observer: Option<&StepObserver>,
    ) -> Duration {
        // Diffusion and encoding belong on the engine's own thread, never on the async runtime (every
        // local test runs through here, so a move onto the runtime fails them).
        debug_assert!(tokio::runtime::Handle::try_current().is_err(), "a local generation ran on the async runtime");
        let Task { model, plan, reply, cancel, abandoned, slot } = self;
        let Plan { mut params, edit, format, compression, resolved, credentials } = plan;
        let started = Instant::now();
        if let Some(pending) = &edit {
            match decode_edit(&pending.request, pending.strength) {
                Ok(e) => params.edit = Some(e),
                Err(e) => {
                    drop(slot);
                    reply.send_err(ProviderError::Api(e));
                    return started.elapsed();
                }
            }
        }
        let sender = match &reply {
            Reply::Stream(tx) => Some(tx),
            Reply::Complete(_) => None,
        };
        let signing = credentials.as_ref().map(|credentials| {
            let request = edit.as_ref().map(|e| &e.request);
            Signing {
                credentials,
                images: request.map(|r| r.images.iter().map(input).collect()).unwrap_or_default(),
                mask: request.and_then(|r| r.mask.as_ref()).map(input),
            }
        });
        let mut hooks = StreamHooks {
            between,
            nested: Duration::ZERO,
            observer,
            model: &model.name,
            step_started: Instant::now(),
            cancel: &cancel,
            abandoned: &abandoned,
            sender,
            format,
            compression,
            resolved,
            signing: signing.as_ref(),
        };
        let generated = pipeline.generate(&params, &mut hooks);
        let nested = hooks.nested;
        let used = || started.elapsed().saturating_sub(nested);
        let compute_ms = used().as_millis() as u64;
        let outcome = match generated {
            // Stopped between steps: what it had used until then is what the job incurred.
            Err(EngineError::Cancelled) => Err(ProviderError::Cancelled { compute_ms }),
            Err(e) => Err(engine_error(e, &model.name)),
            Ok(images) => images
                .iter()
                .map(|img| encode(img, format, compression, signing.as_ref(), None))
                .collect::<Result<Vec<_>, _>>(),
        };
        // Encoding and signing are part of the job's device time too.
        let compute = used();
        let compute_ms = compute.as_millis() as u64;
        tracing::info!(model = %model.name, ms = compute_ms, n = params.n, steps = params.steps, "local generation");
        let created = now();
        // The engine is done with this task: its place in the queue is free before the client hears.
        drop(slot);
        let b64s = match outcome {
            Ok(b64s) => b64s,
            Err(e) => {
                reply.send_err(e);
                return compute;
            }
        };
        match reply {
            Reply::Complete(tx) => {
                let images = b64s
                    .into_iter()
                    .map(|b| GeneratedImage { payload: ImagePayload::Base64(b), revised_prompt: None })
                    .collect();
                let result = ImageResult { created, images, resolved, usage: None, compute_ms: Some(compute_ms) };
                let _ = tx.send(Ok(result));
            }
            Reply::Stream(tx) => {
                // The measured time is billed once, with the first completed image.
                for (i, b64_json) in b64s.into_iter().enumerate() {
                    let compute_ms = Some(if i == 0 { compute_ms } else { 0 });
                    let event =
                        StreamEvent::Completed { b64_json, created_at: created, resolved, usage: None, compute_ms };
                    let _ = tx.send(Ok(event));
                }
            }
        }
        compute
    }
}

impl Reply {
    /// Hands the client an error (ignored when it has gone).
    fn send_err(self, e: ProviderError) {
        match self {
            Reply::Complete(tx) => {
                let _ = tx.send(Err(e));
            }
            Reply::Stream(tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

fn engine_error(e: EngineError, model: &str) -> ProviderError {
    let api = match e {
        EngineError::InvalidInput(msg) => ApiError::new(400, "invalid_request_error", None, Some("invalid_value"), msg),
        EngineError::Cancelled => ApiError::new(
            499,
            "invalid_request_error",
            None,
            Some("cancelled"),
            "The request was cancelled.".to_owned(),
        ),
        other => {
            tracing::error!(model, error = %other, "local generation failed");
            ApiError::new(
                500,
                "server_error",
                None,
                Some("generation_failed"),
                format!("The local model '{model}' failed to generate the image; the server log has the details."),
            )
        }
    };
    ProviderError::Api(api)
}

/// The image as base64 in `format`, signed when `signing` is given (`partial`: a partial image's index).
fn encode(
    img: &RgbImage,
    format: OutputFormat,
    compression: Option<u8>,
    signing: Option<&Signing<'_>>,
    partial: Option<u32>,
) -> Result<String, ProviderError> {
    let f = match format {
        OutputFormat::Png => Format::Png,
        OutputFormat::Jpeg => Format::Jpeg,
        OutputFormat::Webp => Format::Webp,
    };
    let mut bytes = engine::encode::encode(img, f, compression).map_err(|e| engine_error(e, "local"))?;
    if let Some(signing) = signing {
        // An image that should carry credentials never goes out without them.
        bytes = signing.sign(&bytes, format, partial).map_err(|e| {
            tracing::error!(model = %signing.credentials.model, error = %e, "an image could not be signed");
            ProviderError::Api(ApiError::new(
                500,
                "server_error",
                None,
                Some("signing_failed"),
                format!(
                    "The image from the local model '{}' could not be signed with its content credentials; the server log has the details.",
                    signing.credentials.model
                ),
            ))
        })?;
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_edit_sizes_keep_the_aspect_in_multiples_of_eight() {
        assert_eq!(fit((1254, 836), 8, 1024), Size::new(1024, 680));
        assert_eq!(fit((500, 300), 8, 1024), Size::new(496, 296));
        assert_eq!(fit((4000, 40), 8, 1024), Size::new(1024, 64));
    }

    #[test]
    fn profiles_map_quality_to_steps() {
        assert_eq!(Profile::TURBO.steps_for(Quality::Low), 1);
        assert_eq!(Profile::TURBO.steps_for(Quality::Auto), 2);
        assert_eq!(Profile::STANDARD.steps_for(Quality::High), 25);
        assert_eq!(Profile::STANDARD.sampler, Sampler::DpmSolver2mKarras);
        assert_eq!(Profile::guess("sd-turbo", Path::new("/m")), Profile::TURBO);
        assert_eq!(Profile::guess("x", Path::new("/m/sdxl-turbo")), Profile::TURBO);
        assert_eq!(Profile::guess("sd-1.5", Path::new("/m/x")), Profile::STANDARD);
        // The family decides first: a Z-Image checkpoint is not guessed from its name.
        let zimage = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/parity/zimage-tiny");
        assert_eq!(Profile::guess("sd-turbo", &zimage), Profile::Z_IMAGE);
        assert_eq!(Profile::Z_IMAGE.steps_for(Quality::High), 8);
    }

    #[test]
    fn a_standard_model_on_its_own_sampler_takes_the_steps_euler_needs() {
        let own = Profile::STANDARD.with_sampler("checkpoint").unwrap();
        assert_eq!((own.steps, own.sampler), ([15, 25, 40], Sampler::Checkpoint));
        assert_eq!(own.with_sampler("dpm++2m-karras").unwrap(), Profile::STANDARD);
        // Turbo models keep their steps whatever sampler is asked for.
        let turbo = Profile::TURBO.with_sampler("dpm++2m-karras").unwrap();
        assert_eq!((turbo.steps, turbo.sampler), ([1, 2, 4], Sampler::DpmSolver2mKarras));
        assert!(Profile::STANDARD.with_sampler("euler").unwrap_err().contains("'dpm++2m-karras'"));
    }
}

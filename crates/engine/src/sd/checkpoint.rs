//! Reading a diffusers-layout checkpoint: `model_index.json`, `unet/config.json`, `vae/config.json`,
//! `text_encoder/config.json`, `scheduler/scheduler_config.json`, and the weight files next to them.
//!
//! The architecture is read from these files, never assumed from a model's name, and anything the engine
//! cannot run is refused here with a message naming the file and the key (candle's own constructors
//! assert and would panic instead).

use std::path::{Path, PathBuf};

use candle_core::DType;
use candle_transformers::models::stable_diffusion::unet_2d::{BlockConfig, UNet2DConditionModelConfig};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;
use serde::Deserialize;

use crate::EngineError;
use crate::config::read_json;
use crate::text::clip::TextEncoderFile;
use crate::vae::VaeFile;

/// A number or one number per block, as diffusers writes `attention_head_dim` and friends.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(usize),
    Many(Vec<usize>),
}

impl OneOrMany {
    fn at(&self, i: usize) -> Option<usize> {
        match self {
            OneOrMany::One(v) => Some(*v),
            OneOrMany::Many(v) => v.get(i).copied(),
        }
    }
}

fn default_4() -> usize {
    4
}
fn default_2() -> usize {
    2
}
fn default_32() -> usize {
    32
}
fn default_1() -> usize {
    1
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_one_f() -> f64 {
    1.0
}
fn default_heads() -> OneOrMany {
    OneOrMany::One(8)
}

/// `unet/config.json`, the keys the engine reads.
#[derive(Debug, Clone, Deserialize)]
pub struct UnetFile {
    #[serde(default = "default_4")]
    pub in_channels: usize,
    #[serde(default = "default_4")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_2")]
    pub layers_per_block: usize,
    #[serde(default = "default_heads")]
    pub attention_head_dim: OneOrMany,
    pub cross_attention_dim: usize,
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    pub transformer_layers_per_block: Option<OneOrMany>,
    /// Heads per block when set (diffusers' `attention_head_dim` then really is the head count's
    /// fallback: SD checkpoints name the head count `attention_head_dim`).
    pub num_attention_heads: Option<OneOrMany>,
    /// `"text_time"` for SDXL: the pooled text embedding and six size ids join the time embedding.
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub class_embed_type: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_1")]
    pub downsample_padding: usize,
    #[serde(default = "default_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    /// Latent size the model was trained at (x8 for pixels).
    pub sample_size: Option<usize>,
}

/// `scheduler/scheduler_config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerFile {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "scaled_linear")]
    pub beta_schedule: String,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    /// Absent: the class's own default (`linspace` for the Euler samplers, `leading` for DDIM).
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// DDIM clamps its clean estimate to `±clip_sample_range` (absent: diffusers' default, on).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    /// Keys that change the schedule's math, which the engine does not implement: a config that sets
    /// one to anything but its default is refused by name (`Scheduler::new`), never run otherwise.
    #[serde(flatten)]
    pub other: std::collections::BTreeMap<String, serde_json::Value>,
}

impl SchedulerFile {
    /// Stable Diffusion's noise schedule (scaled linear betas 0.00085..0.012 over 1000 timesteps,
    /// epsilon, `steps_offset` 1, SD 1.5's config) for scheduler class `class`, at `spacing`
    /// (`None`: the class's default).
    pub fn stable_diffusion(class: &str, spacing: Option<&str>) -> SchedulerFile {
        SchedulerFile {
            class_name: class.into(),
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: "epsilon".into(),
            timestep_spacing: spacing.map(str::to_owned),
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: Some(false),
            clip_sample_range: 1.0,
            other: Default::default(),
        }
    }
}

fn one() -> f64 {
    1.0
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn scaled_linear() -> String {
    "scaled_linear".to_owned()
}
fn epsilon() -> String {
    "epsilon".to_owned()
}

/// `model_index.json`, the keys the engine reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndexFile {
    /// SDXL pipelines: an empty negative prompt means zero embeddings, not the empty prompt's.
    #[serde(default)]
    pub force_zeros_for_empty_prompt: bool,
}

/// A checkpoint directory whose configs have been read and checked.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub index: ModelIndexFile,
    pub unet: UnetFile,
    pub vae: VaeFile,
    pub text_encoder: TextEncoderFile,
    /// SDXL's second text encoder (`text_encoder_2/`), when the checkpoint has one.
    pub text_encoder_2: Option<TextEncoderFile>,
    pub scheduler: SchedulerFile,
}

/// The UNet's architecture: candle's block configuration plus SDXL's added conditioning.
#[derive(Debug, Clone)]
pub struct UnetConfig {
    pub blocks: UNet2DConditionModelConfig,
    pub in_channels: usize,
    pub out_channels: usize,
    pub text_time: Option<TextTimeConfig>,
}

/// SDXL's `addition_embed_type: "text_time"`: six size ids, each embedded sinusoidally in `time_dim`
/// channels, joined to the pooled text embedding (`pooled_dim`) and projected into the time embedding.
#[derive(Debug, Clone, Copy)]
pub struct TextTimeConfig {
    pub time_dim: usize,
    pub pooled_dim: usize,
}

/// SDXL's micro-conditioning ids: original height and width, crop top and left, target height and width.
pub const TIME_IDS: usize = 6;

impl Checkpoint {
    /// Reads and checks every config of the checkpoint at `dir`.
    pub fn open(dir: &Path) -> Result<Checkpoint, EngineError> {
        let second = dir.join("text_encoder_2");
        let ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            index: read_json(&dir.join("model_index.json"))?,
            unet: read_json(&dir.join("unet/config.json"))?,
            vae: read_json(&dir.join("vae/config.json"))?,
            text_encoder: read_json(&dir.join("text_encoder/config.json"))?,
            text_encoder_2: if second.is_dir() { Some(read_json(&second.join("config.json"))?) } else { None },
            scheduler: read_json(&dir.join("scheduler/scheduler_config.json"))?,
        };
        ckpt.unet_config()?;
        ckpt.vae_config()?;
        ckpt.check_text_encoder()?;
        // A scheduler config the engine cannot honour is refused now, by its key, not on every request.
        crate::scheduler::Scheduler::new(&ckpt.scheduler, 1)?;
        Ok(ckpt)
    }

    /// The weight file of a component: `diffusion_pytorch_model.safetensors` or `model.safetensors`,
    /// or their `.fp16` variants (the full-precision file first, where there are both).
    pub fn weights(&self, component: &str) -> Result<PathBuf, EngineError> {
        self.weights_for(component, DType::F32)
    }

    /// [`Checkpoint::weights`] for a component kept in `dtype`: an f16 one takes the `.fp16` file first
    /// when there are both (used in place, without converting, on the CPU), any other the full-precision
    /// one.
    pub fn weights_for(&self, component: &str, dtype: DType) -> Result<PathBuf, EngineError> {
        let stems = ["diffusion_pytorch_model", "model"];
        let variants = if dtype == DType::F16 { [".fp16", ""] } else { ["", ".fp16"] };
        for stem in stems {
            for variant in variants {
                let p = self.dir.join(component).join(format!("{stem}{variant}.safetensors"));
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(EngineError::MissingFile(self.dir.join(component).join("diffusion_pytorch_model.safetensors")))
    }

    /// The UNet's architecture, from `unet/config.json`.
    pub fn unet_config(&self) -> Result<UnetConfig, EngineError> {
        let u = &self.unet;
        let bad =
            |key: &str, why: String| EngineError::Unsupported { file: "unet/config.json".into(), key: key.into(), why };
        let text_time = match u.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => Some(self.text_time_config()?),
            Some(t) => {
                return Err(bad("addition_embed_type", format!("'{t}' is not supported (only 'text_time', SDXL's)")));
            }
        };
        if let Some(t) = &u.class_embed_type {
            return Err(bad("class_embed_type", format!("'{t}' (class-conditioned UNets) is not supported")));
        }
        if u.time_cond_proj_dim.is_some() {
            return Err(bad("time_cond_proj_dim", "guidance-embedded (LCM) UNets are not supported".into()));
        }
        let n = u.block_out_channels.len();
        if n == 0 || u.down_block_types.len() != n || u.up_block_types.len() != n {
            return Err(bad(
                "down_block_types",
                format!(
                    "block_out_channels, down_block_types and up_block_types must have the same non-zero length ({}, {}, {})",
                    n,
                    u.down_block_types.len(),
                    u.up_block_types.len()
                ),
            ));
        }
        let mut blocks = Vec::with_capacity(n);
        for (i, kind) in u.down_block_types.iter().enumerate() {
            let cross = match kind.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => return Err(bad(&format!("down_block_types[{i}]"), format!("'{other}' is not supported"))),
            };
            // candle builds the up path as the mirror of the down path: the config must say the same.
            let up = &u.up_block_types[n - 1 - i];
            let up_cross = match up.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => {
                    return Err(bad(&format!("up_block_types[{}]", n - 1 - i), format!("'{other}' is not supported")));
                }
            };
            if up_cross != cross {
                return Err(bad("up_block_types", "the up blocks must mirror the down blocks".into()));
            }
            let (heads_key, heads) = match &u.num_attention_heads {
                Some(h) => ("num_attention_heads", h),
                None => ("attention_head_dim", &u.attention_head_dim),
            };
            let heads = heads.at(i).ok_or_else(|| bad(heads_key, format!("no value for block {i}")))?;
            let layers = u.transformer_layers_per_block.as_ref().and_then(|t| t.at(i)).unwrap_or(1);
            let out_channels = u.block_out_channels[i];
            if heads == 0 || !out_channels.is_multiple_of(heads) {
                return Err(bad(
                    heads_key,
                    format!("block {i}: {out_channels} channels do not split into {heads} heads"),
                ));
            }
            if u.norm_num_groups == 0 || !out_channels.is_multiple_of(u.norm_num_groups) {
                return Err(bad(
                    "norm_num_groups",
                    format!("block {i}: {out_channels} channels do not split into {} groups", u.norm_num_groups),
                ));
            }
            blocks.push(BlockConfig {
                out_channels,
                use_cross_attn: cross.then_some(layers),
                attention_head_dim: heads,
            });
        }
        let blocks = UNet2DConditionModelConfig {
            center_input_sample: u.center_input_sample,
            flip_sin_to_cos: u.flip_sin_to_cos,
            freq_shift: u.freq_shift,
            blocks,
            layers_per_block: u.layers_per_block,
            downsample_padding: u.downsample_padding,
            mid_block_scale_factor: u.mid_block_scale_factor,
            norm_num_groups: u.norm_num_groups,
            norm_eps: u.norm_eps,
            cross_attention_dim: u.cross_attention_dim,
            sliced_attention_size: None,
            use_linear_projection: u.use_linear_projection,
        };
        Ok(UnetConfig { blocks, in_channels: u.in_channels, out_channels: u.out_channels, text_time })
    }

    /// SDXL's added conditioning: the pooled embedding of the second text encoder (its projection) and
    /// the six size ids must add up to the UNet's `projection_class_embeddings_input_dim`.
    fn text_time_config(&self) -> Result<TextTimeConfig, EngineError> {
        let u = &self.unet;
        let bad =
            |key: &str, why: String| EngineError::Unsupported { file: "unet/config.json".into(), key: key.into(), why };
        let pooler = self.text_encoder_2.as_ref().ok_or_else(|| {
            bad("addition_embed_type", "'text_time' needs a second text encoder (text_encoder_2/)".into())
        })?;
        let time_dim = u
            .addition_time_embed_dim
            .ok_or_else(|| bad("addition_time_embed_dim", "required with addition_embed_type 'text_time'".into()))?;
        let input_dim = u.projection_class_embeddings_input_dim.ok_or_else(|| {
            bad("projection_class_embeddings_input_dim", "required with addition_embed_type 'text_time'".into())
        })?;
        let pooled_dim = pooler.projection().unwrap_or(pooler.hidden_size);
        if time_dim == 0 || !time_dim.is_multiple_of(2) || pooled_dim + TIME_IDS * time_dim != input_dim {
            return Err(bad(
                "projection_class_embeddings_input_dim",
                format!(
                    "{input_dim} is not the pooled text embedding ({pooled_dim}) plus {TIME_IDS} size ids of \
                     {time_dim} channels (an SDXL refiner's aesthetic-score conditioning is not supported)"
                ),
            ));
        }
        Ok(TextTimeConfig { time_dim, pooled_dim })
    }

    pub fn vae_config(&self) -> Result<AutoEncoderKLConfig, EngineError> {
        self.vae.kl_config()
    }

    /// The VAE's latent scaling factor (0.18215 when the config does not say, as diffusers assumes).
    pub fn vae_scale(&self) -> f64 {
        self.vae.scaling_factor.unwrap_or(0.18215)
    }

    /// Pixels per latent: 2 to the number of VAE down blocks minus one (8 for every SD VAE).
    pub fn vae_factor(&self) -> usize {
        1 << (self.vae.block_out_channels.len().saturating_sub(1))
    }

    /// The size the model was trained at, in pixels.
    pub fn native_size(&self) -> usize {
        self.unet.sample_size.unwrap_or(64) * self.vae_factor()
    }

    /// The width of the UNet's text context: the encoders' hidden sizes side by side.
    pub fn context_dim(&self) -> usize {
        self.text_encoder.hidden_size + self.text_encoder_2.as_ref().map_or(0, |t| t.hidden_size)
    }

    fn check_text_encoder(&self) -> Result<(), EngineError> {
        check_encoder("text_encoder/config.json", &self.text_encoder)?;
        if let Some(second) = &self.text_encoder_2 {
            check_encoder("text_encoder_2/config.json", second)?;
            // SDXL reads both encoders' penultimate layer.
            for (file, t) in [("text_encoder/config.json", &self.text_encoder), ("text_encoder_2/config.json", second)]
            {
                if t.num_hidden_layers < 2 {
                    return Err(EngineError::Unsupported {
                        file: file.into(),
                        key: "num_hidden_layers".into(),
                        why: "SDXL reads the penultimate layer: at least 2 are needed".into(),
                    });
                }
            }
        }
        if self.context_dim() != self.unet.cross_attention_dim {
            let (file, key) = match &self.text_encoder_2 {
                Some(_) => ("text_encoder_2/config.json", "hidden_size"),
                None => ("text_encoder/config.json", "hidden_size"),
            };
            return Err(EngineError::Unsupported {
                file: file.into(),
                key: key.into(),
                why: format!(
                    "the text context is {} wide but the UNet's cross_attention_dim is {}",
                    self.context_dim(),
                    self.unet.cross_attention_dim
                ),
            });
        }
        Ok(())
    }
}

fn check_encoder(file: &str, t: &TextEncoderFile) -> Result<(), EngineError> {
    let bad = |key: &str, why: String| EngineError::Unsupported { file: file.into(), key: key.into(), why };
    if !matches!(t.hidden_act.as_str(), "quick_gelu" | "gelu") {
        return Err(bad("hidden_act", format!("'{}' is not one of 'quick_gelu', 'gelu'", t.hidden_act)));
    }
    if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
        return Err(bad(
            "num_attention_heads",
            format!("{} does not divide hidden_size {}", t.num_attention_heads, t.hidden_size),
        ));
    }
    Ok(())
}

//! The KL autoencoder (diffusers' `AutoencoderKL`) every family decodes its latents with: SD's
//! 4-channel VAEs and FLUX's 16-channel one (Z-Image's), read from `vae/config.json`.

pub mod decoder;
pub mod encoder;

use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;
use serde::Deserialize;

use crate::EngineError;

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeFile {
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_2")]
    pub layers_per_block: usize,
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    /// 0.18215 for SD 1/2, 0.13025 for SDXL: always read, never assumed.
    pub scaling_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// The VAE overflows in f16 (SDXL's): it runs in f32 on GPUs too.
    #[serde(default)]
    pub force_upcast: bool,
    /// Subtracted from latents before scaling (FLUX's VAE, 0.1159); none for SD's.
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

impl VaeFile {
    /// The KL autoencoder's architecture, refusing block sizes its group norms cannot divide.
    pub fn kl_config(&self) -> Result<AutoEncoderKLConfig, EngineError> {
        let v = self;
        if v.block_out_channels.is_empty()
            || v.norm_num_groups == 0
            || v.block_out_channels.iter().any(|c| !c.is_multiple_of(v.norm_num_groups))
        {
            return Err(EngineError::Unsupported {
                file: "vae/config.json".into(),
                key: "block_out_channels".into(),
                why: format!("every entry must be a non-zero multiple of norm_num_groups ({})", v.norm_num_groups),
            });
        }
        Ok(AutoEncoderKLConfig {
            block_out_channels: v.block_out_channels.clone(),
            layers_per_block: v.layers_per_block,
            latent_channels: v.latent_channels,
            norm_num_groups: v.norm_num_groups,
            use_quant_conv: v.use_quant_conv,
            use_post_quant_conv: v.use_post_quant_conv,
        })
    }

    /// Pixels per latent: 2 to the number of down blocks minus one (8 for every SD and FLUX VAE).
    pub fn factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

fn default_2() -> usize {
    2
}
fn default_4() -> usize {
    4
}
fn default_32() -> usize {
    32
}
fn default_true() -> bool {
    true
}

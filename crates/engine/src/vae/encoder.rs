//! The VAE's encoder half, for edits: pixels to latents.
//!
//! candle's `AutoEncoderKL::encode` returns a distribution whose mean is private and whose sampling draws
//! from an unseedable RNG; here the encoder returns the distribution itself (mean and standard deviation),
//! and the pipeline samples it with the request's seeded noise as diffusers' pipelines do
//! (`latent_dist.sample(generator)`). Built from candle's public blocks with the same tensor names as the
//! real VAE.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;

pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    latent_channels: usize,
}

impl VaeEncoder {
    /// `vb` is the VAE's root (the one holding `encoder.*` and `quant_conv.*`).
    pub fn new(vb: VarBuilder, c: &AutoEncoderKLConfig) -> Result<VaeEncoder> {
        let enc = vb.pp("encoder");
        let padded = Conv2dConfig { padding: 1, ..Default::default() };
        let channels = &c.block_out_channels;
        let first = channels.first().copied().unwrap_or(0);
        let last = channels.last().copied().unwrap_or(0);
        let conv_in = candle_nn::conv2d(3, first, 3, padded, enc.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (i, &out) in channels.iter().enumerate() {
            let input = if i == 0 { first } else { channels[i - 1] };
            let cfg = DownEncoderBlock2DConfig {
                num_layers: c.layers_per_block,
                resnet_eps: 1e-6,
                resnet_groups: c.norm_num_groups,
                add_downsample: i + 1 < channels.len(),
                downsample_padding: 0,
                ..Default::default()
            };
            down_blocks.push(DownEncoderBlock2D::new(enc.pp("down_blocks").pp(i.to_string()), input, out, cfg)?);
        }
        let mid_cfg = UNetMidBlock2DConfig {
            resnet_eps: 1e-6,
            output_scale_factor: 1.0,
            attn_num_head_channels: None,
            resnet_groups: Some(c.norm_num_groups),
            ..Default::default()
        };
        let mid_block = UNetMidBlock2D::new(enc.pp("mid_block"), last, None, mid_cfg)?;
        let norm_out = candle_nn::group_norm(c.norm_num_groups, last, 1e-6, enc.pp("conv_norm_out"))?;
        let latent = c.latent_channels;
        let conv_out = candle_nn::conv2d(last, 2 * latent, 3, padded, enc.pp("conv_out"))?;
        let quant_conv = if c.use_quant_conv {
            Some(candle_nn::conv2d(2 * latent, 2 * latent, 1, Default::default(), vb.pp("quant_conv"))?)
        } else {
            None
        };
        Ok(VaeEncoder { conv_in, down_blocks, mid_block, norm_out, conv_out, quant_conv, latent_channels: latent })
    }

    /// The latent distribution of `pixels` (`[batch, 3, h, w]` in -1..1), unscaled: its mean and standard
    /// deviation, each `[batch, latent_channels, h / 8, w / 8]`. As diffusers'
    /// `DiagonalGaussianDistribution`: the log-variance is clamped to -30..20 before `std = exp(logvar / 2)`.
    pub fn encode(&self, pixels: &Tensor) -> Result<LatentDist> {
        let mut xs = self.conv_in.forward(pixels)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.mid_block.forward(&xs, None)?;
        let xs = candle_nn::ops::silu(&self.norm_out.forward(&xs)?)?;
        let mut moments = self.conv_out.forward(&xs)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let mean = moments.narrow(1, 0, self.latent_channels)?;
        let std = (moments.narrow(1, self.latent_channels, self.latent_channels)?.clamp(-30.0, 20.0)? * 0.5)?.exp()?;
        Ok(LatentDist { mean, std })
    }
}

/// A diagonal gaussian over latents.
#[derive(Debug, Clone)]
pub struct LatentDist {
    pub mean: Tensor,
    pub std: Tensor,
}

impl LatentDist {
    /// `mean + std * noise`, with `noise` unit gaussian of the mean's shape (or a batch of them, when the
    /// distribution has batch 1).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.broadcast_add(&self.std.broadcast_mul(noise)?)
    }
}

//! The VAE decoder (diffusers' `AutoencoderKL`: `post_quant_conv`, then `decoder.*`) on the engine's
//! own layers, so its convolutions and norms run on imagegate's kernels. Three quarters of a
//! one-step generation is this decoder: 2.5 TFLOP at 512x512, nearly all of it 3x3 convolutions at
//! 128-512 channels.

use crate::weights::Weights;
use candle_core::{Result, Tensor};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;

use crate::layers::{Activation, Conv, GroupNorm, Kernels, Resnet, ResnetConfig, Upsample, VaeAttention};

const EPS: f64 = 1e-6;

struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Upsample>,
}

pub struct VaeDecoder {
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid: (Resnet, VaeAttention, Resnet),
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl VaeDecoder {
    /// Reads the decoder from the VAE's weights (`vb` at the file's root).
    pub fn load(vb: Weights, config: &AutoEncoderKLConfig, kernels: Kernels) -> Result<VaeDecoder> {
        let channels = &config.block_out_channels;
        let (Some(&first), Some(&last)) = (channels.first(), channels.last()) else {
            candle_core::bail!("vae/config.json: block_out_channels is empty")
        };
        let latent = config.latent_channels;
        let groups = config.norm_num_groups;
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv::load(vb.pp("post_quant_conv"), (latent, latent), 1, 1, 0, kernels)?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let resnet = |cin, cout| ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups,
            eps: EPS,
            output_scale: 1.0,
        };
        let mid_vb = vb.pp("mid_block");
        let mid = (
            Resnet::load(mid_vb.pp("resnets.0"), resnet(last, last), kernels)?,
            VaeAttention::load(mid_vb.pp("attentions.0"), last, groups, kernels)?,
            Resnet::load(mid_vb.pp("resnets.1"), resnet(last, last), kernels)?,
        );
        let mut up = Vec::with_capacity(channels.len());
        let mut cin = last;
        for (i, &cout) in channels.iter().rev().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let mut resnets = Vec::with_capacity(config.layers_per_block + 1);
            for j in 0..=config.layers_per_block {
                let input = if j == 0 { cin } else { cout };
                resnets.push(Resnet::load(vb.pp("resnets").pp(j), resnet(input, cout), kernels)?);
            }
            let upsample =
                if i + 1 < channels.len() { Some(Upsample::load(vb.pp("upsamplers.0"), cout, kernels)?) } else { None };
            up.push(UpBlock { resnets, upsample });
            cin = cout;
        }
        Ok(VaeDecoder {
            post_quant_conv,
            conv_in: Conv::same3(vb.pp("conv_in"), (latent, last), kernels)?,
            mid,
            up,
            norm_out: GroupNorm::load(vb.pp("conv_norm_out"), groups, first, EPS, kernels)?,
            conv_out: Conv::same3(vb.pp("conv_out"), (first, 3), kernels)?,
        })
    }

    /// Unscaled latents `[n, latent, h, w]` to pixels `[n, 3, 8h, 8w]` in about -1..1.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        let mut xs = self.conv_in.forward(&xs)?;
        xs = self.mid.0.forward(&xs, None)?;
        xs = self.mid.1.forward(&xs)?;
        xs = self.mid.2.forward(&xs, None)?;
        for block in &self.up {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(up) = &block.upsample {
                xs = up.forward(&xs, None)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&xs, Activation::Silu)?)
    }
}

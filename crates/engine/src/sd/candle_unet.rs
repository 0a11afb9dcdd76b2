//! The conditional UNet assembled from candle's own down, mid and up blocks: the reference the
//! engine's [`crate::sd::unet::Unet`] (which runs on imagegate's kernels) is tested against, and the module
//! the tests' tiny checkpoints are written from, so that their tensor names come from an
//! implementation independent of the engine's. SDXL's added conditioning (`addition_embed_type:
//! "text_time"`) joins the time embedding here too.
//!
//! candle's own `UNet2DConditionModel` has no place for that conditioning and silently ignores the
//! `add_embedding` tensors of SDXL checkpoints; this one reads them whenever the config asks for them, so
//! a checkpoint without them fails to load with the tensor named.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d::BlockConfig;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D, CrossAttnUpBlock2DConfig, DownBlock2D,
    DownBlock2DConfig, UNetMidBlock2DCrossAttn, UNetMidBlock2DCrossAttnConfig, UpBlock2D, UpBlock2DConfig,
};

use crate::sd::checkpoint::{TIME_IDS, TextTimeConfig, UnetConfig};
use crate::sd::unet::AddedCond;

enum Down {
    Basic(DownBlock2D),
    CrossAttn(CrossAttnDownBlock2D),
}

enum Up {
    Basic(UpBlock2D),
    CrossAttn(CrossAttnUpBlock2D),
}

impl Up {
    fn resnets(&self) -> usize {
        match self {
            Up::Basic(b) => b.resnets.len(),
            Up::CrossAttn(b) => b.upblock.resnets.len(),
        }
    }
}

/// SDXL's added conditioning: the size ids embedded like timesteps, joined to the pooled text
/// embedding, through a two-layer MLP into the time embedding's width.
struct TextTime {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
    config: TextTimeConfig,
}

pub struct Unet {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTime>,
    down: Vec<Down>,
    mid: UNetMidBlock2DCrossAttn,
    up: Vec<Up>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    center_input_sample: bool,
}

impl Unet {
    pub fn new(vb: VarBuilder, config: &UnetConfig, use_flash_attn: bool) -> Result<Unet> {
        let c = &config.blocks;
        let (Some(first), Some(last)) = (c.blocks.first(), c.blocks.last()) else {
            return Err(candle_core::Error::Msg("a UNet needs at least one block".into()));
        };
        let n = c.blocks.len();
        let base = first.out_channels;
        let time_dim = base * 4;
        let pad1 = Conv2dConfig { padding: 1, ..Default::default() };
        let conv_in = candle_nn::conv2d(config.in_channels, base, 3, pad1, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(base, c.flip_sin_to_cos, c.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), base, time_dim)?;
        let text_time = match config.text_time {
            Some(tt) => Some(TextTime {
                time_proj: Timesteps::new(tt.time_dim, c.flip_sin_to_cos, c.freq_shift),
                embedding: TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    tt.pooled_dim + TIME_IDS * tt.time_dim,
                    time_dim,
                )?,
                config: tt,
            }),
            None => None,
        };

        let mut down = Vec::with_capacity(n);
        for (i, block) in c.blocks.iter().enumerate() {
            let in_channels = if i > 0 { c.blocks[i - 1].out_channels } else { base };
            let basic = DownBlock2DConfig {
                num_layers: c.layers_per_block,
                resnet_eps: c.norm_eps,
                resnet_groups: c.norm_num_groups,
                add_downsample: i + 1 < n,
                downsample_padding: c.downsample_padding,
                ..Default::default()
            };
            let vb = vb.pp("down_blocks").pp(i);
            down.push(match block.use_cross_attn {
                Some(layers) => {
                    let cfg = CrossAttnDownBlock2DConfig {
                        downblock: basic,
                        attn_num_head_channels: block.attention_head_dim,
                        cross_attention_dim: c.cross_attention_dim,
                        sliced_attention_size: None,
                        use_linear_projection: c.use_linear_projection,
                        transformer_layers_per_block: layers,
                    };
                    let b = CrossAttnDownBlock2D::new(
                        vb,
                        in_channels,
                        block.out_channels,
                        Some(time_dim),
                        use_flash_attn,
                        cfg,
                    )?;
                    Down::CrossAttn(b)
                }
                None => Down::Basic(DownBlock2D::new(vb, in_channels, block.out_channels, Some(time_dim), basic)?),
            });
        }

        let mid_cfg = UNetMidBlock2DCrossAttnConfig {
            resnet_eps: c.norm_eps,
            output_scale_factor: c.mid_block_scale_factor,
            cross_attn_dim: c.cross_attention_dim,
            attn_num_head_channels: last.attention_head_dim,
            resnet_groups: Some(c.norm_num_groups),
            use_linear_projection: c.use_linear_projection,
            transformer_layers_per_block: last.use_cross_attn.unwrap_or(1),
            ..Default::default()
        };
        let mid = UNetMidBlock2DCrossAttn::new(
            vb.pp("mid_block"),
            last.out_channels,
            Some(time_dim),
            use_flash_attn,
            mid_cfg,
        )?;

        // The up path mirrors the down path: up block i undoes down block n-1-i.
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let block: BlockConfig = c.blocks[n - 1 - i];
            let prev_out = if i > 0 { c.blocks[n - i].out_channels } else { last.out_channels };
            let skip_in = c.blocks[if i + 1 == n { 0 } else { n - i - 2 }].out_channels;
            let basic = UpBlock2DConfig {
                num_layers: c.layers_per_block + 1,
                resnet_eps: c.norm_eps,
                resnet_groups: c.norm_num_groups,
                add_upsample: i + 1 < n,
                ..Default::default()
            };
            let vb = vb.pp("up_blocks").pp(i);
            up.push(match block.use_cross_attn {
                Some(layers) => {
                    let cfg = CrossAttnUpBlock2DConfig {
                        upblock: basic,
                        attn_num_head_channels: block.attention_head_dim,
                        cross_attention_dim: c.cross_attention_dim,
                        sliced_attention_size: None,
                        use_linear_projection: c.use_linear_projection,
                        transformer_layers_per_block: layers,
                    };
                    let b = CrossAttnUpBlock2D::new(
                        vb,
                        skip_in,
                        prev_out,
                        block.out_channels,
                        Some(time_dim),
                        use_flash_attn,
                        cfg,
                    )?;
                    Up::CrossAttn(b)
                }
                None => Up::Basic(UpBlock2D::new(vb, skip_in, prev_out, block.out_channels, Some(time_dim), basic)?),
            });
        }

        let norm_out = candle_nn::group_norm(c.norm_num_groups, base, c.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = candle_nn::conv2d(base, config.out_channels, 3, pad1, vb.pp("conv_out"))?;
        Ok(Unet {
            conv_in,
            time_proj,
            time_embedding,
            text_time,
            down,
            mid,
            up,
            norm_out,
            conv_out,
            center_input_sample: c.center_input_sample,
        })
    }

    /// Whether the model needs [`AddedCond`] (SDXL).
    pub fn needs_added_cond(&self) -> bool {
        self.text_time.is_some()
    }

    /// The predicted noise (or velocity) for latents `xs` at `timestep`, given the text `context`.
    pub fn forward(&self, xs: &Tensor, timestep: f64, context: &Tensor, added: Option<&AddedCond>) -> Result<Tensor> {
        let (batch, _, height, width) = xs.dims4()?;
        let xs = if self.center_input_sample { ((xs * 2.0)? - 1.0)? } else { xs.clone() };
        let t = (Tensor::ones(batch, xs.dtype(), xs.device())? * timestep)?;
        let mut emb = self.time_embedding.forward(&self.time_proj.forward(&t)?)?;
        match (&self.text_time, added) {
            (Some(tt), Some(a)) => {
                let ids = a.time_ids.flatten_all()?.to_dtype(DType::F32)?;
                let ids = tt.time_proj.forward(&ids)?.reshape((batch, TIME_IDS * tt.config.time_dim))?;
                let joined = Tensor::cat(&[&a.text_embeds.to_dtype(emb.dtype())?, &ids.to_dtype(emb.dtype())?], 1)?;
                emb = (emb + tt.embedding.forward(&joined)?)?;
            }
            (Some(_), None) => {
                return Err(candle_core::Error::Msg(
                    "this UNet needs the pooled text embedding and size ids (SDXL conditioning)".into(),
                ));
            }
            (None, _) => {}
        }

        let xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        let mut xs = xs;
        for block in &self.down {
            let (out, res) = match block {
                Down::Basic(b) => b.forward(&xs, Some(&emb))?,
                Down::CrossAttn(b) => b.forward(&xs, Some(&emb), Some(context))?,
            };
            skips.extend(res);
            xs = out;
        }
        xs = self.mid.forward(&xs, Some(&emb), Some(context))?;

        // Latent sides the down path did not halve evenly: upsample to the skip's size, not 2x.
        let factor = 1usize << self.up.len().saturating_sub(1);
        let odd = !height.is_multiple_of(factor) || !width.is_multiple_of(factor);
        let last = self.up.len().saturating_sub(1);
        for (i, block) in self.up.iter().enumerate() {
            let take = block.resnets().min(skips.len());
            let res = skips.split_off(skips.len() - take);
            let size = match skips.last() {
                Some(s) if odd && i < last => {
                    let (_, _, h, w) = s.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            xs = match block {
                Up::Basic(b) => b.forward(&xs, &res, Some(&emb), size)?,
                Up::CrossAttn(b) => b.forward(&xs, &res, Some(&emb), size, Some(context))?,
            };
        }
        let xs = candle_nn::ops::silu(&self.norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}

//! The conditional UNet (diffusers' `UNet2DConditionModel`) on the engine's own layers, so that its
//! convolutions, group norms and attention run on imagegate's kernels; with SDXL's added conditioning
//! (`addition_embed_type: "text_time"`) joining the time embedding.
//!
//! It reads the tensors of diffusers checkpoints under their names. The tests check it against
//! [`crate::sd::candle_unet`], the same UNet assembled from candle's blocks.

use crate::weights::Weights;
use candle_core::{D, DType, Module, Result, Tensor};
use candle_transformers::models::stable_diffusion::embeddings::Timesteps;

use crate::layers::{
    Activation, Conv, GroupNorm, Kernels, LayerNorm, Linear, Resnet, ResnetConfig, Upsample, attention, geglu,
};
use crate::sd::checkpoint::{TIME_IDS, TextTimeConfig, UnetConfig};

/// Multi-head attention: self-attention (`attn1`) or cross-attention on the text context (`attn2`).
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    kernels: Kernels,
}

impl Attention {
    fn load(vb: Weights, dim: usize, context_dim: usize, heads: usize, kernels: Kernels) -> Result<Attention> {
        Ok(Attention {
            q: Linear::load(vb.pp("to_q"), dim, dim, false)?,
            k: Linear::load(vb.pp("to_k"), context_dim, dim, false)?,
            v: Linear::load(vb.pp("to_v"), context_dim, dim, false)?,
            out: Linear::load(vb.pp("to_out.0"), dim, dim, true)?,
            heads,
            kernels,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        // The heads' layout copies run on every thread (`kernels::contiguous`); reshaping a transposed
        // tensor would have candle copy it on one.
        let split = |t: Tensor| -> Result<Tensor> {
            let (b, n, c) = t.dims3()?;
            let heads = t.reshape((b, n, self.heads, c / self.heads))?.transpose(1, 2)?;
            kernels::contiguous(&heads)?.reshape((b * self.heads, n, c / self.heads))
        };
        let (b, n, c) = xs.dims3()?;
        let d = c / self.heads;
        let dtype = xs.dtype();
        let f32 = |t: Tensor| -> Result<Tensor> { split(t)?.to_dtype(DType::F32) };
        let q = f32(self.q.forward(xs)?)?;
        let k = f32(self.k.forward(context)?)?;
        let v = f32(self.v.forward(context)?)?;
        let att = attention(&q, &k, &v, 1.0 / (d as f64).sqrt(), self.kernels)?.to_dtype(dtype)?;
        let att = kernels::contiguous(&att.reshape((b, self.heads, n, d))?.transpose(1, 2)?)?.reshape((b, n, c))?;
        self.out.forward(&att)
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each after a
/// layer norm and added to its input.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    kernels: Kernels,
}

impl TransformerBlock {
    fn load(vb: Weights, dim: usize, context_dim: usize, heads: usize, kernels: Kernels) -> Result<TransformerBlock> {
        let inner = 4 * dim;
        Ok(TransformerBlock {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(vb.pp("attn1"), dim, dim, heads, kernels)?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(vb.pp("attn2"), dim, context_dim, heads, kernels)?,
            norm3: LayerNorm::load(vb.pp("norm3"), dim, 1e-5)?,
            ff_in: Linear::load(vb.pp("ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: Linear::load(vb.pp("ff.net.2"), inner, dim, true)?,
            kernels,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(xs)?;
        let xs = (self.attn1.forward(&h, &h)? + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, context)? + &xs)?;
        let gated = self.ff_in.forward(&self.norm3.forward(&xs)?)?;
        let ff = self.ff_out.forward(&geglu(&gated, self.kernels)?)?;
        ff + xs
    }
}

/// The input and output projections of a [`SpatialTransformer`]: 1x1 convolutions (SD 1.x) or linears
/// on the tokens (`use_linear_projection`, SD 2.x and SDXL).
enum Proj {
    Conv(Conv),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel`: group norm, projection to tokens, transformer blocks, projection
/// back, added to the input.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    fn load(vb: Weights, channels: usize, heads: usize, depth: usize, c: &Sizes) -> Result<SpatialTransformer> {
        let proj = |name: &str| -> Result<Proj> {
            Ok(if c.linear_projection {
                Proj::Linear(Linear::load(vb.pp(name), channels, channels, true)?)
            } else {
                Proj::Conv(Conv::load(vb.pp(name), (channels, channels), 1, 1, 0, c.kernels)?)
            })
        };
        let blocks = (0..depth)
            .map(|i| {
                TransformerBlock::load(vb.pp("transformer_blocks").pp(i), channels, c.context_dim, heads, c.kernels)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SpatialTransformer {
            norm: GroupNorm::load(vb.pp("norm"), c.groups, channels, 1e-6, c.kernels)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs, Activation::None)?;
        let to_tokens = |t: &Tensor| kernels::contiguous(&t.reshape((b, c, h * w))?.transpose(1, 2)?);
        let mut tokens = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Proj::Linear(linear) => linear.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image = |t: &Tensor| t.transpose(1, 2)?.reshape((b, c, h, w));
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&kernels::contiguous(&to_image(&tokens)?)?)?,
            Proj::Linear(linear) => kernels::contiguous(&to_image(&linear.forward(&tokens)?)?)?,
        };
        out + xs
    }
}

/// What every block of one UNet shares.
struct Sizes {
    temb: usize,
    groups: usize,
    eps: f64,
    context_dim: usize,
    linear_projection: bool,
    kernels: Kernels,
}

impl Sizes {
    fn resnet(&self, cin: usize, cout: usize, output_scale: f64) -> ResnetConfig {
        ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(self.temb),
            groups: self.groups,
            eps: self.eps,
            output_scale,
        }
    }
}

/// A down block: resnets (each followed by a transformer in cross-attention blocks), then a stride-2
/// convolution except in the last block. Every output is kept for the up path's skips.
struct DownBlock {
    layers: Vec<(Resnet, Option<SpatialTransformer>)>,
    downsample: Option<Conv>,
    /// `downsample_padding: 0` pads the right and bottom by one before an unpadded convolution.
    pad_before_downsample: bool,
}

/// An up block: resnets on the input joined to a skip (each followed by a transformer in
/// cross-attention blocks), then an upsampler except in the last block.
struct UpBlock {
    layers: Vec<(Resnet, Option<SpatialTransformer>)>,
    upsample: Option<Upsample>,
}

/// diffusers' `TimestepEmbedding`: linear, SiLU, linear.
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: Weights, channels: usize, dim: usize) -> Result<TimestepEmbedding> {
        Ok(TimestepEmbedding {
            linear_1: Linear::load(vb.pp("linear_1"), channels, dim, true)?,
            linear_2: Linear::load(vb.pp("linear_2"), dim, dim, true)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&candle_nn::ops::silu(&self.linear_1.forward(xs)?)?)
    }
}

/// SDXL's added conditioning: the size ids embedded like timesteps, joined to the pooled text
/// embedding, through a two-layer MLP into the time embedding's width.
struct TextTime {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
    config: TextTimeConfig,
}

/// The extra inputs of a UNet with `text_time` conditioning, one row per image of the batch.
pub struct AddedCond {
    /// The second text encoder's pooled, projected output, `[batch, pooled_dim]`.
    pub text_embeds: Tensor,
    /// Original height and width, crop top and left, target height and width, `[batch, 6]`.
    pub time_ids: Tensor,
}

pub struct Unet {
    conv_in: Conv,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTime>,
    down: Vec<DownBlock>,
    mid: (Resnet, Vec<(SpatialTransformer, Resnet)>),
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
    center_input_sample: bool,
}

impl Unet {
    pub fn new(vb: Weights, config: &UnetConfig, kernels: Kernels) -> Result<Unet> {
        let c = &config.blocks;
        let (Some(first), Some(last)) = (c.blocks.first(), c.blocks.last()) else {
            candle_core::bail!("a UNet needs at least one block")
        };
        let n = c.blocks.len();
        let base = first.out_channels;
        let time_dim = base * 4;
        let sizes = Sizes {
            temb: time_dim,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            context_dim: c.cross_attention_dim,
            linear_projection: c.use_linear_projection,
            kernels,
        };
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
        let mut cin = base;
        for (i, block) in c.blocks.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let cout = block.out_channels;
            let mut layers = Vec::with_capacity(c.layers_per_block);
            for j in 0..c.layers_per_block {
                let input = if j == 0 { cin } else { cout };
                let resnet = Resnet::load(vb.pp("resnets").pp(j), sizes.resnet(input, cout, 1.0), kernels)?;
                let attn = block
                    .use_cross_attn
                    .map(|depth| {
                        let heads = block.attention_head_dim.max(1);
                        SpatialTransformer::load(vb.pp("attentions").pp(j), cout, heads, depth, &sizes)
                    })
                    .transpose()?;
                layers.push((resnet, attn));
            }
            let downsample = if i + 1 < n {
                let padding = c.downsample_padding;
                Some(Conv::load(vb.pp("downsamplers.0.conv"), (cout, cout), 3, 2, padding, kernels)?)
            } else {
                None
            };
            down.push(DownBlock { layers, downsample, pad_before_downsample: c.downsample_padding == 0 });
            cin = cout;
        }

        let mid_vb = vb.pp("mid_block");
        let top = last.out_channels;
        let scale = c.mid_block_scale_factor;
        let mid_first = Resnet::load(mid_vb.pp("resnets.0"), sizes.resnet(top, top, scale), kernels)?;
        let depth = last.use_cross_attn.unwrap_or(1);
        let heads = last.attention_head_dim.max(1);
        let mid_rest = vec![(
            SpatialTransformer::load(mid_vb.pp("attentions.0"), top, heads, depth, &sizes)?,
            Resnet::load(mid_vb.pp("resnets.1"), sizes.resnet(top, top, scale), kernels)?,
        )];

        // The up path mirrors the down path: up block i undoes down block n-1-i.
        let mut up = Vec::with_capacity(n);
        let mut prev = top;
        for i in 0..n {
            let block = c.blocks[n - 1 - i];
            let cout = block.out_channels;
            // The channels of the down block below this one: the last skip this block takes.
            let below = c.blocks[(n - 1 - i).saturating_sub(1)].out_channels;
            let vb = vb.pp("up_blocks").pp(i);
            let layers_n = c.layers_per_block + 1;
            let mut layers = Vec::with_capacity(layers_n);
            for j in 0..layers_n {
                let skip = if j + 1 == layers_n { below } else { cout };
                let input = if j == 0 { prev } else { cout };
                let resnet = Resnet::load(vb.pp("resnets").pp(j), sizes.resnet(input + skip, cout, 1.0), kernels)?;
                let attn = block
                    .use_cross_attn
                    .map(|depth| {
                        let heads = block.attention_head_dim.max(1);
                        SpatialTransformer::load(vb.pp("attentions").pp(j), cout, heads, depth, &sizes)
                    })
                    .transpose()?;
                layers.push((resnet, attn));
            }
            let upsample = if i + 1 < n { Some(Upsample::load(vb.pp("upsamplers.0"), cout, kernels)?) } else { None };
            up.push(UpBlock { layers, upsample });
            prev = cout;
        }

        Ok(Unet {
            conv_in: Conv::same3(vb.pp("conv_in"), (config.in_channels, base), kernels)?,
            time_proj: Timesteps::new(base, c.flip_sin_to_cos, c.freq_shift),
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), base, time_dim)?,
            text_time,
            down,
            mid: (mid_first, mid_rest),
            up,
            norm_out: GroupNorm::load(vb.pp("conv_norm_out"), c.norm_num_groups, base, c.norm_eps, kernels)?,
            conv_out: Conv::same3(vb.pp("conv_out"), (base, config.out_channels), kernels)?,
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
                candle_core::bail!("this UNet needs the pooled text embedding and size ids (SDXL conditioning)")
            }
            (None, _) => {}
        }
        // Every resnet applies SiLU to the embedding before its projection: do it once.
        let temb = candle_nn::ops::silu(&emb)?;
        let temb = Some(&temb);

        let mut xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for (resnet, attn) in &block.layers {
                xs = resnet.forward(&xs, temb)?;
                if let Some(attn) = attn {
                    xs = attn.forward(&xs, context)?;
                }
                skips.push(xs.clone());
            }
            if let Some(conv) = &block.downsample {
                if block.pad_before_downsample {
                    xs = xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
                }
                xs = conv.forward(&xs)?;
                skips.push(xs.clone());
            }
        }
        xs = self.mid.0.forward(&xs, temb)?;
        for (attn, resnet) in &self.mid.1 {
            xs = resnet.forward(&attn.forward(&xs, context)?, temb)?;
        }

        // Latent sides the down path did not halve evenly: upsample to the skip's size, not 2x.
        let factor = 1usize << self.up.len().saturating_sub(1);
        let odd = !height.is_multiple_of(factor) || !width.is_multiple_of(factor);
        for block in &self.up {
            for (resnet, attn) in &block.layers {
                let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet skip stack is empty".into()))?;
                xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, temb)?;
                if let Some(attn) = attn {
                    xs = attn.forward(&xs, context)?;
                }
            }
            if let Some(up) = &block.upsample {
                let size = match skips.last() {
                    Some(s) if odd => {
                        let (_, _, h, w) = s.dims4()?;
                        Some((h, w))
                    }
                    _ => None,
                };
                xs = up.forward(&xs, size)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&xs, Activation::Silu)?)
    }
}

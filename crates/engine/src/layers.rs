//! The building blocks the engine's own VAE decoder and UNet are made of, on imagegate's CPU kernels.
//!
//! candle's Stable Diffusion blocks hold `candle_nn::Conv2d` and `GroupNorm`, which run candle's CPU
//! convolution (a whole-image im2col then one gemm, 2-3x behind PyTorch) and group norm (eight tensor
//! passes). These layers load the same tensors under the same names and run them on [`kernels`]:
//! Winograd and blocked convolutions, a one-pass group norm fused with SiLU, attention in query
//! chunks. With [`Kernels::Reference`] every layer runs candle's own op instead, which the tests use
//! to check the fast path against; other devices and dtypes always take candle's ops.
//!
//! Every layer computes in its input's dtype and keeps its tensors in the dtype they were loaded in:
//! on the CPU the big weights can stay in f16 (half the memory) and are widened to f32 one layer at a
//! time, just before use ([`cast`]).

use crate::weights::{Param, Weights};
use candle_core::{D, DType, Module, Result, Tensor};

pub use kernels::{Activation, Fused};

/// Which implementation the layers run on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// imagegate's kernels for f32 CPU tensors (candle's ops elsewhere).
    #[default]
    Fast,
    /// candle's own ops everywhere: the reference the fast path is tested against.
    Reference,
}

/// A 2-D convolution with square kernel, stride and padding.
pub struct Conv {
    weight: Param,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    kernels: Kernels,
}

impl Conv {
    /// Reads `weight` `[cout, cin, k, k]` and `bias` `[cout]` under `vb`.
    pub fn load(
        vb: Weights,
        (cin, cout): (usize, usize),
        kernel: usize,
        stride: usize,
        padding: usize,
        kernels: Kernels,
    ) -> Result<Conv> {
        let bias = Some(vb.get(cout, "bias")?);
        Ok(Conv { weight: vb.param((cout, cin, kernel, kernel), "weight")?, bias, stride, padding, kernels })
    }

    /// A 3x3 convolution at stride 1 and padding 1 without a bias (PyTorch's `bias=False`): reads only
    /// `weight`.
    pub fn same3_unbiased(vb: Weights, (cin, cout): (usize, usize), kernels: Kernels) -> Result<Conv> {
        Ok(Conv { weight: vb.param((cout, cin, 3, 3), "weight")?, bias: None, stride: 1, padding: 1, kernels })
    }

    /// A 3x3 convolution at stride 1 that keeps the size (padding 1), the most common one.
    pub fn same3(vb: Weights, channels: (usize, usize), kernels: Kernels) -> Result<Conv> {
        Conv::load(vb, channels, 3, 1, 1, kernels)
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_fused(xs, Fused::default())
    }

    /// The convolution, then `fused`'s residual and ReLU: on [`Kernels::Fast`] applied band by band
    /// inside the convolution, with [`Kernels::Reference`] by candle's add and ReLU after it.
    pub fn forward_fused(&self, xs: &Tensor, fused: Fused<'_>) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(|b| cast(b, xs.dtype())).transpose()?;
        if self.kernels == Kernels::Fast && xs.device().is_cpu() && xs.dtype() == DType::F32 {
            let dims = self.weight.dims()?;
            let &[cout, cin, kh, kw] = dims.as_slice() else {
                candle_core::bail!("conv weight of shape {dims:?}, expected 4 dimensions")
            };
            // Weights kept in f16 are read as they are, never widened whole.
            let (stride, padding) = (self.stride, self.padding);
            let conv = |weight: &[half::f16]| {
                kernels::conv2d_f16(xs, weight, (cout, cin, kh, kw), bias.as_ref(), stride, padding, fused)
            };
            if let Some(ys) = self.weight.with_f16(conv)?.transpose()? {
                return Ok(ys);
            }
        }
        let weight = self.weight.to_dtype(xs.dtype())?;
        let algorithm = match self.kernels {
            Kernels::Fast => kernels::Algorithm::Auto,
            Kernels::Reference => kernels::Algorithm::Candle,
        };
        kernels::conv2d_fused(xs, &weight, bias.as_ref(), self.stride, self.padding, algorithm, fused)
    }
}

/// Group normalization over `[batch, channels, ...]`, optionally followed by SiLU.
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    kernels: Kernels,
}

impl GroupNorm {
    pub fn load(vb: Weights, groups: usize, channels: usize, eps: f64, kernels: Kernels) -> Result<GroupNorm> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        // Refuses channels that do not split into the groups at load, not at the first forward.
        candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(GroupNorm { weight, bias, groups, eps, kernels })
    }

    pub fn forward(&self, xs: &Tensor, activation: Activation) -> Result<Tensor> {
        let (weight, bias) = (cast(&self.weight, xs.dtype())?, cast(&self.bias, xs.dtype())?);
        let fast = self.kernels == Kernels::Fast && xs.device().is_cpu() && xs.dtype() == DType::F32;
        if fast {
            return kernels::group_norm(xs, self.groups, self.eps, &weight, &bias, activation);
        }
        let channels = weight.dim(0)?;
        let ys = candle_nn::GroupNorm::new(weight, bias, channels, self.groups, self.eps)?.forward(xs)?;
        match activation {
            Activation::None => Ok(ys),
            Activation::Silu => candle_nn::ops::silu(&ys),
        }
    }
}

/// diffusers' `ResnetBlock2D`: two norm-SiLU-conv stages, the time embedding added between them, and
/// a 1x1 shortcut when the channel count changes.
pub struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
    output_scale: f64,
}

/// The sizes of a [`Resnet`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding (UNet), or `None` (VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale: f64,
}

impl Resnet {
    pub fn load(vb: Weights, c: ResnetConfig, kernels: Kernels) -> Result<Resnet> {
        let (cin, cout) = (c.in_channels, c.out_channels);
        let shortcut =
            if cin != cout { Some(Conv::load(vb.pp("conv_shortcut"), (cin, cout), 1, 1, 0, kernels)?) } else { None };
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(Linear::load(vb.pp("time_emb_proj"), t, cout, true)?),
            None => None,
        };
        Ok(Resnet {
            norm1: GroupNorm::load(vb.pp("norm1"), c.groups, cin, c.eps, kernels)?,
            conv1: Conv::same3(vb.pp("conv1"), (cin, cout), kernels)?,
            time_emb_proj,
            norm2: GroupNorm::load(vb.pp("norm2"), c.groups, cout, c.eps, kernels)?,
            conv2: Conv::same3(vb.pp("conv2"), (cout, cout), kernels)?,
            shortcut,
            output_scale: c.output_scale,
        })
    }

    /// `temb` is the time embedding after its SiLU (the same for every resnet of a UNet pass).
    pub fn forward(&self, xs: &Tensor, silu_temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(xs, Activation::Silu)?)?;
        let h = match (silu_temb, &self.time_emb_proj) {
            (Some(t), Some(proj)) => h.broadcast_add(&proj.forward(t)?.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?,
            _ => h,
        };
        let shortcut = match &self.shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let residual = Fused { residual: Some(&shortcut), relu: false };
        let out = self.conv2.forward_fused(&self.norm2.forward(&h, Activation::Silu)?, residual)?;
        if self.output_scale == 1.0 { Ok(out) } else { out / self.output_scale }
    }
}

/// `t` in `dtype`: free when it already is; f16 weights meeting f32 activations on the CPU take the
/// fast parallel widening of [`kernels::to_f32`].
pub fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else if dtype == DType::F32 {
        kernels::to_f32(t)
    } else {
        t.to_dtype(dtype)
    }
}

/// GEGLU, diffusers' gated GELU: `x[..., :n] * gelu(x[..., n:])` for `x` `[..., 2n]`. With
/// [`Kernels::Fast`] on f32 CPU tensors, [`kernels::geglu`] (one pass, vectorized erf); otherwise
/// candle's ops.
pub fn geglu(xs: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if kernels == Kernels::Fast && xs.device().is_cpu() && xs.dtype() == DType::F32 {
        return kernels::geglu(xs);
    }
    let halves = xs.chunk(2, D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// A linear layer `x W^T + b` over the last dimension, in the input's dtype.
pub struct Linear {
    weight: Param,
    bias: Option<Tensor>,
}

impl Linear {
    /// Reads `weight` `[out, in]` and, with `bias`, `bias` `[out]`.
    pub fn load(vb: Weights, cin: usize, cout: usize, bias: bool) -> Result<Linear> {
        let weight = vb.param((cout, cin), "weight")?;
        let bias = if bias { Some(vb.get(cout, "bias")?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// On f32 CPU activations with the weight kept in f16, [`kernels::linear_f16`] (the weight read in
    /// place for few rows, widened into a reused buffer for many); otherwise candle's linear on the
    /// weight in the input's dtype.
    ///
    /// A strided (say, transposed) input is made contiguous first: candle 0.11's batched CPU matmul
    /// returns wrong values for every batch item after the first when its left side is a transposed
    /// view (the VAE attention's tokens were one), and no kernel here is faster on strided rows.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = &xs.contiguous()?;
        let bias = self.bias.as_ref().map(|b| cast(b, xs.dtype())).transpose()?;
        if xs.device().is_cpu() && xs.dtype() == DType::F32 {
            let out_features = self.weight.dims()?.first().copied().unwrap_or(0);
            let fast = self.weight.with_f16(|w| kernels::linear_f16(xs, w, out_features, bias.as_ref()))?;
            if let Some(Some(ys)) = fast.transpose()? {
                return Ok(ys);
            }
        }
        let weight = self.weight.to_dtype(xs.dtype())?;
        candle_nn::Linear::new(weight, bias).forward(xs)
    }
}

/// Layer normalization over the last dimension, in the input's dtype.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: Weights, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (weight, bias) = (cast(&self.weight, xs.dtype())?, cast(&self.bias, xs.dtype())?);
        candle_nn::LayerNorm::new(weight, bias, self.eps).forward(xs)
    }
}

/// Root-mean-square normalization over the last dimension (`x / sqrt(mean(x^2) + eps) * weight`), in
/// the input's dtype, accumulated in f32.
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: Weights, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: vb.get(dim, "weight")?, eps })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x32 = cast(xs, DType::F32)?;
        let ys = candle_nn::ops::rms_norm(&x32.contiguous()?, &cast(&self.weight, DType::F32)?, self.eps as f32)?;
        cast(&ys, dtype)
    }
}

/// Nearest-neighbour upsampling to `size` (twice the input's by default), then a 3x3 convolution.
pub struct Upsample {
    conv: Conv,
}

impl Upsample {
    pub fn load(vb: Weights, channels: usize, kernels: Kernels) -> Result<Upsample> {
        Ok(Upsample { conv: Conv::same3(vb.pp("conv"), (channels, channels), kernels)? })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&kernels::upsample_nearest2d(xs, th, tw)?)
    }
}

/// Softmax attention `softmax(q k^T * scale) v` over `[batch * heads, tokens, head_dim]` tensors. With
/// [`Kernels::Fast`] on f32 CPU tensors, [`kernels::attention`]: fused, one small block of scores per
/// thread. Otherwise candle's ops, in chunks of queries so that the score matrix never exceeds
/// [`SCORE_FLOATS`] per chunk (at 64x64 latents the whole matrix of one head is 64 MiB, of a 10-head
/// layer 640 MiB).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, kernels: Kernels) -> Result<Tensor> {
    let f32_cpu = [q, k, v].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if kernels == Kernels::Fast && f32_cpu {
        return kernels::attention(q, k, v, scale);
    }
    let (bh, tq, _) = q.dims3()?;
    let tk = k.dim(1)?;
    let chunk = (SCORE_FLOATS / (bh * tk).max(1)).clamp(1, tq.max(1));
    let kt = k.t()?;
    let one = |q: &Tensor| -> Result<Tensor> {
        let scores = (q.matmul(&kt)? * scale)?;
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
    };
    if chunk >= tq {
        return one(q);
    }
    let parts = (0..tq)
        .step_by(chunk)
        .map(|start| one(&q.narrow(1, start, chunk.min(tq - start))?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 1)
}

/// The largest score matrix [`attention`] builds at once, in floats (64 MiB).
pub const SCORE_FLOATS: usize = 16 << 20;

/// diffusers' VAE `Attention` block (one head over all channels by default), with either naming of
/// its projections (`to_q`... or the older `query`...; 1x1 convolutions are read as linears).
pub struct VaeAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    kernels: Kernels,
}

impl VaeAttention {
    pub fn load(vb: Weights, channels: usize, groups: usize, kernels: Kernels) -> Result<VaeAttention> {
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let linear = |name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            let weight = match vb.get((channels, channels), "weight") {
                Ok(w) => w,
                Err(_) => vb.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))?,
            };
            Ok(Linear { weight: Param::Tensor(weight), bias: Some(vb.get(channels, "bias")?) })
        };
        Ok(VaeAttention {
            norm: GroupNorm::load(vb.pp("group_norm"), groups, channels, 1e-6, kernels)?,
            q: linear(names[0])?,
            k: linear(names[1])?,
            v: linear(names[2])?,
            out: linear(names[3])?,
            heads: 1,
            kernels,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self.norm.forward(xs, Activation::None)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let d = c / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, h * w, self.heads, d))?.transpose(1, 2)?.reshape((b * self.heads, h * w, d))?.contiguous()
        };
        let q = split(self.q.forward(&tokens)?)?;
        let k = split(self.k.forward(&tokens)?)?;
        let v = split(self.v.forward(&tokens)?)?;
        let dtype = q.dtype();
        let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
        let att = attention(&q, &k, &v, 1.0 / (d as f64).sqrt(), self.kernels)?.to_dtype(dtype)?;
        let att = att.reshape((b, self.heads, h * w, d))?.transpose(1, 2)?.reshape((b, h * w, c))?;
        let out = self.out.forward(&att)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::Device;

    use super::*;

    /// A linear layer gives the same rows whatever the input's strides: each item of a batch of 3 fed
    /// as a transposed view (as the VAE attention feeds its tokens) equals the contiguous input's.
    #[test]
    fn linear_on_a_transposed_batch_equals_the_contiguous_one() {
        let device = Device::Cpu;
        let (b, c, tokens, out) = (3, 8, 5, 6);
        let x = Tensor::randn(0f32, 1., (b, c, tokens), &device).unwrap();
        let linear = Linear {
            weight: Param::Tensor(Tensor::randn(0f32, 1., (out, c), &device).unwrap()),
            bias: Some(Tensor::randn(0f32, 1., out, &device).unwrap()),
        };
        let strided = linear.forward(&x.transpose(1, 2).unwrap()).unwrap();
        let dense = linear.forward(&x.transpose(1, 2).unwrap().contiguous().unwrap()).unwrap();
        for i in 0..b {
            let diff = (strided.get(i).unwrap() - dense.get(i).unwrap()).unwrap().abs().unwrap();
            let diff: f32 = diff.max_all().unwrap().to_scalar().unwrap();
            assert!(diff < 1e-5, "batch item {i}: {diff}");
        }
    }
}

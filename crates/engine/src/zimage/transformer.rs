//! Z-Image's single-stream DiT (diffusers' `ZImageTransformer2DModel`), built from
//! `transformer/config.json` on the engine's layers.
//!
//! One forward pass, for a batch of latents that share one caption (what a request's `n` images are):
//! - the timestep, `t * t_scale`, embedded sinusoidally (cos then sin, 256 channels) through an MLP into
//!   the modulation input (`min(dim, 256)` wide);
//! - the latents cut into 2x2 patches (`[patch rows, patch cols, 2, 2, channels]` order), embedded, and
//!   padded to a multiple of 32 tokens with the learned `x_pad_token`; the caption RMS-normed and
//!   embedded, padded the same way with `cap_pad_token`;
//! - 3-axis rotary positions: caption token `i` at `(1 + i, 0, 0)` (padding included), image patch
//!   `(r, c)` at `(caption length + 1, r, c)`, image padding at `(0, 0, 0)`; each axis's frequencies
//!   `theta^(-2j/d)` computed in f64, angles rounded to f32, applied to `(even, odd)` pairs;
//! - the noise refiner (modulated) over the image tokens, the context refiner (unmodulated) over the
//!   caption, then the main layers over `[image, caption]`, every token attending to every other
//!   (padding too, as diffusers does for one sequence length);
//! - the final layer (LayerNorm without affine, scaled by the modulation) on the image tokens, folded
//!   back into latents.
//!
//! Each block: `x += tanh(g1) * norm2(attn(norm1(x) * (1 + s1)))`, `x += tanh(g2) * norm4(ffn(norm3(x)
//! * (1 + s2)))`, with the four modulations from one linear of the timestep embedding; attention has
//! RMS norms on queries and keys; the FFN is SwiGLU of width `int(dim / 3 * 8)`.

use candle_core::{D, DType, Device, Result, Tensor};
use serde::Deserialize;

use crate::EngineError;
use crate::layers::{Kernels, Linear, RmsNorm, attention, cast};
use crate::weights::Weights;

/// Tokens are padded to a multiple of this.
const SEQ_MULTIPLE: usize = 32;
/// The modulation input is at most this wide.
const ADALN_DIM: usize = 256;
/// The timestep's sinusoidal embedding width, and the MLP's hidden width.
const FREQ_DIM: usize = 256;
const T_HIDDEN: usize = 1024;

/// `transformer/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct TransformerFile {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub all_patch_size: Vec<usize>,
    pub all_f_patch_size: Vec<usize>,
    pub in_channels: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_refiner_layers: usize,
    pub n_heads: usize,
    #[serde(default = "eps")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub qk_norm: bool,
    pub cap_feat_dim: usize,
    #[serde(default)]
    pub siglip_feat_dim: Option<usize>,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default = "t_scale")]
    pub t_scale: f64,
    pub axes_dims: Vec<usize>,
    pub axes_lens: Vec<usize>,
}

fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn theta() -> f64 {
    256.0
}
fn t_scale() -> f64 {
    1000.0
}

impl TransformerFile {
    /// Refuses what the model does not compute, naming the key.
    pub fn check(&self) -> std::result::Result<(), EngineError> {
        let bad = |key: &str, why: String| EngineError::Unsupported {
            file: "transformer/config.json".into(),
            key: key.into(),
            why,
        };
        if self.class_name != "ZImageTransformer2DModel" {
            return Err(bad("_class_name", format!("'{}' is not ZImageTransformer2DModel", self.class_name)));
        }
        if self.all_patch_size != [2] || self.all_f_patch_size != [1] {
            return Err(bad("all_patch_size", "only 2x2 patches of single frames ([2], [1]) are implemented".into()));
        }
        if self.siglip_feat_dim.is_some() {
            return Err(bad("siglip_feat_dim", "the Omni model's image conditioning is not implemented".into()));
        }
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            return Err(bad("n_heads", format!("{} does not divide dim {}", self.n_heads, self.dim)));
        }
        let head_dim = self.dim / self.n_heads;
        if self.axes_dims.len() != 3
            || self.axes_lens.len() != 3
            || self.axes_dims.iter().sum::<usize>() != head_dim
            || self.axes_dims.iter().any(|d| d % 2 == 1)
        {
            return Err(bad(
                "axes_dims",
                format!("three even sizes adding up to the head dimension {head_dim} (and three axes_lens) are needed"),
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// diffusers' `int(dim / 3 * 8)`, in Python's float arithmetic.
    pub fn ffn_dim(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }
}

struct Block {
    modulation: Option<Linear>,
    norm1: RmsNorm,
    norm2: RmsNorm,
    ffn_norm1: RmsNorm,
    ffn_norm2: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

/// Rotary angles of a token sequence: `[tokens, head_dim / 2]` cos and sin.
#[derive(Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn cat(a: &Rope, b: &Rope) -> Result<Rope> {
        Ok(Rope { cos: Tensor::cat(&[&a.cos, &b.cos], 0)?, sin: Tensor::cat(&[&a.sin, &b.sin], 0)? })
    }
}

pub struct Transformer {
    config: TransformerFile,
    t_mlp: (Linear, Linear),
    x_embedder: Linear,
    cap_norm: RmsNorm,
    cap_linear: Linear,
    x_pad: Tensor,
    cap_pad: Tensor,
    noise_refiner: Vec<Block>,
    context_refiner: Vec<Block>,
    layers: Vec<Block>,
    final_modulation: Linear,
    final_linear: Linear,
    kernels: Kernels,
}

impl Transformer {
    pub fn new(vb: Weights, c: &TransformerFile, kernels: Kernels) -> Result<Transformer> {
        let dim = c.dim;
        let adaln = dim.min(ADALN_DIM);
        let patch = 2 * 2 * c.in_channels;
        let block = |vb: Weights, modulated: bool| -> Result<Block> {
            let attn = vb.pp("attention");
            let hd = c.head_dim();
            let qk = |name: &str| -> Result<Option<RmsNorm>> {
                if c.qk_norm { Ok(Some(RmsNorm::load(attn.pp(name), hd, 1e-5)?)) } else { Ok(None) }
            };
            let ffn = vb.pp("feed_forward");
            Ok(Block {
                modulation: if modulated {
                    Some(Linear::load(vb.pp("adaLN_modulation.0"), adaln, 4 * dim, true)?)
                } else {
                    None
                },
                norm1: RmsNorm::load(vb.pp("attention_norm1"), dim, c.norm_eps)?,
                norm2: RmsNorm::load(vb.pp("attention_norm2"), dim, c.norm_eps)?,
                ffn_norm1: RmsNorm::load(vb.pp("ffn_norm1"), dim, c.norm_eps)?,
                ffn_norm2: RmsNorm::load(vb.pp("ffn_norm2"), dim, c.norm_eps)?,
                q: Linear::load(attn.pp("to_q"), dim, dim, false)?,
                k: Linear::load(attn.pp("to_k"), dim, dim, false)?,
                v: Linear::load(attn.pp("to_v"), dim, dim, false)?,
                out: Linear::load(attn.pp("to_out.0"), dim, dim, false)?,
                norm_q: qk("norm_q")?,
                norm_k: qk("norm_k")?,
                w1: Linear::load(ffn.pp("w1"), dim, c.ffn_dim(), false)?,
                w2: Linear::load(ffn.pp("w2"), c.ffn_dim(), dim, false)?,
                w3: Linear::load(ffn.pp("w3"), dim, c.ffn_dim(), false)?,
            })
        };
        let blocks = |name: &str, count: usize, modulated: bool| -> Result<Vec<Block>> {
            (0..count).map(|i| block(vb.pp(name).pp(i), modulated)).collect()
        };
        let key = "2-1";
        Ok(Transformer {
            config: c.clone(),
            t_mlp: (
                Linear::load(vb.pp("t_embedder.mlp.0"), FREQ_DIM, T_HIDDEN, true)?,
                Linear::load(vb.pp("t_embedder.mlp.2"), T_HIDDEN, adaln, true)?,
            ),
            x_embedder: Linear::load(vb.pp("all_x_embedder").pp(key), patch, dim, true)?,
            cap_norm: RmsNorm::load(vb.pp("cap_embedder.0"), c.cap_feat_dim, c.norm_eps)?,
            cap_linear: Linear::load(vb.pp("cap_embedder.1"), c.cap_feat_dim, dim, true)?,
            x_pad: vb.get((1, dim), "x_pad_token")?,
            cap_pad: vb.get((1, dim), "cap_pad_token")?,
            noise_refiner: blocks("noise_refiner", c.n_refiner_layers, true)?,
            context_refiner: blocks("context_refiner", c.n_refiner_layers, false)?,
            layers: blocks("layers", c.n_layers, true)?,
            final_modulation: Linear::load(
                vb.pp("all_final_layer").pp(key).pp("adaLN_modulation.1"),
                adaln,
                dim,
                true,
            )?,
            final_linear: Linear::load(vb.pp("all_final_layer").pp(key).pp("linear"), dim, patch, true)?,
            kernels,
        })
    }

    pub fn config(&self) -> &TransformerFile {
        &self.config
    }

    /// The model's output for `latents` `[n, channels, h, w]` (in the compute dtype) at time `t` (0 is
    /// noise, 1 clean) under the caption `caption` `[tokens, cap_feat_dim]`: `[n, channels, h, w]`.
    pub fn forward(&self, latents: &Tensor, t: f32, caption: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = latents.dims4()?;
        let device = latents.device();
        let dtype = latents.dtype();
        let (ht, wt) = (h / 2, w / 2);
        let tokens = ht * wt;
        let padded_tokens = tokens.next_multiple_of(SEQ_MULTIPLE);
        let cap_tokens = caption.dim(0)?;
        let padded_cap = cap_tokens.next_multiple_of(SEQ_MULTIPLE);
        if padded_cap + 1 >= self.config.axes_lens[0] || ht > self.config.axes_lens[1] || wt > self.config.axes_lens[2]
        {
            candle_core::bail!(
                "{cap_tokens} caption tokens and {ht}x{wt} patches are beyond the model's positions {:?}",
                self.config.axes_lens
            )
        }

        // The modulation input, the same for every image of the batch: [1, adaln].
        let adaln = self.time_embedding(t * self.config.t_scale as f32, device, dtype)?;

        // Image tokens: [n, padded_tokens, dim].
        let patches =
            latents.reshape((n, c, ht, 2, wt, 2))?.permute((0, 2, 4, 3, 5, 1))?.reshape((n, tokens, 4 * c))?;
        let mut x = self.x_embedder.forward(&patches)?;
        if padded_tokens > tokens {
            let pad = cast(&self.x_pad, dtype)?.unsqueeze(0)?.expand((n, padded_tokens - tokens, self.config.dim))?;
            x = Tensor::cat(&[&x, &pad.contiguous()?], 1)?;
        }
        let mut image_pos = Vec::with_capacity(padded_tokens);
        for r in 0..ht {
            for col in 0..wt {
                image_pos.push([padded_cap + 1, r, col]);
            }
        }
        image_pos.resize(padded_tokens, [0, 0, 0]);
        let x_rope = self.rope(&image_pos, device)?;

        // Caption tokens: [1, padded_cap, dim].
        let mut cap = self.cap_linear.forward(&self.cap_norm.forward(&cast(caption, dtype)?)?)?;
        if padded_cap > cap_tokens {
            let pad = cast(&self.cap_pad, dtype)?.expand((padded_cap - cap_tokens, self.config.dim))?;
            cap = Tensor::cat(&[&cap, &pad.contiguous()?], 0)?;
        }
        let cap = cap.unsqueeze(0)?;
        let cap_pos: Vec<[usize; 3]> = (0..padded_cap).map(|i| [1 + i, 0, 0]).collect();
        let cap_rope = self.rope(&cap_pos, device)?;

        for block in &self.noise_refiner {
            x = self.block(block, &x, &x_rope, Some(&adaln))?;
        }
        let mut cap = cap;
        for block in &self.context_refiner {
            cap = self.block(block, &cap, &cap_rope, None)?;
        }
        let cap = cap.expand((n, padded_cap, self.config.dim))?.contiguous()?;
        let mut unified = Tensor::cat(&[&x, &cap], 1)?;
        let rope = Rope::cat(&x_rope, &cap_rope)?;
        for block in &self.layers {
            unified = self.block(block, &unified, &rope, Some(&adaln))?;
        }

        // The final layer on the image tokens only (it is per token).
        let image = unified.narrow(1, 0, tokens)?;
        let scale = (self.final_modulation.forward(&candle_nn::ops::silu(&adaln)?)? + 1.0)?.unsqueeze(1)?;
        let normed = layer_norm(&image, 1e-6)?.broadcast_mul(&scale)?;
        let out = self.final_linear.forward(&normed)?;
        out.reshape((n, ht, wt, 2, 2, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((n, c, h, w))
    }

    /// diffusers' `TimestepEmbedder` of one time: `[1, min(dim, 256)]`.
    fn time_embedding(&self, t: f32, device: &Device, dtype: DType) -> Result<Tensor> {
        let half = FREQ_DIM / 2;
        let log_period = -(10000f64.ln()) as f32;
        let mut emb = vec![0f32; FREQ_DIM];
        for i in 0..half {
            let freq = (log_period * i as f32 / half as f32).exp();
            let arg = t * freq;
            emb[i] = arg.cos();
            emb[half + i] = arg.sin();
        }
        let emb = Tensor::from_vec(emb, (1, FREQ_DIM), device)?.to_dtype(dtype)?;
        let hidden = candle_nn::ops::silu(&self.t_mlp.0.forward(&emb)?)?;
        self.t_mlp.1.forward(&hidden)
    }

    /// The rotary angles of `positions` (one `(frame, row, column)` each).
    fn rope(&self, positions: &[[usize; 3]], device: &Device) -> Result<Rope> {
        let half = self.config.head_dim() / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        let freqs: Vec<Vec<f64>> = self
            .config
            .axes_dims
            .iter()
            .map(|&d| (0..d / 2).map(|j| 1.0 / self.config.rope_theta.powf((2 * j) as f64 / d as f64)).collect())
            .collect();
        for pos in positions {
            for (axis, axis_freqs) in freqs.iter().enumerate() {
                for f in axis_freqs {
                    let angle = (pos[axis] as f64 * f) as f32;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = (positions.len(), half);
        Ok(Rope { cos: Tensor::from_vec(cos, shape, device)?, sin: Tensor::from_vec(sin, shape, device)? })
    }

    fn block(&self, b: &Block, x: &Tensor, rope: &Rope, adaln: Option<&Tensor>) -> Result<Tensor> {
        match (&b.modulation, adaln) {
            (Some(modulation), Some(adaln)) => {
                // [1, 1, 4 * dim] -> scale_msa, gate_msa, scale_mlp, gate_mlp.
                let m = modulation.forward(adaln)?.unsqueeze(1)?;
                let parts = m.chunk(4, D::Minus1)?;
                let (scale_msa, gate_msa) = ((&parts[0] + 1.0)?, parts[1].tanh()?);
                let (scale_mlp, gate_mlp) = ((&parts[2] + 1.0)?, parts[3].tanh()?);
                let attn = self.attention(b, &b.norm1.forward(x)?.broadcast_mul(&scale_msa)?, rope)?;
                let x = (x + b.norm2.forward(&attn)?.broadcast_mul(&gate_msa)?)?;
                let ffn = self.ffn(b, &b.ffn_norm1.forward(&x)?.broadcast_mul(&scale_mlp)?)?;
                x + b.ffn_norm2.forward(&ffn)?.broadcast_mul(&gate_mlp)?
            }
            _ => {
                let attn = self.attention(b, &b.norm1.forward(x)?, rope)?;
                let x = (x + b.norm2.forward(&attn)?)?;
                let ffn = self.ffn(b, &b.ffn_norm1.forward(&x)?)?;
                x + b.ffn_norm2.forward(&ffn)?
            }
        }
    }

    fn attention(&self, b: &Block, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        let (n, t, _) = x.dims3()?;
        let (heads, hd) = (self.config.n_heads, self.config.head_dim());
        let project = |linear: &Linear, norm: &Option<RmsNorm>, rotate: bool| -> Result<Tensor> {
            let mut y = linear.forward(x)?.reshape((n, t, heads, hd))?;
            if let Some(norm) = norm {
                y = norm.forward(&y)?;
            }
            let y = y.transpose(1, 2)?.contiguous()?;
            let y = if rotate {
                let dtype = y.dtype();
                cast(&candle_nn::rotary_emb::rope_i(&cast(&y, DType::F32)?, &rope.cos, &rope.sin)?, dtype)?
            } else {
                y
            };
            y.reshape((n * heads, t, hd))
        };
        let q = project(&b.q, &b.norm_q, true)?;
        let k = project(&b.k, &b.norm_k, true)?;
        let v = project(&b.v, &None, false)?;
        let out = attention(&q, &k, &v, 1.0 / (hd as f64).sqrt(), self.kernels)?;
        let out = out.reshape((n, heads, t, hd))?.transpose(1, 2)?.reshape((n, t, heads * hd))?;
        b.out.forward(&out)
    }

    fn ffn(&self, b: &Block, x: &Tensor) -> Result<Tensor> {
        let gated = (candle_nn::ops::silu(&b.w1.forward(x)?)? * b.w3.forward(x)?)?;
        b.w2.forward(&gated)
    }
}

/// LayerNorm over the last dimension without weights, computed in f32.
fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = cast(x, DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    cast(&centered.broadcast_div(&(var + eps)?.sqrt()?)?, dtype)
}

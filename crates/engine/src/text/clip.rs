//! The CLIP text encoder, built from `text_encoder/config.json`.
//!
//! candle's configurable CLIP text model knows only QuickGELU, while SD 2.x (and SD-Turbo) encoders use
//! GELU, and its Stable Diffusion variant hard-codes each model's sizes; this one reads every size and the
//! activation from the config, with the tensor names of diffusers/transformers checkpoints.
//!
//! SDXL conditions on two encoders: the penultimate layer's hidden states of both, side by side, and the
//! second one's pooled output (its end token after the final norm) through `text_projection`.

use crate::weights::{Param, Weights};
use candle_core::{D, DType, Device, Result, Tensor};

use crate::layers::{LayerNorm, Linear};

use serde::Deserialize;

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702f64)?)?,
            Activation::Gelu => xs.gelu_erf(),
        }
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct TextEncoder {
    /// `[vocab, hidden]`: only the prompt's rows are read (a mapped table is 100 MB for SD 2.x).
    token_embedding: Param,
    position_embedding: Param,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    heads: usize,
    activation: Activation,
    /// `text_projection` (no bias), on `CLIPTextModelWithProjection` encoders.
    projection: Option<Linear>,
    /// The dtype activations are computed in.
    compute: DType,
}

/// What SDXL reads from an encoder.
pub struct SdxlOutput {
    /// The hidden states before the last layer, `[batch, seq, hidden]`.
    pub penultimate: Tensor,
    /// The end token's final state, projected when the encoder has a projection, `[batch, dim]`.
    pub pooled: Tensor,
}

impl TextEncoder {
    pub fn new(vb: Weights, c: &TextEncoderFile) -> Result<TextEncoder> {
        // Hub repositories (and `CLIPTextModelWithProjection` as transformers 5 saves it) nest the
        // weights under `text_model.`; transformers 5 saves a `CLIPTextModel` without it.
        let vb =
            if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        let d = c.hidden_size;
        let emb = vb.pp("embeddings");
        let token_embedding = emb.pp("token_embedding").param((c.vocab_size, d), "weight")?;
        let position_embedding = emb.pp("position_embedding").param((c.max_position_embeddings, d), "weight")?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = vb.pp("encoder.layers").pp(i.to_string());
            let attn = l.pp("self_attn");
            layers.push(Layer {
                q: Linear::load(attn.pp("q_proj"), d, d, true)?,
                k: Linear::load(attn.pp("k_proj"), d, d, true)?,
                v: Linear::load(attn.pp("v_proj"), d, d, true)?,
                out: Linear::load(attn.pp("out_proj"), d, d, true)?,
                norm1: LayerNorm::load(l.pp("layer_norm1"), d, c.layer_norm_eps)?,
                norm2: LayerNorm::load(l.pp("layer_norm2"), d, c.layer_norm_eps)?,
                fc1: Linear::load(l.pp("mlp.fc1"), d, c.intermediate_size, true)?,
                fc2: Linear::load(l.pp("mlp.fc2"), c.intermediate_size, d, true)?,
            });
        }
        let final_norm = LayerNorm::load(vb.pp("final_layer_norm"), d, c.layer_norm_eps)?;
        let activation = if c.hidden_act == "gelu" { Activation::Gelu } else { Activation::QuickGelu };
        let projection = match c.projection() {
            Some(p) => Some(Linear::load(vb.root().pp("text_projection"), d, p, false)?),
            None => None,
        };
        // Weights stored in f16 on the CPU still compute in f32.
        let compute = if vb.device().is_cpu() { DType::F32 } else { vb.dtype() };
        Ok(TextEncoder {
            compute,
            projection,
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            heads: c.num_attention_heads,
            activation,
        })
    }

    /// The last hidden state (after the final layer norm) for a batch of token ids, `[batch, seq, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (last, _) = self.run(ids)?;
        self.final_norm.forward(&last)
    }

    /// SDXL's reading of the encoder: the penultimate hidden states, and the pooled output at `eos`
    /// (the end token's position in every row of `ids`).
    pub fn forward_sdxl(&self, ids: &Tensor, eos: usize) -> Result<SdxlOutput> {
        let (last, penultimate) = self.run(ids)?;
        let pooled = self.final_norm.forward(&last.narrow(1, eos, 1)?.squeeze(1)?)?;
        let pooled = match &self.projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(SdxlOutput { penultimate, pooled })
    }

    /// Every layer: the last hidden states (before the final norm) and the ones before the last layer.
    fn run(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (batch, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let tokens = self.token_embedding.rows(&ids.flatten_all()?, self.compute)?.reshape((batch, seq, ()))?;
        let mut xs = tokens.broadcast_add(&self.position_embedding.rows(&positions, self.compute)?)?;
        let mask = causal_mask(seq, ids.device(), xs.dtype())?;
        let mut previous = xs.clone();
        for layer in &self.layers {
            previous = xs.clone();
            let h = layer.norm1.forward(&xs)?;
            let h = self.attention(layer, &h, &mask, batch, seq)?;
            xs = (h + &previous)?;
            let residual = xs.clone();
            let h = layer.norm2.forward(&xs)?;
            let h = layer.fc2.forward(&self.activation.forward(&layer.fc1.forward(&h)?)?)?;
            xs = (h + residual)?;
        }
        Ok((xs, previous))
    }

    fn attention(&self, l: &Layer, xs: &Tensor, mask: &Tensor, batch: usize, seq: usize) -> Result<Tensor> {
        let d = xs.dim(D::Minus1)?;
        let head_dim = d / self.heads;
        let scale = (head_dim as f64).powf(-0.5);
        let split = |t: Tensor| t.reshape((batch, seq, self.heads, head_dim))?.transpose(1, 2)?.contiguous();
        let q = split((l.q.forward(xs)? * scale)?)?;
        let k = split(l.k.forward(xs)?)?;
        let v = split(l.v.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, seq, d))?;
        l.out.forward(&out)
    }
}

/// `-inf` above the diagonal: each token sees itself and the tokens before it.
fn causal_mask(seq: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let values: Vec<f32> =
        (0..seq).flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(values, (seq, seq), device)?.to_dtype(dtype)
}

/// `text_encoder/config.json` (a CLIP text model).
#[derive(Debug, Clone, Deserialize)]
pub struct TextEncoderFile {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Size of the pooled-output projection. Only `CLIPTextModelWithProjection` (SDXL's second
    /// encoder) has one: SD 2.x configs set it on a plain `CLIPTextModel` whose file has no
    /// `text_projection` ([`TextEncoderFile::projection`]).
    pub projection_dim: Option<usize>,
    #[serde(default)]
    pub architectures: Vec<String>,
}

impl TextEncoderFile {
    /// The width of `text_projection`, for encoders that have one.
    pub fn projection(&self) -> Option<usize> {
        let with_projection = self.architectures.iter().any(|a| a == "CLIPTextModelWithProjection");
        self.projection_dim.filter(|_| with_projection)
    }
}

fn quick_gelu() -> String {
    "quick_gelu".to_owned()
}

fn default_eps() -> f64 {
    1e-5
}

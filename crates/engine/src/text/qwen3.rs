//! Qwen3 as a text encoder (Z-Image's; FLUX.2 klein's too), built from `text_encoder/config.json`, and
//! its tokenizer with the chat template the pipelines apply.
//!
//! The diffusion pipelines take a prompt as one user turn of a chat (`<|im_start|>user\n{prompt}
//! <|im_end|>\n<|im_start|>assistant\n`: Qwen3's template with `add_generation_prompt` and thinking
//! on), tokenized without special-token additions, at most `max_sequence_length` tokens, and read the
//! hidden states *before* the last decoder layer (`hidden_states[-2]`) at the prompt's tokens. So the last
//! layer and the final norm never run here.
//!
//! Layers: RMS norms, rotary positions (`rotate_half`, theta from the config), grouped-query attention
//! with per-head RMS norms on queries and keys, causal; SwiGLU MLP. Weights under `model.` (a
//! `Qwen3ForCausalLM` file) or at the root (`Qwen3Model`).

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::EngineError;
use crate::layers::{Linear, RmsNorm, cast};
use crate::weights::{Param, Weights};

/// `text_encoder/config.json` of a Qwen3 model, the keys the encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3File {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    /// transformers 4.x writes `rope_theta` at the top; 5.x inside `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
}

fn eps() -> f64 {
    1e-6
}
fn silu() -> String {
    "silu".into()
}

impl Qwen3File {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The rotary base, wherever the config keeps it (Qwen3's default 1,000,000 when it says none).
    pub fn theta(&self) -> f64 {
        let nested = self.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64());
        self.rope_theta.or(nested).unwrap_or(1_000_000.0)
    }

    /// Refuses what the encoder does not compute, naming the key.
    pub fn check(&self) -> std::result::Result<(), EngineError> {
        let bad = |key: &str, why: String| EngineError::Unsupported {
            file: "text_encoder/config.json".into(),
            key: key.into(),
            why,
        };
        if let Some(kind) = &self.model_type
            && kind != "qwen3"
        {
            return Err(bad("model_type", format!("'{kind}': this family's text encoder is a Qwen3 model ('qwen3')")));
        }
        if self.hidden_act != "silu" {
            return Err(bad("hidden_act", format!("'{}' is not 'silu'", self.hidden_act)));
        }
        let rope_type = |v: &serde_json::Value| v.get("rope_type").and_then(|t| t.as_str()).map(str::to_owned);
        for (key, value) in [("rope_scaling", &self.rope_scaling), ("rope_parameters", &self.rope_parameters)] {
            if let Some(v) = value.as_ref().filter(|v| !v.is_null())
                && rope_type(v).is_some_and(|t| t != "default")
            {
                return Err(bad(key, format!("{v}: only the default rotary embedding is implemented")));
            }
        }
        let (heads, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(bad("num_key_value_heads", format!("{kv} does not divide num_attention_heads {heads}")));
        }
        if self.num_hidden_layers < 2 {
            return Err(bad("num_hidden_layers", "the pipeline reads the layer before the last: at least 2".into()));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad("head_dim", format!("{} is odd: rotary positions need pairs", self.head_dim())));
        }
        Ok(())
    }
}

struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The encoder: the embedding table and the decoder layers up to the one before the last.
pub struct Qwen3Encoder {
    embed: Param,
    layers: Vec<Layer>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    theta: f64,
    /// The dtype activations are computed in.
    compute: DType,
}

impl Qwen3Encoder {
    /// Reads the weights (under `model.` or at the root) of every layer the pipelines use.
    pub fn new(vb: Weights, c: &Qwen3File, compute: DType) -> Result<Qwen3Encoder> {
        let vb = if vb.contains_tensor("model.embed_tokens.weight") { vb.pp("model") } else { vb };
        let (hidden, hd) = (c.hidden_size, c.head_dim());
        let (heads, kv) = (c.num_attention_heads, c.num_key_value_heads);
        let embed = vb.param((c.vocab_size, hidden), "embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers - 1);
        for i in 0..c.num_hidden_layers - 1 {
            let vb = vb.pp("layers").pp(i);
            let (attn, mlp) = (vb.pp("self_attn"), vb.pp("mlp"));
            let bias = c.attention_bias;
            layers.push(Layer {
                input_norm: RmsNorm::load(vb.pp("input_layernorm"), hidden, c.rms_norm_eps)?,
                q: Linear::load(attn.pp("q_proj"), hidden, heads * hd, bias)?,
                k: Linear::load(attn.pp("k_proj"), hidden, kv * hd, bias)?,
                v: Linear::load(attn.pp("v_proj"), hidden, kv * hd, bias)?,
                o: Linear::load(attn.pp("o_proj"), heads * hd, hidden, bias)?,
                q_norm: RmsNorm::load(attn.pp("q_norm"), hd, c.rms_norm_eps)?,
                k_norm: RmsNorm::load(attn.pp("k_norm"), hd, c.rms_norm_eps)?,
                post_norm: RmsNorm::load(vb.pp("post_attention_layernorm"), hidden, c.rms_norm_eps)?,
                gate: Linear::load(mlp.pp("gate_proj"), hidden, c.intermediate_size, false)?,
                up: Linear::load(mlp.pp("up_proj"), hidden, c.intermediate_size, false)?,
                down: Linear::load(mlp.pp("down_proj"), c.intermediate_size, hidden, false)?,
            });
        }
        Ok(Qwen3Encoder { embed, layers, heads, kv_heads: kv, head_dim: hd, theta: c.theta(), compute })
    }

    /// The hidden states before the last layer at each of `ids`, `[tokens, hidden]`.
    pub fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let t = ids.len();
        // On the model's device: a table on a GPU is indexed there, a mapped one (CPU) reads the ids.
        let ids_t = Tensor::new(ids, device)?;
        let mut xs = self.embed.rows(&ids_t, self.compute)?.to_device(device)?.unsqueeze(0)?;
        let (cos, sin) = self.rotary(t, device)?;
        let mask = causal_mask(t, device)?;
        for layer in &self.layers {
            let h = layer.input_norm.forward(&xs)?;
            let q = self.heads_of(&layer.q.forward(&h)?, self.heads, &layer.q_norm, &cos, &sin)?;
            let k = self.heads_of(&layer.k.forward(&h)?, self.kv_heads, &layer.k_norm, &cos, &sin)?;
            let v = layer.v.forward(&h)?.reshape((1, t, self.kv_heads, self.head_dim))?.transpose(1, 2)?;
            let groups = self.heads / self.kv_heads;
            let (k, v) = (repeat_kv(&k, groups)?, repeat_kv(&v, groups)?);
            // Scores in f32 whatever the compute dtype, as SDPA accumulates.
            let scale = 1.0 / (self.head_dim as f64).sqrt();
            let q32 = cast(&q, DType::F32)?;
            let scores = (q32.matmul(&cast(&k, DType::F32)?.t()?)? * scale)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let attn = cast(&probs.matmul(&cast(&v.contiguous()?, DType::F32)?)?, xs.dtype())?;
            let attn = attn.transpose(1, 2)?.reshape((1, t, self.heads * self.head_dim))?;
            xs = (xs + layer.o.forward(&attn)?)?;
            let h = layer.post_norm.forward(&xs)?;
            let gated = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            xs = (xs + layer.down.forward(&gated)?)?;
        }
        xs.squeeze(0)
    }

    /// `[1, tokens, heads * head_dim]` projections to `[1, heads, tokens, head_dim]`, normed per head and
    /// rotated.
    fn heads_of(&self, xs: &Tensor, heads: usize, norm: &RmsNorm, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let t = xs.dim(1)?;
        let xs = norm.forward(&xs.reshape((1, t, heads, self.head_dim))?)?.transpose(1, 2)?.contiguous()?;
        let dtype = xs.dtype();
        let rotated = candle_nn::rotary_emb::rope(&cast(&xs, DType::F32)?, cos, sin)?;
        cast(&rotated, dtype)
    }

    /// transformers' default rotary table for positions `0..t`: `inv_freq = theta^(-2i/d)` in f32,
    /// angles `position * inv_freq` in f32; `[t, head_dim / 2]` each.
    fn rotary(&self, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let d = self.head_dim;
        let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / (self.theta as f32).powf((2 * i) as f32 / d as f32)).collect();
        let mut cos = Vec::with_capacity(t * d / 2);
        let mut sin = Vec::with_capacity(t * d / 2);
        for p in 0..t {
            for f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((Tensor::from_vec(cos, (t, d / 2), device)?, Tensor::from_vec(sin, (t, d / 2), device)?))
    }
}

fn repeat_kv(xs: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(xs.clone());
    }
    let (b, kv, t, d) = xs.dims4()?;
    xs.unsqueeze(2)?.expand((b, kv, groups, t, d))?.reshape((b, kv * groups, t, d))
}

/// `[t, t]`: 0 on and below the diagonal, minus infinity above.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(values, (t, t), device)
}

/// Qwen's byte-level BPE (`tokenizer/tokenizer.json`) with the chat template the pipelines apply.
pub struct ChatTokenizer {
    inner: Tokenizer,
}

impl ChatTokenizer {
    /// Loads `dir/tokenizer.json` and checks that the checkpoint's chat template (`chat_template.jinja`,
    /// or `chat_template` in `tokenizer_config.json`) is ChatML, the only one this renders.
    pub fn load(dir: &Path) -> std::result::Result<ChatTokenizer, EngineError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(EngineError::MissingFile(path));
        }
        let mut inner = Tokenizer::from_file(&path)
            .map_err(|e| EngineError::InvalidFile { path: path.clone(), why: e.to_string() })?;
        // A saved tokenizer may carry the padding and truncation it was last called with; the prompt's
        // own tokens are what is wanted here.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| EngineError::InvalidFile { path: path.clone(), why: e.to_string() })?;
        let template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => t,
            Err(_) => {
                let config = dir.join("tokenizer_config.json");
                let text = std::fs::read_to_string(&config).map_err(|_| EngineError::MissingFile(config.clone()))?;
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| EngineError::InvalidFile { path: config.clone(), why: e.to_string() })?;
                value.get("chat_template").and_then(|t| t.as_str()).unwrap_or_default().to_owned()
            }
        };
        if !(template.contains("<|im_start|>") && template.contains("add_generation_prompt")) {
            return Err(EngineError::Unsupported {
                file: "tokenizer/tokenizer_config.json".into(),
                key: "chat_template".into(),
                why: "not a ChatML template (<|im_start|>role ... <|im_end|>): the only one the engine renders".into(),
            });
        }
        for token in ["<|im_start|>", "<|im_end|>"] {
            if inner.token_to_id(token).is_none() {
                return Err(EngineError::InvalidFile { path, why: format!("no special token {token}") });
            }
        }
        Ok(ChatTokenizer { inner })
    }

    /// The chat-templated prompt's token ids, at most `max_len`.
    pub fn encode(&self, prompt: &str, max_len: usize) -> std::result::Result<Vec<u32>, EngineError> {
        let text = chat_prompt(prompt);
        let encoding = self
            .inner
            .encode(text.as_str(), false)
            .map_err(|e| EngineError::InvalidInput(format!("cannot tokenize the prompt: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        ids.truncate(max_len);
        Ok(ids)
    }
}

/// One user turn and the assistant's opening, as Qwen3's template renders it with
/// `add_generation_prompt=True, enable_thinking=True`.
pub fn chat_prompt(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

//! imagegate's local diffusion engine: diffusers-layout checkpoints run on candle.
//!
//! Knows nothing of HTTP, SQL or prices. The architecture of every model is read from its checkpoint's
//! config files ([`checkpoint`]), sampling is seeded end to end ([`scheduler`], [`pipeline`]), and
//! everything a request can get wrong is checked before candle (which asserts) sees it.

pub mod candle_unet;
pub mod checkpoint;
pub mod encode;
pub mod flow_match;
pub mod layers;
pub mod pipeline;
pub mod registry;
pub mod scheduler;
pub mod taesd;
pub mod testing;
pub mod text;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae_decoder;
mod vae_encoder;
pub mod weights;
pub mod zimage;

use std::path::PathBuf;

pub use candle_core::Device;
pub use checkpoint::Checkpoint;
pub use layers::Kernels;
pub use pipeline::{Draw, Edit, GenerateParams, Hooks, LoadOptions, NoHooks, Pipeline, Sampler, default_device};
pub use taesd::Decoder;

/// Whether this build runs models on a GPU (the `cuda` or `metal` feature).
pub fn uses_gpu() -> bool {
    cfg!(any(feature = "cuda", feature = "metal"))
}

/// What can go wrong loading or running a model, with the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("missing file {0}")]
    MissingFile(PathBuf),
    #[error("cannot read {path}: {why}")]
    InvalidFile { path: PathBuf, why: String },
    #[error("{file}: {key}: {why}")]
    Unsupported { file: String, key: String, why: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("cancelled")]
    Cancelled,
    #[error("cannot encode the image: {0}")]
    Encode(String),
    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}

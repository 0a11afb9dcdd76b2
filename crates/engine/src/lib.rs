//! imagegate's local diffusion engine: diffusers-layout checkpoints run on candle.
//!
//! Knows nothing of HTTP, SQL or prices. The architecture of every model is read from its checkpoint's
//! config files, sampling is seeded end to end, and everything a request can get wrong is checked
//! before candle (which asserts) sees it.
//!
//! Shared parts: [`weights`] (safetensors, mapped or read), [`layers`] (the blocks models are made of,
//! on the `kernels` crate), [`scheduler`] and [`flow_match`] (samplers), [`text`] (CLIP and Qwen3
//! encoders and tokenizers), [`vae`] (the KL autoencoder), [`pipeline`] (requests, hooks, the
//! [`Pipeline`] of any family), [`encode`] (png/jpeg/webp). Each model family is a folder: [`sd`]
//! (Stable Diffusion 1.x/2.x/XL), [`zimage`] (Z-Image); a new family is a new folder and one arm of
//! [`Pipeline`] and [`Family`].

pub mod config;
pub mod encode;
pub mod flow_match;
pub mod layers;
pub mod pipeline;
pub mod registry;
pub mod scheduler;
pub mod sd;
pub mod testing;
pub mod text;
pub mod vae;
pub mod weights;
pub mod zimage;

use std::path::PathBuf;

pub use candle_core::Device;
pub use layers::Kernels;
pub use pipeline::{
    Draw, Edit, Family, GenerateParams, Hooks, LoadOptions, ModelInfo, NoHooks, Pipeline, Sampler, default_device,
    inspect,
};
pub use sd::Checkpoint;
pub use sd::taesd::Decoder;

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

//! Text encoders and tokenizers shared by model families.

pub mod clip;
pub mod clip_tokenizer;
pub mod qwen3;

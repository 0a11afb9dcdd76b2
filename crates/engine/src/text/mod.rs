//! Text encoders shared by model families.

pub mod qwen3;

//! Writes a tiny diffusers-layout checkpoint with random weights (`engine::testing::TinySpec`'s
//! default: an SD-1.5-shaped model a few kilobytes large) into DIR, for tests outside Rust that need
//! a local model to serve (the SDK conformance suite):
//!
//!     cargo run -p engine --example tiny_checkpoint -- DIR

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: tiny_checkpoint DIR");
        return ExitCode::from(2);
    };
    match engine::testing::write_checkpoint(std::path::Path::new(&dir), &engine::testing::TinySpec::default()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tiny_checkpoint: {e}");
            ExitCode::FAILURE
        }
    }
}

//! Throughput of SD 2.x's linear layers (the UNet's at 512x512 images: 4096, 1024 and 256 tokens; the
//! text encoder's at 77), f32 activations, weights kept in f16 as the engine keeps them, 2 threads
//! unless RAYON_NUM_THREADS says otherwise. Columns: `f32 matmul`, candle's `matmul` by an f32 weight
//! already in memory; `widen + matmul`, the engine's general path (the f16 weight widened to a fresh f32
//! copy, then that); `linear_f16`, `kernels::linear_f16` on the f16 weight. GFLOP/s = 2 * M * N * K /
//! time, median of `--runs`.
//!
//!     cargo run --release -p kernels --example linear_bench -- [--runs 5]
#![allow(clippy::print_stdout)]

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};

/// (name, tokens M, in K, out N)
const ROWS: &[(&str, usize, usize, usize)] = &[
    ("attn q/k/v/out 320 @4096", 4096, 320, 320),
    ("ff in 320->2560 @4096", 4096, 320, 2560),
    ("ff out 1280->320 @4096", 4096, 1280, 320),
    ("ff in 640->5120 @1024", 1024, 640, 5120),
    ("ff out 2560->640 @1024", 1024, 2560, 640),
    ("ff in 1280->10240 @256", 256, 1280, 10240),
    ("ff out 5120->1280 @256", 256, 5120, 1280),
    ("text q/k/v/out 1024 @77", 77, 1024, 1024),
    ("text fc1 1024->4096 @77", 77, 1024, 4096),
    ("text fc2 4096->1024 @77", 77, 4096, 1024),
];

/// Bytes of weight copies for the cold column: more than the last-level cache of any likely machine.
const COLD_BYTES: usize = 256 << 20;

fn main() -> Result<()> {
    let mut runs = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--runs", Some(v)) => runs = v.parse().map_err(|e| candle_core::Error::Msg(format!("--runs: {e}")))?,
            _ => candle_core::bail!("usage: linear_bench [--runs N]"),
        }
    }
    println!("median of {runs} runs after a warm-up, GFLOP/s\n");
    println!(
        "| op | GFLOP | f32 matmul | widen + matmul | linear_f16 | linear_f16, cold weight |\n|---|---:|---:|---:|---:|---:|"
    );
    for &(name, m, k, n) in ROWS {
        let x = Tensor::randn(0f32, 1.0, (1, m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let half = w.to_dtype(DType::F16)?;
        let half_values: Vec<half::f16> = half.flatten_all()?.to_vec1()?;
        let gflop = 2.0 * (m * n * k) as f64 / 1e9;
        // `f` returns what it computed, kept from being optimized away.
        let time = |f: &dyn Fn() -> Result<Option<Tensor>>| -> Result<f64> {
            f()?;
            let mut times = (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    f().map(|y| {
                        std::hint::black_box(y);
                        t.elapsed().as_secs_f64()
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            times.sort_by(f64::total_cmp);
            Ok(gflop / times[times.len() / 2])
        };
        let f32_matmul = time(&|| Ok(Some(x.broadcast_matmul(&w.t()?)?)))?;
        let widened = time(&|| Ok(Some(x.broadcast_matmul(&kernels::to_f32(&half)?.t()?)?)))?;
        let fused = time(&|| kernels::linear_f16(&x, &half_values, n, None))?;
        // The pipeline reads each weight once per generation, from memory: copies enough to
        // overflow the last-level cache, used in turn, so that every call finds its weight cold.
        let copies: Vec<Vec<half::f16>> = (0..(COLD_BYTES / (2 * n * k)).max(2)).map(|_| half_values.clone()).collect();
        let turn = std::cell::Cell::new(0usize);
        let cold = time(&|| {
            let i = turn.get();
            turn.set((i + 1) % copies.len());
            kernels::linear_f16(&x, &copies[i], n, None)
        })?;
        println!("| {name} | {gflop:.2} | {f32_matmul:.1} | {widened:.1} | {fused:.1} | {cold:.1} |");
    }
    Ok(())
}

//! CPU attention time, the engine's unfused candle path against `kernels::attention`, in ms.
//!
//!     cargo run --release -p kernels --example attention_bench -- [--runs 5] [--fused-only] [--only TEXT]
//!
//! The unfused path is `engine::layers::attention`'s: query chunks of at most 16M score floats, each
//! `softmax(q k^T * scale) v` as candle's matmul, `* scale`, softmax over the last dimension (a copy of
//! `candle_nn::ops::softmax_last_dim`'s CPU code, as a custom op: candle-nn is no dependency of this
//! crate) and matmul. Each cell is the median of `--runs` timed runs after one warm-up run, the two
//! taking turns run by run (the machine is shared: load from other processes then hits both alike).
//! `--fused-only` times the fused kernel alone (for a profiler); `--only TEXT` keeps the rows whose
//! `(bh, tq, tk, d)` contains TEXT.
#![allow(clippy::print_stdout)]

use std::time::Instant;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// (bh, tq, tk, d)
const ROWS: &[(usize, usize, usize, usize)] = &[
    (5, 4096, 4096, 64),  // SD 2.x UNet self-attention at a 64x64 latent
    (5, 1024, 1024, 64),  // ... at 32x32
    (1, 4096, 4096, 512), // the VAE's mid-block attention at a 64x64 latent
    (5, 4096, 77, 64),    // cross-attention at 64x64
];

/// The largest score matrix the unfused path builds at once (`engine::layers::SCORE_FLOATS`).
const SCORE_FLOATS: usize = 16 << 20;

/// `candle_nn::ops::softmax_last_dim` on the CPU, f32 only (the same loops, safe code).
struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(src), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            bail!("softmax: expected a contiguous f32 tensor")
        };
        let dims = layout.shape().dims();
        let Some(&n) = dims.last() else { bail!("softmax: scalar input") };
        let src = &src[start..end];
        let mut dst = vec![0.0f32; src.len()];
        src.par_chunks(n.max(1)).zip(dst.par_chunks_mut(n.max(1))).for_each(|(src, dst)| {
            let max = src.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            for (s, d) in src.iter().zip(dst.iter_mut()) {
                *d = (*s - max).exp();
            }
            let sum: f32 = dst.iter().sum();
            dst.iter_mut().for_each(|d| *d /= sum);
        });
        Ok((CpuStorage::F32(dst), Shape::from_dims(dims)))
    }
}

/// `engine::layers::attention`: candle's ops in query chunks.
fn unfused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (bh, tq, _) = q.dims3()?;
    let tk = k.dim(1)?;
    let chunk = (SCORE_FLOATS / (bh * tk).max(1)).clamp(1, tq.max(1));
    let kt = k.t()?;
    let one = |q: &Tensor| -> Result<Tensor> {
        let scores = (q.matmul(&kt)? * scale)?;
        scores.apply_op1_no_bwd(&SoftmaxLastDim)?.matmul(v)
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

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut runs, mut fused_only, mut only) = (5, false, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--fused-only" => fused_only = true,
            "--only" => match args.next() {
                Some(text) => only = Some(text),
                None => bail!("--only takes a text"),
            },
            "--runs" => match args.next().map(|v| v.parse::<usize>()) {
                Some(Ok(n)) if n > 0 => runs = n,
                _ => bail!("--runs takes a positive number"),
            },
            _ => bail!("usage: attention_bench [--runs N] [--fused-only] [--only TEXT]"),
        }
    }
    println!("{} rayon threads, median of {runs} runs", rayon::current_num_threads());
    println!("{:<28} {:>12} {:>12} {:>8} {:>10}", "(bh, tq, tk, d)", "unfused ms", "fused ms", "speedup", "rel err");
    for &(bh, tq, tk, d) in ROWS {
        let row = format!("({bh}, {tq}, {tk}, {d})");
        if only.as_ref().is_some_and(|only| !row.contains(only.as_str())) {
            continue;
        }
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (bh, tq, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (bh, tk, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (bh, tk, d), &dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        let want = if fused_only { kernels::attention(&q, &k, &v, scale)? } else { unfused(&q, &k, &v, scale)? };
        let got = kernels::attention(&q, &k, &v, scale)?;
        let err = ((&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?)
            / want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        let (mut slow, mut fast) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            if !fused_only {
                let start = Instant::now();
                drop(unfused(&q, &k, &v, scale)?);
                slow.push(start.elapsed().as_secs_f64() * 1e3);
            }
            let start = Instant::now();
            drop(kernels::attention(&q, &k, &v, scale)?);
            fast.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let (slow, fast) = (if fused_only { f64::NAN } else { median(slow) }, median(fast));
        println!("{row:<28} {slow:>12.1} {fast:>12.1} {:>7.2}x {err:>10.1e}", slow / fast);
    }
    Ok(())
}

//! Group normalization, optionally fused with SiLU, in one read and one write of the tensor.
//!
//! candle's `GroupNorm` is a chain of tensor ops (reshape, mean, subtract, square, mean, divide, scale,
//! shift), each a pass over the whole activation with its own allocation: at the VAE decoder's 128
//! channels x 512 x 512 that is about a GB of memory traffic per norm, and the SiLU after it another.
//! Here each (image, group) slab is contiguous in NCHW, so a thread takes whole slabs: the statistics in
//! f64 (two passes over the slab while it is in cache), then one pass that normalizes, scales, shifts and
//! applies SiLU into the output.

use rayon::prelude::*;

/// What follows the normalization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    /// `x * sigmoid(x)`, as diffusers applies after most norms.
    Silu,
}

/// `out[n, c, ..] = act((x - mean[n, g]) / sqrt(var[n, g] + eps) * gamma[c] + beta[c])` over `groups`
/// groups of `channels / groups` consecutive channels; `x` is `[batch, channels, pixels]` row-major.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm(
    x: &[f32],
    out: &mut [f32],
    channels: usize,
    pixels: usize,
    groups: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
    activation: Activation,
) {
    let per_group = channels / groups;
    let slab = per_group * pixels;
    if slab == 0 {
        return;
    }
    out.par_chunks_mut(slab).zip(x.par_chunks(slab)).enumerate().for_each(|(i, (dst, src))| {
        let n = src.len() as f64;
        let mean = src.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = src.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        let c0 = (i % groups) * per_group;
        for (c, (d, s)) in dst.chunks_mut(pixels).zip(src.chunks(pixels)).enumerate() {
            // One multiply-add per value: y = x * scale + shift.
            let scale = (inv * f64::from(gamma[c0 + c])) as f32;
            let shift = (f64::from(beta[c0 + c]) - mean * inv * f64::from(gamma[c0 + c])) as f32;
            match activation {
                Activation::None => d.iter_mut().zip(s).for_each(|(d, &s)| *d = s * scale + shift),
                Activation::Silu => d.iter_mut().zip(s).for_each(|(d, &s)| {
                    let y = s * scale + shift;
                    *d = y / (1.0 + (-y).exp());
                }),
            }
        }
    });
}

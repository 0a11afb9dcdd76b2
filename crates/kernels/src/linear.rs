//! A linear layer with f16 weights for few tokens: `y[m][n] = Σ_k x[m][k] w[n][k]`, `x` f32 `[M x K]`
//! row-major, `w` f16 `[N x K]` row-major (PyTorch's layout), for the text encoders' 77 tokens.
//!
//! With few rows each weight is used only `M` times, so a gemm is bound by memory, not arithmetic: the
//! engine's general path widens the layer's f16 weight into a fresh f32 copy, and the gemm then packs
//! that copy again, three passes over four bytes per weight for `2 M` flops. Here each rayon task takes
//! `NB` weight rows (output features), widens them `KC` values at a time into a small buffer that stays
//! in cache, and runs dot products of `R` token rows against `C` weight rows at once, `L` lanes per
//! accumulator (`R x C` vector accumulators in registers, reduced across lanes at the end): the
//! weights are read once, as f16, and nothing is allocated besides the output and the buffer.
//!
//! The loops are plain Rust over fixed-size chunks that LLVM vectorizes; `pulp` runs them inside a
//! function compiled for AVX2+FMA or AVX-512, chosen at run time (`L = 8` or 16 lanes). On CPUs with
//! neither, [`linear_f16`] declines and the caller takes the general path.

use half::f16;
use half::slice::HalfFloatSliceExt;
use pulp::{Simd, WithSimd};
use rayon::prelude::*;

/// Token rows per tile.
const R: usize = 4;
/// Weight rows (output features) per rayon task.
const NB: usize = 32;
/// Weight values widened at a time per row: `NB x KC` floats (64 KiB) stay in L2 while every row
/// group passes over them.
const KC: usize = 512;

/// `y = x wᵀ (+ bias)` for `x` `[m x k]`, `w` `[n x k]`, `y` `[m x n]`, on the current rayon pool.
/// Returns `false`, leaving `y` untouched, when the CPU has neither AVX2+FMA nor AVX-512.
pub(crate) fn linear_f16(
    x: &[f32],
    w: &[f16],
    bias: Option<&[f32]>,
    dims: (usize, usize, usize),
    y: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // 16 lanes and 4 weight rows on AVX-512 (16 of its 32 registers hold accumulators), 8 lanes
        // and 2 rows on AVX2 (8 of 16).
        if let Some(simd) = pulp::x86::V4::try_new() {
            run::<_, 16, 4>(simd, x, w, bias, dims, y);
            return true;
        }
        if let Some(simd) = pulp::x86::V3::try_new() {
            run::<_, 8, 2>(simd, x, w, bias, dims, y);
            return true;
        }
    }
    // Elsewhere the general path, until a NEON variant is measured.
    let _ = (x, w, bias, dims, y);
    false
}

fn run<S: Simd, const L: usize, const C: usize>(
    simd: S,
    x: &[f32],
    w: &[f16],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    y: &mut [f32],
) {
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(NB))
        .into_par_iter()
        .map(|b| {
            let (n0, nb) = (b * NB, NB.min(n - b * NB));
            let mut out = vec![0.0f32; m * nb];
            let mut wide = vec![0.0f32; nb * KC.min(k)];
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                for (j, row) in wide.chunks_exact_mut(kc).take(nb).enumerate() {
                    w[(n0 + j) * k + k0..][..kc].convert_to_f32_slice(row);
                }
                simd.vectorize(Dots::<L, C> { x, k, k0, kc, wide: &wide[..nb * kc], nb, out: &mut out });
            }
            out
        })
        .collect();
    for (b, out) in blocks.iter().enumerate() {
        let (n0, nb) = (b * NB, NB.min(n - b * NB));
        for (dst, src) in y.chunks_exact_mut(n).zip(out.chunks_exact(nb)) {
            let dst = &mut dst[n0..n0 + nb];
            match bias {
                Some(bias) => dst.iter_mut().zip(src).zip(&bias[n0..]).for_each(|((d, s), b)| *d = s + b),
                None => dst.copy_from_slice(src),
            }
        }
    }
}

/// One task's step: the token rows' columns `k0 .. k0 + kc` against its `nb` weight rows `wide`
/// (`[nb x kc]`, widened), added into `out` `[m x nb]`; `L` lanes, `C` weight rows at a time.
struct Dots<'a, const L: usize, const C: usize> {
    x: &'a [f32],
    k: usize,
    k0: usize,
    kc: usize,
    wide: &'a [f32],
    nb: usize,
    out: &'a mut [f32],
}

impl<const L: usize, const C: usize> WithSimd for Dots<'_, L, C> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let Dots { x, k, k0, kc, wide, nb, out } = self;
        let m = out.len() / nb.max(1);
        let row = |i: usize| &x[i * k + k0..][..kc];
        let mut i = 0;
        while i + R <= m {
            tile::<L, R, C>(std::array::from_fn(|r| row(i + r)), wide, kc, nb, &mut out[i * nb..(i + R) * nb]);
            i += R;
        }
        while i < m {
            tile::<L, 1, C>([row(i)], wide, kc, nb, &mut out[i * nb..(i + 1) * nb]);
            i += 1;
        }
    }
}

/// `out[r][j] += x[r] · wide[j]` for `RR` token rows and every weight row, `C` at a time.
#[inline(always)]
fn tile<const L: usize, const RR: usize, const C: usize>(
    x: [&[f32]; RR],
    wide: &[f32],
    kc: usize,
    nb: usize,
    out: &mut [f32],
) {
    let wrow = |j: usize| &wide[j * kc..(j + 1) * kc];
    let mut j = 0;
    while j + C <= nb {
        let sums = dots::<L, RR, C>(x, std::array::from_fn(|c| wrow(j + c)));
        for (r, sums) in sums.iter().enumerate() {
            out[r * nb + j..][..C].iter_mut().zip(sums).for_each(|(o, s)| *o += s);
        }
        j += C;
    }
    while j < nb {
        let sums = dots::<L, RR, 1>(x, [wrow(j)]);
        for (r, sums) in sums.iter().enumerate() {
            out[r * nb + j] += sums[0];
        }
        j += 1;
    }
}

/// The `RR x C` dot products of equal-length rows: `L`-lane accumulators over the whole chunks,
/// reduced by constant-bound loops (nothing borrows the accumulators, which stay in registers), plus
/// the scalar tail.
#[inline(always)]
fn dots<const L: usize, const RR: usize, const C: usize>(x: [&[f32]; RR], w: [&[f32]; C]) -> [[f32; C]; RR] {
    let len = x.iter().chain(&w).map(|row| row.len()).min().unwrap_or(0);
    let chunks = len / L;
    let xc: [&[[f32; L]]; RR] = x.map(|row| &row.as_chunks::<L>().0[..chunks]);
    let wc: [&[[f32; L]]; C] = w.map(|row| &row.as_chunks::<L>().0[..chunks]);
    let mut acc = [[[0.0f32; L]; C]; RR];
    for i in 0..chunks {
        let wv: [[f32; L]; C] = std::array::from_fn(|c| wc[c][i]);
        for r in 0..RR {
            let xv = xc[r][i];
            for c in 0..C {
                for l in 0..L {
                    acc[r][c][l] = xv[l].mul_add(wv[c][l], acc[r][c][l]);
                }
            }
        }
    }
    let done = chunks * L;
    let mut sums = [[0.0f32; C]; RR];
    for r in 0..RR {
        for c in 0..C {
            let mut s: f32 = x[r][done..len].iter().zip(&w[c][done..len]).map(|(a, b)| a * b).sum();
            for l in 0..L {
                s += acc[r][c][l];
            }
            sums[r][c] = s;
        }
    }
    sums
}

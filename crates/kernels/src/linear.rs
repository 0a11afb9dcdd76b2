//! A linear layer with f16 weights for few tokens: `y[m][n] = Σ_k x[m][k] w[n][k]`, `x` f32 `[M x K]`
//! row-major, `w` f16 `[N x K]` row-major (PyTorch's layout), for up to a few hundred rows: the text
//! encoders' 77 tokens, the UNet's low-resolution levels, its 8x8 convolutions as im2col rows.
//!
//! With few rows each weight is used only `M` times, so a gemm is bound by memory, not arithmetic: the
//! engine's general path widens the layer's f16 weight into a fresh f32 copy, and the gemm then packs
//! that copy again, three passes over four bytes per weight for `2 M` flops. Here each rayon task takes
//! `NB` weight rows (output features), widens them `KC` values at a time into a small buffer that stays
//! in cache, and runs dot products of `R` token rows against `C` weight rows at once, `L` lanes per
//! accumulator (`R x C` vector accumulators in registers, reduced across lanes at the end of each
//! `KC` chunk): the weights are read once, as f16, and nothing is allocated besides the output and the
//! buffer. The chunk is long so that the reductions stay rare: at `KC = 512` they cost a quarter of the
//! loop (16 of them per tile and chunk), and the text encoder's linears ran 25% slower.
//!
//! (An outer-product tile, gemm-style, needs no reductions but a transposed copy of the weights:
//! measured, it won at 256 rows and lost at the text encoder's 77 and the 8x8 convolutions' 64, where
//! each weight is used too few times to pay for its transposition. BENCHMARKS.md, 2026-12-01.)
//!
//! The accumulators are `pulp` vector values (`S::f32s`, `L = 16` lanes on AVX-512, 8 on AVX2+FMA),
//! and `pulp` runs the loops inside a function compiled for the instructions chosen at run time. (With
//! `[f32; L]` arrays instead, LLVM stored every accumulator to the stack on each iteration, at a third
//! of the speed.) On CPUs with neither, [`linear_f16`] declines and the caller takes the general path.

use candle_core::Result;
use half::f16;
use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use crate::gemm::{Mat, MatMut, matmul};
use crate::scratch::Values;
use crate::widen::HalfFloat;

/// Output values (at least) per rayon task when [`linear_widened`] writes the bias rows.
const BIAS_VALUES_PER_TASK: usize = 1 << 16;

/// Token rows per tile.
const R: usize = 4;
/// Weight rows (output features) per rayon task.
const NB: usize = 32;
/// Weight values widened at a time per row: `NB x KC` floats (512 KiB) stay in L2 while every row
/// group passes over them, and most layers (`k <= 4096`) reduce their accumulators once.
const KC: usize = 4096;

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
            run::<_, 4>(simd, x, w, bias, dims, y);
            return true;
        }
        if let Some(simd) = pulp::x86::V3::try_new() {
            run::<_, 2>(simd, x, w, bias, dims, y);
            return true;
        }
    }
    // Elsewhere the general path, until a NEON variant is measured.
    let _ = (x, w, bias, dims, y);
    false
}

/// `y = x wᵀ (+ bias)` for many rows, where a gemm wins: `w` widened into this thread's reused
/// reused widened buffer ([`Values`]; no fresh copy per call), `y` starting from the bias rows if any (no pass of
/// its own after the product).
pub(crate) fn linear_widened(
    x: &[f32],
    w: &[f16],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let mut y = crate::scratch::zeroed(m * n);
    // The bias rows written by the threads: up to 42 MB at the UNet's feed-forward (4096 x 2560), where
    // one thread repeating the bias (and taking the fresh pages' faults) left the other idle.
    if let Some(bias) = bias {
        if bias.len() != n {
            candle_core::bail!("linear: bias of {} values for {n} output features", bias.len())
        }
        let rows_per_task = BIAS_VALUES_PER_TASK.div_ceil(n.max(1));
        y.par_chunks_mut(n.max(1) * rows_per_task).for_each(|rows| {
            rows.chunks_exact_mut(n.max(1)).for_each(|row| row.copy_from_slice(bias));
        });
    }
    Values::F16(w).with_f32(|wide| {
        // wᵀ read in place: element (l, j) is w[j * k + l].
        let wt = Mat { data: wide, rows: k, cols: n, row_stride: 1, col_stride: k };
        let dst = MatMut { data: &mut y, rows: m, cols: n, row_stride: n };
        matmul(dst, Mat::rows(x, m, k, k), wt, bias.is_some(), rayon::current_num_threads())
    })?;
    Ok(y)
}

fn run<S: Simd, const C: usize>(
    simd: S,
    x: &[f32],
    w: &[f16],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    y: &mut [f32],
) {
    let zeros = vec![0.0f32; KC.min(k)];
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(NB))
        .into_par_iter()
        .map(|b| {
            let (n0, nb) = (b * NB, NB.min(n - b * NB));
            // Weight rows past nb (up to a multiple of C) stay zero, and so do token rows past m (up
            // to a multiple of R): every tile is whole, their results are dropped.
            let nbp = nb.next_multiple_of(C);
            let mut out = vec![0.0f32; m.next_multiple_of(R) * nbp];
            let mut wide = vec![0.0f32; nbp * KC.min(k)];
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                for (j, row) in wide.chunks_exact_mut(kc).take(nb).enumerate() {
                    f16::widen_slice(&w[(n0 + j) * k + k0..][..kc], row);
                }
                let x = |i: usize| if i < m { &x[i * k + k0..][..kc] } else { &zeros[..kc] };
                let wide = &wide[..nbp * kc];
                for (g, out) in out.chunks_exact_mut(R * nbp).enumerate() {
                    let rows: [&[f32]; R] = std::array::from_fn(|r| x(g * R + r));
                    simd.vectorize(Dots::<C> { rows, wide, kc, out });
                }
            }
            out
        })
        .collect();
    // Each block's columns into every token row, the rows shared out between the threads.
    y.par_chunks_exact_mut(n.max(1)).enumerate().with_min_len(8).for_each(|(i, dst)| {
        for (b, out) in blocks.iter().enumerate() {
            let (n0, nb) = (b * NB, NB.min(n - b * NB));
            let src = &out[i * nb.next_multiple_of(C)..][..nb];
            let dst = &mut dst[n0..n0 + nb];
            match bias {
                Some(bias) => dst.iter_mut().zip(src).zip(&bias[n0..]).for_each(|((d, s), b)| *d = s + b),
                None => dst.copy_from_slice(src),
            }
        }
    });
}

/// R token rows (`kc` values each) against every weight row of `wide` (`[nbp x kc]`, widened, `nbp` a
/// multiple of C), added into `out` `[R x nbp]`.
struct Dots<'a, const C: usize> {
    rows: [&'a [f32]; R],
    wide: &'a [f32],
    kc: usize,
    out: &'a mut [f32],
}

impl<const C: usize> WithSimd for Dots<'_, C> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Dots { rows, wide, kc, out } = self;
        let nbp = out.len() / R;
        for (j, weights) in wide.chunks_exact(C * kc.max(1)).enumerate() {
            let sums = match C {
                4 => widen_sums(dots4(simd, rows, std::array::from_fn(|c| &weights[c * kc..(c + 1) * kc]))),
                _ => widen_sums(dots2(simd, rows, std::array::from_fn(|c| &weights[c * kc..(c + 1) * kc]))),
            };
            for (r, sums) in sums.iter().enumerate() {
                for (c, s) in sums.iter().enumerate().take(C) {
                    out[r * nbp + j * C + c] += s;
                }
            }
        }
    }
}

/// Sums of `C' <= 4` weight rows as four columns (the unused ones zero).
#[inline(always)]
fn widen_sums<const C: usize>(sums: [[f32; C]; R]) -> [[f32; 4]; R] {
    sums.map(|row| std::array::from_fn(|c| row.get(c).copied().unwrap_or(0.0)))
}

/// The 4 x 4 dot products of four token rows with four weight rows, all of one length: vector
/// accumulators (`S::f32s`, 16 lanes on AVX-512) over the whole vectors, reduced at the end, then the
/// scalar tail. The main loop zips the rows' vector iterators, so it has no bounds checks and no
/// exits, and the sixteen accumulators stay in registers (16 of AVX-512's 32).
#[inline(always)]
fn dots4<S: Simd>(simd: S, x: [&[f32]; R], w: [&[f32]; 4]) -> [[f32; 4]; R] {
    let [x0, x1, x2, x3] = x.map(|row| S::as_simd_f32s(row).0);
    let [w0, w1, w2, w3] = w.map(|row| S::as_simd_f32s(row).0);
    let mut acc = [[simd.splat_f32s(0.0); 4]; R];
    let zipped = x0.iter().zip(x1).zip(x2).zip(x3).zip(w0).zip(w1).zip(w2).zip(w3);
    for (((((((a0, a1), a2), a3), b0), b1), b2), b3) in zipped {
        let (xs, ws) = ([*a0, *a1, *a2, *a3], [*b0, *b1, *b2, *b3]);
        for (acc, x) in acc.iter_mut().zip(xs) {
            for (acc, w) in acc.iter_mut().zip(ws) {
                *acc = simd.mul_add_e_f32s(x, w, *acc);
            }
        }
    }
    reduce(simd, acc, x, w, x0.len() * S::F32_LANES)
}

/// [`dots4`] with two weight rows (AVX2: 8 accumulators of its 16 registers).
#[inline(always)]
fn dots2<S: Simd>(simd: S, x: [&[f32]; R], w: [&[f32]; 2]) -> [[f32; 2]; R] {
    let [x0, x1, x2, x3] = x.map(|row| S::as_simd_f32s(row).0);
    let [w0, w1] = w.map(|row| S::as_simd_f32s(row).0);
    let mut acc = [[simd.splat_f32s(0.0); 2]; R];
    for (((((a0, a1), a2), a3), b0), b1) in x0.iter().zip(x1).zip(x2).zip(x3).zip(w0).zip(w1) {
        let (xs, ws) = ([*a0, *a1, *a2, *a3], [*b0, *b1]);
        for (acc, x) in acc.iter_mut().zip(xs) {
            for (acc, w) in acc.iter_mut().zip(ws) {
                *acc = simd.mul_add_e_f32s(x, w, *acc);
            }
        }
    }
    reduce(simd, acc, x, w, x0.len() * S::F32_LANES)
}

/// The accumulators' lanes summed, plus the products of the rows' values from `done` on.
#[inline(always)]
fn reduce<S: Simd, const C: usize>(
    simd: S,
    acc: [[S::f32s; C]; R],
    x: [&[f32]; R],
    w: [&[f32]; C],
    done: usize,
) -> [[f32; C]; R] {
    let mut sums = [[0.0f32; C]; R];
    for ((sums, acc), x) in sums.iter_mut().zip(acc).zip(x) {
        for ((sum, acc), w) in sums.iter_mut().zip(acc).zip(w) {
            let tail: f32 = x[done..].iter().zip(&w[done..]).map(|(a, b)| a * b).sum();
            *sum = simd.reduce_sum_f32s(acc) + tail;
        }
    }
    sums
}

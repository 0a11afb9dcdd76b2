//! A linear layer with f16 weights for few tokens: `y[m][n] = Σ_k x[m][k] w[n][k]`, `x` f32 `[M x K]`
//! row-major, `w` f16 `[N x K]` row-major (PyTorch's layout), for up to a few hundred rows: the text
//! encoders' 77 tokens, the UNet's low-resolution levels, its 8x8 convolutions as im2col rows.
//!
//! With few rows each weight is used only `M` times, so a gemm is bound by memory, not arithmetic: the
//! engine's general path widens the layer's f16 weight into a fresh f32 copy, and the gemm then packs
//! that copy again, three passes over four bytes per weight for `2 M` flops. Here each rayon task takes
//! `NB` weight rows (output features), widens them `KC` values at a time into a small buffer that stays
//! in L2 (module `widen`), and runs dot products of `R` token rows against `C` weight rows at once, `L`
//! lanes per accumulator (`R x C` vector accumulators in registers): the weights are read once, as f16,
//! and nothing is allocated besides the output, the buffer and the accumulators.
//!
//! The dot products run `KB` values at a time: the `R` token rows' segments stay in L1 while every
//! weight row of the task passes them, and each tile's vector accumulators are kept in memory from one
//! block to the next and reduced across lanes only at the end (reducing at the end of each short block
//! instead cost a quarter of the loop: the text encoder's linears ran 25% slower). Without the blocks
//! both the token rows and the weight rows streamed from L2 at every step (on the AVX-512 development
//! VM: 6 x 4 tiles in 512-value blocks ran the 77- and 256-row layers 1.09-1.39x faster on one
//! thread than 4 x 4 tiles over whole 4096-value chunks).
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

/// Weight rows (output features) per rayon task.
const NB: usize = 32;
/// Weight values widened at a time per row: `NB x KC` floats (512 KiB) stay in L2 while every row
/// group passes over them.
const KC: usize = 4096;
/// Values per row in one L1 block: `R` token rows' segments (at most 12 KiB) stay in L1 while the
/// weight rows pass.
const KB: usize = 512;

/// `y = x wᵀ (+ bias)` for `x` `[m x k]`, `w` `[n x k]`, `y` `[m x n]`, on the current rayon pool.
/// Returns `false`, leaving `y` untouched, when the CPU has neither AVX2+FMA nor AVX-512 (or
/// [`crate::with_level`] forces the baseline).
pub(crate) fn linear_f16(
    x: &[f32],
    w: &[f16],
    bias: Option<&[f32]>,
    dims: (usize, usize, usize),
    y: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // 16 lanes, 6 token rows and 4 weight rows on AVX-512 (24 of its 32 registers hold
        // accumulators), 8 lanes, 4 rows and 2 on AVX2 (8 of 16).
        match crate::level::arch() {
            pulp::Arch::V4(simd) => {
                run::<_, 6, 4>(simd, x, w, bias, dims, y);
                return true;
            }
            pulp::Arch::V3(simd) => {
                run::<_, 4, 2>(simd, x, w, bias, dims, y);
                return true;
            }
            _ => {}
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

fn run<S: Simd, const R: usize, const C: usize>(
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
            simd.vectorize(Block::<R, C> { x, w: &w[n0 * k..(n0 + nb) * k], m, k, nb })
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

/// One task's `nb` weight rows (`w`, `[nb x k]`) against all `m` token rows of `x` (`[m x k]`): the
/// products `[m' x nbp]`, `m'` and `nbp` rounded up to multiples of `R` and `C`.
struct Block<'a, const R: usize, const C: usize> {
    x: &'a [f32],
    w: &'a [f16],
    m: usize,
    k: usize,
    nb: usize,
}

impl<const R: usize, const C: usize> WithSimd for Block<'_, R, C> {
    type Output = Vec<f32>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Vec<f32> {
        let Block { x, w, m, k, nb } = self;
        // Weight rows past nb (up to a multiple of C) and token rows past m (up to a multiple of R)
        // are zeros or stale values: every tile is whole, and their results are dropped.
        let nbp = nb.next_multiple_of(C);
        let (groups, quads) = (m.div_ceil(R), nbp / C);
        // Each tile's vector accumulators, kept from one L1 block to the next and reduced at the end.
        let mut acc = vec![[[simd.splat_f32s(0.0); C]; R]; groups * quads];
        let mut out = vec![0.0f32; groups * R * nbp];
        let mut wide = vec![0.0f32; nbp * KC.min(k)];
        let zeros = vec![0.0f32; KB.min(k)];
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for (j, row) in wide.chunks_exact_mut(kc).take(nb).enumerate() {
                f16::widen_slice(&w[j * k + k0..][..kc], row);
            }
            for kb0 in (0..kc).step_by(KB) {
                let kb = KB.min(kc - kb0);
                for g in 0..groups {
                    // R token rows' segments, 12 KiB at most: they stay in L1 while the weight rows
                    // stream past them from L2.
                    let rows: [&[f32]; R] = std::array::from_fn(|r| {
                        let i = g * R + r;
                        if i < m { &x[i * k + k0 + kb0..][..kb] } else { &zeros[..kb] }
                    });
                    for (q, acc) in acc[g * quads..(g + 1) * quads].iter_mut().enumerate() {
                        let weights: [&[f32]; C] = std::array::from_fn(|c| &wide[(q * C + c) * kc + kb0..][..kb]);
                        let tail = dots(simd, rows, weights, acc);
                        if let Some(tail) = tail {
                            for (r, tail) in tail.iter().enumerate() {
                                for (c, t) in tail.iter().enumerate() {
                                    out[(g * R + r) * nbp + q * C + c] += t;
                                }
                            }
                        }
                    }
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let (g, q) = (t / quads, t % quads);
            for (r, acc) in acc.iter().enumerate() {
                for (c, &a) in acc.iter().enumerate() {
                    out[(g * R + r) * nbp + q * C + c] += simd.reduce_sum_f32s(a);
                }
            }
        }
        out
    }
}

/// The `R x C` dot products of `R` token rows with `C` weight rows, all of one length, added into the
/// tile's vector accumulators `acc` (`S::f32s`, 16 lanes on AVX-512) over the whole vectors; the
/// products of the scalar tail past them, if there is one, are returned. Each step loads `R + C`
/// vectors for `R x C` multiply-adds; the rows are re-sliced to one length first, so the indexing
/// has no bounds checks left, and the accumulators stay in registers (24 of AVX-512's 32 at `6 x 4`,
/// 8 of AVX2's 16 at `4 x 2`).
#[inline(always)]
fn dots<S: Simd, const R: usize, const C: usize>(
    simd: S,
    x: [&[f32]; R],
    w: [&[f32]; C],
    acc: &mut [[S::f32s; C]; R],
) -> Option<[[f32; C]; R]> {
    let len = w.first().map_or(0, |row| S::as_simd_f32s(row).0.len());
    let xv: [&[S::f32s]; R] = x.map(|row| &S::as_simd_f32s(row).0[..len]);
    let wv: [&[S::f32s]; C] = w.map(|row| &S::as_simd_f32s(row).0[..len]);
    let mut a = *acc;
    for i in 0..len {
        let ws: [S::f32s; C] = std::array::from_fn(|c| wv[c][i]);
        for (a, xv) in a.iter_mut().zip(&xv) {
            let x = xv[i];
            for (a, w) in a.iter_mut().zip(ws) {
                *a = simd.mul_add_e_f32s(x, w, *a);
            }
        }
    }
    *acc = a;
    let done = len * S::F32_LANES;
    if w.first().is_none_or(|row| row.len() == done) {
        return None;
    }
    Some(std::array::from_fn(|r| {
        std::array::from_fn(|c| x[r][done..].iter().zip(&w[c][done..]).map(|(a, b)| a * b).sum())
    }))
}

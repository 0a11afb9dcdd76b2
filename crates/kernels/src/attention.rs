//! Scaled dot-product attention, `softmax(q k^T * scale) v`, fused flash-attention style.
//!
//! The unfused path (matmul, scale, softmax, matmul) materializes the `[tq x tk]` scores three times
//! (product, scaled, softmax), each into freshly allocated memory: at a 64x64 latent (tq = tk = 4096, five
//! heads) that is 320 MiB per matrix, in chunks of 64 MiB. Here each rayon task takes one head and a
//! block of queries and walks the keys a block at a time: the scores of the query block against a key
//! block (a single-threaded gemm reading k transposed in place) are scaled, go through an online softmax
//! (a running maximum and sum per query; the output rows are rescaled when the maximum grows) and are
//! multiplied into the output rows by a second gemm that accumulates; the rows are divided by their sums
//! at the end. The only scratch is one score block per thread (at most `QUERY_BLOCK x KEY_BLOCK` floats
//! plus two per query), in the thread's band buffer that is kept between calls (module `scratch`).

use candle_core::Result;
use rayon::prelude::*;

use crate::gemm::{Mat, MatMut, matmul};
use crate::math::exp;
use crate::scratch::{Slot, with_scratch};

/// Queries per task: enough rows for the gemms to run at full rate.
const QUERY_BLOCK: usize = 128;
/// Keys per block: the score block is `QUERY_BLOCK x KEY_BLOCK` floats, 256 KiB, in L2 with the key and
/// value blocks at head sizes up to 64. Blocks from 64x128 to 256x1024 ran within the noise of each
/// other (`examples/attention_bench.rs`, 2-core AVX2 VM, d = 64 and 512): the time goes to the gemms
/// and the exponentials, not to memory.
const KEY_BLOCK: usize = 512;

/// The sizes of one call: `bh` heads, each `tq` queries and `tk` keys of `d` values, `tk` values of `dv`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub bh: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
    pub dv: usize,
}

/// `out = softmax(q k^T * scale) v` per head, all row-major: q `[bh, tq, d]`, k `[bh, tk, d]`,
/// v `[bh, tk, dv]`, out `[bh, tq, dv]`. With no keys (`tk == 0`) the output is zero.
pub(crate) fn attention(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], dims: Dims, scale: f32) -> Result<()> {
    let Dims { bh, tq, tk, d, dv } = dims;
    if q.len() != bh * tq * d || k.len() != bh * tk * d || v.len() != bh * tk * dv || out.len() != bh * tq * dv {
        candle_core::bail!("attention: slice lengths do not match {dims:?}")
    }
    if out.is_empty() {
        return Ok(());
    }
    if tk == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // Smaller query blocks when there are too few heads and queries to give every thread a block.
    let threads = rayon::current_num_threads().max(1);
    let qb = QUERY_BLOCK.min(tq.div_ceil(threads.div_ceil(bh))).max(1);
    out.par_chunks_mut(tq * dv).enumerate().try_for_each(|(h, out)| {
        let q = &q[h * tq * d..(h + 1) * tq * d];
        let k = &k[h * tk * d..(h + 1) * tk * d];
        let v = &v[h * tk * dv..(h + 1) * tk * dv];
        out.par_chunks_mut(qb * dv).enumerate().try_for_each(|(b, out)| {
            let rows = out.len() / dv.max(1);
            let q = &q[b * qb * d..(b * qb + rows) * d];
            query_block(q, k, v, out, rows, dims, scale)
        })
    })
}

/// One head's attention for `m` queries (`q` `[m, d]`, `out` `[m, dv]`) against all its keys, in
/// the thread's band buffer, compiled for the CPU's widest vectors ([`QueryBlock`]).
fn query_block(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], m: usize, dims: Dims, scale: f32) -> Result<()> {
    let kb = KEY_BLOCK.min(dims.tk);
    with_scratch(Slot::Band, m * kb + 2 * m, |buffer| {
        crate::level::arch().dispatch(QueryBlock { q, k, v, out, m, dims, scale, buffer })
    })
}

/// [`query_block`]'s work, run by `pulp`'s dispatch inside a function compiled for the CPU's widest
/// vectors: everything below is `#[inline(always)]`, so the exponentials and the scaling loops use
/// AVX-512 or AVX2 where the CPU has them (the crate itself is built for SSE2).
struct QueryBlock<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a mut [f32],
    m: usize,
    dims: Dims,
    scale: f32,
    buffer: &'a mut [f32],
}

impl pulp::WithSimd for QueryBlock<'_> {
    type Output = Result<()>;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Result<()> {
        let QueryBlock { q, k, v, out, m, dims, scale, buffer } = self;
        query_block_in(q, k, v, out, m, dims, scale, buffer)
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn query_block_in(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    m: usize,
    dims: Dims,
    scale: f32,
    buffer: &mut [f32],
) -> Result<()> {
    let Dims { tk, d, dv, .. } = dims;
    let kb = KEY_BLOCK.min(tk);
    let (scores, stats) = buffer.split_at_mut(m * kb);
    let (maxima, sums) = stats.split_at_mut(m);
    for start in (0..tk).step_by(kb) {
        let n = kb.min(tk - start);
        let first = start == 0;
        let scores = &mut scores[..m * n];
        // scores = q k_block^T: element (l, j) of k_block^T is k[(start + j) * d + l].
        let kt = Mat { data: &k[start * d..(start + n) * d], rows: d, cols: n, row_stride: 1, col_stride: d };
        let dst = MatMut { data: scores, rows: m, cols: n, row_stride: n };
        matmul(dst, Mat::rows(q, m, d, d), kt, false, 1)?;
        for i in 0..m {
            let row = &mut scores[i * n..(i + 1) * n];
            let block_max = scale_and_max(row, scale);
            let max = if first { block_max } else { maxima[i].max(block_max) };
            let sum = exp_and_sum(row, max);
            if first {
                sums[i] = sum;
            } else {
                // The rows so far were weighted by exp(s - old max): bring them to the new maximum.
                let correction = (maxima[i] - max).exp();
                if correction != 1.0 {
                    out[i * dv..(i + 1) * dv].iter_mut().for_each(|o| *o *= correction);
                }
                sums[i] = sums[i] * correction + sum;
            }
            maxima[i] = max;
        }
        // out (+)= p v_block
        let dst = MatMut { data: out, rows: m, cols: dv, row_stride: dv };
        let v_block = Mat::rows(&v[start * dv..(start + n) * dv], n, dv, dv);
        matmul(dst, Mat::rows(scores, m, n, n), v_block, !first, 1)?;
    }
    for (row, &sum) in out.chunks_exact_mut(dv.max(1)).zip(sums.iter()) {
        row.iter_mut().for_each(|o| *o /= sum);
    }
    Ok(())
}

/// Lanes of the reductions below: independent accumulators the compiler keeps in one AVX-512 register
/// (two AVX2 ones, four SSE2 ones): 16 took the 64x64 self-attention from 141 to 128 ms against 8.
const LANES: usize = 16;

/// Multiplies `row` by `scale` and returns its maximum (NaN-ignoring, like candle's; a NaN still
/// reaches the output through the exponentials).
#[inline(always)]
fn scale_and_max(row: &mut [f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (x, m) in chunk.iter_mut().zip(lanes.iter_mut()) {
            *x *= scale;
            *m = if *x > *m { *x } else { *m };
        }
    }
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for x in chunks.into_remainder() {
        *x *= scale;
        max = max.max(*x);
    }
    max
}

/// Replaces each `x` of `row` by `exp(x - max)` and returns their sum.
#[inline(always)]
fn exp_and_sum(row: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (x, s) in chunk.iter_mut().zip(lanes.iter_mut()) {
            *x = exp(*x - max);
            *s += *x;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let max = scale_and_max(&mut row, 2.0);
        assert_eq!(max, row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
        let sum = exp_and_sum(&mut row, max);
        assert!((row.iter().sum::<f32>() - sum).abs() < 1e-5);
        assert!(row.contains(&1.0));
    }
}

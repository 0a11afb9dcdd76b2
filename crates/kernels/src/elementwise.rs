//! Element-wise kernels over rows: each row's output only reads that row, so rows are shared out
//! between the threads, several at a time.

use rayon::prelude::*;

use crate::math::gelu;

/// Rows per rayon task at the least: the UNet's rows are 1280-5120 values wide.
const MIN_ROWS: usize = 16;

/// `out[r][j] = x[r][j] * gelu(x[r][n + j])` for rows `r` of `x` `[rows][2n]` and `out` `[rows][n]`.
pub(crate) fn geglu(x: &[f32], out: &mut [f32], n: usize) {
    if n == 0 {
        return;
    }
    out.par_chunks_mut(n).zip(x.par_chunks(2 * n)).with_min_len(MIN_ROWS).for_each(|(out, row)| {
        let (value, gate) = row.split_at(n);
        for ((o, v), g) in out.iter_mut().zip(value).zip(gate) {
            *o = v * gelu(*g);
        }
    });
}

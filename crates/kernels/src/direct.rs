//! Direct convolution as gemm: a plain gemm for 1x1 kernels, a blocked im2col for everything else.
//!
//! Both cut the output into bands of rows (one band per thread at a time when there are enough, else
//! one band at a time with a multithreaded gemm). 1x1 at stride 1 without padding: the input already
//! is the `[Cin x H*W]` matrix, so a band's gemm reads its columns in place. Blocked im2col: for a band of output rows, the column matrix `col[(ci, ky, kx)][pixel]` (`K = Cin *
//! kh * kw` rows, one column per output pixel of the band) is built in a per-thread buffer and
//! multiplied by the weight, which is already the `[Cout x K]` row-major matrix the gemm needs:
//! `tile[Cout x pixels] = weight * col`. The tile is then copied into the band's rows of each output
//! channel with the bias added. Nothing is ever as large as candle's whole-image column matrix.

use candle_core::Result;

use crate::gemm::{Mat, MatMut, matmul};
use crate::geometry::{Band, Epilogue, Geometry, band_units, run_bands, split_rows};
use crate::scratch::{Slot, with_scratch};

/// Aim for a column matrix of about this many floats per band (4 MiB): big enough that the gemm's own
/// blocking, not the band, decides its efficiency; small enough to stay in the shared L3.
const COLUMN_FLOATS: usize = 1 << 20;

/// 1x1 kernel, stride 1, no padding: the input already is the `[Cin x H*W]` matrix, so each band's
/// gemm reads the band's columns of it in place: `tile[Cout x pixels] = weight[Cout x Cin] *
/// input[Cin x band pixels]`.
pub(crate) fn conv_1x1(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    epilogue: Epilogue<'_>,
    g: &Geometry,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let hw = g.h * g.w;
    let target_rows = (COLUMN_FLOATS / (g.cout * g.wo).max(1)).max(1);
    let rows = band_units(g.ho, g.batch, threads, target_rows);
    let bands = split_rows(out, g, rows);
    let parallel = threads > 1 && bands.len() >= threads;
    let gemm_threads = if parallel { 1 } else { threads };
    run_bands(bands, parallel, |band| {
        let pixels = band.rows * g.wo;
        with_scratch(Slot::Band, g.cout * pixels, |tile| {
            let image = &x[band.image * g.cin * hw..][..g.cin * hw];
            let lhs = Mat::rows(w, g.cout, g.cin, g.cin);
            let rhs = Mat::rows(&image[band.row0 * g.w..], g.cin, pixels, hw);
            let dst = MatMut { data: tile, rows: g.cout, cols: pixels, row_stride: pixels };
            matmul(dst, lhs, rhs, false, gemm_threads)?;
            store(band, tile, bias, epilogue, g);
            Ok(())
        })
    })
}

/// Copies a band's `[Cout x pixels]` tile into its output channels, adding the bias, then applies the
/// epilogue.
fn store(band: Band<'_>, tile: &[f32], bias: Option<&[f32]>, epilogue: Epilogue<'_>, g: &Geometry) {
    let pixels = tile.len() / band.channels.len().max(1);
    for (co, (dst, src)) in band.channels.into_iter().zip(tile.chunks(pixels.max(1))).enumerate() {
        let b = bias.map_or(0.0, |b| b[co]);
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = s + b);
        epilogue.apply(g, band.image, co, band.row0, dst);
    }
}

/// Any kernel size, stride and padding, by bands of output rows (see the module doc).
pub(crate) fn conv_im2col(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    epilogue: Epilogue<'_>,
    g: &Geometry,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let k = g.cin * g.kh * g.kw;
    let target_rows = (COLUMN_FLOATS / (k * g.wo).max(1)).max(1);
    let rows = band_units(g.ho, g.batch, threads, target_rows);
    let bands = split_rows(out, g, rows);
    // Enough bands: one per thread at a time, single-threaded gemms; else each gemm gets the threads.
    let parallel = threads > 1 && bands.len() >= threads;
    let gemm_threads = if parallel { 1 } else { threads };
    run_bands(bands, parallel, |band| {
        let pixels = band.rows * g.wo;
        with_scratch(Slot::Band, (k + g.cout) * pixels, |buffer| {
            let (col, tile) = buffer.split_at_mut(k * pixels);
            let image = &x[band.image * g.cin * g.h * g.w..][..g.cin * g.h * g.w];
            fill_columns(image, g, band.row0, band.rows, col);
            let lhs = Mat::rows(w, g.cout, k, k);
            let rhs = Mat::rows(col, k, pixels, pixels);
            let dst = MatMut { data: tile, rows: g.cout, cols: pixels, row_stride: pixels };
            matmul(dst, lhs, rhs, false, gemm_threads)?;
            store(band, tile, bias, epilogue, g);
            Ok(())
        })
    })
}

/// Writes the im2col matrix of output rows `row0 .. row0 + rows` of one image into `col`:
/// `col[((ci * kh + ky) * kw + kx) * pixels + (oy - row0) * wo + ox] = x[ci][oy * s + ky - pad][ox * s + kx - pad]`,
/// zero where that falls in the padding.
pub(crate) fn fill_columns(image: &[f32], g: &Geometry, row0: usize, rows: usize, col: &mut [f32]) {
    let pixels = rows * g.wo;
    let (s, pad) = (g.stride, g.pad);
    let mut dst_rows = col.chunks_mut(pixels);
    for plane in image.chunks(g.h * g.w).take(g.cin) {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let Some(dst) = dst_rows.next() else { return };
                // Output columns whose input column ox * s + kx - pad lies inside the image.
                let first = (pad.saturating_sub(kx)).div_ceil(s).min(g.wo);
                let end = if g.w + pad > kx { (g.w + pad - kx).div_ceil(s).min(g.wo) } else { 0 }.max(first);
                for (dst_row, oy) in dst.chunks_mut(g.wo).zip(row0..row0 + rows) {
                    let iy = oy * s + ky;
                    if iy < pad || iy - pad >= g.h {
                        dst_row.fill(0.0);
                        continue;
                    }
                    let src = &plane[(iy - pad) * g.w..][..g.w];
                    dst_row[..first].fill(0.0);
                    dst_row[end..].fill(0.0);
                    if end == first {
                        continue;
                    }
                    let ix0 = first * s + kx - pad;
                    if s == 1 {
                        dst_row[first..end].copy_from_slice(&src[ix0..ix0 + (end - first)]);
                    } else {
                        let inside = src[ix0..].iter().step_by(s);
                        dst_row[first..end].iter_mut().zip(inside).for_each(|(d, v)| *d = *v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook definition, for checking `fill_columns` element by element.
    fn naive_column(image: &[f32], g: &Geometry, row: usize, oy: usize, ox: usize) -> f32 {
        let (ci, ky, kx) = (row / (g.kh * g.kw), row / g.kw % g.kh, row % g.kw);
        let (iy, ix) = ((oy * g.stride + ky) as isize - g.pad as isize, (ox * g.stride + kx) as isize - g.pad as isize);
        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
            0.0
        } else {
            image[ci * g.h * g.w + iy as usize * g.w + ix as usize]
        }
    }

    #[test]
    fn columns_match_the_definition() {
        for (h, w, k, s, pad) in
            [(5, 7, 3, 1, 1), (6, 5, 3, 2, 1), (7, 6, 3, 2, 0), (4, 4, 5, 1, 2), (3, 9, 1, 3, 2), (2, 2, 3, 1, 3)]
        {
            let g = Geometry::new((1, 2, h, w), (1, 2, k, k), s, pad).unwrap();
            let image: Vec<f32> = (0..g.input_len()).map(|v| v as f32 + 1.0).collect();
            let (row0, rows) = (g.ho / 3, g.ho - g.ho / 3);
            let mut col = vec![f32::NAN; 2 * k * k * rows * g.wo];
            fill_columns(&image, &g, row0, rows, &mut col);
            for (i, v) in col.iter().enumerate() {
                let (row, p) = (i / (rows * g.wo), i % (rows * g.wo));
                let want = naive_column(&image, &g, row, row0 + p / g.wo, p % g.wo);
                assert_eq!(*v, want, "{g:?} element {i}");
            }
        }
    }
}

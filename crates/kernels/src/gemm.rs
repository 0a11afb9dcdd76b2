//! The crate's only unsafe code: one call into the `gemm` crate (the matrix multiply candle itself uses),
//! behind a signature that takes slices and checks every bound before the call.

use candle_core::{Result, bail};

/// A read-only matrix inside a slice: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix: element `(i, j)` is `data[i * row_stride + j]`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { data, rows, cols, row_stride, col_stride: 1 }
    }
}

/// A writable row-major matrix inside a slice: element `(i, j)` is `data[i * row_stride + j]`.
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

/// Whether every element of a `rows x cols` matrix with these strides lies inside `len` elements, and
/// the strides fit the `isize` the `gemm` crate takes.
fn fits(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1).checked_mul(row_stride).zip((cols - 1).checked_mul(col_stride));
    let end = last.and_then(|(r, c)| r.checked_add(c)).and_then(|last| last.checked_add(1));
    isize::try_from(row_stride).is_ok() && isize::try_from(col_stride).is_ok() && end.is_some_and(|end| end <= len)
}

/// `dst = lhs * rhs`, or `dst += lhs * rhs` when `accumulate`, on `threads` rayon threads (1: this
/// thread only). Errors, without touching `dst`, if the shapes disagree or a matrix does not fit its
/// slice.
pub(crate) fn matmul(dst: MatMut<'_>, lhs: Mat<'_>, rhs: Mat<'_>, accumulate: bool, threads: usize) -> Result<()> {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    if lhs.rows != m || rhs.rows != k || rhs.cols != n {
        bail!("matmul: [{m}x{n}] = [{}x{}] * [{}x{}]", lhs.rows, lhs.cols, rhs.rows, rhs.cols)
    }
    if !fits(dst.data.len(), m, n, dst.row_stride, 1)
        || !fits(lhs.data.len(), m, k, lhs.row_stride, lhs.col_stride)
        || !fits(rhs.data.len(), k, n, rhs.row_stride, rhs.col_stride)
    {
        bail!("matmul: a matrix does not fit its slice")
    }
    // Distinct (i, j) must be distinct elements of dst: `gemm` writes them from several threads.
    if m > 1 && dst.row_stride < n {
        bail!("matmul: destination rows overlap (row stride {} < {n} columns)", dst.row_stride)
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in dst.data.chunks_mut(dst.row_stride.max(1)).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // `fits` proved the strides fit an isize.
    let dst_rs = dst.row_stride as isize;
    let (lhs_rs, lhs_cs) = (lhs.row_stride as isize, lhs.col_stride as isize);
    let (rhs_rs, rhs_cs) = (rhs.row_stride as isize, rhs.col_stride as isize);
    #[allow(unsafe_code)]
    // SAFETY: `gemm` reads lhs[i * lhs_rs + l * lhs_cs] for i < m, l < k, rhs[l * rhs_rs + j * rhs_cs] for
    // l < k, j < n, and writes dst[i * dst_rs + j] for i < m, j < n. All strides are non-negative (usize)
    // and `fits` checked above, on these very slices, that the largest such offsets, (m-1)*rs + (k-1)*cs
    // and so on, are inside each slice, and that no offset computation overflows. dst rows do not overlap (dst_rs >= n when m > 1), so no
    // element is written by two of gemm's threads. dst is a `&mut` borrow, so it aliases neither input;
    // all of gemm's threads finish before it returns, so no pointer outlives the borrows. With
    // `read_dst` false, dst is only written, so its previous contents need no initialization.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst_rs,
            accumulate,
            lhs.data.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.data.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn multiplies_and_accumulates_with_strides() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|v| v as f32 * 0.5 - 2.0).collect();
        let b: Vec<f32> = (0..k * n).map(|v| (v % 5) as f32 - 1.0).collect();
        let want = naive(m, n, k, &a, &b);
        // dst rows padded to 9 columns: the padding must stay untouched.
        let mut dst = vec![100.0; (m - 1) * 9 + n];
        let lhs = Mat::rows(&a, m, k, k);
        let rhs = Mat::rows(&b, k, n, n);
        matmul(MatMut { data: &mut dst, rows: m, cols: n, row_stride: 9 }, lhs, rhs, false, 1).unwrap();
        for i in 0..m {
            assert_eq!(&dst[i * 9..i * 9 + n], &want[i * n..(i + 1) * n]);
            if i + 1 < m {
                assert_eq!(&dst[i * 9 + n..(i + 1) * 9], &[100.0, 100.0]);
            }
        }
        matmul(MatMut { data: &mut dst, rows: m, cols: n, row_stride: 9 }, lhs, rhs, true, 2).unwrap();
        assert_eq!(dst[9 + 2], 2.0 * want[n + 2]);
        // The same product with rhs read transposed from a [n x k] matrix.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let rhs_t = Mat { data: &bt, rows: k, cols: n, row_stride: 1, col_stride: k };
        let mut dst = vec![0.0; m * n];
        matmul(MatMut { data: &mut dst, rows: m, cols: n, row_stride: n }, lhs, rhs_t, false, 1).unwrap();
        assert_eq!(dst, want);
    }

    #[test]
    fn rejects_what_does_not_fit() {
        let a = vec![1.0; 6];
        let mut dst = vec![0.0; 4];
        let lhs = Mat::rows(&a, 2, 3, 3);
        let short = Mat::rows(&a[..5], 3, 2, 2);
        let dst_mat = MatMut { data: &mut dst, rows: 2, cols: 2, row_stride: 2 };
        assert!(matmul(dst_mat, lhs, short, false, 1).is_err());
        let overlapping = MatMut { data: &mut dst, rows: 2, cols: 2, row_stride: 1 };
        let rhs = Mat::rows(&a, 3, 2, 2);
        assert!(matmul(overlapping, lhs, rhs, false, 1).is_err());
        let strided_too_far = Mat { data: &a, rows: 3, cols: 2, row_stride: 1, col_stride: 4 };
        let dst_mat = MatMut { data: &mut dst, rows: 2, cols: 2, row_stride: 2 };
        assert!(matmul(dst_mat, lhs, strided_too_far, false, 1).is_err());
    }
}

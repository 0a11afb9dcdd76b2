//! Winograd convolution F(m x m, 3 x 3) for 3x3 kernels at stride 1 (any padding).
//!
//! Each output tile of `m x m` pixels is computed from an `a x a` input tile (`a = m + 2`, tiles
//! overlapping by 2) as `Y = Aᵀ [U ⊙ V] A`, with `U = G g Gᵀ` (the weight, transformed once per call)
//! and `V = Bᵀ d B` (the input tile). Summed over input channels, the elementwise product becomes `a²`
//! independent matrix products, one per position `ξ` in the tile: `M[ξ] (Cout x tiles) = U[ξ] (Cout x
//! Cin) * V[ξ] (Cin x tiles)`. F(2x2) does 16 multiplies where the direct method does 36 per 2x2
//! outputs (2.25x fewer), F(4x4) 36 for 144 (4x fewer), at the price of the transforms and of some
//! rounding (F(4x4)'s transforms hold 4, 5 and 8: about 1e-5 relative error at 512 channels, against
//! 1e-6 for F(2x2) and the direct method).
//!
//! The output is cut into bands of whole tile rows. Buffers, per band of `tiles` tiles (tile `t =
//! local tile row * tiles_x + tile column`): `V[ci][ξ][t]` and `M[ξ][co][t]`; the weight is
//! `U[ξ][co][ci]`. Every transform step runs along a contiguous row of tiles (which the compiler
//! vectorizes), and every gemm reads and writes plain row-major matrices.
//!
//! Two ways to use the threads:
//! - large images: one band per thread at a time, everything inside a band on that thread, `U` shared;
//! - small images (fewer or smaller bands than that): one band at a time, as large as all threads'
//!   budgets allow, its input channels, its `a²` products and its output channels each shared out
//!   between the threads; when `U` would exceed `Limits::weight_floats` (wide UNet convolutions), it is
//!   transformed a slice of output channels at a time, within each band.
//!
//! Memory: `U` (at most 48 MiB at a time), plus per band `a² * (Cin + Cout) * tiles` floats (16 MiB a
//! thread), both in reused per-thread buffers (module `scratch`).

use std::marker::PhantomData;
use std::ops::Range;

use candle_core::Result;
use rayon::prelude::*;

use crate::gemm::{Mat, MatMut, matmul};
use crate::geometry::{Band, Epilogue, Geometry, band_units, run_bands, split_rows};
use crate::scratch::{Slot, Values, with_scratch};

/// Sizes of the band split and of the transformed weight held at once.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Budget for a band's `V` and `M` buffers together, in floats, per thread.
    band_floats: usize,
    /// Tiles per band beyond which bigger bands stop helping the gemm.
    max_band_tiles: usize,
    /// Bands smaller than this run one at a time, with the threads inside them (bigger gemms).
    min_parallel_band_tiles: usize,
    /// Most transformed-weight floats held at once.
    weight_floats: usize,
}

impl Limits {
    /// 16 MiB of band per thread; 48 MiB of transformed weight (512 -> 512 channels F(4x4) need 9.4M
    /// floats, 36 MiB: wider convolutions transform their weight a slice of output channels at a time).
    const DEFAULT: Self =
        Self { band_floats: 4 << 20, max_band_tiles: 512, min_parallel_band_tiles: 64, weight_floats: 12 << 20 };
}

/// One Winograd variant: its tile sizes and transforms.
pub(crate) trait Variant {
    /// Output tile side `m`.
    const M: usize;
    /// Input tile side `a = m + 2`.
    const A: usize;
    /// The `a x 3` weight transform `G`.
    const G: &'static [[f32; 3]];
    /// `dst row i = Σ_j Bᵀ[i][j] * src row j`, over `a` rows of `len` elements (rows `stride` apart).
    fn input_transform(src: &[f32], src_stride: usize, dst: &mut [f32], dst_stride: usize, len: usize);
    /// `dst row r = Σ_i Aᵀ[r][i] * src row i`: `a` rows in, `m` rows out.
    fn output_transform(src: &[f32], src_stride: usize, dst: &mut [f32], dst_stride: usize, len: usize);
    /// One output row from its `m` rows by tile column (`src`, `[c][tx]`, `tiles_x` apart): `dst[tx * m
    /// + c] = src[c][tx] + bias`.
    fn store_row(src: &[f32], tiles_x: usize, dst: &mut [f32], bias: f32);
}

/// F(2x2, 3x3): 4x4 input tiles; the input and output transforms add and subtract only.
pub(crate) struct F2;

/// F(4x4, 3x3): 6x6 input tiles, interpolation points 0, ±1, ±2 (Lavin and Gray, 2016).
pub(crate) struct F4;

impl Variant for F2 {
    const M: usize = 2;
    const A: usize = 4;
    const G: &'static [[f32; 3]] = &[[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

    #[inline(always)]
    fn input_transform(src: &[f32], ss: usize, dst: &mut [f32], ds: usize, len: usize) {
        let [d0, d1, d2, d3] = rows(src, ss, len);
        let [o0, o1, o2, o3] = rows_mut(dst, ds, len);
        for i in 0..len {
            let (a0, a1, a2, a3) = (d0[i], d1[i], d2[i], d3[i]);
            o0[i] = a0 - a2;
            o1[i] = a1 + a2;
            o2[i] = a2 - a1;
            o3[i] = a1 - a3;
        }
    }

    #[inline(always)]
    fn output_transform(src: &[f32], ss: usize, dst: &mut [f32], ds: usize, len: usize) {
        let [m0, m1, m2, m3] = rows(src, ss, len);
        let [y0, y1] = rows_mut(dst, ds, len);
        for i in 0..len {
            y0[i] = m0[i] + m1[i] + m2[i];
            y1[i] = m1[i] - m2[i] - m3[i];
        }
    }

    #[inline(always)]
    fn store_row(src: &[f32], tiles_x: usize, dst: &mut [f32], bias: f32) {
        interleave::<2>(rows(src, tiles_x, tiles_x), dst, bias);
    }
}

impl Variant for F4 {
    const M: usize = 4;
    const A: usize = 6;
    const G: &'static [[f32; 3]] = &[
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];

    #[inline(always)]
    fn input_transform(src: &[f32], ss: usize, dst: &mut [f32], ds: usize, len: usize) {
        let [d0, d1, d2, d3, d4, d5] = rows(src, ss, len);
        let [o0, o1, o2, o3, o4, o5] = rows_mut(dst, ds, len);
        for i in 0..len {
            let (a0, a1, a2, a3, a4, a5) = (d0[i], d1[i], d2[i], d3[i], d4[i], d5[i]);
            o0[i] = 4.0 * a0 - 5.0 * a2 + a4;
            o1[i] = a3 + a4 - 4.0 * (a1 + a2);
            o2[i] = a4 - a3 + 4.0 * (a1 - a2);
            o3[i] = a4 - a2 + 2.0 * (a3 - a1);
            o4[i] = a4 - a2 + 2.0 * (a1 - a3);
            o5[i] = 4.0 * a1 - 5.0 * a3 + a5;
        }
    }

    #[inline(always)]
    fn output_transform(src: &[f32], ss: usize, dst: &mut [f32], ds: usize, len: usize) {
        let [m0, m1, m2, m3, m4, m5] = rows(src, ss, len);
        let [y0, y1, y2, y3] = rows_mut(dst, ds, len);
        for i in 0..len {
            let (sum12, dif12, sum34, dif34) = (m1[i] + m2[i], m1[i] - m2[i], m3[i] + m4[i], m3[i] - m4[i]);
            y0[i] = m0[i] + sum12 + sum34;
            y1[i] = dif12 + 2.0 * dif34;
            y2[i] = sum12 + 4.0 * sum34;
            y3[i] = dif12 + 8.0 * dif34 + m5[i];
        }
    }

    #[inline(always)]
    fn store_row(src: &[f32], tiles_x: usize, dst: &mut [f32], bias: f32) {
        interleave::<4>(rows(src, tiles_x, tiles_x), dst, bias);
    }
}

/// `R` rows of `len` elements, `stride` apart.
#[inline(always)]
fn rows<const R: usize>(src: &[f32], stride: usize, len: usize) -> [&[f32]; R] {
    std::array::from_fn(|i| &src[i * stride..i * stride + len])
}

/// `R` disjoint writable rows of `len <= stride` elements, `stride` apart.
#[inline(always)]
fn rows_mut<const R: usize>(dst: &mut [f32], stride: usize, len: usize) -> [&mut [f32]; R] {
    let mut rest = dst;
    std::array::from_fn(|_| {
        let step = stride.min(rest.len());
        let (row, tail) = std::mem::take(&mut rest).split_at_mut(step);
        rest = tail;
        &mut row[..len]
    })
}

/// `dst[tx * M + c] = src[c][tx] + bias`, for a `dst` that may end in a partial tile.
#[inline(always)]
fn interleave<const M: usize>(src: [&[f32]; M], dst: &mut [f32], bias: f32) {
    let full = dst.len() / M;
    let (body, tail) = dst.split_at_mut(full * M);
    for (c, d) in tail.iter_mut().enumerate() {
        *d = src[c][full] + bias;
    }
    let src = src.map(|row| &row[..full]);
    for (tx, pixels) in body.chunks_exact_mut(M).enumerate() {
        for (c, d) in pixels.iter_mut().enumerate() {
            *d = src[c][tx] + bias;
        }
    }
}

/// 3x3 convolution at stride 1 by Winograd `V` (see the module doc). The caller checked the kernel
/// size and stride.
pub(crate) fn conv<V: Variant>(
    x: &[f32],
    w: Values<'_>,
    bias: Option<&[f32]>,
    epilogue: Epilogue<'_>,
    g: &Geometry,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    conv_limited::<V>(x, w, bias, epilogue, g, out, threads, Limits::DEFAULT)
}

#[allow(clippy::too_many_arguments)]
fn conv_limited<V: Variant>(
    x: &[f32],
    w: Values<'_>,
    bias: Option<&[f32]>,
    epilogue: Epilogue<'_>,
    g: &Geometry,
    out: &mut [f32],
    threads: usize,
    limits: Limits,
) -> Result<()> {
    let a2 = V::A * V::A;
    let (tiles_x, tiles_y) = (g.wo.div_ceil(V::M), g.ho.div_ceil(V::M));
    let budget_rows = (limits.band_floats / (a2 * (g.cin + g.cout)) / tiles_x).max(1);
    let whole_u = a2 * g.cout * g.cin <= limits.weight_floats;
    // Many bands of decent size, and a transformed weight small enough to share: one band per thread
    // at a time. Otherwise one band at a time, as large as the budget allows, with all threads
    // working inside it (and, if the whole of U is too big, the weight transformed a slice of output
    // channels at a time, within each band).
    let tile_rows = band_units(tiles_y, g.batch, threads, budget_rows.min(limits.max_band_tiles.div_ceil(tiles_x)));
    let bands = g.batch * tiles_y.div_ceil(tile_rows);
    let parallel_bands =
        threads > 1 && whole_u && bands >= threads && tile_rows * tiles_x >= limits.min_parallel_band_tiles;
    // One band at a time may use every thread's share of the budget.
    let (tile_rows, inner_threads) =
        if parallel_bands || threads == 1 { (tile_rows, 1) } else { ((budget_rows * threads).min(tiles_y), threads) };
    let bands = split_rows(out, g, tile_rows * V::M);
    let run = |weights: Weights<'_>| {
        run_bands(bands, parallel_bands, |band| {
            let tiles = band.rows.div_ceil(V::M) * tiles_x;
            let (v_len, m_len) = (a2 * g.cin * tiles, a2 * g.cout * tiles);
            with_scratch(Slot::Band, v_len + m_len, |buffer| {
                let (v, m) = buffer.split_at_mut(v_len);
                conv_band::<V>(x, weights, bias, epilogue, g, band, v, m, inner_threads)
            })
        })
    };
    if whole_u {
        with_scratch(Slot::Weights, a2 * g.cout * g.cin, |u| {
            transform_weights::<V>(w, u, threads)?;
            run(Weights::Transformed(u))
        })
    } else {
        let channels = (limits.weight_floats / (a2 * g.cin)).max(1);
        run(Weights::Raw { w, channels })
    }
}

/// The weight as a band sees it: transformed once for all bands, or to be transformed for `channels`
/// output channels at a time (when the whole of it would not fit `Limits::weight_floats`).
#[derive(Clone, Copy)]
enum Weights<'a> {
    Transformed(&'a [f32]),
    Raw { w: Values<'a>, channels: usize },
}

/// `U[ξ][pair] = (G g[pair] Gᵀ)[ξ]` for the `(co, ci)` kernels of `w` (`[pairs][3][3]`). Each
/// `U[ξ = i * a + j]` is a fixed combination of the nine taps, `Σ_(r,c) G[i][r] G[j][c] g[r][c]`, so the
/// transform is one gemm: `U [a² x pairs] = C [a² x 9] * Wᵀ [9 x pairs]` (`w` read transposed in place).
fn transform_weights<V: Variant>(w: Values<'_>, u: &mut [f32], threads: usize) -> Result<()> {
    w.with_f32(|w| transform_f32::<V>(w, u, threads))
}

fn transform_f32<V: Variant>(w: &[f32], u: &mut [f32], threads: usize) -> Result<()> {
    let a = V::A;
    let c: Vec<f32> = (0..a * a * 9).map(|n| V::G[n / 9 / a][n % 9 / 3] * V::G[n / 9 % a][n % 3]).collect();
    let pairs = w.len() / 9;
    let lhs = Mat::rows(&c, a * a, 9, 9);
    let rhs = Mat { data: w, rows: 9, cols: pairs, row_stride: 1, col_stride: 9 };
    matmul(MatMut { data: u, rows: a * a, cols: pairs, row_stride: pairs }, lhs, rhs, false, threads)
}

/// One band: input transform, `a²` gemms, output transform. `v` and `m` are the band's `V[ci][ξ][t]`
/// and `M[ξ][co][t]`; with `threads > 1` the channels of each transform, and the gemms, are shared
/// out between the threads.
#[allow(clippy::too_many_arguments)]
fn conv_band<V: Variant>(
    x: &[f32],
    weights: Weights<'_>,
    bias: Option<&[f32]>,
    epilogue: Epilogue<'_>,
    g: &Geometry,
    band: Band<'_>,
    v: &mut [f32],
    m: &mut [f32],
    threads: usize,
) -> Result<()> {
    let a2 = V::A * V::A;
    let tiles_x = g.wo.div_ceil(V::M);
    let (ty0, tile_rows) = (band.row0 / V::M, band.rows.div_ceil(V::M));
    let tiles = tile_rows * tiles_x;
    let image = &x[band.image * g.cin * g.h * g.w..][..g.cin * g.h * g.w];
    let (plane, v_ci) = (g.h * g.w, a2 * tiles);
    let input = |s: &mut InputScratch, (plane, v_ci): (&[f32], &mut [f32])| {
        crate::level::arch().dispatch(Input::<V> { plane, v_ci, g, ty0, tile_rows, s, variant: PhantomData });
    };
    if threads > 1 {
        image.par_chunks_exact(plane).zip(v.par_chunks_exact_mut(v_ci)).for_each_init(InputScratch::default, input);
    } else {
        let mut s = InputScratch::default();
        image.chunks_exact(plane).zip(v.chunks_exact_mut(v_ci)).for_each(|p| input(&mut s, p));
    }

    // M[ξ] = U[ξ] V[ξ]: a² independent [Cout x Cin] x [Cin x tiles] products, shared out whole
    // between the threads. `u` holds U[ξ] for output channels `cos` only: `[a²][cos][Cin]`.
    let m_xi = g.cout * tiles;
    let v = &*v;
    let products = |u: &[f32], cos: Range<usize>, m: &mut [f32]| {
        let rows = cos.len();
        let product = |(xi, m): (usize, &mut [f32])| {
            let lhs = Mat::rows(&u[xi * rows * g.cin..], rows, g.cin, g.cin);
            let rhs = Mat::rows(&v[xi * tiles..], g.cin, tiles, a2 * tiles);
            let dst = &mut m[cos.start * tiles..cos.end * tiles];
            matmul(MatMut { data: dst, rows, cols: tiles, row_stride: tiles }, lhs, rhs, false, 1)
        };
        if threads > 1 {
            m.par_chunks_exact_mut(m_xi).enumerate().with_max_len(1).try_for_each(product)
        } else {
            m.chunks_exact_mut(m_xi).enumerate().try_for_each(product)
        }
    };
    match weights {
        Weights::Transformed(u) => products(u, 0..g.cout, m)?,
        Weights::Raw { w, channels } => {
            for start in (0..g.cout).step_by(channels) {
                let cos = start..(start + channels).min(g.cout);
                with_scratch(Slot::Weights, a2 * cos.len() * g.cin, |u| {
                    transform_weights::<V>(w.slice(cos.start * g.cin * 9..cos.end * g.cin * 9), u, threads)?;
                    products(u, cos.clone(), m)
                })?;
            }
        }
    }

    let m = &*m;
    let (image, row0) = (band.image, band.row0);
    let output = |s: &mut OutputScratch, (co, channel): (usize, &mut [f32])| {
        let b = bias.map_or(0.0, |b| b[co]);
        let m_co = &m[co * tiles..];
        crate::level::arch().dispatch(Output::<V> {
            m_co,
            xi_stride: m_xi,
            channel,
            bias: b,
            wo: g.wo,
            tiles_x,
            s,
            variant: PhantomData,
        });
        epilogue.apply(g, image, co, row0, channel);
    };
    if threads > 1 {
        band.channels.into_par_iter().enumerate().for_each_init(OutputScratch::default, output);
    } else {
        let mut s = OutputScratch::default();
        band.channels.into_iter().enumerate().for_each(|o| output(&mut s, o));
    }
    Ok(())
}

/// [`transform_input`] for one channel, run by `pulp`'s dispatch inside a function compiled for the
/// CPU's widest vectors (the crate is built for SSE2): the transforms are `#[inline(always)]`.
struct Input<'a, V> {
    plane: &'a [f32],
    v_ci: &'a mut [f32],
    g: &'a Geometry,
    ty0: usize,
    tile_rows: usize,
    s: &'a mut InputScratch,
    variant: PhantomData<V>,
}

impl<V: Variant> pulp::WithSimd for Input<'_, V> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        transform_input::<V>(self.plane, self.v_ci, self.g, self.ty0, self.tile_rows, self.s);
    }
}

/// [`transform_output`] for one channel, dispatched like [`Input`].
struct Output<'a, V> {
    m_co: &'a [f32],
    xi_stride: usize,
    channel: &'a mut [f32],
    bias: f32,
    wo: usize,
    tiles_x: usize,
    s: &'a mut OutputScratch,
    variant: PhantomData<V>,
}

impl<V: Variant> pulp::WithSimd for Output<'_, V> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        transform_output::<V>(self.m_co, self.xi_stride, self.channel, self.bias, self.wo, self.tiles_x, self.s);
    }
}

/// Per-thread buffers of the input transform.
#[derive(Default)]
struct InputScratch {
    /// One input row, zero-padded: `row[p] = x[iy][p - pad]`.
    row: Vec<f32>,
    /// The row regrouped by tile: `gathered[j][tx] = row[tx * m + j]`.
    gathered: Vec<f32>,
    /// Every input row the band reads, transformed along the row: `[row][k][tx]`.
    rows_t: Vec<f32>,
}

/// `V[ξ = i * a + k][t]` of one input channel for tile rows `ty0 .. ty0 + tile_rows`: each input row
/// is transformed along the row once (`Σ_l d[j][l] B[l][k]`), then each tile row down the columns
/// (`Σ_j Bᵀ[i][j] ...`).
#[inline(always)]
fn transform_input<V: Variant>(
    plane: &[f32],
    v_ci: &mut [f32],
    g: &Geometry,
    ty0: usize,
    tile_rows: usize,
    s: &mut InputScratch,
) {
    let (m, a) = (V::M, V::A);
    let tiles_x = g.wo.div_ceil(m);
    let tiles = tile_rows * tiles_x;
    let row_len = (tiles_x - 1) * m + a;
    let input_rows = (tile_rows - 1) * m + a;
    s.row.resize(row_len, 0.0);
    s.gathered.resize(a * tiles_x, 0.0);
    s.rows_t.resize(input_rows * a * tiles_x, 0.0);
    let (start, end) = (g.pad.min(row_len), (g.pad + g.w).min(row_len));
    for (j, dst) in s.rows_t.chunks_exact_mut(a * tiles_x).enumerate() {
        // Padded row ty0 * m + j is input row ty0 * m + j - pad.
        let Some(iy) = (ty0 * m + j).checked_sub(g.pad).filter(|iy| *iy < g.h) else {
            dst.fill(0.0);
            continue;
        };
        let src = &plane[iy * g.w..][..g.w];
        s.row[..start].fill(0.0);
        s.row[start..end].copy_from_slice(&src[..end - start]);
        s.row[end..].fill(0.0);
        for (l, gathered) in s.gathered.chunks_exact_mut(tiles_x).enumerate() {
            gathered.iter_mut().zip(s.row[l..].iter().step_by(m)).for_each(|(d, v)| *d = *v);
        }
        V::input_transform(&s.gathered, tiles_x, dst, tiles_x, tiles_x);
    }
    for lt in 0..tile_rows {
        for k in 0..a {
            let src = &s.rows_t[(lt * m * a + k) * tiles_x..];
            V::input_transform(src, a * tiles_x, &mut v_ci[k * tiles + lt * tiles_x..], a * tiles, tiles_x);
        }
    }
}

/// Per-thread buffers of the output transform.
#[derive(Default)]
struct OutputScratch {
    /// First pass, down the columns: `[r][j][tx]`.
    half: Vec<f32>,
    /// Second pass, along the row: `[c][tx]`, one output row.
    out_row: Vec<f32>,
}

/// One output channel of a band: `y[r][c] = Σ_i Aᵀ[r][i] Σ_j M[i * a + j] A[j][c] + bias`, written
/// into `channel` (the band's rows of that channel, `wo` wide). `m_co` starts at the channel's first
/// product, `M[0][co][0]`; the products of position ξ are `ξ * xi_stride` further on.
#[inline(always)]
fn transform_output<V: Variant>(
    m_co: &[f32],
    xi_stride: usize,
    channel: &mut [f32],
    bias: f32,
    wo: usize,
    tiles_x: usize,
    s: &mut OutputScratch,
) {
    let (m, a) = (V::M, V::A);
    s.half.resize(m * a * tiles_x, 0.0);
    s.out_row.resize(m * tiles_x, 0.0);
    for (lt, out_rows) in channel.chunks_mut(m * wo).enumerate() {
        for j in 0..a {
            let src = &m_co[j * xi_stride + lt * tiles_x..];
            V::output_transform(src, a * xi_stride, &mut s.half[j * tiles_x..], a * tiles_x, tiles_x);
        }
        for (r, dst) in out_rows.chunks_exact_mut(wo).enumerate() {
            V::output_transform(&s.half[r * a * tiles_x..], tiles_x, &mut s.out_row, tiles_x, tiles_x);
            V::store_row(&s.out_row, tiles_x, dst, bias);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook convolution, in f64.
    fn naive(x: &[f32], w: &[f32], bias: &[f32], g: &Geometry) -> Vec<f64> {
        let mut out = vec![0.0; g.output_len()];
        for (i, o) in out.iter_mut().enumerate() {
            let (n, co, oy, ox) = (i / (g.cout * g.ho * g.wo), i / (g.ho * g.wo) % g.cout, i / g.wo % g.ho, i % g.wo);
            *o = f64::from(bias[co]);
            for ci in 0..g.cin {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (iy, ix) = ((oy + ky) as isize - g.pad as isize, (ox + kx) as isize - g.pad as isize);
                        if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                            let xv = x[((n * g.cin + ci) * g.h + iy as usize) * g.w + ix as usize];
                            *o += f64::from(xv) * f64::from(w[((co * g.cin + ci) * 3 + ky) * 3 + kx]);
                        }
                    }
                }
            }
        }
        out
    }

    fn check<V: Variant>(g: &Geometry, threads: usize, limits: Limits) {
        let x: Vec<f32> = (0..g.input_len()).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        // Values f16 holds exactly, so that the f16 taps are the same weights.
        let half: Vec<half::f16> =
            (0..g.weight_len()).map(|i| half::f16::from_f32(((i * 53 % 97) as f32 / 97.0) - 0.5)).collect();
        let w: Vec<f32> = half.iter().map(|v| v.to_f32()).collect();
        let bias: Vec<f32> = (0..g.cout).map(|i| i as f32 * 0.25 - 0.5).collect();
        let want = naive(&x, &w, &bias, g);
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        // At every level this CPU has: the transforms are compiled for each.
        for level in crate::Level::supported() {
            for taps in [Values::F32(&w), Values::F16(&half)] {
                let mut out = vec![f32::NAN; g.output_len()];
                pool.install(|| {
                    crate::with_level(level, || {
                        conv_limited::<V>(&x, taps, Some(&bias), Epilogue::default(), g, &mut out, threads, limits)
                    })
                })
                .unwrap()
                .unwrap();
                let f16 = matches!(taps, Values::F16(_));
                for (i, (got, want)) in out.iter().zip(&want).enumerate() {
                    let err = (f64::from(*got) - want).abs() / scale;
                    let m = V::M;
                    assert!(
                        err < 1e-5,
                        "{level:?} F({m}x{m}) {g:?} {threads} threads {limits:?} f16 {f16}: element {i} {got} vs {want}"
                    );
                }
            }
        }
    }

    fn all_splits<V: Variant>() {
        let tiny = Limits { band_floats: 1, max_band_tiles: 1, min_parallel_band_tiles: 1, weight_floats: 1 << 20 };
        let shapes = [
            Geometry::new((2, 5, 13, 10), (6, 5, 3, 3), 1, 1).unwrap(),
            Geometry::new((1, 3, 9, 14), (4, 3, 3, 3), 1, 0).unwrap(),
            Geometry::new((1, 2, 5, 4), (3, 2, 3, 3), 1, 2).unwrap(),
        ];
        for g in &shapes {
            for threads in [1, 2, 3] {
                // One band per image; one tile row per band, in parallel; the same, one at a time
                // with the threads inside; and the weight transformed two output channels at a time.
                check::<V>(g, threads, Limits::DEFAULT);
                check::<V>(g, threads, tiny);
                check::<V>(g, threads, Limits { min_parallel_band_tiles: usize::MAX, ..tiny });
                check::<V>(g, threads, Limits { weight_floats: V::A * V::A * g.cin * 2, ..tiny });
            }
        }
    }

    #[test]
    fn f2_matches_the_definition_for_every_split() {
        all_splits::<F2>();
    }

    #[test]
    fn f4_matches_the_definition_for_every_split() {
        all_splits::<F4>();
    }
}

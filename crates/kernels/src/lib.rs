//! imagegate's CPU compute kernels for the diffusion models' UNet and VAE, called in place of candle's
//! ops: a fast f32 2-D convolution ([`conv2d`], most of this page), a one-pass group norm fused with
//! SiLU ([`group_norm`]), fused softmax attention ([`attention`], module `attention`), the GEGLU
//! activation of the UNet's feed-forward layers ([`geglu`]), and linears and small convolutions that
//! read f16 weights in place ([`linear_f16`], [`conv2d_f16`], module `linear`). [`conv2d_fused`] adds a
//! residual and ReLU to each output band while it is in cache.
//!
//! candle 0.11 convolves on the CPU by building the whole image's im2col matrix (1.2 GB for 128
//! channels at 512x512) and then running one gemm. [`conv2d`] instead cuts the output into bands of
//! rows that fit the cache and picks an algorithm per shape ([`Algorithm`], chosen by measurement):
//!
//! - **3x3, stride 1** (nearly every convolution of the UNet and the VAE): Winograd F(4x4, 3x3) from 32x32
//!   outputs on (4x fewer multiplications than the direct method), F(2x2, 3x3) at 16x16 (2.25x), the
//!   direct method below that (module `winograd`);
//! - **1x1, stride 1, no padding**: the input already is the `[Cin x H*W]` matrix: a gemm per band
//!   reading it in place (module `direct`);
//! - **anything else** (3x3 stride 2 downsamplers, other kernels, 3x3 below 16x16 or with under 32
//!   channels): blocked im2col, the column matrix of a band of output rows at a time multiplied by
//!   the weight (module `direct`).
//!
//! Every matrix product goes through the `gemm` crate candle itself uses (module `gemm`, the crate's
//! only unsafe code). Threads come from the current rayon pool: bands run in parallel when there are
//! enough of them, otherwise the threads share the work inside each band.
//!
//! The hand-written vector loops run at the CPU's best instruction-set [`Level`] (AVX-512, AVX2+FMA or
//! the SSE2 baseline), picked at run time; [`with_level`] forces a lower one, so that the tests check
//! every path one binary may take (module `level`).
//!
//! Invariants:
//! - the result equals candle's `conv2d` plus the bias broadcast over `[1, Cout, 1, 1]`, up to f32
//!   rounding (the tests bound the error: 1e-5 relative for the gemm paths and F(2x2), 1e-3 for F(4x4),
//!   whose measured error is about 1e-5);
//! - tensors that are not f32 on the CPU go to candle unchanged; the result tracks no gradient;
//! - besides the output, memory is bounded: per thread a band (at most 16 MiB) and, for Winograd, the
//!   transformed weight (at most 48 MiB at a time). These live in per-thread buffers that are kept for
//!   the next call (module `scratch`): fresh pages cost about 0.5 ms per MB on the development VM.

mod attention;
mod direct;
mod elementwise;
mod gemm;
mod geometry;
mod level;
mod linear;
mod math;
mod norm;
mod scratch;
mod widen;
mod winograd;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor, bail};
use rayon::prelude::*;

use geometry::Geometry;
pub use level::{Level, with_level};
pub use norm::Activation;
use scratch::Values;
pub use widen::HalfFloat;

/// How [`conv2d_with`] computes the convolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// The fastest of the ones below for the shape (measured on a 2-core AVX2 machine).
    #[default]
    Auto,
    /// A plain gemm for 1x1 kernels at stride 1 without padding; blocked im2col and gemm otherwise.
    Gemm,
    /// Winograd F(2x2, 3x3): 3x3 kernels at stride 1 only.
    Winograd2,
    /// Winograd F(4x4, 3x3): 3x3 kernels at stride 1 only.
    Winograd4,
    /// candle's own `conv2d`, plus the bias: the reference, and the path for other devices and dtypes.
    Candle,
}

/// 2-D convolution of an NCHW `input` `[N, Cin, H, W]` with `weight` `[Cout, Cin, kh, kw]` and an
/// optional `bias` `[Cout]`, at the same `stride` and zero `padding` in both directions (note the
/// order: stride, then padding; candle's `conv2d` takes padding first).
///
/// f32 tensors on the CPU take the fast path; anything else goes to candle's `conv2d`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
///
/// let x = Tensor::ones((1, 4, 8, 8), DType::F32, &Device::Cpu)?;
/// let weight = Tensor::ones((16, 4, 3, 3), DType::F32, &Device::Cpu)?;
/// let bias = Tensor::zeros(16, DType::F32, &Device::Cpu)?;
/// let y = kernels::conv2d(&x, &weight, Some(&bias), 1, 1)?;
/// assert_eq!(y.dims(), &[1, 16, 8, 8]);
/// assert_eq!(y.get(0)?.get(0)?.get(3)?.get(3)?.to_scalar::<f32>()?, 36.0); // 4 channels x 9 taps
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn conv2d(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_with(input, weight, bias, stride, padding, Algorithm::Auto)
}

/// [`conv2d`] with a chosen [`Algorithm`]. A forced fast algorithm fails, instead of falling back,
/// on tensors that are not f32 on the CPU or on a shape it does not handle.
pub fn conv2d_with(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    algorithm: Algorithm,
) -> Result<Tensor> {
    conv2d_fused(input, weight, bias, stride, padding, algorithm, Fused::default())
}

/// What [`conv2d_fused`] does to each output value after adding the bias, band by band while the band
/// is in cache, instead of in passes of its own over the whole output, each into new memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fused<'a> {
    /// Added to the output, whose shape it must have: a residual block's shortcut.
    pub residual: Option<&'a Tensor>,
    /// Then ReLU, `max(x, 0)`.
    pub relu: bool,
}

/// [`conv2d_with`], then `fused`'s residual and ReLU: what `(conv2d(..) + residual).relu()` computes,
/// in one pass. Tensors that are not f32 on the CPU take candle's ops for all of it (with
/// [`Algorithm::Auto`]; a forced fast algorithm fails on them instead).
pub fn conv2d_fused(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    algorithm: Algorithm,
    fused: Fused<'_>,
) -> Result<Tensor> {
    let fast = [Some(input), Some(weight), bias, fused.residual]
        .into_iter()
        .flatten()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    let candle = || -> Result<Tensor> {
        let out = candle_conv2d(input, weight, bias, stride, padding)?;
        let out = match fused.residual {
            Some(residual) => (out + residual)?,
            None => out,
        };
        if fused.relu { out.relu() } else { Ok(out) }
    };
    match algorithm {
        Algorithm::Candle => return candle(),
        Algorithm::Auto if !fast => return candle(),
        _ if !fast => bail!("conv2d: {algorithm:?} needs f32 tensors on the CPU"),
        _ => {}
    }
    let input = input.contiguous()?;
    let weight = weight.contiguous()?;
    let g = Geometry::new(input.dims4()?, weight.dims4()?, stride, padding)?;
    let (bias, residual) = bias_and_residual(&g, bias, fused.residual)?;
    let algorithm = match algorithm {
        Algorithm::Auto => choose(&g),
        chosen => chosen,
    };
    let winograd = matches!(algorithm, Algorithm::Winograd2 | Algorithm::Winograd4);
    if winograd && (g.kh, g.kw, g.stride) != (3, 3, 1) {
        bail!("conv2d: {algorithm:?} needs a 3x3 kernel at stride 1, got {}x{} at stride {}", g.kh, g.kw, g.stride)
    }
    let (w_storage, w_layout) = weight.storage_and_layout();
    let w = cpu_f32(&w_storage, w_layout, g.weight_len())?;
    let out = run_conv(&input, Values::F32(w), &g, bias.as_deref(), residual.as_ref(), fused.relu, algorithm);
    drop(w_storage);
    out
}

/// One of the fast paths (`algorithm`, already checked against the geometry) on a contiguous f32
/// `input`, with the weight's taps in f32 or f16, the bias as values and the residual contiguous.
fn run_conv(
    input: &Tensor,
    w: Values<'_>,
    g: &Geometry,
    bias: Option<&[f32]>,
    residual: Option<&Tensor>,
    relu: bool,
    algorithm: Algorithm,
) -> Result<Tensor> {
    let (x_storage, x_layout) = input.storage_and_layout();
    let r_storage = residual.map(|r| r.storage_and_layout());
    let x = cpu_f32(&x_storage, x_layout, g.input_len())?;
    let residual = match &r_storage {
        Some((storage, layout)) => Some(cpu_f32(storage, layout, g.output_len())?),
        None => None,
    };
    let epilogue = geometry::Epilogue { residual, relu };
    let mut out = scratch::zeroed(g.output_len());
    let threads = rayon::current_num_threads();
    match algorithm {
        Algorithm::Winograd2 => winograd::conv::<winograd::F2>(x, w, bias, epilogue, g, &mut out, threads)?,
        Algorithm::Winograd4 => winograd::conv::<winograd::F4>(x, w, bias, epilogue, g, &mut out, threads)?,
        // The direct paths read f32 weights: f16 ones (1x1 and strided convolutions, the smaller
        // weights) widened into the reused buffer first.
        _ if is_pointwise(g) => w.with_f32(|w| direct::conv_1x1(x, w, bias, epilogue, g, &mut out, threads))?,
        _ => w.with_f32(|w| direct::conv_im2col(x, w, bias, epilogue, g, &mut out, threads))?,
    }
    drop((x_storage, r_storage));
    Tensor::from_vec(out, (g.batch, g.cout, g.ho, g.wo), &Device::Cpu)
}

/// Group normalization of an f32 CPU tensor `[batch, channels, ...]` over `groups` groups of
/// consecutive channels, with the per-channel `gamma` and `beta`, then `activation`: what
/// `candle_nn::GroupNorm` followed by SiLU computes, in one pass (module `norm`). Statistics are
/// accumulated in f64. Tensors that are not f32 on the CPU are an error: the caller keeps candle's
/// `GroupNorm` for those.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    gamma: &Tensor,
    beta: &Tensor,
    activation: Activation,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (&batch, &channels) = match (dims.first(), dims.get(1)) {
        (Some(b), Some(c)) => (b, c),
        _ => bail!("group_norm: expected [batch, channels, ...], got {dims:?}"),
    };
    if groups == 0 || !channels.is_multiple_of(groups) {
        bail!("group_norm: {channels} channels do not split into {groups} groups")
    }
    if gamma.dims() != [channels] || beta.dims() != [channels] {
        bail!("group_norm: gamma {:?} and beta {:?}, expected [{channels}]", gamma.dims(), beta.dims())
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        bail!("group_norm: needs an f32 CPU tensor, got {:?} on {:?}", x.dtype(), x.device())
    }
    let pixels: usize = dims[2..].iter().product();
    let x = x.contiguous()?;
    let (gamma, beta) = (gamma.to_vec1::<f32>()?, beta.to_vec1::<f32>()?);
    let (storage, layout) = x.storage_and_layout();
    let values = cpu_f32(&storage, layout, batch * channels * pixels)?;
    let mut out = scratch::zeroed(values.len());
    norm::group_norm(values, &mut out, channels, pixels, groups, eps, &gamma, &beta, activation);
    drop(storage);
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// Scaled dot-product attention, `softmax(q k^T * scale) v` with the softmax over the keys, for f32 CPU
/// tensors q `[bh, tq, d]`, k `[bh, tk, d]` and v `[bh, tk, dv]` (made contiguous if they are not),
/// giving `[bh, tq, dv]`: what candle's matmul, scaling, `softmax_last_dim` and matmul compute, fused
/// (module `attention`): blocks of queries against blocks of keys with an online softmax, so that no more
/// than one small block of scores per thread is ever held, instead of the `[tq x tk]` matrix. With no
/// keys the result is zero. Tensors that are not f32 on the CPU are an error: the caller keeps candle's
/// path for those.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dims3 = |name: &str, t: &Tensor| match *t.dims() {
        [a, b, c] => Ok((a, b, c)),
        ref dims => bail!("attention: {name} must have rank 3, got shape {dims:?}"),
    };
    let (bh, tq, d) = dims3("q [bh, tq, d]", q)?;
    let (k_bh, tk, k_d) = dims3("k [bh, tk, d]", k)?;
    let (v_bh, v_tk, dv) = dims3("v [bh, tk, dv]", v)?;
    if k_bh != bh || v_bh != bh {
        bail!("attention: batch x heads differ: q has {bh}, k {k_bh}, v {v_bh}")
    }
    if k_d != d {
        bail!("attention: head dim differs: q has d = {d}, k has d = {k_d}")
    }
    if v_tk != tk {
        bail!("attention: key count differs: k has tk = {tk}, v has {v_tk}")
    }
    if !scale.is_finite() {
        bail!("attention: scale {scale} is not finite")
    }
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if !t.device().is_cpu() || t.dtype() != DType::F32 {
            bail!("attention: needs f32 CPU tensors, got {name} {:?} on {:?}", t.dtype(), t.device())
        }
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let q_values = cpu_f32(&q_storage, q_layout, bh * tq * d)?;
    let k_values = cpu_f32(&k_storage, k_layout, bh * tk * d)?;
    let v_values = cpu_f32(&v_storage, v_layout, bh * tk * dv)?;
    let mut out = scratch::zeroed(bh * tq * dv);
    let dims = attention::Dims { bh, tq, tk, d, dv };
    attention::attention(q_values, k_values, v_values, &mut out, dims, scale as f32)?;
    drop((q_storage, k_storage, v_storage));
    Tensor::from_vec(out, (bh, tq, dv), &Device::Cpu)
}

/// GEGLU, the gated activation of diffusers' feed-forward layers: for an f32 CPU tensor `x` `[..., 2n]`,
/// `x[..., :n] * gelu(x[..., n:])`, `[..., n]`, with GELU in its exact (erf) form, in one pass (module
/// `elementwise`): candle computes it as a GELU of a strided half and a product, each into new memory,
/// with libm's scalar `erff`. The erf is within 2.5e-7 of the exact one (PyTorch's vectorized CPU
/// formula). Tensors that are not f32 on the CPU are an error: the caller keeps candle's ops for those.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let Some(last) = dims.last_mut() else { bail!("geglu: expected at least one dimension, got a scalar") };
    if !last.is_multiple_of(2) {
        bail!("geglu: the last dimension ({last}) must be even: values, then gates")
    }
    *last /= 2;
    let n = *last;
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        bail!("geglu: needs an f32 CPU tensor, got {:?} on {:?}", x.dtype(), x.device())
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let values = cpu_f32(&storage, layout, x.elem_count())?;
    let mut out = scratch::zeroed(values.len() / 2);
    elementwise::geglu(values, &mut out, n);
    drop(storage);
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// `x wᵀ + bias` over the last dimension of an f32 CPU tensor `x` `[..., k]`, with the weight as f16
/// values `[out_features x k]` row-major (PyTorch's `Linear` layout; the engine hands in weights read in
/// place from a mapped file) and an optional f32 `bias` `[out_features]`. Up to [`FEW_ROWS`] rows (the
/// text encoders' 77 tokens, the UNet's low levels), where each weight is used a few dozen times and a
/// gemm on a widened copy is bound by memory, dot products on the f16 values (module `linear`);
/// beyond, a gemm on the weight widened into a reused buffer, into an output that starts from the bias.
/// `Ok(None)` when there are few rows and the CPU has neither AVX2+FMA nor AVX-512 (or is not x86-64):
/// the caller takes its general path.
pub fn linear_f16(
    x: &Tensor,
    weight: &[half::f16],
    out_features: usize,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let mut dims = x.dims().to_vec();
    let Some(last) = dims.last_mut() else { bail!("linear_f16: expected at least one dimension, got a scalar") };
    let k = *last;
    *last = out_features;
    if weight.len() != out_features * k {
        bail!("linear_f16: weight holds {} values, expected {out_features} x {k}", weight.len())
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        bail!("linear_f16: needs an f32 CPU tensor, got {:?} on {:?}", x.dtype(), x.device())
    }
    let bias = match bias {
        Some(b) if b.dims() != [out_features] => {
            bail!("linear_f16: bias shape {:?}, expected [{out_features}]", b.dims())
        }
        Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    let x = x.contiguous()?;
    let m = x.elem_count() / k.max(1);
    let (storage, layout) = x.storage_and_layout();
    let values = cpu_f32(&storage, layout, m * k)?;
    let out = if m <= FEW_ROWS {
        let mut out = scratch::zeroed(m * out_features);
        if !linear::linear_f16(values, weight, bias.as_deref(), (m, k, out_features), &mut out) {
            return Ok(None);
        }
        out
    } else {
        linear::linear_widened(values, weight, bias.as_deref(), (m, k, out_features))?
    };
    drop(storage);
    Tensor::from_vec(out, dims, &Device::Cpu).map(Some)
}

/// Up to this many rows (tokens), [`linear_f16`] runs on dot products that read the f16 weight once,
/// in place: 2.9-4x a gemm on a widened copy at the text encoders' 77 tokens, 1.07-1.35x at the UNet's
/// 256 (16x16 latents), behind from 1024 on (`examples/linear_bench.rs`, BENCHMARKS.md). Beyond, the
/// gemm, on the weight widened into a reused buffer.
pub const FEW_ROWS: usize = 256;

/// Up to this many output pixels (the UNet's 8x8 level at 512x512 images), [`conv2d_f16`] runs the
/// convolution as im2col rows through [`linear_f16`]: 15-30M weights read once as f16 for 64 pixels'
/// arithmetic. (At 256 pixels Winograd on the f16 taps measured faster.)
pub const FEW_PIXELS: usize = 64;

/// [`conv2d_fused`] with the weight as f16 values (`[cout, cin, kh, kw]` row-major, as `dims` says), as
/// the engine keeps the UNet's weights, read in place from their file, never widened into a whole f32
/// copy (up to 118 MB for one layer) on the main paths:
/// - up to [`FEW_PIXELS`] output pixels, the input's im2col rows (one row of `cin * kh * kw` values
///   per output pixel) through [`linear_f16`] against the weight read once, as f16;
/// - 3x3 convolutions at stride 1 that [`Algorithm::Auto`] gives to Winograd, on the f16 taps, widened a
///   slice of output channels at a time into a reused buffer just before their transform;
/// - others (1x1 and strided convolutions) as [`conv2d_fused`] on f32 weights, widened into the same
///   reused buffer.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_f16(
    input: &Tensor,
    weight: &[half::f16],
    dims: (usize, usize, usize, usize),
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    fused: Fused<'_>,
) -> Result<Tensor> {
    if !input.device().is_cpu() || input.dtype() != DType::F32 {
        bail!("conv2d_f16: needs an f32 CPU input, got {:?} on {:?}", input.dtype(), input.device())
    }
    let g = Geometry::new(input.dims4()?, dims, stride, padding)?;
    if weight.len() != g.weight_len() {
        bail!("conv2d_f16: weight holds {} values, expected {dims:?}", weight.len())
    }
    let (bias, residual) = bias_and_residual(&g, bias, fused.residual)?;
    let input = input.contiguous()?;
    let (bias, residual) = (bias.as_deref(), residual.as_ref());
    if g.batch * g.ho * g.wo <= FEW_PIXELS
        && let Some(out) = conv_rows_f16(&input, weight, &g, bias, residual, fused.relu)?
    {
        return Ok(out);
    }
    run_conv(&input, Values::F16(weight), &g, bias, residual, fused.relu, choose(&g))
}

/// [`conv2d_f16`] for few pixels: im2col rows through [`linear_f16`]. `Ok(None)` when `linear_f16`
/// declines (no AVX2+FMA or AVX-512).
fn conv_rows_f16(
    input: &Tensor,
    weight: &[half::f16],
    g: &Geometry,
    bias: Option<&[f32]>,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Option<Tensor>> {
    let (storage, layout) = input.storage_and_layout();
    let x = cpu_f32(&storage, layout, g.input_len())?;
    // One row of K = cin * kh * kw values per output pixel (the im2col matrix transposed), the pixels
    // shared out between the threads.
    let (pixels, k) = (g.ho * g.wo, g.cin * g.kh * g.kw);
    let mut rows = scratch::zeroed(g.batch * pixels * k);
    rows.par_chunks_mut(k.max(1)).enumerate().for_each(|(i, row)| {
        let (n, p) = (i / pixels, i % pixels);
        let (oy, ox) = (p / g.wo, p % g.wo);
        let image = &x[n * g.cin * g.h * g.w..][..g.cin * g.h * g.w];
        // The taps inside the input (the row starts zeroed: padding stays 0): input rows `y0 + ky`
        // and columns `x0 + kx`, in padded coordinates.
        let (y0, x0) = (oy * g.stride, ox * g.stride);
        let inside = |o: usize, size: usize| o >= g.pad && o - g.pad < size;
        for (plane, taps) in image.chunks_exact((g.h * g.w).max(1)).zip(row.chunks_exact_mut(g.kh * g.kw)) {
            for (ky, taps) in taps.chunks_exact_mut(g.kw).enumerate() {
                if !inside(y0 + ky, g.h) {
                    continue;
                }
                let line = &plane[(y0 + ky - g.pad) * g.w..][..g.w];
                for (kx, v) in taps.iter_mut().enumerate() {
                    if inside(x0 + kx, g.w) {
                        *v = line[x0 + kx - g.pad];
                    }
                }
            }
        }
    });
    drop(storage);
    let mut y = scratch::zeroed(g.batch * pixels * g.cout);
    if !linear::linear_f16(&rows, weight, bias, (g.batch * pixels, k, g.cout), &mut y) {
        return Ok(None);
    }
    // `[image][pixel][cout]` to NCHW, then the same epilogue as the other paths.
    let r_storage = residual.map(|r| r.storage_and_layout());
    let residual = match &r_storage {
        Some((storage, layout)) => Some(cpu_f32(storage, layout, g.output_len())?),
        None => None,
    };
    let epilogue = geometry::Epilogue { residual, relu };
    let mut out = scratch::zeroed(g.output_len());
    out.par_chunks_mut(pixels.max(1)).enumerate().with_min_len(16).for_each(|(i, channel)| {
        let (n, co) = (i / g.cout, i % g.cout);
        channel.iter_mut().enumerate().for_each(|(p, o)| *o = y[(n * pixels + p) * g.cout + co]);
        epilogue.apply(g, n, co, 0, channel);
    });
    drop(r_storage);
    Tensor::from_vec(out, (g.batch, g.cout, g.ho, g.wo), &Device::Cpu).map(Some)
}

/// The bias as values and the residual made contiguous, after checking their shapes against the
/// convolution's: what the epilogue of every fast path reads.
fn bias_and_residual(
    g: &Geometry,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<(Option<Vec<f32>>, Option<Tensor>)> {
    let bias = match bias {
        Some(b) if b.dims() != [g.cout] => bail!("conv2d: bias shape {:?}, expected [{}]", b.dims(), g.cout),
        Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    let out = [g.batch, g.cout, g.ho, g.wo];
    let residual = match residual {
        Some(r) if r.dims() != out => bail!("conv2d: residual shape {:?}, expected the output's {out:?}", r.dims()),
        Some(r) => Some(r.to_dtype(DType::F32)?.contiguous()?),
        None => None,
    };
    Ok((bias, residual))
}

/// Frees the scratch buffers [`conv2d`] and [`attention`] keep between calls, on the calling thread and
/// on every thread of the current rayon pool; the next call allocates them again. Each pool thread keeps
/// up to 16 MiB (its band; attention uses 257 KiB of it), the calling thread up to 48 MiB of transformed
/// weight, up to 27 MiB of f16 weights widened for use and, after small images, one band sized for
/// all the threads (16 MiB each).
pub fn free_buffers() {
    scratch::free_this_thread();
    rayon::broadcast(|_| scratch::free_this_thread());
}

/// candle's `conv2d` plus the bias, as `candle_nn::Conv2d` computes it: the reference for the tests
/// and the benchmark, and the path for other devices and dtypes.
pub fn candle_conv2d(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let out = input.conv2d(weight, padding, stride, 1, 1)?;
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, (), 1, 1))?),
        None => Ok(out),
    }
}

/// The algorithm [`Algorithm::Auto`] uses for a shape: the fastest measured (`examples/conv_bench.rs
/// --all`, 2-core AVX2). Winograd needs enough tiles to amortize transforming the weight, and enough
/// channels to amortize transforming the input and output: F(4x4) from 32x32 outputs on (twice the
/// direct rate on the UNet's and the VAE's shapes, 2.5-3x at 64x64 and up), F(2x2) at 16x16 (1.3-1.6x),
/// direct gemm below that (8x8: gemm 120 GFLOP/s, F(2x2) 75-90) and for 3-4 channel convolutions.
fn choose(g: &Geometry) -> Algorithm {
    let tiles = |m: usize| g.ho.div_ceil(m) * g.wo.div_ceil(m);
    let winograd = (g.kh, g.kw, g.stride) == (3, 3, 1) && g.cin.min(g.cout) >= 32;
    if winograd && tiles(4) >= 64 {
        Algorithm::Winograd4
    } else if winograd && tiles(2) >= 64 {
        Algorithm::Winograd2
    } else {
        Algorithm::Gemm
    }
}

fn is_pointwise(g: &Geometry) -> bool {
    (g.kh, g.kw, g.stride, g.pad) == (1, 1, 1, 0)
}

/// The `len` f32 values of a contiguous CPU tensor, without copying them.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, len: usize) -> Result<&'a [f32]> {
    let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        bail!("conv2d: expected a contiguous f32 CPU tensor")
    };
    match data.get(start..end) {
        Some(values) if values.len() == len => Ok(values),
        _ => bail!("conv2d: tensor storage holds {} values at {start}..{end}, expected {len}", data.len()),
    }
}

/// Below this many values [`contiguous`] leaves the copy to candle.
const PARALLEL_COPY: usize = 1 << 16;

/// `t` with its elements in row-major order, like candle's `contiguous`, but for big f32 CPU tensors
/// the copy is shared out between the threads of the current rayon pool, a row of the last dimension
/// per item (candle copies on one thread: the UNet's token/image and head layout changes left the
/// other core idle). Anything else, and any layout this does not recognize, goes to candle.
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() || !t.device().is_cpu() || t.dtype() != DType::F32 || t.elem_count() < PARALLEL_COPY {
        return t.contiguous();
    }
    let (storage, layout) = t.storage_and_layout();
    let copied = match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => copy_strided(data, layout),
        _ => None,
    };
    drop(storage);
    match copied {
        Some(values) => Tensor::from_vec(values, t.dims(), &Device::Cpu),
        None => t.contiguous(),
    }
}

/// The elements of `layout` over `data` in row-major order, a row of the last dimension per rayon item;
/// `None` for a layout whose elements do not all lie inside `data` (then no index below can fail).
fn copy_strided(data: &[f32], layout: &Layout) -> Option<Vec<f32>> {
    let (dims, strides, start) = (layout.dims(), layout.stride(), layout.start_offset());
    let (&inner, &inner_stride) = (dims.last()?, strides.last()?);
    let last =
        dims.iter().zip(strides).try_fold(start, |acc, (&d, &s)| acc.checked_add(d.checked_sub(1)?.checked_mul(s)?));
    if inner == 0 || last? >= data.len() {
        return None;
    }
    let outer = &dims[..dims.len() - 1];
    let mut out = scratch::zeroed(layout.shape().elem_count());
    out.par_chunks_mut(inner).enumerate().with_min_len((PARALLEL_COPY / inner).max(1)).for_each(|(row_index, row)| {
        // The source offset of this output row: its index decomposed over the outer dimensions.
        let (mut rest, mut offset) = (row_index, start);
        for (&d, &s) in outer.iter().zip(strides).rev() {
            offset += (rest % d) * s;
            rest /= d;
        }
        if inner_stride == 1 {
            row.copy_from_slice(&data[offset..offset + inner]);
        } else {
            row.iter_mut().enumerate().for_each(|(j, v)| *v = data[offset + j * inner_stride]);
        }
    });
    Some(out)
}

/// Nearest-neighbour resizing of an NCHW tensor to `(oh, ow)`, the same pixels as candle's
/// `upsample_nearest2d` (source index `floor(dst * in / out)`), with the output rows shared out between
/// the threads for big f32 CPU tensors (candle's runs on one: the tiny decoder's last upsampling writes
/// 64 MiB at 512x512). Anything else goes to candle.
pub fn upsample_nearest2d(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 || b * c * oh * ow < PARALLEL_COPY || h == 0 || w == 0 {
        return x.upsample_nearest2d(oh, ow);
    }
    let x = contiguous(x)?;
    let (storage, layout) = x.storage_and_layout();
    let src = cpu_f32(&storage, layout, b * c * h * w)?;
    let index = |dst: usize, from: usize, to: usize| ((dst as f64 * (from as f64 / to as f64)) as usize).min(from - 1);
    let columns: Vec<usize> = (0..ow).map(|ox| index(ox, w, ow)).collect();
    let mut out = scratch::zeroed(b * c * oh * ow);
    out.par_chunks_mut(ow.max(1)).enumerate().with_min_len((PARALLEL_COPY / ow.max(1)).max(1)).for_each(
        |(row, dst)| {
            let (plane, oy) = (row / oh, row % oh);
            let line = &src[(plane * h + index(oy, h, oh)) * w..][..w];
            dst.iter_mut().zip(&columns).for_each(|(d, &sx)| *d = line[sx]);
        },
    );
    drop(storage);
    Tensor::from_vec(out, (b, c, oh, ow), &Device::Cpu)
}

/// `t` as f32 (a no-op for f32 tensors): f16 and bf16 CPU tensors are widened with [`widen`]; other
/// devices and dtypes go through candle's `to_dtype`. This is how weights stored in f16 (half the
/// memory) meet f32 activations: one layer's weight is widened at a time, just before it is used.
pub fn to_f32(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        return Ok(t.clone());
    }
    if !t.device().is_cpu() || !matches!(t.dtype(), DType::F16 | DType::BF16) {
        return t.to_dtype(DType::F32);
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("to_f32: expected a contiguous tensor") };
    let out = match &*storage {
        Storage::Cpu(CpuStorage::F16(data)) => widen(&data[start..end]),
        Storage::Cpu(CpuStorage::BF16(data)) => widen(&data[start..end]),
        _ => bail!("to_f32: expected f16 or bf16 CPU storage"),
    };
    drop(storage);
    Tensor::from_vec(out, t.dims(), &Device::Cpu)
}

/// f16 or bf16 values widened to f32, in parallel, with the CPU's conversion instructions where it has
/// them (module `widen`).
pub fn widen<H: HalfFloat>(src: &[H]) -> Vec<f32> {
    let mut out = scratch::zeroed(src.len());
    widen_into(src, &mut out);
    out
}

/// [`widen`] into `dst` (as long as `src`).
pub(crate) fn widen_into<H: HalfFloat>(src: &[H], dst: &mut [f32]) {
    const CHUNK: usize = 1 << 16;
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(dst, src)| H::widen_slice(src, dst));
}

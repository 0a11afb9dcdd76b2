//! `kernels::attention` against attention written with candle's ops (matmul, scale, a softmax by hand:
//! subtract the row maximum, exp, divide by the sum; matmul), on the models' shapes scaled down and on
//! odd ones, at every instruction-set level this CPU has (the softmax's loops are compiled for each), and
//! its argument checks.
//!
//! Error measure: the largest absolute difference divided by the largest magnitude of the reference
//! output, `max|a - b| / max(max|b|, 1e-6)`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod common;
use common::{at_each_level, relative_error};

use candle_core::{D, DType, Device, Result, Tensor};

/// Seeded normal values with standard deviation `std` (xorshift and Box-Muller: candle's CPU generator
/// cannot be seeded).
fn normal(len: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32 * std
        })
        .collect()
}

fn tensor(dims: (usize, usize, usize), std: f32, seed: u64) -> Tensor {
    Tensor::from_vec(normal(dims.0 * dims.1 * dims.2, std, seed), dims, &Device::Cpu).unwrap()
}

fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let exp = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?.matmul(v)
}

/// (bh, tq, tk, d, dv, standard deviation of the inputs, scale)
type Case = (usize, usize, usize, usize, usize, f32, f64);

fn check(cases: &[Case]) {
    for (i, &(bh, tq, tk, d, dv, std, scale)) in cases.iter().enumerate() {
        let seed = 100 * i as u64;
        let q = tensor((bh, tq, d), std, seed);
        let k = tensor((bh, tk, d), std, seed + 1);
        let v = tensor((bh, tk, dv), std, seed + 2);
        let want = reference(&q, &k, &v, scale).unwrap();
        at_each_level(|level| {
            let got = kernels::attention(&q, &k, &v, scale).unwrap();
            let err = relative_error(&got, &want);
            println!("(bh {bh}, tq {tq}, tk {tk}, d {d}, dv {dv}, std {std}, scale {scale}): {err:.2e}");
            assert!(err < 1e-5, "{level:?} {:?}: relative error {err:e}", cases[i]);
        });
    }
}

#[test]
fn matches_candle_on_the_models_shapes() {
    check(&[
        // Self-attention with several key blocks (tk not a multiple of the block), one head of 64.
        (2, 300, 700, 64, 64, 1.0, 0.125),
        // The text encoder; cross-attention (77 keys) at SD 1.x's head sizes.
        (1, 77, 77, 64, 64, 1.0, 0.125),
        (3, 129, 77, 40, 40, 1.0, 1.0 / 40f64.sqrt()),
        (2, 64, 77, 160, 160, 1.0, 1.0 / 160f64.sqrt()),
        (10, 64, 64, 80, 80, 1.0, 1.0 / 80f64.sqrt()),
        // Values of another width than the keys.
        (2, 33, 45, 24, 56, 1.0, 0.2),
    ]);
}

#[test]
fn matches_candle_on_tiny_shapes() {
    check(&[
        (1, 1, 1, 8, 8, 1.0, 0.5),
        (2, 1, 50, 8, 3, 1.0, 0.5),
        (2, 50, 1, 8, 3, 1.0, 0.5),
        (1, 3, 2, 1, 1, 1.0, 1.0),
    ]);
}

/// Large scores (inputs of standard deviation 3 at scale 1): the running maximum grows from key block
/// to key block, so the online softmax rescales; the VAE's head of 512.
#[test]
fn matches_candle_with_large_scores() {
    check(&[(1, 1025, 1025, 512, 512, 3.0, 1.0), (2, 200, 1500, 64, 64, 3.0, 1.0), (1, 100, 2100, 64, 64, 1.0, 0.4)]);
}

/// Keys that grow from first to last: the maximum of most rows grows in every key block, by a few units,
/// so the rescaling factors are neither 0 nor 1.
#[test]
fn matches_candle_with_growing_scores() {
    let (bh, tq, tk, d) = (2, 150, 2000, 64);
    let q = tensor((bh, tq, d), 1.0, 1).abs().unwrap();
    let ramp = Tensor::arange(0u32, tk as u32, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let ramp = ((ramp / tk as f64).unwrap() + 0.5).unwrap().reshape((1, tk, 1)).unwrap();
    let k = tensor((bh, tk, d), 1.0, 2).abs().unwrap().broadcast_mul(&ramp).unwrap();
    let v = tensor((bh, tk, d), 1.0, 3);
    let want = reference(&q, &k, &v, 0.1).unwrap();
    at_each_level(|level| {
        let got = kernels::attention(&q, &k, &v, 0.1).unwrap();
        let err = relative_error(&got, &want);
        println!("growing scores: {err:.2e}");
        assert!(err < 1e-5, "{level:?}: relative error {err:e}");
    });
}

#[test]
fn takes_strided_inputs() {
    let q = tensor((2, 16, 60), 1.0, 1).transpose(1, 2).unwrap(); // [2, 60, 16], not contiguous
    let k = tensor((2, 16, 70), 1.0, 2).transpose(1, 2).unwrap();
    let v = tensor((2, 70, 24), 1.0, 3);
    let want = reference(&q, &k, &v, 0.25).unwrap();
    at_each_level(|level| {
        let got = kernels::attention(&q, &k, &v, 0.25).unwrap();
        assert!(relative_error(&got, &want) < 1e-5, "{level:?}");
    });
}

#[test]
fn without_keys_gives_zeros() {
    let q = tensor((2, 5, 8), 1.0, 1);
    let k = Tensor::zeros((2, 0, 8), DType::F32, &Device::Cpu).unwrap();
    let v = Tensor::zeros((2, 0, 4), DType::F32, &Device::Cpu).unwrap();
    let got = kernels::attention(&q, &k, &v, 1.0).unwrap();
    assert_eq!(got.dims(), &[2, 5, 4]);
    assert!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&x| x == 0.0));
}

#[test]
fn nan_inputs_give_nan() {
    let mut values = normal(2 * 4 * 8, 1.0, 5);
    values[3] = f32::NAN; // head 0, key 0
    let k = Tensor::from_vec(values, (2, 4, 8), &Device::Cpu).unwrap();
    let q = tensor((2, 3, 8), 1.0, 6);
    let v = tensor((2, 4, 8), 1.0, 7);
    at_each_level(|level| {
        let got = kernels::attention(&q, &k, &v, 1.0).unwrap().to_vec3::<f32>().unwrap();
        assert!(got[0].iter().flatten().all(|x| x.is_nan()), "{level:?}");
        assert!(got[1].iter().flatten().all(|x| x.is_finite()), "{level:?}");
    });
}

#[test]
fn rejects_bad_arguments() {
    let q = tensor((2, 5, 8), 1.0, 1);
    let k = tensor((2, 7, 8), 1.0, 2);
    let v = tensor((2, 7, 4), 1.0, 3);
    let error = |q: &Tensor, k: &Tensor, v: &Tensor| kernels::attention(q, k, v, 1.0).unwrap_err().to_string();

    let msg = error(&q, &tensor((2, 7, 6), 1.0, 4), &v);
    assert!(msg.contains("head dim") && msg.contains("d = 8") && msg.contains("d = 6"), "{msg}");
    let msg = error(&q, &k, &tensor((2, 6, 4), 1.0, 4));
    assert!(msg.contains("key count") && msg.contains("tk = 7"), "{msg}");
    let msg = error(&q, &tensor((3, 7, 8), 1.0, 4), &v);
    assert!(msg.contains("batch x heads"), "{msg}");
    let msg = error(&q.reshape((10, 8)).unwrap(), &k, &v);
    assert!(msg.contains("q") && msg.contains("rank 3") && msg.contains("[10, 8]"), "{msg}");
    let msg = error(&q, &k, &v.unsqueeze(0).unwrap());
    assert!(msg.contains("v") && msg.contains("rank 3"), "{msg}");
    let msg = error(&q.to_dtype(DType::F16).unwrap(), &k, &v);
    assert!(msg.contains("f32") && msg.contains("F16"), "{msg}");
    let msg = kernels::attention(&q, &k, &v, f64::NAN).unwrap_err().to_string();
    assert!(msg.contains("scale"), "{msg}");
}

//! `kernels::geglu` against candle's ops in f64 (the halves split, an exact erf GELU of the gates, the
//! product), on the UNet's row widths scaled down and on odd ones, and its argument checks. At every
//! instruction-set level this CPU has: GEGLU has no dispatched loop of its own today (it runs as
//! compiled, for the baseline), and this keeps every level covered if one is added.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod common;
use common::at_each_level;

use candle_core::{D, DType, Device, Tensor};

/// Deterministic values spread over -6..6, where GELU bends (beyond, it is 0 or the identity).
fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| (((i * 7919 + seed * 104_729) % 10_007) as f32 / 10_007.0 - 0.5) * 12.0).collect()
}

fn reference(x: &Tensor) -> Tensor {
    let halves = x.to_dtype(DType::F64).unwrap().chunk(2, D::Minus1).unwrap();
    (&halves[0] * halves[1].gelu_erf().unwrap()).unwrap()
}

#[test]
fn equals_the_gated_exact_gelu_on_the_models_shapes_and_odd_ones() {
    // (rows..., 2n): SD's feed-forward at 8x8 tokens and two odd widths (not a multiple of 8 or 16).
    at_each_level(|level| {
        let shapes = [vec![1, 64, 2 * 1280], vec![2, 3, 2 * 37], vec![5, 2], vec![2 * 9]];
        for (seed, dims) in shapes.into_iter().enumerate() {
            let len = dims.iter().product();
            let x = Tensor::from_vec(values(len, seed), dims.as_slice(), &Device::Cpu).unwrap();
            let got = kernels::geglu(&x).unwrap();
            let want = reference(&x);
            let mut out_dims = dims.clone();
            *out_dims.last_mut().unwrap() /= 2;
            assert_eq!(got.dims(), out_dims.as_slice());
            let got = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let want = want.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let values: Vec<f64> =
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect();
            let n = out_dims[out_dims.len() - 1];
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // The error grows with the value times the gate: an f32 product of two values up to 6.
                let (value, gate) = (values[i / n * 2 * n + i % n], values[i / n * 2 * n + n + i % n]);
                let bound = 4e-7 * (value.abs() * gate.abs()).max(1.0);
                assert!((g - w).abs() <= bound, "{level:?} {dims:?} element {i}: {g} against {w}");
            }
        }
    });
}

#[test]
fn non_strided_views_and_empty_rows_work() {
    // A transposed (non-contiguous) input is made contiguous first.
    let x = Tensor::from_vec(values(4 * 6, 3), (6, 4), &Device::Cpu).unwrap().t().unwrap();
    let empty = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap();
    at_each_level(|level| {
        let got = kernels::geglu(&x).unwrap().to_dtype(DType::F64).unwrap();
        let diff = (got - reference(&x)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-5, "{level:?}: {diff}");
        assert_eq!(kernels::geglu(&empty).unwrap().dims(), &[3, 0]);
    });
}

#[test]
fn refuses_odd_widths_and_other_dtypes_naming_why() {
    let odd = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    let e = kernels::geglu(&odd).unwrap_err().to_string();
    assert!(e.contains("must be even"), "{e}");
    let f16 = Tensor::zeros((2, 4), DType::F16, &Device::Cpu).unwrap();
    let e = kernels::geglu(&f16).unwrap_err().to_string();
    assert!(e.contains("f32 CPU"), "{e}");
    let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
    assert!(kernels::geglu(&scalar).is_err());
}

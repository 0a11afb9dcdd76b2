//! `kernels::linear_f16` against candle's matmul on the same f16 weights widened to f64, on the text
//! encoders' shapes (77 tokens), odd ones (rows, features and widths that are no multiple of the tiles
//! or the vector lanes, widths shorter than one vector, longer than one widening chunk), more rows than
//! the dot products take (the gemm on the widened weight), with and without bias, and its argument
//! checks; at every instruction-set level this CPU has (the dot products' 6 x 4 tiles on AVX-512, 4 x 2
//! on AVX2+FMA; at the baseline `linear_f16` declines up to `FEW_ROWS` rows).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::at_each_level;

use candle_core::{DType, Device, Tensor};
use half::f16;
use kernels::Level;

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| (((i * 7919 + seed * 104_729) % 10_007) as f32 / 10_007.0 - 0.5) * 2.0).collect()
}

#[test]
fn equals_the_matmul_of_the_widened_weights() {
    // (leading dims of x, k, n)
    let cases: [(&[usize], usize, usize); 9] = [
        (&[1, 77], 1024, 1024),
        (&[1, 77], 96, 300),
        (&[2, 5], 1100, 33),
        (&[3], 13, 7),
        (&[5], 3, 40),
        (&[1], 17, 1),
        (&[4, 1], 512, 64),
        // More rows than `FEW_ROWS`: the gemm on the widened weight, starting from the bias.
        (&[2, 301], 70, 100),
        // Longer than one widening chunk (4096): the 8x8 convolutions' im2col rows are 11520 long.
        (&[3, 2], 4200, 40),
    ];
    at_each_level(|level| {
        for (seed, &(lead, k, n)) in cases.iter().enumerate() {
            let m: usize = lead.iter().product();
            let mut dims = lead.to_vec();
            dims.push(k);
            let x = Tensor::from_vec(values(m * k, seed), dims.as_slice(), &Device::Cpu).unwrap();
            let w: Vec<f16> = values(n * k, seed + 10).into_iter().map(f16::from_f32).collect();
            let bias = Tensor::from_vec(values(n, seed + 20), n, &Device::Cpu).unwrap();
            let wide =
                Tensor::from_vec(w.iter().map(|v| v.to_f64()).collect::<Vec<_>>(), (n, k), &Device::Cpu).unwrap();
            let what = |bias: Option<&Tensor>| format!("{level:?} {lead:?} k {k} n {n} bias {}", bias.is_some());
            for bias in [Some(&bias), None] {
                let got = kernels::linear_f16(&x, &w, n, bias).unwrap();
                // The dot products need AVX2+FMA or AVX-512: at the baseline, few rows are declined (the
                // caller takes candle's path), and more rows still take the gemm on the widened weight.
                let Some(got) = got else {
                    assert!(level == Level::Baseline && m <= kernels::FEW_ROWS, "{}: declined", what(bias));
                    continue;
                };
                assert!(level != Level::Baseline || m > kernels::FEW_ROWS, "{}: not declined", what(bias));
                let mut out_dims = lead.to_vec();
                out_dims.push(n);
                assert_eq!(got.dims(), out_dims.as_slice());
                let want = x.to_dtype(DType::F64).unwrap().reshape((m, k)).unwrap().matmul(&wide.t().unwrap()).unwrap();
                let want = match bias {
                    Some(b) => want.broadcast_add(&b.to_dtype(DType::F64).unwrap()).unwrap(),
                    None => want,
                };
                let got = got.reshape((m, n)).unwrap().to_dtype(DType::F64).unwrap();
                let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                // f32 sums of k products of values under 1: a few ulp per term at most.
                let bound = 1e-6 * k as f64;
                assert!(diff <= bound, "{}: max difference {diff:e}", what(bias));
            }
        }
    });
}

#[test]
fn refuses_weights_of_the_wrong_size_and_other_dtypes() {
    let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
    let w = vec![f16::ZERO; 8 * 3];
    let e = kernels::linear_f16(&x, &w, 4, None).unwrap_err().to_string();
    assert!(e.contains("expected 4 x 8"), "{e}");
    let bad_bias = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let e = kernels::linear_f16(&x, &w, 3, Some(&bad_bias)).unwrap_err().to_string();
    assert!(e.contains("bias shape"), "{e}");
    let e = kernels::linear_f16(&x.to_dtype(DType::F16).unwrap(), &w, 3, None).unwrap_err().to_string();
    assert!(e.contains("f32 CPU"), "{e}");
}

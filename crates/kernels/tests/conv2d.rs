//! Every algorithm of `kernels::conv2d` against candle's own conv2d, on the models' shapes scaled down and
//! on odd ones, at every instruction-set level this CPU has (Winograd's transforms are compiled for each,
//! `conv2d_f16`'s few-pixel path runs on `linear_f16`'s tiles; the `gemm` crate picks its own kernels).
//!
//! Error measure: the largest absolute difference divided by the largest magnitude of the reference
//! output, `max|a - b| / max(max|b|, 1e-6)`, so that the few outputs near zero do not dominate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod common;
use common::{at_each_level, relative_error};

use candle_core::{DType, Device, Tensor};
use kernels::{Algorithm, Fused, candle_conv2d, conv2d, conv2d_fused, conv2d_with};

/// (N, Cin, H, W, Cout, k, stride, padding)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

const SHAPES: &[Case] = &[
    // The VAE decoder and the UNet, scaled down: 3x3 stride 1 padding 1.
    (1, 32, 64, 64, 32, 3, 1, 1),
    (1, 64, 32, 32, 64, 3, 1, 1),
    (1, 40, 16, 16, 80, 3, 1, 1),
    (2, 20, 24, 20, 20, 3, 1, 1),
    // Odd sizes: channels not multiples of 8, width not a multiple of the tile, tiny images.
    (1, 4, 17, 13, 3, 3, 1, 1),
    (3, 5, 9, 11, 7, 3, 1, 1),
    (1, 4, 5, 5, 4, 3, 1, 1),
    (1, 3, 2, 3, 2, 3, 1, 1),
    (1, 6, 10, 7, 5, 3, 1, 0),
    (1, 6, 3, 3, 5, 3, 1, 0),
    (1, 2, 6, 6, 3, 3, 1, 2),
    // 1x1: gemm straight on the input; also with padding and stride (im2col).
    (1, 64, 16, 16, 32, 1, 1, 0),
    (2, 12, 7, 9, 5, 1, 1, 0),
    (1, 12, 7, 9, 5, 1, 2, 0),
    (1, 12, 7, 9, 5, 1, 1, 1),
    // Downsamplers: 3x3 stride 2, padding 1 (UNet) and 0 (VAE encoder, after its own padding).
    (1, 32, 32, 32, 32, 3, 2, 1),
    (2, 10, 17, 16, 6, 3, 2, 0),
    (1, 10, 16, 15, 6, 3, 2, 1),
    // Other kernels: 5x5, 7x7 stride 3, and conv_in/conv_out style (Cin 4 -> 32, 32 -> Cout 3).
    (1, 5, 12, 12, 4, 5, 1, 2),
    (1, 3, 20, 19, 2, 7, 3, 3),
    (1, 4, 16, 16, 32, 3, 1, 1),
    (1, 32, 16, 16, 3, 3, 1, 1),
];

/// Seeded uniform values in [-scale, scale) (candle's CPU generator cannot be seeded).
fn random(len: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

fn tensors(case: Case, seed: u64) -> (Tensor, Tensor, Tensor) {
    let (n, cin, h, w, cout, k, _, _) = case;
    let dev = Device::Cpu;
    let x = Tensor::from_vec(random(n * cin * h * w, 1.0, seed), (n, cin, h, w), &dev).unwrap();
    // Unit-variance outputs, as in a trained network: uniform weights with variance 1 / fan-in.
    let scale = (3.0 / (cin * k * k) as f32).sqrt();
    let weight = Tensor::from_vec(random(cout * cin * k * k, scale, seed + 1000), (cout, cin, k, k), &dev).unwrap();
    let bias = Tensor::from_vec(random(cout, 1.0, seed + 2000), cout, &dev).unwrap();
    (x, weight, bias)
}

/// Runs `algorithm` on every case it applies to, with and without bias, at every level, and returns the
/// worst error.
fn worst_error(algorithm: Algorithm, applies: impl Fn(&Case) -> bool + Sync) -> f32 {
    let worst = std::sync::Mutex::new(0f32);
    at_each_level(|level| {
        for (i, &case) in SHAPES.iter().enumerate().filter(|(_, c)| applies(c)) {
            let (x, weight, bias) = tensors(case, i as u64);
            let (stride, padding) = (case.6, case.7);
            for bias in [Some(&bias), None] {
                let want = candle_conv2d(&x, &weight, bias, stride, padding).unwrap();
                let got = conv2d_with(&x, &weight, bias, stride, padding, algorithm).unwrap();
                let err = relative_error(&got, &want);
                let what = format!("{level:?} {algorithm:?} {case:?} bias {}", bias.is_some());
                println!("{what}: {err:.2e}");
                assert!(err < 1e-3, "{what}: relative error {err:e}");
                let mut worst = worst.lock().unwrap();
                *worst = worst.max(err);
            }
        }
    });
    worst.into_inner().unwrap()
}

fn is_winograd(c: &Case) -> bool {
    c.5 == 3 && c.6 == 1
}

#[test]
fn gemm_paths_match_candle() {
    let err = worst_error(Algorithm::Gemm, |_| true);
    assert!(err < 1e-5, "blocked im2col / 1x1 gemm: relative error {err:e}");
}

#[test]
fn auto_matches_candle() {
    let err = worst_error(Algorithm::Auto, |_| true);
    assert!(err < 1e-3, "auto: relative error {err:e}");
}

#[test]
fn winograd_2x2_matches_candle() {
    let err = worst_error(Algorithm::Winograd2, is_winograd);
    assert!(err < 1e-5, "Winograd F(2x2,3x3): relative error {err:e}");
}

#[test]
fn winograd_4x4_matches_candle() {
    let err = worst_error(Algorithm::Winograd4, is_winograd);
    assert!(err < 1e-3, "Winograd F(4x4,3x3): relative error {err:e}");
}

/// F(4x4)'s error grows with the number of input channels summed: check it at the decoder's widest.
#[test]
fn winograd_4x4_error_at_512_channels() {
    let case = (1, 512, 12, 12, 8, 3, 1, 1);
    let (x, weight, bias) = tensors(case, 7);
    let want = candle_conv2d(&x, &weight, Some(&bias), 1, 1).unwrap();
    at_each_level(|level| {
        let got = conv2d_with(&x, &weight, Some(&bias), 1, 1, Algorithm::Winograd4).unwrap();
        let err = relative_error(&got, &want);
        println!("Winograd4 {case:?}: {err:.2e}");
        assert!(err < 1e-3, "{level:?}: relative error {err:e}");
    });
}

#[test]
fn freeing_the_buffers_changes_nothing() {
    let case = (1, 40, 16, 16, 80, 3, 1, 1);
    let (x, weight, bias) = tensors(case, 11);
    let want = candle_conv2d(&x, &weight, Some(&bias), 1, 1).unwrap();
    at_each_level(|level| {
        for _ in 0..2 {
            let got = conv2d(&x, &weight, Some(&bias), 1, 1).unwrap();
            assert!(relative_error(&got, &want) < 1e-3, "{level:?}");
            kernels::free_buffers();
        }
    });
}

#[test]
fn other_dtypes_fall_back_to_candle() {
    let (x, weight, bias) = tensors((1, 4, 9, 9, 3, 3, 1, 1), 3);
    let (x, weight, bias) =
        (x.to_dtype(DType::F64).unwrap(), weight.to_dtype(DType::F64).unwrap(), bias.to_dtype(DType::F64).unwrap());
    let got = conv2d(&x, &weight, Some(&bias), 1, 1).unwrap();
    assert_eq!(got.dtype(), DType::F64);
    let want = candle_conv2d(&x, &weight, Some(&bias), 1, 1).unwrap();
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert_eq!(diff, 0.0);
    assert!(conv2d_with(&x, &weight, Some(&bias), 1, 1, Algorithm::Winograd4).is_err());
}

#[test]
fn non_contiguous_input_is_fine() {
    let (x, weight, bias) = tensors((1, 6, 10, 12, 4, 3, 1, 1), 5);
    let x = x.transpose(2, 3).unwrap(); // [1, 6, 12, 10], strided
    assert!(!x.is_contiguous());
    let want = candle_conv2d(&x, &weight, Some(&bias), 1, 1).unwrap();
    at_each_level(|level| {
        let got = conv2d(&x, &weight, Some(&bias), 1, 1).unwrap();
        assert!(relative_error(&got, &want) < 1e-3, "{level:?}");
    });
}

#[test]
fn bad_shapes_are_errors() {
    let (x, weight, bias) = tensors((1, 6, 10, 12, 4, 3, 1, 1), 5);
    let wrong_cin = Tensor::zeros((4, 5, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&x, &wrong_cin, None, 1, 1).is_err());
    let wrong_bias = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&x, &weight, Some(&wrong_bias), 1, 1).is_err());
    assert!(conv2d(&x, &weight, Some(&bias), 0, 1).is_err());
    let tiny = Tensor::zeros((1, 6, 1, 1), DType::F32, &Device::Cpu).unwrap();
    assert!(conv2d(&tiny, &weight, None, 1, 0).is_err());
    assert!(conv2d_with(&x, &weight, None, 2, 1, Algorithm::Winograd2).is_err());
}

/// Bands are split by thread count (and each gemm gets all threads when bands are few): 1 and 3
/// threads must be right too, at every level (`with_level`'s pool has as many threads as the one it is
/// called on).
#[test]
fn any_thread_count_matches_candle() {
    let (x, weight, bias) = tensors((2, 8, 20, 18, 6, 3, 1, 1), 9);
    let want = candle_conv2d(&x, &weight, Some(&bias), 1, 1).unwrap();
    for algorithm in [Algorithm::Gemm, Algorithm::Winograd4] {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                at_each_level(|level| {
                    assert_eq!(rayon::current_num_threads(), threads);
                    let got = conv2d_with(&x, &weight, Some(&bias), 1, 1, algorithm).unwrap();
                    assert!(relative_error(&got, &want) < 1e-3, "{level:?} {algorithm:?} {threads} threads");
                })
            });
        }
    }
}

/// The fused residual and ReLU, on every algorithm and every shape it applies to, at every level,
/// against candle's conv2d followed by candle's add and ReLU; batch > 1 checks that each image meets its
/// own residual.
#[test]
fn fused_residual_and_relu_match_candle_on_every_algorithm() {
    let algorithms = [Algorithm::Gemm, Algorithm::Winograd2, Algorithm::Winograd4, Algorithm::Auto];
    at_each_level(|level| {
        for (i, &case) in SHAPES.iter().enumerate() {
            let (x, weight, bias) = tensors(case, i as u64 + 50);
            let (stride, padding) = (case.6, case.7);
            let plain = candle_conv2d(&x, &weight, Some(&bias), stride, padding).unwrap();
            let residual =
                Tensor::from_vec(random(plain.elem_count(), 1.0, i as u64 + 90), plain.dims(), &Device::Cpu).unwrap();
            for algorithm in algorithms
                .into_iter()
                .filter(|a| is_winograd(&case) || !matches!(a, Algorithm::Winograd2 | Algorithm::Winograd4))
            {
                for (residual, relu) in [(None, true), (Some(&residual), false), (Some(&residual), true)] {
                    let want = match residual {
                        Some(r) => (&plain + r).unwrap(),
                        None => plain.clone(),
                    };
                    let want = if relu { want.relu().unwrap() } else { want };
                    let fused = Fused { residual, relu };
                    let got = conv2d_fused(&x, &weight, Some(&bias), stride, padding, algorithm, fused).unwrap();
                    let err = relative_error(&got, &want);
                    let what = format!("{level:?} {algorithm:?} {case:?} residual {} relu {relu}", residual.is_some());
                    assert!(err < 1e-3, "{what}: relative error {err:e}");
                    if relu {
                        let values = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        assert!(values.iter().all(|v| *v >= 0.0), "{what}");
                    }
                }
            }
        }
    });
}

#[test]
fn a_residual_of_another_shape_is_an_error_and_other_dtypes_take_candle() {
    let (x, weight, bias) = tensors((1, 6, 10, 12, 4, 3, 1, 1), 5);
    let wrong = Tensor::zeros((1, 4, 10, 11), DType::F32, &Device::Cpu).unwrap();
    let fused = Fused { residual: Some(&wrong), relu: true };
    let e = conv2d_fused(&x, &weight, Some(&bias), 1, 1, Algorithm::Auto, fused).unwrap_err().to_string();
    assert!(e.contains("residual shape"), "{e}");
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let residual = Tensor::ones((1, 4, 10, 12), DType::F64, &Device::Cpu).unwrap();
    let fused = Fused { residual: Some(&residual), relu: true };
    let got = conv2d_fused(&f64s(&x), &f64s(&weight), Some(&f64s(&bias)), 1, 1, Algorithm::Auto, fused).unwrap();
    let want = (candle_conv2d(&f64s(&x), &f64s(&weight), Some(&f64s(&bias)), 1, 1).unwrap() + &residual)
        .unwrap()
        .relu()
        .unwrap();
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert_eq!(diff, 0.0);
}

/// `conv2d_f16` against candle's conv2d on the same f16 weights widened, with and without the fused
/// residual and ReLU: up to 64 output pixels (im2col rows through `linear_f16`) on the UNet's 8x8
/// shapes scaled down, a stride-2 downsampler, a 1x1 and a batch of two; beyond, Winograd F(2x2) and
/// F(4x4) on the f16 taps, and the widened-copy paths (1x1, stride 2); at every level (at the baseline
/// `linear_f16` declines, and the few-pixel shapes take the other paths).
#[test]
fn the_f16_weight_path_matches_candle() {
    let cases: [Case; 8] = [
        (1, 40, 8, 8, 24, 3, 1, 1),
        (2, 16, 7, 5, 12, 3, 2, 1),
        (1, 12, 6, 6, 5, 1, 1, 0),
        (2, 9, 4, 3, 7, 3, 1, 1),
        (1, 40, 16, 16, 36, 3, 1, 1),
        (2, 33, 32, 30, 32, 3, 1, 1),
        (1, 12, 10, 10, 5, 1, 1, 0),
        (1, 8, 20, 20, 6, 3, 2, 1),
    ];
    at_each_level(|level| {
        for (i, case) in cases.into_iter().enumerate() {
            let (x, weight, bias) = tensors(case, i as u64 + 70);
            let (stride, padding) = (case.6, case.7);
            let half = weight.to_dtype(DType::F16).unwrap();
            let values: Vec<half::f16> = half.flatten_all().unwrap().to_vec1().unwrap();
            let widened = half.to_dtype(DType::F32).unwrap();
            let plain = candle_conv2d(&x, &widened, Some(&bias), stride, padding).unwrap();
            let residual =
                Tensor::from_vec(random(plain.elem_count(), 1.0, i as u64 + 80), plain.dims(), &Device::Cpu).unwrap();
            for (residual, relu) in [(None, false), (Some(&residual), true)] {
                let want = match residual {
                    Some(r) => (&plain + r).unwrap(),
                    None => plain.clone(),
                };
                let want = if relu { want.relu().unwrap() } else { want };
                let fused = Fused { residual, relu };
                let dims = weight.dims4().unwrap();
                let got = kernels::conv2d_f16(&x, &values, dims, Some(&bias), stride, padding, fused).unwrap();
                let err = relative_error(&got, &want);
                // Winograd's transforms round more than a direct sum.
                let bound = if dims.2 == 3 && stride == 1 && got.elem_count() / dims.0 > 64 { 1e-4 } else { 1e-5 };
                assert!(err < bound, "{level:?} {case:?} residual {}: relative error {err:e}", residual.is_some());
            }
        }
    });
    let (x, weight, _) = tensors((1, 4, 5, 5, 3, 3, 1, 1), 1);
    let e = kernels::conv2d_f16(&x, &[half::f16::ZERO; 5], weight.dims4().unwrap(), None, 1, 1, Fused::default());
    assert!(e.unwrap_err().to_string().contains("weight holds 5 values"));
}

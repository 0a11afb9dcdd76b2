#![allow(clippy::unwrap_used, clippy::print_stdout, dead_code)] // dead_code: not every test file uses every helper.
//! What the kernel tests share.

use candle_core::Tensor;
use kernels::Level;

/// `max|got - want| / max|want|`, after checking that the shapes agree and every output is finite.
pub fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// Runs `check` at every instruction-set level this CPU has (`kernels::with_level`: AVX-512, AVX2+FMA,
/// the SSE2 baseline), best first, printing which ran and which the CPU lacks: one binary serves every
/// x86-64 CPU, so the AVX2 and baseline paths must be right on an AVX-512 test machine too. `check`
/// gets the level to name it in its messages.
pub fn at_each_level(check: impl Fn(Level) + Sync) {
    for level in Level::ALL {
        if !level.is_supported() {
            println!("level {level:?}: not on this CPU, skipped");
            continue;
        }
        println!("level {level:?}:");
        kernels::with_level(level, || check(level)).unwrap();
    }
}

//! Helpers the reference-parity tests share: comparing tensors and images with diffusers' outputs, and
//! giving the engine diffusers' random draws.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Tensor};

/// The largest difference over the reference's largest magnitude.
pub fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let want = want.to_dtype(DType::F32).unwrap();
    let got = got.to_dtype(DType::F32).unwrap();
    let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff.is_finite() && scale > 0.0, "diff {diff}, scale {scale}");
    diff / scale
}

/// diffusers' draws, by what they are for.
pub struct DiffusersNoise(Vec<(engine::Draw, Tensor)>);

impl DiffusersNoise {
    pub fn new(initial: &Tensor) -> DiffusersNoise {
        DiffusersNoise(vec![(engine::Draw::Initial, initial.clone())])
    }

    pub fn with(mut self, what: engine::Draw, noise: &Tensor) -> DiffusersNoise {
        self.0.push((what, noise.clone()));
        self
    }
}

impl engine::Hooks for DiffusersNoise {
    fn noise(&mut self, _seed: u64, what: engine::Draw, shape: (usize, usize, usize)) -> Option<Tensor> {
        let (_, t) = self.0.iter().find(|(w, _)| *w == what).unwrap_or_else(|| panic!("no noise for {what:?}"));
        assert_eq!(t.dims()[1..], [shape.0, shape.1, shape.2]);
        Some(t.get(0).unwrap())
    }
}

/// The largest difference in levels between an image and diffusers' 8-bit image (`[1, h, w, 3]`) over
/// the pixels `count` picks.
pub fn levels_off(got: &image::RgbImage, want: &Tensor, count: impl Fn(u32, u32) -> bool) -> u8 {
    let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.as_raw().len(), want.len());
    // The reference image is not flat: the comparison means something.
    assert!(want.iter().any(|v| v.abs_diff(want[0]) > 25));
    let w = got.width();
    got.as_raw()
        .iter()
        .zip(&want)
        .enumerate()
        .filter(|(i, _)| count((*i / 3) as u32 % w, (*i / 3) as u32 / w))
        .map(|(_, (g, w))| g.abs_diff(*w))
        .max()
        .unwrap_or(0)
}

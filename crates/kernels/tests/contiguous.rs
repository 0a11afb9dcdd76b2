//! `kernels::contiguous` and `kernels::upsample_nearest2d` against candle's ops: the same values in the
//! same order, exactly, on the UNet's layout changes (tokens to image, heads split and merged), the tiny
//! decoder's upsampling, odd sizes and views with an offset. At every instruction-set level this CPU
//! has: these copies have no dispatched loop of their own today (they run as compiled, for the
//! baseline), and this keeps every level covered if one is added.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod common;
use common::at_each_level;

use candle_core::{DType, Device, IndexOp, Tensor};

fn ramp(dims: &[usize]) -> Tensor {
    let len: usize = dims.iter().product();
    Tensor::arange(0u32, len as u32, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().reshape(dims).unwrap()
}

fn same(view: &Tensor) {
    let got = kernels::contiguous(view).unwrap();
    assert!(got.is_contiguous());
    assert_eq!(got.dims(), view.dims());
    let want = view.contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "{:?}", view.layout());
}

#[test]
fn equals_candles_copy_on_the_unets_layout_changes_and_offset_views() {
    at_each_level(|_| layout_changes_and_offset_views());
}

fn layout_changes_and_offset_views() {
    // Image to tokens at 64x64 latents, 320 channels; tokens back to an image.
    same(&ramp(&[1, 320, 4096]).transpose(1, 2).unwrap());
    same(&ramp(&[1, 4096, 320]).transpose(1, 2).unwrap());
    // Heads split (5 heads of 64) and merged back.
    same(&ramp(&[1, 4096, 5, 64]).transpose(1, 2).unwrap());
    same(&ramp(&[1, 5, 4096, 64]).transpose(1, 2).unwrap());
    // Odd sizes, a batch of two, a view that starts inside its storage and one with an inner stride.
    same(&ramp(&[2, 37, 1001]).transpose(1, 2).unwrap());
    same(&ramp(&[3, 300, 301]).i((1.., 7.., 2..)).unwrap().transpose(0, 2).unwrap());
    same(&ramp(&[4, 130, 257]).narrow(2, 1, 200).unwrap());
    // Small tensors and contiguous ones are left to candle and come back unchanged.
    same(&ramp(&[3, 5]).t().unwrap());
    same(&ramp(&[1, 70_000]));
}

#[test]
fn upsampling_equals_candles_nearest_on_whole_and_odd_sizes() {
    let cases: [(&[usize], (usize, usize)); 4] = [
        (&[1, 64, 64, 64], (128, 128)),
        (&[2, 5, 33, 47], (66, 94)),
        // Sizes that are not multiples (the UNet's odd latent sides), and a view.
        (&[1, 16, 31, 40], (64, 81)),
        (&[1, 16, 40, 40], (80, 80)),
    ];
    at_each_level(|level| {
        for (i, (dims, (oh, ow))) in cases.into_iter().enumerate() {
            let x = ramp(dims);
            let x = if i == 3 { x.narrow(2, 3, 30).unwrap() } else { x };
            let got = kernels::upsample_nearest2d(&x, oh, ow).unwrap();
            let want = x.upsample_nearest2d(oh, ow).unwrap();
            assert_eq!(got.dims(), want.dims());
            let (got, want) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
            assert_eq!(got.to_vec1::<f32>().unwrap(), want.to_vec1::<f32>().unwrap(), "{level:?} case {i}");
        }
    });
}

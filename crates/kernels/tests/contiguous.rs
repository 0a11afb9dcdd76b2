//! `kernels::contiguous` against candle's `contiguous`: the same values in the same order, exactly, on
//! the UNet's layout changes (tokens to image, heads split and merged) and on views with an offset.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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

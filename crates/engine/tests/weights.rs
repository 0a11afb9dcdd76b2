#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The safetensors reader against candle's writer and reader.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

#[test]
fn every_dtype_reads_back_what_candle_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let base = Tensor::randn(0f32, 1.0, (3, 700, 601), &Device::Cpu).unwrap(); // over one read chunk
    let mut tensors = HashMap::new();
    tensors.insert("a.weight".to_owned(), base.clone());
    tensors.insert("b.half".to_owned(), base.to_dtype(DType::F16).unwrap());
    tensors.insert("c.brain".to_owned(), base.narrow(0, 0, 1).unwrap().to_dtype(DType::BF16).unwrap());
    tensors.insert("d.scalar".to_owned(), Tensor::new(&[2.5f32], &Device::Cpu).unwrap());
    tensors.insert("e.empty".to_owned(), Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();

    let got = engine::weights::load(&path, &Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(got.len(), 5);
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!((g.dims(), g.dtype()), (w.dims(), w.dtype()), "{name}");
        let (g, w) = (g.to_dtype(DType::F32).unwrap().flatten_all().unwrap(), w.to_dtype(DType::F32).unwrap());
        assert_eq!(g.to_vec1::<f32>().unwrap(), w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}");
    }
}

#[test]
fn truncated_and_malformed_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let mut tensors = HashMap::new();
    tensors.insert("conv.weight".to_owned(), Tensor::ones((8, 8), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
    let msg = engine::weights::load(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("w.safetensors") && msg.contains("conv.weight"), "{msg}");

    std::fs::write(&path, &bytes[..5]).unwrap();
    let msg = engine::weights::load(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("header"), "{msg}");

    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &huge).unwrap();
    let msg = engine::weights::load(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("header length"), "{msg}");
}

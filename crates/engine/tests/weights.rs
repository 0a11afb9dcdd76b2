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
fn kept_in_f16_f32_and_bf16_weights_are_narrowed_while_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let base = (Tensor::randn(0f32, 1.0, (2, 600, 700), &Device::Cpu).unwrap() * 3.0).unwrap();
    let mut tensors = HashMap::new();
    tensors.insert("f32".to_owned(), base.clone());
    tensors.insert("bf16".to_owned(), base.to_dtype(DType::BF16).unwrap());
    // Past f16's range: saturates instead of becoming infinite.
    tensors.insert(
        "big".to_owned(),
        Tensor::new(&[1e6f32, -1e6, 2.0], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let got = engine::weights::load_as(&path, &Device::Cpu, Some(DType::F16)).unwrap();
    for name in ["f32", "bf16"] {
        assert_eq!(got[name].dtype(), DType::F16, "{name}");
        let want =
            tensors[name].to_dtype(DType::F32).unwrap().to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
        let got = got[name].to_dtype(DType::F32).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    assert_eq!(got["big"].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), [65504.0, -65504.0, 2.0]);
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

#[test]
fn a_mapped_file_gives_its_f16_weights_in_place_and_copies_the_rest() {
    use engine::weights::{MappedFile, Param, Weights};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let base = Tensor::randn(0f32, 1.0, (64, 33), &Device::Cpu).unwrap();
    let mut tensors = HashMap::new();
    tensors.insert("blk.proj.weight".to_owned(), base.to_dtype(DType::F16).unwrap());
    tensors.insert("blk.proj.bias".to_owned(), base.get(0).unwrap().to_dtype(DType::F16).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let file = MappedFile::open(&path).unwrap();
    assert!(file.all_of(DType::F16) && !file.all_of(DType::F32));
    let want = base.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();

    // Kept in f16: the weight is read in place, and widened when asked for in f32.
    let w = Weights::mapped(file.clone(), DType::F16).pp("blk").pp("proj");
    let param = w.param((64, 33), "weight").unwrap();
    assert!(matches!(param, Param::Mapped { .. }));
    assert_eq!(param.dims().unwrap(), [64, 33]);
    let wide = param.to_dtype(DType::F32).unwrap();
    assert_eq!((wide.dims(), wide.dtype()), ([64, 33].as_slice(), DType::F32));
    assert_eq!(values(&wide), values(&want));
    assert_eq!(param.to_dtype(DType::F16).unwrap().dtype(), DType::F16);
    // Released pages come back from the file, unchanged.
    file.release().unwrap();
    assert_eq!(values(&param.to_dtype(DType::F32).unwrap()), values(&want));
    assert_eq!(values(&w.get(33, "bias").unwrap().to_dtype(DType::F32).unwrap()), values(&want.get(0).unwrap()));
    assert!(w.root().contains_tensor("blk.proj.bias") && !w.contains_tensor("missing"));

    // Kept in f32: the f16 weight is widened once, into a tensor of its own.
    let w = Weights::mapped(file.clone(), DType::F32).pp("blk.proj");
    let param = w.param((64, 33), "weight").unwrap();
    assert!(matches!(&param, Param::Tensor(t) if t.dtype() == DType::F32));
    assert_eq!(values(&param.to_dtype(DType::F32).unwrap()), values(&want));

    // A shape that does not match, or a missing tensor, is an error naming the tensor.
    let w = Weights::mapped(file, DType::F16);
    let msg = w.param((33, 64), "blk.proj.weight").unwrap_err().to_string();
    assert!(msg.contains("blk.proj.weight") && msg.contains("[64, 33]"), "{msg}");
    let msg = w.get((64, 33), "blk.proj.weight2").unwrap_err().to_string();
    assert!(msg.contains("blk.proj.weight2"), "{msg}");
}

#[test]
fn a_file_that_cannot_be_mapped_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    let msg = engine::weights::MappedFile::open(&path).unwrap_err().to_string();
    assert!(msg.contains("w.safetensors") && msg.contains("header"), "{msg}");
    let msg = engine::weights::MappedFile::open(&dir.path().join("none.safetensors")).unwrap_err().to_string();
    assert!(msg.contains("none.safetensors"), "{msg}");
}

/// An embedding table's rows read from the map are the rows of the table read whole, in any dtype
/// asked for; a row past the table or a table that is not 2-D is an error naming it.
#[test]
fn rows_of_a_mapped_table_are_the_rows_of_the_whole_table() {
    use engine::weights::{MappedFile, Param};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let table = Tensor::randn(0f32, 1.0, (50, 12), &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
    let mut tensors = HashMap::new();
    tensors.insert("emb.weight".to_owned(), table.clone());
    tensors.insert("flat".to_owned(), Tensor::zeros(7, DType::F16, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let file = MappedFile::open(&path).unwrap();
    let mapped = Param::Mapped { file: file.clone(), name: "emb.weight".into() };
    let copied = Param::Tensor(table.clone());
    let ids = Tensor::new(&[3u32, 49, 0, 3], &Device::Cpu).unwrap();
    let want = table.index_select(&ids, 0).unwrap().to_dtype(DType::F32).unwrap();
    for param in [&mapped, &copied] {
        let got = param.rows(&ids, DType::F32).unwrap();
        assert_eq!(got.dims(), &[4, 12]);
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
    }
    assert_eq!(mapped.rows(&ids, DType::F16).unwrap().dtype(), DType::F16);
    let past = Tensor::new(&[50u32], &Device::Cpu).unwrap();
    let e = mapped.rows(&past, DType::F32).unwrap_err().to_string();
    assert!(e.contains("emb.weight") && e.contains("50"), "{e}");
    let flat = Param::Mapped { file, name: "flat".into() };
    let e = flat.rows(&ids, DType::F32).unwrap_err().to_string();
    assert!(e.contains("flat") && e.contains("2-D"), "{e}");
}

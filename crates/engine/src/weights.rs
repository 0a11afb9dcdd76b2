//! Reading safetensors weight files: each tensor read from the file straight into its own buffer.
//!
//! candle's `safetensors::load` reads the whole file into one buffer and then copies every tensor out
//! of it, so a 3.5 GB UNet costs 7 GB of freshly faulted pages and two full copies (on the development
//! VM a fresh page costs about as much as copying it twice: loading was 29 s of a 46 s generation).
//! Here a tensor's bytes go from the page cache through a small reused chunk into the tensor's own
//! buffer, converted from little-endian on the way, several tensors at a time on the rayon pool. The
//! safetensors header is checked as it is read: every tensor's byte range must lie inside the file and
//! match its dtype and shape.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use serde::Deserialize;

use crate::EngineError;

/// Bytes read at a time into the per-task chunk (1 MiB).
const CHUNK: usize = 1 << 20;
/// The largest header accepted (safetensors' own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Every tensor of the safetensors file at `path`, on `device`, in the file's dtype.
pub fn load(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, EngineError> {
    load_as(path, device, None)
}

/// [`load`], with f32 tensors of the file stored as `store` (f16: half the memory) when given; the
/// conversion happens chunk by chunk as the file is read, so the f32 tensor never exists whole.
pub fn load_as(path: &Path, device: &Device, store: Option<DType>) -> Result<HashMap<String, Tensor>, EngineError> {
    let invalid = |why: String| EngineError::InvalidFile { path: path.to_path_buf(), why };
    let mut file = File::open(path).map_err(|e| invalid(e.to_string()))?;
    let file_len = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| invalid(format!("no safetensors header: {e}")))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER || 8 + header_len > file_len {
        return Err(invalid(format!("header length {header_len} does not fit the file's {file_len} bytes")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| invalid(e.to_string()))?;
    let entries: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| invalid(format!("bad safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let entry: Entry = serde_json::from_value(value).map_err(|e| invalid(format!("tensor {name}: {e}")))?;
        let dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => return Err(invalid(format!("tensor {name}: dtype {other} is not F32, F16 or BF16"))),
        };
        let (start, end) = entry.data_offsets;
        let count: usize = entry.shape.iter().product();
        let bytes = (count * dtype.size_in_bytes()) as u64;
        if start > end || end - start != bytes || data_start + end > file_len {
            return Err(invalid(format!(
                "tensor {name}: bytes {start}..{end} do not hold {:?} {:?} inside the file",
                entry.dtype, entry.shape
            )));
        }
        tensors.push((name, dtype, entry.shape, data_start + start, count));
    }
    // Largest first, so that the pool's threads finish together.
    tensors.sort_by_key(|t| std::cmp::Reverse(t.4));
    tensors
        .into_par_iter()
        .map(|(name, dtype, shape, offset, count)| {
            let read = || -> Result<Tensor, String> {
                let mut file = File::open(path).map_err(|e| e.to_string())?;
                file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
                let tensor = match dtype {
                    DType::F32 if store == Some(DType::F16) => {
                        Tensor::from_vec(read_f32_as_f16(&mut file, count)?, shape, device)
                    }
                    DType::F16 => Tensor::from_vec(read_values(&mut file, count, f16::from_le_bytes)?, shape, device),
                    DType::BF16 => Tensor::from_vec(read_values(&mut file, count, bf16::from_le_bytes)?, shape, device),
                    _ => Tensor::from_vec(read_values(&mut file, count, f32::from_le_bytes)?, shape, device),
                };
                tensor.map_err(|e| e.to_string())
            };
            read().map(|t| (name.clone(), t)).map_err(|why| invalid(format!("tensor {name}: {why}")))
        })
        .collect()
}

/// `count` little-endian f32 values from the file's current position, narrowed to f16 a chunk at a time
/// (with the CPU's conversion instructions where it has them).
fn read_f32_as_f16(file: &mut File, count: usize) -> Result<Vec<f16>, String> {
    use half::slice::HalfFloatSliceExt;
    let mut out = Vec::with_capacity(count);
    let mut wide = Vec::with_capacity(CHUNK / 4);
    let mut narrow = Vec::with_capacity(CHUNK / 4);
    let mut bytes = vec![0u8; CHUNK.min(count * 4)];
    while out.len() < count {
        let take = ((count - out.len()) * 4).min(bytes.len());
        let buf = &mut bytes[..take];
        file.read_exact(buf).map_err(|e| e.to_string())?;
        wide.clear();
        wide.extend(buf.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        narrow.clear();
        narrow.resize(wide.len(), f16::ZERO);
        narrow.convert_from_f32_slice(&wide);
        out.extend_from_slice(&narrow);
    }
    Ok(out)
}

/// `count` little-endian values of `N` bytes each from the file's current position.
fn read_values<T, const N: usize>(file: &mut File, count: usize, decode: fn([u8; N]) -> T) -> Result<Vec<T>, String> {
    let mut out = Vec::with_capacity(count);
    let mut chunk = vec![0u8; CHUNK.min(count * N)];
    while out.len() < count {
        let take = ((count - out.len()) * N).min(chunk.len());
        let buf = &mut chunk[..take];
        file.read_exact(buf).map_err(|e| e.to_string())?;
        out.extend(buf.chunks_exact(N).map(|b| {
            let mut v = [0u8; N];
            v.copy_from_slice(b);
            decode(v)
        }));
    }
    Ok(out)
}

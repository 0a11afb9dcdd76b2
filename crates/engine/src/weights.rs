//! Reading safetensors weight files, two ways:
//!
//! - [`MappedFile`] maps the file, and the layers use the tensors stored in the dtype the model keeps
//!   ([`Weights::param`]: f16 on the CPU) in place, straight from the page cache: loading is the header.
//!   This is the path for the fp16 files `imagegate models pull` installs.
//! - [`load_as`] reads each tensor into its own buffer, converting on the way (an f32 file kept in f16),
//!   through a small reused chunk, several tensors at a time on the rayon pool. candle's
//!   `safetensors::load` instead reads the whole file into one buffer and then copies every tensor out
//!   of it: 7 GB of fresh pages and two copies for a 3.5 GB UNet.
//!
//! Fresh pages are the dearest part of loading on the development VM (a `perf` profile of a load put
//! a third of all samples in the kernel zeroing them), hence both. The header is checked either way:
//! every tensor's byte range must lie inside the file and match its dtype and shape.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use half::{bf16, f16};
use memmap2::{Mmap, UncheckedAdvice};
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

/// One tensor's entry in a safetensors header, checked against the file: `offset` is absolute.
struct Info {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    offset: u64,
    count: usize,
}

/// Reads and checks the header of the safetensors file `file` (of `file_len` bytes): every tensor's
/// byte range must lie inside the file and match its dtype and shape.
fn read_header(path: &Path, file: &mut File, file_len: u64) -> Result<Vec<Info>, EngineError> {
    let invalid = |why: String| EngineError::InvalidFile { path: path.to_path_buf(), why };
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
        tensors.push(Info { name, dtype, shape: entry.shape, offset: data_start + start, count });
    }
    Ok(tensors)
}

/// Checks that `path` is a safetensors file whose header holds together (every tensor's bytes inside
/// the file, matching its dtype and shape), reading only the header.
pub fn check_file(path: &Path) -> Result<(), EngineError> {
    let invalid = |why: String| EngineError::InvalidFile { path: path.to_path_buf(), why };
    let mut file = File::open(path).map_err(|e| invalid(e.to_string()))?;
    let file_len = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
    read_header(path, &mut file, file_len).map(drop)
}

/// Every tensor of the safetensors file at `path`, on `device`, in the file's dtype.
pub fn load(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, EngineError> {
    load_as(path, device, None)
}

/// [`load`], with f32 (and bf16) tensors of the file stored as `store` (f16: half the memory) when given; the
/// conversion happens chunk by chunk as the file is read, so the f32 tensor never exists whole.
pub fn load_as(path: &Path, device: &Device, store: Option<DType>) -> Result<HashMap<String, Tensor>, EngineError> {
    let invalid = |why: String| EngineError::InvalidFile { path: path.to_path_buf(), why };
    let mut file = File::open(path).map_err(|e| invalid(e.to_string()))?;
    let file_len = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
    let mut tensors = read_header(path, &mut file, file_len)?;
    // Largest first, so that the pool's threads finish together.
    tensors.sort_by_key(|t| std::cmp::Reverse(t.count));
    tensors
        .into_par_iter()
        .map(|Info { name, dtype, shape, offset, count }| {
            let read = || -> Result<Tensor, String> {
                let mut file = File::open(path).map_err(|e| e.to_string())?;
                file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
                let tensor = match dtype {
                    DType::F32 if store == Some(DType::F16) => {
                        Tensor::from_vec(read_f32_as_f16(&mut file, count)?, shape, device)
                    }
                    // bf16 kept in f16 (Z-Image's text encoder): the same 16 bits per weight, more mantissa,
                    // less range; weights past f16's range (none in the models served) saturate.
                    DType::BF16 if store == Some(DType::F16) => {
                        let values = read_values(&mut file, count, bf16::from_le_bytes)?;
                        let narrowed: Vec<f16> =
                            values.iter().map(|v| f16::from_f32(v.to_f32().clamp(-65504.0, 65504.0))).collect();
                        Tensor::from_vec(narrowed, shape, device)
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

/// A safetensors file mapped read-only into memory, its header checked: tensors whose dtype a model
/// keeps are used in place ([`Param`]), straight from the page cache, with no copy and no fresh memory
/// (on the development VM fresh pages are the dearest part of loading: reading SD-Turbo's UNet into
/// its own buffers spent most of its time in the kernel zeroing them).
///
/// Invariant: the file is not modified or truncated while it is mapped (model files are written once,
/// by `imagegate models pull` or the user, and only read after that).
pub struct MappedFile {
    path: PathBuf,
    /// Read-locked while a tensor is copied out, write-locked by [`MappedFile::release`].
    map: RwLock<Mmap>,
    tensors: HashMap<String, Info>,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl MappedFile {
    /// Maps the safetensors file at `path` and checks its header.
    pub fn open(path: &Path) -> Result<Arc<MappedFile>, EngineError> {
        let invalid = |why: String| EngineError::InvalidFile { path: path.to_path_buf(), why };
        let mut file = File::open(path).map_err(|e| invalid(e.to_string()))?;
        let file_len = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
        let tensors = read_header(path, &mut file, file_len)?;
        #[allow(unsafe_code)]
        // SAFETY: the map is read-only (`Mmap`, PROT_READ) and private to this process. What mapping a
        // file cannot rule out is another process changing or truncating it while mapped; model files
        // are not written after they are installed (the type's invariant), as with every
        // memory-mapped model loader (safetensors, candle, llama.cpp).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| invalid(format!("cannot map the file: {e}")))?;
        if (map.len() as u64) < file_len {
            return Err(invalid(format!("mapped {} of the file's {file_len} bytes", map.len())));
        }
        let tensors = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        Ok(Arc::new(MappedFile { path: path.to_path_buf(), map: RwLock::new(map), tensors }))
    }

    /// Whether every tensor of the file is stored as `dtype`.
    pub fn all_of(&self, dtype: DType) -> bool {
        self.tensors.values().all(|t| t.dtype == dtype)
    }

    fn info(&self, name: &str) -> candle_core::Result<&Info> {
        self.tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("cannot find tensor {name} in {}", self.path.display())))
    }

    /// Drops the file's pages from this process (`MADV_DONTNEED`): its resident memory falls by the
    /// file's size, and the next use reads them again from the page cache (about 0.1 s per GB on the
    /// development VM) or, if the kernel has reclaimed them meanwhile, from the disk. The pipeline calls
    /// it on the text encoders once the prompts are encoded and on the UNet once the latents are
    /// denoised, so that each model's weights are resident only while it runs.
    pub fn release(&self) -> Result<(), EngineError> {
        let map = self.map.write().map_err(|_| self.poisoned())?;
        #[allow(unsafe_code)]
        // SAFETY: memmap2 makes `DontNeed` unsafe because it discards what was written to private pages
        // and is undefined behaviour while the mapping is borrowed. The map is read-only, so nothing was
        // written: the pages read back from the file are the ones dropped. The write lock means no
        // reader holds a borrow of it: borrows live only inside `tensor`, under the read lock.
        unsafe { map.unchecked_advise(UncheckedAdvice::DontNeed) }
            .map_err(|e| EngineError::InvalidFile { path: self.path.clone(), why: format!("madvise: {e}") })
    }

    fn poisoned(&self) -> EngineError {
        EngineError::InvalidFile { path: self.path.clone(), why: "a thread panicked while reading the file".into() }
    }

    /// A copy of the tensor `name` in `dtype` on `device`.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let info = self.info(name)?;
        let map = self.map.read().map_err(|_| candle_core::Error::Msg(self.poisoned().to_string()))?;
        // The header check proved the range lies inside the file.
        let start = info.offset as usize;
        let bytes = &map[start..start + info.count * info.dtype.size_in_bytes()];
        let shape = info.shape.clone();
        let tensor = match info.dtype {
            DType::F16 if dtype == DType::F32 && device.is_cpu() => {
                return Tensor::from_vec(kernels::widen(&decode(bytes, f16::from_le_bytes)), shape, device);
            }
            DType::F16 => Tensor::from_vec(decode(bytes, f16::from_le_bytes).into_owned(), shape, device)?,
            DType::BF16 => Tensor::from_vec(decode(bytes, bf16::from_le_bytes).into_owned(), shape, device)?,
            _ => Tensor::from_vec(decode(bytes, f32::from_le_bytes).into_owned(), shape, device)?,
        };
        tensor.to_dtype(dtype)
    }

    /// Rows `ids` of the 2-D tensor `name` (an embedding table), `[ids.len(), width]`, in `dtype` on
    /// the CPU: only those rows are read from the map, not the whole table.
    pub fn rows(&self, name: &str, ids: &[u32], dtype: DType) -> candle_core::Result<Tensor> {
        let info = self.info(name)?;
        let [count, width] = info.shape[..] else {
            candle_core::bail!("{name} in {}: expected a 2-D table, got shape {:?}", self.path.display(), info.shape)
        };
        let row_bytes = width * info.dtype.size_in_bytes();
        let map = self.map.read().map_err(|_| candle_core::Error::Msg(self.poisoned().to_string()))?;
        let mut bytes = Vec::with_capacity(ids.len() * row_bytes);
        for &id in ids {
            let id = id as usize;
            if id >= count {
                candle_core::bail!("{name}: row {id} is past the table's {count} rows")
            }
            // The header check proved the whole tensor lies inside the file.
            let start = info.offset as usize + id * row_bytes;
            bytes.extend_from_slice(&map[start..start + row_bytes]);
        }
        drop(map);
        let shape = (ids.len(), width);
        let tensor = match info.dtype {
            DType::F16 => Tensor::from_vec(decode(&bytes, f16::from_le_bytes).into_owned(), shape, &Device::Cpu)?,
            DType::BF16 => Tensor::from_vec(decode(&bytes, bf16::from_le_bytes).into_owned(), shape, &Device::Cpu)?,
            _ => Tensor::from_vec(decode(&bytes, f32::from_le_bytes).into_owned(), shape, &Device::Cpu)?,
        };
        crate::layers::cast(&tensor, dtype)
    }
}

/// `bytes` read as little-endian values of `T`: in place when the CPU is little-endian and the bytes
/// are aligned for `T` (always, for safetensors written by the usual tools), else decoded one by one.
fn decode<T: bytemuck::Pod, const N: usize>(bytes: &[u8], from_le: fn([u8; N]) -> T) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(values) if cfg!(target_endian = "little") => Cow::Borrowed(values),
        _ => Cow::Owned(
            bytes
                .chunks_exact(N)
                .map(|b| {
                    let mut v = [0u8; N];
                    v.copy_from_slice(b);
                    from_le(v)
                })
                .collect(),
        ),
    }
}

/// A layer's weight: a tensor, or a tensor read in place from a [`MappedFile`] each time it is used.
#[derive(Clone, Debug)]
pub enum Param {
    Tensor(Tensor),
    Mapped { file: Arc<MappedFile>, name: String },
}

impl Param {
    /// The weight in `dtype`: free for a tensor already in it; a mapped weight (or one stored in f16 for
    /// f32 compute) is copied, widened where needed, into a new tensor that lives as long as the caller
    /// keeps it: one layer's weight at a time.
    pub fn to_dtype(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Param::Tensor(t) => crate::layers::cast(t, dtype),
            Param::Mapped { file, name } => file.tensor(name, dtype, &Device::Cpu),
        }
    }

    /// Rows `ids` of this 2-D weight (an embedding table) in `dtype`, `[ids.len(), width]`: a mapped
    /// table is read only at those rows.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Param::Tensor(t) => crate::layers::cast(&t.index_select(ids, 0)?, dtype),
            Param::Mapped { file, name } => file.rows(name, &ids.to_vec1::<u32>()?, dtype),
        }
    }

    /// `f` of the weight's values in place, when it is kept in f16 on the CPU (read from the map, or
    /// the tensor's own storage); `None` otherwise.
    pub fn with_f16<R>(&self, f: impl FnOnce(&[f16]) -> R) -> candle_core::Result<Option<R>> {
        match self {
            Param::Mapped { file, name } => {
                let info = file.info(name)?;
                if info.dtype != DType::F16 {
                    return Ok(None);
                }
                let map = file.map.read().map_err(|_| candle_core::Error::Msg(file.poisoned().to_string()))?;
                // The header check proved the range lies inside the file.
                let start = info.offset as usize;
                let values = decode(&map[start..start + info.count * 2], f16::from_le_bytes);
                Ok(Some(f(&values)))
            }
            Param::Tensor(t) if t.device().is_cpu() && t.dtype() == DType::F16 && t.is_contiguous() => {
                let (storage, layout) = t.storage_and_layout();
                match (&*storage, layout.contiguous_offsets()) {
                    (candle_core::Storage::Cpu(candle_core::CpuStorage::F16(data)), Some((a, b))) => {
                        Ok(Some(f(&data[a..b])))
                    }
                    _ => Ok(None),
                }
            }
            Param::Tensor(_) => Ok(None),
        }
    }

    /// The weight's dimensions.
    pub fn dims(&self) -> candle_core::Result<Vec<usize>> {
        match self {
            Param::Tensor(t) => Ok(t.dims().to_vec()),
            Param::Mapped { file, name } => Ok(file.info(name)?.shape.clone()),
        }
    }
}

/// Where the layers read their weights: candle's `VarBuilder` (names, prefixes, shapes, the dtype the
/// model keeps them in), and, on the CPU, the mapped file behind it, so that big weights stored in that
/// dtype are used in place ([`Weights::param`]) instead of copied.
#[derive(Clone)]
pub struct Weights<'a> {
    vb: VarBuilder<'a>,
    /// The mapped files behind `vb` (one, or a sharded model's shards), empty when it holds tensors.
    mapped: Arc<[Arc<MappedFile>]>,
}

impl<'a> From<VarBuilder<'a>> for Weights<'a> {
    fn from(vb: VarBuilder<'a>) -> Self {
        Weights { vb, mapped: Arc::new([]) }
    }
}

impl Weights<'static> {
    /// The tensors of a mapped file, kept in `dtype` on the CPU: [`Weights::get`] copies (and converts),
    /// [`Weights::param`] reads in place the tensors stored in `dtype`.
    pub fn mapped(file: Arc<MappedFile>, dtype: DType) -> Weights<'static> {
        Weights::mapped_shards(vec![file], dtype)
    }

    /// [`Weights::mapped`] over the shards of one model, each tensor read from the shard that holds it.
    pub fn mapped_shards(files: Vec<Arc<MappedFile>>, dtype: DType) -> Weights<'static> {
        let files: Arc<[Arc<MappedFile>]> = files.into();
        let backend: Box<dyn SimpleBackend> = Box::new(MappedBackend(files.clone()));
        Weights { vb: VarBuilder::from_backend(backend, dtype, Device::Cpu), mapped: files }
    }
}

impl<'a> Weights<'a> {
    /// The weights under `prefix` (`a.b` for `pp("b")` under `a`).
    pub fn pp(&self, prefix: impl ToString) -> Weights<'a> {
        Weights { vb: self.vb.pp(prefix), mapped: self.mapped.clone() }
    }

    /// The tensor `name` of this shape, in the model's dtype (a copy): for small tensors (biases, norms).
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> candle_core::Result<Tensor> {
        self.vb.get(shape, name)
    }

    /// The weight `name` of this shape: read in place from the mapped file when it is stored there in the
    /// model's dtype, else loaded like [`Weights::get`].
    pub fn param(&self, shape: impl Into<Shape>, name: &str) -> candle_core::Result<Param> {
        let shape = shape.into();
        let full = match self.vb.prefix() {
            p if p.is_empty() => name.to_owned(),
            p => format!("{p}.{name}"),
        };
        match self.mapped.iter().find(|file| file.tensors.contains_key(&full)) {
            Some(file) if file.tensors.get(&full).is_some_and(|t| t.dtype == self.vb.dtype()) => {
                let found = &file.info(&full)?.shape;
                if found.as_slice() != shape.dims() {
                    candle_core::bail!("shape mismatch for {full}, got {found:?}, expected {shape:?}")
                }
                Ok(Param::Mapped { file: file.clone(), name: full })
            }
            _ => Ok(Param::Tensor(self.vb.get(shape, name)?)),
        }
    }

    /// The weights at the file's root, whatever this prefix.
    pub fn root(&self) -> Weights<'a> {
        Weights { vb: self.vb.root(), mapped: self.mapped.clone() }
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    /// candle's `VarBuilder`, for candle's own modules.
    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }
}

/// candle's `VarBuilder` over [`MappedFile`]s (a model's shards): every `get` is a checked copy.
struct MappedBackend(Arc<[Arc<MappedFile>]>);

impl MappedBackend {
    fn file(&self, name: &str) -> candle_core::Result<&MappedFile> {
        match self.0.iter().find(|f| f.tensors.contains_key(name)) {
            Some(file) => Ok(file),
            None => {
                let paths: Vec<String> = self.0.iter().map(|f| f.path.display().to_string()).collect();
                candle_core::bail!("cannot find tensor {name} in {}", paths.join(", "))
            }
        }
    }
}

impl SimpleBackend for MappedBackend {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let file = self.file(name)?;
        let found = &file.info(name)?.shape;
        if found.as_slice() != s.dims() {
            candle_core::bail!("shape mismatch for {name}, got {found:?}, expected {s:?}")
        }
        file.tensor(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.file(name)?.tensor(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.iter().any(|f| f.tensors.contains_key(name))
    }
}

/// The weight files of one model component directory: the shards its `*.safetensors.index.json` names
/// (`weight_map`), else its one `diffusion_pytorch_model.safetensors` or `model.safetensors` (or their
/// `.fp16` variants when only those exist).
pub fn component_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    for stem in ["diffusion_pytorch_model", "model"] {
        for variant in ["", ".fp16"] {
            let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
            if index.is_file() {
                return shards_of(&index);
            }
            let single = dir.join(format!("{stem}{variant}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
        }
    }
    Err(EngineError::MissingFile(dir.join("diffusion_pytorch_model.safetensors")))
}

/// The shard files an index names, each once, in order, every one present.
fn shards_of(index: &Path) -> Result<Vec<PathBuf>, EngineError> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let invalid = |why: String| EngineError::InvalidFile { path: index.to_path_buf(), why };
    let text = std::fs::read_to_string(index).map_err(|e| invalid(e.to_string()))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&String> = parsed.weight_map.values().collect();
    names.sort();
    names.dedup();
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(invalid(format!("shard name {name:?} is not a file name")));
        }
        let path = dir.join(name);
        if !path.is_file() {
            return Err(EngineError::MissingFile(path));
        }
        files.push(path);
    }
    if files.is_empty() {
        return Err(invalid("weight_map names no file".into()));
    }
    Ok(files)
}

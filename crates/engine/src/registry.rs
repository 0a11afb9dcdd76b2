//! The built-in model registry: which open-weight models `imagegate models pull NAME` knows, which files
//! of their Hugging Face repositories they need, and where they live on disk once downloaded.
//!
//! Pure data and filesystem: no network here (the CLI downloads). Downloads use the layout of the Hugging
//! Face hub cache under `DATA_DIR/models`:
//!
//! ```text
//! models/models--OWNER--NAME/
//!     blobs/ETAG                     the file contents, one per distinct file
//!     snapshots/COMMIT/PATH          symlinks into blobs/, in the repository's own layout
//!     refs/REVISION                  the commit that REVISION resolved to
//! ```
//!
//! so a snapshot directory is a diffusers-layout model directory the engine loads like any other.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// A model `imagegate models pull NAME` can download: a diffusers-layout repository on the Hugging Face
/// hub and the exact files of it the engine needs (fp16 weights where the repository has them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinModel {
    /// The short name users type (`sd-turbo`).
    pub name: &'static str,
    /// The hub repository id (`stabilityai/sd-turbo`).
    pub repo: &'static str,
    /// The branch, tag or commit to download.
    pub revision: &'static str,
    /// One line for `imagegate models list`.
    pub description: &'static str,
    /// Paths inside the repository to download, exactly as the hub names them.
    pub files: &'static [&'static str],
    /// Roughly how many bytes `files` add up to, to warn before a download.
    pub approx_download_bytes: u64,
    /// What the repository holds: a model to serve, or a tiny decoder that goes with models.
    pub kind: ModelKind,
}

/// What a built-in repository is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A diffusers-layout pipeline: a model `--model` and `[models.NAME]` can serve.
    Pipeline,
    /// A tiny decoder (`AutoencoderTiny`: `config.json` and its weights) for the models whose latents it
    /// reads; used by those models when installed, never served on its own.
    TinyDecoder,
}

/// The files of a Stable Diffusion 1.x/2.x diffusers repository with fp16 weights: one CLIP text encoder.
const SD_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
];

/// The files of a Stable Diffusion XL diffusers repository with fp16 weights: two text encoders and
/// their tokenizers.
const SDXL_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
];

/// The files of Tongyi-MAI/Z-Image-Turbo the engine reads (the repository's file list, read through the
/// project's search tool: BENCHMARKS.md): the transformer's and the text encoder's shards with their
/// indexes, the tokenizer's `tokenizer.json` (the BPE) and `tokenizer_config.json` (its chat template).
const Z_IMAGE_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model-00001-of-00003.safetensors",
    "text_encoder/model-00002-of-00003.safetensors",
    "text_encoder/model-00003-of-00003.safetensors",
    "text_encoder/model.safetensors.index.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

/// The files of a tiny decoder repository (diffusers' `AutoencoderTiny`).
const TINY_DECODER_FILES: &[&str] = &["config.json", "diffusion_pytorch_model.safetensors"];

/// fp16 UNet (865M parameters) + OpenCLIP ViT-H text encoder (340M) + VAE: SD 2.x and its derivatives.
const SD2_BYTES: u64 = 1_732_000_000 + 681_000_000 + 167_000_000;
/// fp16 UNet (860M) + CLIP ViT-L text encoder (123M) + VAE: SD 1.x.
const SD1_BYTES: u64 = 1_720_000_000 + 246_000_000 + 167_000_000;
/// fp16 UNet (2.6B) + CLIP ViT-L (123M) + OpenCLIP ViT-bigG (695M) + VAE: SDXL and its derivatives.
const SDXL_BYTES: u64 = 5_135_000_000 + 246_000_000 + 1_389_000_000 + 167_000_000;
/// Z-Image-Turbo: the f32 transformer (6.15B parameters; its index's `total_size` 24,619,634,944), the
/// bf16 Qwen3-4B text encoder (8,044,936,192), the VAE (168 MB) and the tokenizer (11.4 MB).
const Z_IMAGE_BYTES: u64 = 24_619_634_944 + 8_044_936_192 + 168_000_000 + 11_400_000;
/// An f32 tiny autoencoder, encoder and decoder (2.4M parameters).
const TINY_BYTES: u64 = 9_800_000;

static BUILTINS: &[BuiltinModel] = &[
    BuiltinModel {
        name: "sd-turbo",
        repo: "stabilityai/sd-turbo",
        revision: "main",
        description: "SD 2.1 distilled for 1-4 steps, 512x512; the fastest, fine on a CPU",
        files: SD_FILES,
        approx_download_bytes: SD2_BYTES,
        kind: ModelKind::Pipeline,
    },
    BuiltinModel {
        name: "sdxl-turbo",
        repo: "stabilityai/sdxl-turbo",
        revision: "main",
        description: "SDXL distilled for 1-4 steps, 512x512; better images, wants a GPU",
        files: SDXL_FILES,
        approx_download_bytes: SDXL_BYTES,
        kind: ModelKind::Pipeline,
    },
    BuiltinModel {
        name: "sd-1.5",
        repo: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision: "main",
        description: "Stable Diffusion 1.5, 512x512, 20-50 steps with guidance",
        files: SD_FILES,
        approx_download_bytes: SD1_BYTES,
        kind: ModelKind::Pipeline,
    },
    BuiltinModel {
        name: "sd-2.1",
        repo: "stabilityai/stable-diffusion-2-1-base",
        revision: "main",
        description: "Stable Diffusion 2.1 base, 512x512, 20-50 steps with guidance",
        files: SD_FILES,
        approx_download_bytes: SD2_BYTES,
        kind: ModelKind::Pipeline,
    },
    BuiltinModel {
        name: "sd-2-inpainting",
        repo: "stabilityai/stable-diffusion-2-inpainting",
        revision: "main",
        description: "Stable Diffusion 2 inpainting, 512x512: edits with a mask",
        files: SD_FILES,
        approx_download_bytes: SD2_BYTES,
        kind: ModelKind::Pipeline,
    },
    BuiltinModel {
        name: "sdxl",
        repo: "stabilityai/stable-diffusion-xl-base-1.0",
        revision: "main",
        description: "SDXL base 1.0, 1024x1024, 20-50 steps with guidance; wants a GPU",
        files: SDXL_FILES,
        approx_download_bytes: SDXL_BYTES,
        kind: ModelKind::Pipeline,
    },
    BuiltinModel {
        name: "z-image-turbo",
        repo: "Tongyi-MAI/Z-Image-Turbo",
        revision: "main",
        description: "Z-Image-Turbo (6B DiT, Qwen3-4B text encoder), 1024x1024 in 8 steps; gpt-image-1-mini's class, wants a GPU",
        files: Z_IMAGE_FILES,
        approx_download_bytes: Z_IMAGE_BYTES,
        kind: ModelKind::Pipeline,
    },
    TAESD,
    TAESDXL,
];

/// The tiny decoder for SD 1.x/2.x latents.
const TAESD: BuiltinModel = BuiltinModel {
    name: "taesd",
    repo: "madebyollin/taesd",
    revision: "main",
    description: "tiny decoder for SD 1.x/2.x models: quality=low and streamed previews decode ~20x cheaper, softer",
    files: TINY_DECODER_FILES,
    approx_download_bytes: TINY_BYTES,
    kind: ModelKind::TinyDecoder,
};

/// The tiny decoder for SDXL latents.
const TAESDXL: BuiltinModel = BuiltinModel {
    name: "taesdxl",
    repo: "madebyollin/taesdxl",
    revision: "main",
    description: "tiny decoder for SDXL models: quality=low and streamed previews decode ~20x cheaper, softer",
    files: TINY_DECODER_FILES,
    approx_download_bytes: TINY_BYTES,
    kind: ModelKind::TinyDecoder,
};

/// The built-in model called `name`, if any.
pub fn builtin(name: &str) -> Option<&'static BuiltinModel> {
    BUILTINS.iter().find(|m| m.name == name)
}

/// Every built-in model, in the order `imagegate models list` shows them.
pub fn builtins() -> &'static [BuiltinModel] {
    BUILTINS
}

/// The built-in names, comma-separated, for messages.
pub fn builtin_names() -> String {
    BUILTINS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The tiny decoder built for `checkpoint`'s latents: `taesdxl` for SDXL-family checkpoints (a second
/// text encoder), `taesd` for SD 1.x/2.x. SDXL's VAE has a latent space of its own, so the other one
/// decodes the same latents into wrong colours.
pub fn tiny_decoder_for(checkpoint: &crate::Checkpoint) -> &'static BuiltinModel {
    if checkpoint.text_encoder_2.is_some() { &TAESDXL } else { &TAESD }
}

/// Where downloaded models live under the data directory.
pub fn models_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("models")
}

/// The data directory when `--data-dir` is not given: `IMAGEGATE_DATA_DIR`, else
/// `$XDG_DATA_HOME/imagegate`, else `$HOME/.local/share/imagegate`, else `./imagegate-data`.
pub fn default_data_dir() -> PathBuf {
    default_data_dir_from(|key| std::env::var_os(key))
}

/// [`default_data_dir`] with the environment given as a lookup function (empty values count as unset;
/// a relative `XDG_DATA_HOME` is ignored, as the XDG spec says).
pub fn default_data_dir_from(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let var = |key: &str| var(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("IMAGEGATE_DATA_DIR") {
        return dir;
    }
    if let Some(xdg) = var("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
        return xdg.join("imagegate");
    }
    if let Some(home) = var("HOME") {
        return home.join(".local").join("share").join("imagegate");
    }
    PathBuf::from("imagegate-data")
}

/// The hub-cache directory of `model`'s repository: `models_dir/models--OWNER--NAME`.
pub fn repo_dir(models_dir: &Path, model: &BuiltinModel) -> PathBuf {
    models_dir.join(format!("models--{}", model.repo.replace('/', "--")))
}

/// The snapshot directory `model.revision` points to, whether or not it is complete.
pub fn snapshot_dir(models_dir: &Path, model: &BuiltinModel) -> Option<PathBuf> {
    let repo = repo_dir(models_dir, model);
    let commit = std::fs::read_to_string(repo.join("refs").join(model.revision)).ok()?;
    let commit = commit.trim();
    // The ref names a directory: refuse anything that is not one plain path component.
    let plain = !commit.is_empty()
        && commit != "."
        && commit != ".."
        && !commit.contains(|c: char| std::path::is_separator(c) || c == '\0');
    plain.then(|| repo.join("snapshots").join(commit))
}

/// The files of `model` its snapshot lacks (all of them when nothing was downloaded yet).
pub fn missing_files(models_dir: &Path, model: &BuiltinModel) -> Vec<&'static str> {
    match snapshot_dir(models_dir, model) {
        // `exists` follows symlinks: a dangling link into blobs/ counts as missing.
        Some(dir) => model.files.iter().copied().filter(|f| !dir.join(f).exists()).collect(),
        None => model.files.to_vec(),
    }
}

/// The snapshot directory of `model` if it is fully downloaded: `refs/REVISION` exists and every file
/// the model lists is present in the snapshot it names.
pub fn installed_dir(models_dir: &Path, model: &BuiltinModel) -> Option<PathBuf> {
    let dir = snapshot_dir(models_dir, model)?;
    model.files.iter().all(|f| dir.join(f).is_file()).then_some(dir)
}

/// The total size of the files under `dir`, following symlinks (a hub snapshot is symlinks into blobs/).
/// Unreadable entries count as zero.
pub fn installed_size(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: u32) -> u64 {
        // A symlink loop ends here rather than overflowing the stack.
        if depth > 32 {
            return 0;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|entry| {
                let path = entry.path();
                match std::fs::metadata(&path) {
                    Ok(meta) if meta.is_dir() => walk(&path, depth + 1),
                    Ok(meta) => meta.len(),
                    Err(_) => 0,
                }
            })
            .sum()
    }
    walk(dir, 0)
}

/// Where a model given as `--model SPEC` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A diffusers-layout directory on disk.
    Dir(PathBuf),
    /// A built-in model, downloaded on demand into the models directory.
    Builtin(&'static BuiltinModel),
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "{}", dir.display()),
            Self::Builtin(model) => write!(f, "{} ({})", model.name, model.repo),
        }
    }
}

/// What is wrong with a model spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error(
        "unknown model `{name}`: the built-in models are {known} (see `imagegate models list`); \
         or give the path of a diffusers-layout model directory"
    )]
    UnknownModel { name: String, known: String },
    #[error("model directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "`{0}` is a tiny decoder, not a model: once pulled, the models whose latents it reads use it by \
         themselves (quality=low, streamed partial images, the `decoder` field)"
    )]
    NotAModel(String),
}

/// Resolves `--model SPEC`: a spec that looks like a path (contains a path separator, or starts with
/// `.` or `/`) or names an existing directory is a directory; otherwise a built-in name; otherwise an
/// error that lists the built-in names.
pub fn resolve(spec: &str) -> Result<ModelSource, RegistryError> {
    resolve_with(spec, |p| p.is_dir())
}

fn resolve_with(spec: &str, is_dir: impl Fn(&Path) -> bool) -> Result<ModelSource, RegistryError> {
    let path = Path::new(spec);
    let looks_like_path = spec.starts_with('.') || spec.starts_with('/') || spec.contains(std::path::is_separator);
    if !spec.is_empty() && is_dir(path) {
        return Ok(ModelSource::Dir(path.to_path_buf()));
    }
    if looks_like_path {
        return Err(RegistryError::NotADirectory(path.to_path_buf()));
    }
    match builtin(spec) {
        Some(model) if model.kind == ModelKind::TinyDecoder => Err(RegistryError::NotAModel(spec.to_string())),
        Some(model) => Ok(ModelSource::Builtin(model)),
        None => Err(RegistryError::UnknownModel { name: spec.to_string(), known: builtin_names() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |key| map.get(key).cloned()
    }

    /// Lays out `model` the way hf-hub's cache does: blobs, symlinked snapshot files, a ref.
    fn install(models_dir: &Path, model: &BuiltinModel, commit: &str, skip: &[&str]) -> PathBuf {
        let repo = repo_dir(models_dir, model);
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join(model.revision), commit).unwrap();
        for (i, file) in model.files.iter().enumerate() {
            if skip.contains(file) {
                continue;
            }
            let blob = repo.join("blobs").join(format!("blob{i}"));
            std::fs::write(&blob, vec![b'x'; i + 1]).unwrap();
            let link = snapshot.join(file);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            #[cfg(unix)]
            std::os::unix::fs::symlink(&blob, &link).unwrap();
            #[cfg(not(unix))]
            std::fs::copy(&blob, &link).unwrap();
        }
        snapshot
    }

    #[test]
    fn the_table_has_the_promised_models_with_complete_file_lists() {
        for (name, repo) in [
            ("sd-turbo", "stabilityai/sd-turbo"),
            ("sdxl-turbo", "stabilityai/sdxl-turbo"),
            ("sd-1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
            ("sd-2.1", "stabilityai/stable-diffusion-2-1-base"),
            ("sd-2-inpainting", "stabilityai/stable-diffusion-2-inpainting"),
            ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
        ] {
            let model = builtin(name).unwrap();
            assert_eq!(model.repo, repo);
            assert_eq!(model.revision, "main");
            assert!(model.approx_download_bytes > 1_000_000_000, "{name}");
            for file in [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "tokenizer/tokenizer_config.json",
                "tokenizer/special_tokens_map.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.fp16.safetensors",
                "text_encoder/config.json",
                "text_encoder/model.fp16.safetensors",
            ] {
                assert!(model.files.contains(&file), "{name} lacks {file}");
            }
            let xl = name.starts_with("sdxl");
            assert_eq!(model.files.contains(&"text_encoder_2/model.fp16.safetensors"), xl, "{name}");
            assert_eq!(model.files.contains(&"tokenizer_2/vocab.json"), xl, "{name}");
            let mut unique = model.files.to_vec();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), model.files.len(), "{name} lists a file twice");
        }
        let names: Vec<_> = builtins().iter().map(|m| m.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert!(builtin("sd-3").is_none());
        assert!(builtin_names().starts_with("sd-turbo, sdxl-turbo"));
    }

    #[test]
    fn z_image_turbo_lists_every_file_the_engine_reads() {
        let model = builtin("z-image-turbo").unwrap();
        assert_eq!((model.repo, model.revision, model.kind), ("Tongyi-MAI/Z-Image-Turbo", "main", ModelKind::Pipeline));
        // The sizes the hub's indexes give: a 24.6 GB f32 transformer, an 8 GB bf16 text encoder.
        assert!((32_000_000_000..34_000_000_000).contains(&model.approx_download_bytes));
        for component in ["transformer/diffusion_pytorch_model", "text_encoder/model"] {
            assert!(model.files.contains(&format!("{component}.safetensors.index.json").as_str()), "{component}");
            for shard in 1..=3 {
                let name = format!("{component}-0000{shard}-of-00003.safetensors");
                assert!(model.files.contains(&name.as_str()), "{name}");
            }
        }
        for file in [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "transformer/config.json",
            "text_encoder/config.json",
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ] {
            assert!(model.files.contains(&file), "lacks {file}");
        }
        let mut unique = model.files.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), model.files.len());
    }

    #[test]
    fn the_tiny_decoders_are_pullable_but_not_models() {
        for (name, repo) in [("taesd", "madebyollin/taesd"), ("taesdxl", "madebyollin/taesdxl")] {
            let model = builtin(name).unwrap();
            assert_eq!((model.repo, model.revision, model.kind), (repo, "main", ModelKind::TinyDecoder));
            assert_eq!(model.files, &["config.json", "diffusion_pytorch_model.safetensors"]);
            assert!(model.approx_download_bytes < 100_000_000, "{name}");
            assert_eq!(resolve_with(name, |_| false), Err(RegistryError::NotAModel(name.into())));
        }
        assert!(builtins().iter().filter(|m| m.kind == ModelKind::Pipeline).all(|m| !m.name.starts_with("taesd")));
        assert!(builtin_names().ends_with("taesd, taesdxl"));
    }

    #[test]
    fn each_model_family_gets_the_tiny_decoder_of_its_latents() {
        use crate::testing::{TinySpec, write_checkpoint};
        let sd = tempfile::tempdir().unwrap();
        write_checkpoint(sd.path(), &TinySpec::default()).unwrap();
        let xl = tempfile::tempdir().unwrap();
        write_checkpoint(xl.path(), &TinySpec { sdxl: true, ..TinySpec::default() }).unwrap();
        let sd = crate::Checkpoint::open(sd.path()).unwrap();
        let xl = crate::Checkpoint::open(xl.path()).unwrap();
        assert_eq!(tiny_decoder_for(&sd).name, "taesd");
        assert_eq!(tiny_decoder_for(&xl).name, "taesdxl");
    }

    #[test]
    fn default_data_dir_prefers_the_explicit_variable_then_xdg_then_home() {
        let all = [("IMAGEGATE_DATA_DIR", "/srv/ig"), ("XDG_DATA_HOME", "/xdg"), ("HOME", "/home/u")];
        assert_eq!(default_data_dir_from(env(&all)), PathBuf::from("/srv/ig"));
        assert_eq!(default_data_dir_from(env(&all[1..])), PathBuf::from("/xdg/imagegate"));
        assert_eq!(default_data_dir_from(env(&all[2..])), PathBuf::from("/home/u/.local/share/imagegate"));
        assert_eq!(default_data_dir_from(env(&[])), PathBuf::from("imagegate-data"));
        // Empty counts as unset; a relative XDG_DATA_HOME is ignored.
        let odd = [("IMAGEGATE_DATA_DIR", ""), ("XDG_DATA_HOME", "rel"), ("HOME", "/home/u")];
        assert_eq!(default_data_dir_from(env(&odd)), PathBuf::from("/home/u/.local/share/imagegate"));
        assert_eq!(models_dir(Path::new("/srv/ig")), PathBuf::from("/srv/ig/models"));
    }

    #[test]
    fn repo_dir_uses_the_hub_cache_folder_name() {
        let model = builtin("sd-1.5").unwrap();
        assert_eq!(
            repo_dir(Path::new("/m"), model),
            PathBuf::from("/m/models--stable-diffusion-v1-5--stable-diffusion-v1-5")
        );
    }

    #[test]
    fn installed_dir_needs_the_ref_and_every_file() {
        let tmp = tempfile::tempdir().unwrap();
        let models = tmp.path();
        let model = builtin("sd-turbo").unwrap();
        assert_eq!(installed_dir(models, model), None);
        assert_eq!(missing_files(models, model), model.files.to_vec());

        // A snapshot without its ref is not installed.
        let snapshot = install(models, model, "abc123", &[]);
        std::fs::remove_file(repo_dir(models, model).join("refs/main")).unwrap();
        assert_eq!(installed_dir(models, model), None);

        // With the ref it is, and the size follows the symlinks into blobs/.
        std::fs::write(repo_dir(models, model).join("refs/main"), "abc123\n").unwrap();
        assert_eq!(installed_dir(models, model), Some(snapshot.clone()));
        assert!(missing_files(models, model).is_empty());
        let expected: u64 = (1..=model.files.len() as u64).sum();
        assert_eq!(installed_size(&snapshot), expected);

        // One file missing (or a dangling link) makes it incomplete.
        let unet = "unet/diffusion_pytorch_model.fp16.safetensors";
        std::fs::remove_file(snapshot.join(unet)).unwrap();
        assert_eq!(installed_dir(models, model), None);
        assert_eq!(missing_files(models, model), vec![unet]);

        // A ref pointing elsewhere (the repo moved on) is not installed either.
        let other = install(models, model, "def456", &["vae/config.json"]);
        assert_eq!(installed_dir(models, model), None);
        assert_eq!(missing_files(models, model), vec!["vae/config.json"]);
        assert!(other.ends_with("snapshots/def456"));
    }

    #[test]
    fn a_ref_that_escapes_the_snapshots_directory_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let model = builtin("sd-turbo").unwrap();
        install(tmp.path(), model, "abc", &[]);
        for bad in ["../..", "..", "", "a/b"] {
            std::fs::write(repo_dir(tmp.path(), model).join("refs/main"), bad).unwrap();
            assert_eq!(snapshot_dir(tmp.path(), model), None, "{bad:?}");
            assert_eq!(installed_dir(tmp.path(), model), None, "{bad:?}");
        }
    }

    #[test]
    fn installed_size_sums_nested_files_and_tolerates_missing_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        std::fs::write(tmp.path().join("a/one"), [0u8; 10]).unwrap();
        std::fs::write(tmp.path().join("a/b/two"), [0u8; 32]).unwrap();
        assert_eq!(installed_size(tmp.path()), 42);
        assert_eq!(installed_size(&tmp.path().join("nope")), 0);
    }

    #[test]
    fn resolve_tells_directories_from_builtin_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_str().unwrap();
        assert_eq!(resolve(dir).unwrap(), ModelSource::Dir(PathBuf::from(dir)));
        assert_eq!(resolve("sd-turbo").unwrap(), ModelSource::Builtin(builtin("sd-turbo").unwrap()));
        assert_eq!(resolve("sd-1.5").unwrap(), ModelSource::Builtin(builtin("sd-1.5").unwrap()));

        // Path-like specs are directories, and must exist.
        let missing = format!("{dir}/nope");
        assert_eq!(resolve(&missing), Err(RegistryError::NotADirectory(PathBuf::from(&missing))));
        assert!(matches!(resolve("./sd-turbo"), Err(RegistryError::NotADirectory(_))));
        assert!(matches!(resolve("models/sd-turbo"), Err(RegistryError::NotADirectory(_))));

        // An existing directory wins over a built-in name of the same spelling.
        let src = resolve_with("sd-turbo", |p| p == Path::new("sd-turbo")).unwrap();
        assert_eq!(src, ModelSource::Dir(PathBuf::from("sd-turbo")));
        assert_eq!(src.to_string(), "sd-turbo");
        assert_eq!(resolve("sdxl").unwrap().to_string(), "sdxl (stabilityai/stable-diffusion-xl-base-1.0)");
    }

    #[test]
    fn unknown_names_list_the_builtins() {
        let err = resolve_with("sd-9", |_| false).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("unknown model `sd-9`"), "{message}");
        for model in builtins() {
            assert!(message.contains(model.name), "{message}");
        }
        assert!(matches!(resolve_with("", |_| false), Err(RegistryError::UnknownModel { .. })));
    }
}

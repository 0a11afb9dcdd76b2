//! `imagegate models list|pull`: the built-in open-weight models, and downloading them from the Hugging Face
//! hub (or the mirror `HF_ENDPOINT` names) into `DATA_DIR/models`, in the hub's own cache layout.
//!
//! What to download is `engine::registry`'s business; this module only talks HTTP, through hf-hub's
//! synchronous (ureq + rustls) client. It blocks: call it from a plain thread, never an async worker.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use engine::registry::{self, BuiltinModel};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

/// Where downloads come from when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

#[derive(Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List the built-in models, their download sizes, and which are downloaded.
    List(DataDirArg),
    /// Download a built-in model from the Hugging Face hub (HF_ENDPOINT for a mirror, HF_TOKEN for gated
    /// repositories). Prints the model directory on its last stdout line.
    Pull(PullArgs),
}

#[derive(Args)]
struct DataDirArg {
    /// Data directory (models go under DIR/models). Default: $XDG_DATA_HOME/imagegate, else
    /// ~/.local/share/imagegate.
    #[arg(long, env = "IMAGEGATE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl DataDirArg {
    fn models_dir(&self) -> PathBuf {
        let data_dir = self.data_dir.clone().unwrap_or_else(registry::default_data_dir);
        let models = registry::models_dir(&data_dir);
        std::path::absolute(&models).unwrap_or(models)
    }
}

#[derive(Args)]
struct PullArgs {
    /// A built-in model name (see `imagegate models list`).
    name: String,
    #[command(flatten)]
    dir: DataDirArg,
}

/// Why a download failed, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("cannot create the models directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot set up the download client: {0}")]
    Client(String),
    #[error(
        "{endpoint} refused {file} of {repo} (HTTP {status}): the repository is gated or private. Accept its \
         license at {endpoint}/{repo} with your Hugging Face account, then set HF_TOKEN to an access token of \
         that account{token_note}"
    )]
    Unauthorized { endpoint: String, repo: String, file: String, status: u16, token_note: &'static str },
    #[error(
        "{url} was not found (HTTP 404): the repository {repo} no longer has {file}, or HF_ENDPOINT \
         ({endpoint}) is not a Hugging Face hub or mirror"
    )]
    NotFound { url: String, endpoint: String, repo: String, file: String },
    #[error(
        "cannot reach {endpoint} to download {file} of {repo}: {why}. Check the network or proxy settings, \
         or set HF_ENDPOINT to a reachable mirror"
    )]
    Unreachable { endpoint: String, repo: String, file: String, why: String },
    #[error("downloading {file} of {repo} from {endpoint} failed: {why}")]
    Download { endpoint: String, repo: String, file: String, why: String },
    #[error(
        "{model} finished downloading but {missing} is missing from {dir}: the repository probably changed \
         during the download; run `imagegate models pull {model}` again"
    )]
    Incomplete { model: String, missing: String, dir: PathBuf },
}

/// `HF_ENDPOINT` when set and not empty (a hub mirror), the variable the Hugging Face tools read.
pub fn endpoint_from_env() -> Option<String> {
    std::env::var("HF_ENDPOINT").ok().filter(|e| !e.trim().is_empty())
}

/// The hub access token: `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the file
/// `huggingface-cli login` writes (`$HF_TOKEN_PATH`, `$HF_HOME/token`, `~/.cache/huggingface/token`).
fn hf_token() -> Option<String> {
    let var = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
    let non_empty = |s: String| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    if let Some(token) = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"].iter().find_map(|k| var(k)) {
        return non_empty(token.to_string_lossy().into_owned());
    }
    let file = match (var("HF_TOKEN_PATH"), var("HF_HOME"), var("HOME")) {
        (Some(path), _, _) => PathBuf::from(path),
        (None, Some(home), _) => PathBuf::from(home).join("token"),
        (None, None, Some(home)) => PathBuf::from(home).join(".cache").join("huggingface").join("token"),
        (None, None, None) => return None,
    };
    std::fs::read_to_string(file).ok().and_then(non_empty)
}

/// Sizes the way download pages show them: 2.6 GB, 167.3 MB, 42 B.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Downloads every file of `model` that is not already in `models_dir` (hub cache layout) from `endpoint`
/// (default [`DEFAULT_ENDPOINT`]), sending `HF_TOKEN` when set, with a progress bar per file on stderr when
/// `progress`. Interrupted downloads resume. Returns the snapshot directory, a diffusers-layout model dir.
pub fn pull(
    model: &BuiltinModel,
    models_dir: &Path,
    endpoint: Option<String>,
    progress: bool,
) -> Result<PathBuf, PullError> {
    let models_dir = std::path::absolute(models_dir).unwrap_or_else(|_| models_dir.to_path_buf());
    std::fs::create_dir_all(&models_dir).map_err(|source| PullError::CreateDir { path: models_dir.clone(), source })?;
    let endpoint = endpoint
        .map(|e| e.trim().trim_end_matches('/').to_string())
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let token = hf_token();
    let has_token = token.is_some();
    let api = ApiBuilder::from_cache(Cache::new(models_dir.clone()))
        .with_endpoint(endpoint.clone())
        .with_token(token)
        .with_progress(progress)
        .with_retries(3)
        .with_user_agent("imagegate", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| PullError::Client(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(model.repo.to_string(), RepoType::Model, model.revision.to_string()));

    let missing = registry::missing_files(&models_dir, model);
    let total = missing.len();
    for (i, file) in missing.into_iter().enumerate() {
        if !progress {
            eprintln!("[{}/{total}] {file}", i + 1);
        }
        repo.get(file).map_err(|e| {
            let url = repo.url(file);
            describe(e, &Context { endpoint: &endpoint, repo: model.repo, file, url: &url, has_token })
        })?;
    }
    registry::installed_dir(&models_dir, model).ok_or_else(|| PullError::Incomplete {
        model: model.name.to_string(),
        missing: registry::missing_files(&models_dir, model).join(", "),
        dir: registry::snapshot_dir(&models_dir, model).unwrap_or_else(|| registry::repo_dir(&models_dir, model)),
    })
}

struct Context<'a> {
    endpoint: &'a str,
    repo: &'a str,
    file: &'a str,
    url: &'a str,
    has_token: bool,
}

fn describe(error: ApiError, cx: &Context<'_>) -> PullError {
    let (endpoint, repo, file) = (cx.endpoint.to_string(), cx.repo.to_string(), cx.file.to_string());
    match error {
        ApiError::RequestError(e) => match *e {
            ureq::Error::Status(status @ (401 | 403), _) => PullError::Unauthorized {
                endpoint,
                repo,
                file,
                status,
                token_note: if cx.has_token {
                    " (a token was sent: check that it is valid and that its account accepted the license)"
                } else {
                    " (none is set now)"
                },
            },
            ureq::Error::Status(404, _) => PullError::NotFound { url: cx.url.to_string(), endpoint, repo, file },
            ureq::Error::Status(status, _) => {
                PullError::Download { endpoint, repo, file, why: format!("the server answered HTTP {status}") }
            }
            ureq::Error::Transport(t) => PullError::Unreachable { endpoint, repo, file, why: t.to_string() },
        },
        ApiError::TooManyRetries(inner) => match describe(*inner, cx) {
            PullError::Download { endpoint, repo, file, why } => {
                PullError::Download { endpoint, repo, file, why: format!("{why} (gave up after retrying)") }
            }
            other => other,
        },
        ApiError::MissingHeader(header) | ApiError::InvalidHeader(header) => PullError::Download {
            endpoint,
            repo,
            file,
            why: format!("the answer lacks a valid `{header}` header: is HF_ENDPOINT a Hugging Face hub or mirror?"),
        },
        other => PullError::Download { endpoint, repo, file, why: other.to_string() },
    }
}

/// The snapshot directory of `model`, downloading what is missing first (after saying on stderr what and
/// roughly how large). `generate` calls this for a built-in model; `models pull` too.
pub fn ensure_installed(
    model: &BuiltinModel,
    models_dir: &Path,
    endpoint: Option<String>,
    progress: bool,
) -> Result<PathBuf, PullError> {
    if let Some(dir) = registry::installed_dir(models_dir, model) {
        return Ok(dir);
    }
    let missing = registry::missing_files(models_dir, model).len();
    let from = endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT).trim_end_matches('/');
    let size = human_bytes(model.approx_download_bytes);
    let what = if missing == model.files.len() {
        format!("{missing} files, about {size}")
    } else {
        format!("the {missing} missing of its {} files (about {size} in all)", model.files.len())
    };
    eprintln!(
        "downloading model {} ({}@{}): {what}, from {from} into {}",
        model.name,
        model.repo,
        model.revision,
        registry::repo_dir(models_dir, model).display()
    );
    let dir = pull(model, models_dir, endpoint, progress)?;
    eprintln!("{} is ready: {} on disk", model.name, human_bytes(registry::installed_size(&dir)));
    Ok(dir)
}

/// Runs `imagegate models ...`.
pub fn run(args: ModelsArgs) -> Result<(), String> {
    match args.command {
        ModelsCommand::List(dir) => list(&dir.models_dir()).map_err(|e| format!("cannot write the list: {e}")),
        ModelsCommand::Pull(args) => pull_command(&args),
    }
}

fn list(models_dir: &Path) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    for model in registry::builtins() {
        writeln!(out, "{}  ({}, download about {})", model.name, model.repo, human_bytes(model.approx_download_bytes))?;
        writeln!(out, "    {}", model.description)?;
        match registry::installed_dir(models_dir, model) {
            Some(dir) => writeln!(
                out,
                "    installed: {} on disk at {}",
                human_bytes(registry::installed_size(&dir)),
                dir.display()
            )?,
            None => {
                let missing = registry::missing_files(models_dir, model).len();
                if missing == model.files.len() {
                    writeln!(out, "    not downloaded")?;
                } else {
                    writeln!(out, "    partly downloaded: {missing} of {} files missing", model.files.len())?;
                }
            }
        }
    }
    writeln!(
        out,
        "Download one with `imagegate models pull NAME` (into {}; --data-dir or IMAGEGATE_DATA_DIR to change).",
        models_dir.display()
    )
}

fn pull_command(args: &PullArgs) -> Result<(), String> {
    let model = registry::builtin(&args.name).ok_or_else(|| {
        format!(
            "unknown model `{}`: the built-in models are {} (see `imagegate models list`)",
            args.name,
            registry::builtin_names()
        )
    })?;
    let models_dir = args.dir.models_dir();
    let dir = match registry::installed_dir(&models_dir, model) {
        Some(dir) => {
            eprintln!("{} is already downloaded ({} on disk)", model.name, human_bytes(registry::installed_size(&dir)));
            dir
        }
        None => ensure_installed(model, &models_dir, endpoint_from_env(), std::io::stderr().is_terminal())
            .map_err(|e| e.to_string())?,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", dir.display()).map_err(|e| format!("cannot write to stdout: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_reads_like_a_download_page() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1000), "1.0 kB");
        assert_eq!(human_bytes(167_335_342), "167.3 MB");
        assert_eq!(human_bytes(2_580_000_000), "2.6 GB");
        assert_eq!(human_bytes(999_990_000), "1.0 GB");
        assert_eq!(human_bytes(6_937_000_000_000_000), "6937.0 TB");
    }
}

//! The `imagegate` command: `serve` the OpenAI Images API, or `generate`/`edit` images from the command
//! line, either in-process (a server on a private loopback port inside this process) or against a running
//! server with `--server URL`. Thin glue: the work is in the `server`, `providers` and `api` crates.

/// jemalloc instead of the system allocator, built with `thp:always` (`.cargo/config.toml`): the
/// engine's weights and activations land on transparent huge pages, and freed activations are reused
/// instead of returned to the kernel. On the development VM a fresh 4 KiB page costs more than
/// copying it twice: this halved model loading and cut a third off a one-step generation.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod batch;
mod client;
mod estimate;
mod keys;
mod models;
mod usage;
mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use server::config::{Config, ConfigFile, Env, LocalModelFile, ProcessEnv};
use server::{AppState, KeySet, Limits};

#[derive(Parser)]
#[command(name = "imagegate", version, about = "Self-hosted image generation that speaks OpenAI's Images API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads for the local engine's computations (default: one per CPU core).
    #[arg(long, global = true, env = "IMAGEGATE_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI Images API (/v1/images/generations, edits and variations, /v1/models) with
    /// imagegate's own endpoints (/v1/images/estimates, /v1/admin/keys, /v1/organization/usage/images,
    /// /v1/organization/costs, /health).
    Serve(ServeArgs),
    /// Generate images from a prompt and write them to files.
    Generate(client::GenerateArgs),
    /// Edit images (with an optional mask) from a prompt and write the results to files.
    Edit(client::EditArgs),
    /// Estimate what a job would cost, itemized, before spending anything.
    Estimate(estimate::EstimateArgs),
    /// List the built-in local models, or download one (`models pull NAME`) from the Hugging Face hub.
    Models(models::ModelsArgs),
    /// Create, list, update and revoke API keys (and their projects and budgets).
    Keys(keys::KeysArgs),
    /// What was spent: requests, images, tokens and cost from the usage ledger, by model, key, project
    /// or day.
    Usage(usage::UsageArgs),
    /// OpenAI's Batch API against a running server: submit a JSONL file (--wait), status, list,
    /// results (images named by custom_id), cancel.
    Batch(batch::BatchArgs),
    /// Show the C2PA manifest (Content Credentials) an image carries and validate it: signature, hash
    /// binding, trust.
    Verify(verify::VerifyArgs),
}

/// Where the providers, keys and limits come from. Shared by `serve` and the in-process client.
#[derive(Args, Clone)]
pub struct ConfigArgs {
    /// TOML config: providers, model aliases, prices, local models, and client API keys (stored as their
    /// SHA-256, never in plain text). Without it, OPENAI_API_KEY (and OPENAI_BASE_URL) configure an
    /// upstream provider named `openai`.
    #[arg(long, env = "IMAGEGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "IMAGEGATE_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Largest input image in pixels, checked before decoding (guards against decompression bombs).
    #[arg(long, env = "IMAGEGATE_MAX_IMAGE_PIXELS", default_value_t = Limits::default().max_image_pixels)]
    max_image_pixels: u64,
    /// Decoded input images in memory at once, in bytes, over all requests (edits beyond wait, then get
    /// 503); at least 8 bytes per --max-image-pixels.
    #[arg(long, env = "IMAGEGATE_MAX_DECODE_BYTES", default_value_t = Limits::default().max_decode_bytes)]
    max_decode_bytes: u64,
    /// Request bodies in memory at once, in bytes, over all requests (requests beyond wait, then get
    /// 503); at least --max-body-bytes.
    #[arg(long, env = "IMAGEGATE_MAX_BODY_BYTES_IN_FLIGHT", default_value_t = Limits::default().max_body_bytes_in_flight)]
    max_body_bytes_in_flight: u64,
    /// Milliseconds a request waits for room under --max-decode-bytes or --max-body-bytes-in-flight
    /// before a 503 to retry.
    #[arg(long, env = "IMAGEGATE_DECODE_WAIT_MS", default_value_t = Limits::default().decode_wait.as_millis() as u64)]
    decode_wait_ms: u64,
    /// Where pulled models (and stored data) live [default: $XDG_DATA_HOME/imagegate or
    /// ~/.local/share/imagegate].
    #[arg(long, env = "IMAGEGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The database of keys, budgets and the usage ledger: `sqlite://PATH` or `postgres://...`
    /// (instances sharing one PostgreSQL database share budgets, limits and keys)
    /// [default: imagegate.db in the data dir].
    #[arg(long, env = "IMAGEGATE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

/// The process environment, with `--data-dir` in place of `IMAGEGATE_DATA_DIR`.
struct CliEnv<'a>(Option<&'a std::path::Path>);

impl Env for CliEnv<'_> {
    fn var(&self, name: &str) -> Option<String> {
        match (name, self.0) {
            ("IMAGEGATE_DATA_DIR", Some(dir)) => Some(dir.to_string_lossy().into_owned()),
            _ => ProcessEnv.var(name),
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on. Without API keys only a loopback address is allowed.
    #[arg(long, env = "IMAGEGATE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Accepted client API keys, comma-separated. Without any, the server is open (loopback only).
    #[arg(long, env = "IMAGEGATE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<String>,
    /// Seconds a request's budget hold outlives its instance's last heartbeat (renewed every quarter
    /// of it while the request runs) before another instance presumes the instance dead, releases the
    /// hold and records the request as `instance_died`; also a local job's worst-case compute time.
    /// Must exceed every provider's `timeout_secs` by 10 s.
    #[arg(long, env = "IMAGEGATE_RESERVATION_TTL_SECS", default_value_t = 3600)]
    reservation_ttl_secs: u64,
    /// The URL clients reach this server at (`https://images.example.com` behind a proxy): the base of
    /// the image URLs of `response_format=url` [default: http:// and the request's Host].
    #[arg(long, env = "IMAGEGATE_PUBLIC_URL")]
    public_url: Option<String>,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive connection
    /// stays open.
    #[arg(long, env = "IMAGEGATE_HEADER_TIMEOUT_SECS", default_value_t = server::DEFAULT_HEADER_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    header_timeout_secs: u64,
    /// Seconds a client has to send a request's whole body after its headers (408 beyond).
    #[arg(long, env = "IMAGEGATE_BODY_TIMEOUT_SECS", default_value_t = server::DEFAULT_BODY_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    body_timeout_secs: u64,
    /// Seconds a write may wait for the client to read (a response, or a stream's next event) before
    /// the connection is closed: a client that stops reading cannot hold its connection.
    #[arg(long, env = "IMAGEGATE_WRITE_TIMEOUT_SECS", default_value_t = server::DEFAULT_WRITE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    write_timeout_secs: u64,
    /// Most connections served at once; more wait until one closes.
    #[arg(long, env = "IMAGEGATE_MAX_CONNECTIONS", default_value_t = server::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_connections: usize,
    #[command(flatten)]
    config: ConfigArgs,
}

impl ConfigArgs {
    /// The data dir: `--data-dir`, `IMAGEGATE_DATA_DIR`, or the XDG default.
    pub fn data_dir(&self) -> PathBuf {
        let env = CliEnv(self.data_dir.as_deref());
        engine::registry::default_data_dir_from(|k| env.var(k).map(std::ffi::OsString::from))
    }

    /// Connects to the ledger database (running its migrations), creating the data dir for the default
    /// SQLite file.
    pub async fn open_ledger(&self, options: ledger::LedgerOptions) -> Result<ledger::Ledger, String> {
        let url = match &self.database_url {
            Some(url) => url.clone(),
            None => {
                let dir = self.data_dir();
                std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                ledger::sqlite_url(&dir).map_err(|e| e.to_string())?
            }
        };
        ledger::Ledger::connect_with(&url, options).await.map_err(|e| format!("the database: {e}"))
    }

    /// The validated application state, or a message for the operator.
    pub fn state(&self, plain_keys: &[String]) -> Result<AppState, String> {
        self.state_with(plain_keys, None, None).map(|(state, _)| state)
    }

    /// [`ConfigArgs::state`], also serving `model` locally when it names a model directory or a built-in
    /// model the config does not serve (pulling a built-in one that is missing, after saying what and
    /// how large), with `tiny_decoder` as that local model's tiny decoder when given. Returns the name
    /// requests must use for it.
    pub fn state_with(
        &self,
        plain_keys: &[String],
        model: Option<&str>,
        tiny_decoder: Option<&std::path::Path>,
    ) -> Result<(AppState, Option<String>), String> {
        let env = CliEnv(self.data_dir.as_deref());
        let mut file = match &self.config {
            Some(path) => ConfigFile::load(path).map_err(|e| e.to_string())?,
            None => ConfigFile::default(),
        };
        let renamed = match model {
            Some(spec) => add_local_model(&mut file, spec, &env)?,
            None => None,
        };
        if let Some(tiny) = tiny_decoder {
            let local = renamed.as_deref().or(model).and_then(|name| file.models.get_mut(name)).ok_or_else(|| {
                "--decoder DIR gives a local model its tiny decoder: --model must name a local model (a directory, \
                 a built-in model, or a [models.NAME] of the config)"
                    .to_owned()
            })?;
            local.tiny_decoder = Some(tiny.to_path_buf());
        }
        let mut config = Config::from_file(file, &env).map_err(|e| match &self.config {
            Some(path) => format!("{}: {e}", path.display()),
            None => e.to_string(),
        })?;
        config.limits = Limits {
            max_body_bytes: self.max_body_bytes,
            max_image_pixels: self.max_image_pixels,
            max_decode_bytes: self.max_decode_bytes,
            max_body_bytes_in_flight: self.max_body_bytes_in_flight,
            decode_wait: std::time::Duration::from_millis(self.decode_wait_ms),
        };
        let mut state = AppState::from_config(&config).map_err(|e| e.to_string())?;
        for warning in config.lifecycle_warnings(env.today()) {
            tracing::warn!("{warning}");
        }
        let mut keys = KeySet::new(config.api_key_hashes.clone());
        keys.add_plain(plain_keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()));
        state.keys = std::sync::Arc::new(keys);
        Ok((state, renamed))
    }
}

/// Adds `spec` to the config's local models when it is a directory, or a built-in model name that the
/// config does not already serve; returns the model name to request when it differs from `spec`.
fn add_local_model(file: &mut ConfigFile, spec: &str, env: &dyn Env) -> Result<Option<String>, String> {
    use engine::registry;
    let path = std::path::Path::new(spec);
    if file.models.contains_key(spec) {
        return Ok(None);
    }
    if path.is_dir() {
        // A directory: served under its folder name (a model name cannot contain '/').
        let name = path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "local".to_owned());
        file.models
            .insert(name.clone(), LocalModelFile { path: Some(path.to_path_buf()), ..LocalModelFile::default() });
        return Ok(Some(name));
    }
    if let Some(builtin) = registry::builtin(spec) {
        if builtin.kind == registry::ModelKind::TinyDecoder {
            return Err(format!("--model {spec}: {}", registry::RegistryError::NotAModel(spec.to_owned())));
        }
        let data_dir = registry::default_data_dir_from(|k| env.var(k).map(std::ffi::OsString::from));
        let models_dir = registry::models_dir(&data_dir);
        let use_bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let dir = models::ensure_installed(builtin, &models_dir, models::endpoint_from_env(), use_bar)
            .map_err(|e| e.to_string())?;
        file.models.insert(spec.to_owned(), LocalModelFile { path: Some(dir), ..LocalModelFile::default() });
        return Ok(None);
    }
    if spec.contains('/') && (spec.starts_with('.') || spec.starts_with('/')) {
        return Err(format!("--model {spec}: no such directory"));
    }
    Ok(None)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(threads) = cli.threads {
        // The engine's kernels and candle's matrix products both run on rayon's global pool.
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(threads.into()).build_global() {
            eprintln!("error: cannot start {threads} compute threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Generate(args) => client::generate(args).await,
            Command::Edit(args) => client::edit(args).await,
            Command::Estimate(args) => estimate::run(args),
            // Blocking file downloads: fine here, on the main thread, outside the runtime's workers.
            Command::Models(args) => models::run(args),
            Command::Keys(args) => keys::run(args).await,
            Command::Usage(args) => usage::run(args).await,
            Command::Batch(args) => batch::run(args).await,
            Command::Verify(args) => verify::run(args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let state = args.config.state(&args.api_keys)?;
    let ttl = std::time::Duration::from_secs(args.reservation_ttl_secs.max(1));
    // An in-flight Idempotency-Key lives as long as its request's hold: a heartbeat renews both.
    let options = ledger::LedgerOptions { reservation_ttl: ttl, idempotency_in_flight_ttl: ttl, ..Default::default() };
    let ledger = args.config.open_ledger(options).await?;
    // Also starts the heartbeat that keeps this instance's holds alive and the sweep that frees the
    // holds of instances that died.
    let mut state = state.with_ledger(ledger).await.map_err(|e| e.to_string())?;
    if let Some(url) = &args.public_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("--public-url: '{url}' is not an http:// or https:// URL"));
        }
        state.public_url = Some(url.trim_end_matches('/').into());
    }
    let open = state.is_open().await.map_err(|e| e.to_string())?;
    server::check_listen_address(&args.listen, open).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let models = state.catalog.public_names();
    if models.is_empty() {
        tracing::warn!(
            "no provider is configured: set OPENAI_API_KEY or pass --config; every image request will be a 404"
        );
    }
    if open {
        tracing::warn!(
            %addr,
            "no API keys yet: serving WITHOUT authentication, on loopback only (imagegate keys create --name NAME)"
        );
    }
    tracing::info!(%addr, models = %models.join(", "), "imagegate listening");
    let options = server::ServeOptions {
        header_timeout: std::time::Duration::from_secs(args.header_timeout_secs),
        body_timeout: std::time::Duration::from_secs(args.body_timeout_secs),
        write_timeout: std::time::Duration::from_secs(args.write_timeout_secs),
        max_connections: args.max_connections,
    };
    server::run_with(listener, server::app(state), options, shutdown_signal()).await.map_err(|e| e.to_string())?;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Resolves on ctrl-c or SIGTERM; the server then stops accepting and lets requests in flight finish.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested: finishing requests in flight");
}

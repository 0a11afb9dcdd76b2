//! The `imagegate` command: `serve` the OpenAI Images API, or `generate`/`edit` images from the command
//! line, either in-process (a server on a private loopback port inside this process) or against a running
//! server with `--server URL`. Thin glue: the work is in the `server`, `providers` and `api` crates.

mod client;
mod estimate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use server::config::{Config, ProcessEnv};
use server::{AppState, KeySet, Limits};

#[derive(Parser)]
#[command(name = "imagegate", version, about = "Self-hosted image generation that speaks OpenAI's Images API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI Images API (/v1/images/generations, /v1/images/edits, /v1/models, /health).
    Serve(ServeArgs),
    /// Generate images from a prompt and write them to files.
    Generate(client::GenerateArgs),
    /// Edit images (with an optional mask) from a prompt and write the results to files.
    Edit(client::EditArgs),
    /// Estimate what a job would cost, itemized, before spending anything.
    Estimate(estimate::EstimateArgs),
}

/// Where the providers, keys and limits come from. Shared by `serve` and the in-process client.
#[derive(Args, Clone)]
pub struct ConfigArgs {
    /// TOML config: providers, model aliases, API key hashes. Without it, OPENAI_API_KEY (and
    /// OPENAI_BASE_URL) configure an upstream provider named `openai`.
    #[arg(long, env = "IMAGEGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "IMAGEGATE_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Largest input image in pixels, checked before decoding (guards against decompression bombs).
    #[arg(long, env = "IMAGEGATE_MAX_IMAGE_PIXELS", default_value_t = Limits::default().max_image_pixels)]
    max_image_pixels: u64,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on. Without API keys only a loopback address is allowed.
    #[arg(long, env = "IMAGEGATE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Accepted client API keys, comma-separated. Without any, the server is open (loopback only).
    #[arg(long, env = "IMAGEGATE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

impl ConfigArgs {
    /// The validated application state, or a message for the operator.
    pub fn state(&self, plain_keys: &[String]) -> Result<AppState, String> {
        let mut config = match &self.config {
            Some(path) => Config::load(path, &ProcessEnv).map_err(|e| e.to_string())?,
            None => Config::from_file(Default::default(), &ProcessEnv).map_err(|e| e.to_string())?,
        };
        config.limits = Limits { max_body_bytes: self.max_body_bytes, max_image_pixels: self.max_image_pixels };
        let mut state = AppState::from_config(&config).map_err(|e| e.to_string())?;
        let mut keys = KeySet::new(config.api_key_hashes.clone());
        keys.add_plain(plain_keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()));
        state.keys = std::sync::Arc::new(keys);
        Ok(state)
    }
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
    server::check_listen_address(&args.listen, &state.keys).map_err(|e| e.to_string())?;
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
    if state.keys.is_open() {
        tracing::warn!(%addr, "no API keys configured: serving WITHOUT authentication, on loopback only");
    }
    tracing::info!(%addr, models = %models.join(", "), "imagegate listening");
    server::run(listener, server::app(state), shutdown_signal()).await.map_err(|e| e.to_string())?;
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

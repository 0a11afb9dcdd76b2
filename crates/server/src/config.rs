//! Configuration: the TOML file, the zero-config environment (`OPENAI_API_KEY`, `OPENAI_BASE_URL`), and
//! its validation at start with errors that name the offending key.
//!
//! ```toml
//! default_model = "mini"                      # used when a request names no model
//! api_keys = ["sha256:<hex of the key>"]      # client keys, stored as hashes only
//!
//! [providers.comet]
//! base_url = "https://api.cometapi.com/v1"
//! api_key_env = "COMET_API_KEY"               # the key itself never sits in the file
//! models = ["gpt-image-1-mini", { name = "flux-dev", like = "gpt-image-1" }]
//! discount_percent = "20"                     # sells at 20% under the list price
//! timeout_secs = 600
//! max_retries = 2
//! concurrency = 16                            # requests in flight to it at once
//! flex_queue = 64                             # flex and batch requests waiting for it; more: 429
//! flex_max_wait_secs = 600                    # a flex request expected to wait longer: 429 at once
//!
//! [aliases]
//! mini = "comet/gpt-image-1-mini"
//!
//! [prices."flux-dev"]                         # every served model needs a price (see pricing)
//! billing_basis = "flat"
//! flat_per_image = "0.003"
//!
//! [models.sd-turbo]                           # a local model: a built-in name (pulled) or a path
//! [models.my-finetune]
//! path = "/srv/models/my-finetune"            # a diffusers-layout directory
//! profile = "standard"                        # steps per quality: "turbo" (1/2/4), "standard" (10/15/25), "z-image" (4/6/8)
//! sampler = "checkpoint"                      # optional: the checkpoint's scheduler (standard: 15/25/40 steps)
//!                                             # instead of the standard profile's DPM++ 2M Karras
//! tiny_decoder = "/srv/models/taesd"          # optional TAESD directory (default: the pulled taesd/taesdxl)
//! provenance = false                          # optional: its images carry no Content Credentials
//!
//! [provenance]                                # C2PA Content Credentials on every local image (default on)
//! cert_chain = "/etc/imagegate/c2pa-chain.pem" # signer certificate, then its issuers; without it and
//! private_key = "/etc/imagegate/c2pa-key.pem" # the key, a self-made (untrusted) identity in the data dir
//! include_prompt = false                      # write the prompt into manifests (default false)
//! # remote_signer_url = "https://signer.internal/c2pa"  # instead of private_key: the key stays there
//! # algorithm = "es256"                       # the remote key's
//! # enabled = false                           # sign nothing
//!
//! [engine]
//! queue_capacity = 8                          # requests queued or running before 429
//! resident_models = 2                         # models kept loaded
//! flex_queue = 64                             # flex and batch requests waiting; more: 429
//! flex_max_wait_secs = 600                    # a flex request expected to wait longer: 429 at once
//!
//! [remote_images]                             # https:// image URLs of JSON edits (server::remote)
//! allow_hosts = ["images.example.com", ".cdn.example.com"]
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use domain::{ModelFamily, OPENAI_IMAGE_MODELS};
use providers::schedule::QueueLimits;

use crate::routing::Replacement;
use rust_decimal::Decimal;
use serde::Deserialize;

/// The config file as written. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub default_model: Option<String>,
    #[serde(default)]
    pub api_keys: Vec<String>,
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderFile>,
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// Price entries laid over the built-in catalog, keyed by model name.
    #[serde(default)]
    pub prices: BTreeMap<String, pricing::ModelPrice>,
    /// Service tier multipliers laid over the built-in ones.
    #[serde(default)]
    pub tiers: BTreeMap<String, pricing::Price>,
    /// Local models served by the engine, by the name requests use.
    #[serde(default)]
    pub models: BTreeMap<String, LocalModelFile>,
    #[serde(default)]
    pub engine: EngineFile,
    /// Which image URLs of JSON edits the server fetches; absent: none.
    pub remote_images: Option<RemoteImagesFile>,
    /// What serves a model its provider shut down: `"MODEL" = "OTHER"` (a model served here) or
    /// `"MODEL" = "refuse"`. Without an entry, a shut-down model is served by the first local model (a
    /// turbo one first), or refused.
    #[serde(default)]
    pub replacements: BTreeMap<String, String>,
    /// How local images are signed (C2PA); absent: signed with the local identity of the data dir.
    #[serde(default)]
    pub provenance: ProvenanceFile,
}

/// `[provenance]`: the Content Credentials (C2PA manifests) of every image the local engine makes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvenanceFile {
    /// `false` signs nothing (default `true`).
    pub enabled: Option<bool>,
    /// The signer's certificate, then its issuers (PEM); with `private_key`. Without both, the server
    /// signs with an identity it makes in the data dir (`provenance/`), which validators show as
    /// untrusted.
    pub cert_chain: Option<std::path::PathBuf>,
    /// The signer's private key (PKCS#8 PEM: ECDSA P-256/384/521, Ed25519 or RSA).
    pub private_key: Option<std::path::PathBuf>,
    /// Instead of `private_key`: a signing service holding the key (the bytes to sign are POSTed to
    /// it, the response body is the signature: the c2pa SDK's remote-signer protocol), with
    /// `cert_chain` and `algorithm`.
    pub remote_signer_url: Option<String>,
    /// The remote key's algorithm: es256, es384, es512, ps256, ps384, ps512 or ed25519.
    pub algorithm: Option<String>,
    /// Write the prompt into the manifest (default `false`: prompts can be private).
    pub include_prompt: Option<bool>,
}

/// `[remote_images]`: hosts the server fetches input images from (`server::remote`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteImagesFile {
    /// Exact host names, or `.example.com` for its subdomains.
    pub allow_hosts: Vec<String>,
    /// Largest image fetched, in bytes (default 50 MB, the largest upload OpenAI takes).
    pub max_bytes: Option<usize>,
    /// The whole fetch, in seconds (default 10).
    pub timeout_secs: Option<u64>,
    /// Also fetch `http://` URLs and private addresses: for tests and trusted networks only.
    #[serde(default)]
    pub allow_insecure: bool,
}

/// `[models.NAME]`: a local model.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModelFile {
    /// A diffusers-layout directory; without it NAME must be a built-in model that was pulled.
    pub path: Option<std::path::PathBuf>,
    /// `turbo` or `standard`; guessed from the name when absent.
    pub profile: Option<String>,
    /// `dpm++2m-karras` or `checkpoint` (the checkpoint's own scheduler config); absent: the profile's.
    pub sampler: Option<String>,
    /// A tiny decoder directory (`config.json` + `diffusion_pytorch_model.safetensors` of an
    /// `AutoencoderTiny`) for `quality=low`, the `decoder` field and streamed previews; without it the
    /// pulled `taesd` or `taesdxl` matching the model is used when installed.
    pub tiny_decoder: Option<std::path::PathBuf>,
    /// `false`: this model's images carry no Content Credentials (default `true`).
    pub provenance: Option<bool>,
}

/// `[engine]`: the local engine's queue.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineFile {
    pub queue_capacity: Option<usize>,
    pub resident_models: Option<usize>,
    pub flex_queue: Option<usize>,
    pub flex_max_wait_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    pub base_url: String,
    pub api_key_env: Option<String>,
    pub models: Vec<ModelFile>,
    pub discount_percent: Option<DecimalText>,
    pub timeout_secs: Option<u64>,
    pub max_retries: Option<u32>,
    pub concurrency: Option<usize>,
    pub flex_queue: Option<usize>,
    pub flex_max_wait_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ModelFile {
    /// One of OpenAI's model names.
    Known(String),
    /// Another name, validated like the OpenAI model named in `like`.
    Custom { name: String, like: String },
}

/// An exact decimal written as a string (`"12.5"`) or an integer (`20`), never through a float.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DecimalText {
    Text(String),
    Integer(i64),
}

/// One upstream provider, validated.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub base_url: String,
    pub api_key: Option<String>,
    /// (the provider's model name, its family)
    pub models: Vec<(String, ModelFamily)>,
    /// Percent off the list price (negative for a markup).
    pub discount_percent: Decimal,
    pub timeout: Duration,
    pub max_retries: u32,
    /// Requests in flight at once, and how flex and batch work waits for it.
    pub queue: QueueLimits,
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub default_model: Option<String>,
    /// The built-in price catalog with the file's overrides.
    pub prices: pricing::Catalog,
    /// SHA-256 digests of the accepted client keys.
    pub api_key_hashes: Vec<[u8; 32]>,
    pub providers: Vec<ProviderConfig>,
    pub aliases: BTreeMap<String, String>,
    pub limits: Limits,
    /// Local models, served by the provider named `local`.
    pub local_models: Vec<providers::local::LocalModel>,
    pub engine: providers::local::LocalOptions,
    pub remote_images: Option<crate::remote::RemoteImages>,
    /// `[replacements]`: what serves a model its provider shut down.
    pub replacements: BTreeMap<String, Replacement>,
    /// How local images are signed; `None`: they are not.
    pub provenance: Option<ProvenanceConfig>,
}

/// `[provenance]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ProvenanceConfig {
    pub identity: IdentitySource,
    pub include_prompt: bool,
    /// Where checkpoint digests are remembered (`provenance/` of the data dir).
    pub cache_dir: std::path::PathBuf,
}

/// Where the signing identity comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum IdentitySource {
    /// The configured certificate chain and key.
    Files { cert_chain: std::path::PathBuf, private_key: std::path::PathBuf },
    /// The configured certificate chain, its key held by a signing service.
    Remote { cert_chain: std::path::PathBuf, url: String, algorithm: String },
    /// The identity the server makes for itself in this directory (`provenance/` of the data dir).
    Local(std::path::PathBuf),
}

impl Config {
    /// The local model that serves shut-down models without a replacement of their own: on a GPU build
    /// the first Z-Image model (the closest to gpt-image-1-mini), else the first with the turbo profile
    /// (the quickest), else the first. On the CPU a Z-Image model is minutes per image, so it is
    /// picked only when it is the only one (or named in `[replacements]`).
    pub fn default_replacement(&self) -> Option<String> {
        self.default_replacement_for(engine::uses_gpu())
    }

    fn default_replacement_for(&self, gpu: bool) -> Option<String> {
        use providers::local::Profile;
        let with = |profile: Profile| self.local_models.iter().find(move |m| m.profile.steps == profile.steps);
        let z_image = with(Profile::Z_IMAGE).filter(|_| gpu);
        z_image.or_else(|| with(Profile::TURBO)).or(self.local_models.first()).map(|m| m.name.clone())
    }

    /// Models' lives (the price catalog's) and what replaces them (the config's and the default).
    pub fn lifecycles(&self) -> crate::routing::Lifecycles {
        crate::routing::Lifecycles {
            known: self.prices.lifecycle.clone(),
            replacements: self.replacements.clone(),
            default_local: self.default_replacement(),
        }
    }

    /// One line for every upstream model configured here that its provider shut down, or shuts down
    /// within 30 days of `today`, saying what happens to requests for it.
    pub fn lifecycle_warnings(&self, today: chrono::NaiveDate) -> Vec<String> {
        let soon = today + chrono::Days::new(30);
        let lifecycles = self.lifecycles();
        let mut out = Vec::new();
        for p in &self.providers {
            for (model, _) in &p.models {
                let Some(life) = self.prices.lifecycle(model) else { continue };
                let Some(date) = life.shutdown_date.filter(|d| *d <= soon) else { continue };
                let when = if date <= today { "was shut down" } else { "shuts down" };
                let named = match life.replacements.as_slice() {
                    [] => String::new(),
                    names => format!(" (OpenAI names {} instead)", names.join(" or ")),
                };
                let then = match (lifecycles.replacement(model, today), self.replacements.get(model)) {
                    (Some(m), _) => format!("served by '{m}'"),
                    (None, Some(Replacement::Refuse)) => "refused with its shutdown date".to_owned(),
                    (None, _) => format!(
                        "refused with its shutdown date (name a replacement under [replacements]: \"{model}\" = \"MODEL\")"
                    ),
                };
                out.push(format!(
                    "model '{model}' of provider '{}' {when} on {date}{named}: requests for it still go to '{}', and when it answers that the model does not exist, they are {then}",
                    p.name, p.name
                ));
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Largest input image, in pixels, before it is decoded.
    pub max_image_pixels: u64,
    /// Decoded input images in memory at once, in bytes, over all requests: a few hundred KB of PNG
    /// can decode to 512 MB, so concurrent edits with such images, each under the pixel limit, would
    /// otherwise take whatever memory the machine has. At least [`Limits::largest_decode_bytes`].
    pub max_decode_bytes: u64,
    /// Request bodies in memory at once, in bytes, over all requests (each is at most
    /// `max_body_bytes`): without it, many connections each sending a large body at once would take
    /// whatever memory the machine has. At least `max_body_bytes`.
    pub max_body_bytes_in_flight: u64,
    /// How long a request waits for room in `max_decode_bytes` or `max_body_bytes_in_flight` before it
    /// gets a 503 to retry.
    pub decode_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 * 1024 * 1024,
            max_image_pixels: 64_000_000,
            // Two images at the default pixel limit at 16 bits RGBA (512 MB each).
            max_decode_bytes: 1024 * 1024 * 1024,
            // Eight requests at the default body limit.
            max_body_bytes_in_flight: 512 * 1024 * 1024,
            // Long enough for a decode at the pixel limit to finish on a small machine.
            decode_wait: Duration::from_secs(5),
        }
    }
}

impl Limits {
    /// The most bytes one input image at the pixel limit takes decoded (16-bit RGBA).
    pub fn largest_decode_bytes(&self) -> u64 {
        self.max_image_pixels.saturating_mul(api::images::MAX_DECODED_BYTES_PER_PIXEL)
    }

    /// Refuses a decode budget too small for one image at the pixel limit (such an image could never
    /// be decoded, and every edit with one would wait, then fail), and a body budget too small for one
    /// body at the body limit (the same).
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes_in_flight < self.max_body_bytes as u64 {
            return err(format!(
                "--max-body-bytes-in-flight (IMAGEGATE_MAX_BODY_BYTES_IN_FLIGHT) is {} bytes, less than one request body at --max-body-bytes (IMAGEGATE_MAX_BODY_BYTES) {}: raise --max-body-bytes-in-flight to at least {}, or lower --max-body-bytes",
                self.max_body_bytes_in_flight, self.max_body_bytes, self.max_body_bytes
            ));
        }
        if self.max_decode_bytes < self.largest_decode_bytes() {
            return err(format!(
                "--max-decode-bytes (IMAGEGATE_MAX_DECODE_BYTES) is {} bytes, and one input image at --max-image-pixels (IMAGEGATE_MAX_IMAGE_PIXELS) {} pixels takes up to {} bytes decoded ({} a pixel): raise --max-decode-bytes to at least {}, or lower --max-image-pixels",
                self.max_decode_bytes,
                self.max_image_pixels,
                self.largest_decode_bytes(),
                api::images::MAX_DECODED_BYTES_PER_PIXEL,
                self.largest_decode_bytes()
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// The environment a config is resolved against (a function, so tests need not touch the process's).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;

    /// Today (UTC), for models' shutdown dates.
    fn today(&self) -> chrono::NaiveDate {
        crate::routing::today()
    }
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl ConfigFile {
    /// Reads and parses a config file (not yet validated: see [`Config::from_file`]).
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        Config::from_toml(&text, env).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    pub fn from_toml(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        Config::from_file(file, env)
    }

    /// Validates a parsed file and adds the zero-config `openai` provider when `OPENAI_API_KEY` is set
    /// and no provider of that name is configured.
    pub fn from_file(file: ConfigFile, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut providers = Vec::new();
        for (name, p) in file.providers {
            providers.push(provider_config(&name, p, env)?);
        }
        let mut prices = pricing::Catalog::builtin()
            .and_then(|c| c.with_overrides(file.prices, file.tiers))
            .map_err(|e| ConfigError(e.0))?;
        let today = env.today();
        if !providers.iter().any(|p| p.name == "openai")
            && let Some(key) = env.var("OPENAI_API_KEY")
        {
            let base_url = env.var("OPENAI_BASE_URL").unwrap_or_else(|| "https://api.openai.com/v1".to_owned());
            check_url("OPENAI_BASE_URL", &base_url)?;
            providers.push(ProviderConfig {
                name: "openai".to_owned(),
                base_url,
                api_key: Some(key),
                // The live models only: OpenAI answers "no such model" for the others, which are
                // served by their replacements here, or refused with their shutdown date.
                models: OPENAI_IMAGE_MODELS
                    .iter()
                    .filter(|m| !prices.lifecycle(m).is_some_and(|l| l.is_shut_down(today)))
                    .filter_map(|m| ModelFamily::of_openai_model(m).map(|f| ((*m).to_owned(), f)))
                    .collect(),
                discount_percent: Decimal::ZERO,
                timeout: Duration::from_secs(600),
                max_retries: 2,
                queue: QueueLimits::default(),
            });
        }
        let mut api_key_hashes = Vec::new();
        for (i, k) in file.api_keys.iter().enumerate() {
            api_key_hashes.push(parse_key_hash(k).ok_or_else(|| {
                ConfigError(format!(
                    "api_keys[{i}]: expected \"sha256:<64 hex digits>\" (the file stores key hashes, never keys; compute one with `printf %s KEY | sha256sum`)"
                ))
            })?);
        }
        if providers.iter().any(|p| p.name == LOCAL_PROVIDER) {
            return err(format!(
                "providers.{LOCAL_PROVIDER}: the name is reserved for the local engine ([models.NAME])"
            ));
        }
        let data_dir = engine::registry::default_data_dir_from(|k| env.var(k).map(std::ffi::OsString::from));
        let mut local_models = Vec::new();
        for (name, m) in file.models {
            let model = local_model(&name, m, &data_dir)?;
            // A local model without a price of its own is billed by measured compute time.
            prices.models.entry(name).or_insert_with(|| local_price(&prices.local));
            local_models.push(model);
        }
        let defaults = providers::local::LocalOptions::default();
        let engine = providers::local::LocalOptions {
            queue_capacity: file.engine.queue_capacity.unwrap_or(defaults.queue_capacity).max(1),
            resident_models: file.engine.resident_models.unwrap_or(defaults.resident_models).max(1),
            background_queue: file.engine.flex_queue.unwrap_or(defaults.background_queue),
            max_background_wait: file
                .engine
                .flex_max_wait_secs
                .map_or(defaults.max_background_wait, Duration::from_secs),
            step_observer: None,
            models_dir: Some(engine::registry::models_dir(&data_dir)),
            // Made from `provenance` when the server starts (`AppState::from_config`).
            provenance: None,
        };
        for p in &providers {
            for (i, (model, _)) in p.models.iter().enumerate() {
                if prices.model(model).is_none() {
                    return err(format!(
                        "providers.{}.models[{i}]: model '{model}' has no price, and imagegate never bills an image as free: add a [prices.\"{model}\"] entry (the keys of crates/pricing/catalog.toml)",
                        p.name
                    ));
                }
            }
        }
        let p = file.provenance;
        let provenance = match (p.enabled, p.cert_chain, p.private_key, p.remote_signer_url, p.algorithm) {
            (Some(false), ..) => None,
            (_, Some(cert_chain), Some(private_key), None, None) => {
                Some(IdentitySource::Files { cert_chain, private_key })
            }
            (_, Some(cert_chain), None, Some(url), Some(algorithm)) => {
                Some(IdentitySource::Remote { cert_chain, url, algorithm })
            }
            (_, None, None, None, None) => Some(IdentitySource::Local(data_dir.join("provenance"))),
            (_, _, Some(_), Some(_), _) => {
                return err("provenance: set private_key or remote_signer_url, not both");
            }
            (_, _, _, Some(_), _) => {
                return err("provenance.remote_signer_url: set cert_chain (the signer's certificates, PEM) and algorithm (the remote key's: es256, es384, es512, ps256, ps384, ps512 or ed25519) with it");
            }
            _ => {
                return err("provenance: set both cert_chain and private_key (PEM files), or neither to sign with the server's own local identity");
            }
        }
        .map(|identity| ProvenanceConfig {
            identity,
            include_prompt: p.include_prompt.unwrap_or(false),
            cache_dir: data_dir.join("provenance"),
        });
        let replacements = file
            .replacements
            .into_iter()
            .map(|(model, target)| {
                let r = if target == "refuse" { Replacement::Refuse } else { Replacement::Model(target) };
                (model, r)
            })
            .collect();
        Ok(Config {
            default_model: file.default_model,
            replacements,
            prices,
            api_key_hashes,
            providers,
            aliases: file.aliases,
            limits: Limits::default(),
            local_models,
            engine,
            provenance,
            remote_images: match file.remote_images {
                None => None,
                Some(r) if r.allow_hosts.is_empty() => {
                    return err("remote_images.allow_hosts: name at least one host (or leave [remote_images] out)");
                }
                Some(r) => Some(crate::remote::RemoteImages {
                    allow_hosts: r.allow_hosts,
                    max_bytes: r.max_bytes.unwrap_or(50 * 1024 * 1024),
                    timeout: std::time::Duration::from_secs(r.timeout_secs.unwrap_or(10).max(1)),
                    allow_insecure: r.allow_insecure,
                }),
            },
        })
    }
}

/// The provider name of the local engine.
pub const LOCAL_PROVIDER: &str = "local";

fn local_model(name: &str, m: LocalModelFile, data_dir: &Path) -> Result<providers::local::LocalModel, ConfigError> {
    use engine::registry;
    if name.is_empty() || name.contains('/') {
        return err(format!("models.{name}: a model name must be non-empty and contain no '/'"));
    }
    let dir = match (m.path, registry::builtin(name)) {
        (None, Some(builtin)) if builtin.kind == registry::ModelKind::TinyDecoder => {
            return err(format!("models.{name}: {}", registry::RegistryError::NotAModel(name.to_owned())));
        }
        (Some(path), _) => {
            if !path.is_dir() {
                return err(format!("models.{name}.path: '{}' is not a directory", path.display()));
            }
            path
        }
        (None, Some(builtin)) => registry::installed_dir(&registry::models_dir(data_dir), builtin).ok_or_else(|| {
            ConfigError(format!(
                "models.{name}: the built-in model is not installed under {}: run `imagegate models pull {name}` (about {}), or set path = \"DIR\"",
                registry::models_dir(data_dir).display(),
                approx_size(builtin.approx_download_bytes)
            ))
        })?,
        (None, None) => {
            return err(format!(
                "models.{name}: set path = \"DIR\" (a diffusers-layout directory), or use a built-in name ({})",
                registry::builtin_names()
            ));
        }
    };
    let profile = match m.profile.as_deref() {
        None => providers::local::Profile::guess(name, &dir),
        Some("turbo") => providers::local::Profile::TURBO,
        Some("standard") => providers::local::Profile::STANDARD,
        Some("z-image") => providers::local::Profile::Z_IMAGE,
        Some(other) => {
            return err(format!("models.{name}.profile: '{other}' is not one of 'turbo', 'standard', 'z-image'"));
        }
    };
    let profile = match m.sampler.as_deref() {
        None => profile,
        Some(s) => profile.with_sampler(s).map_err(|why| ConfigError(format!("models.{name}.sampler: {why}")))?,
    };
    if let Some(tiny) = &m.tiny_decoder
        && !tiny.is_dir()
    {
        return err(format!("models.{name}.tiny_decoder: '{}' is not a directory", tiny.display()));
    }
    Ok(providers::local::LocalModel {
        name: name.to_owned(),
        dir,
        profile,
        tiny_decoder: m.tiny_decoder,
        provenance: m.provenance.unwrap_or(true),
    })
}

fn approx_size(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// The price of a local model without an entry: compute time at the catalog's CPU or GPU rate.
fn local_price(local: &pricing::LocalPrices) -> pricing::ModelPrice {
    let per_hour = if engine::uses_gpu() { local.gpu_usd_per_hour } else { local.cpu_usd_per_hour };
    pricing::ModelPrice {
        billing_basis: pricing::BillingBasis::Compute,
        as_of: None,
        source: Some("[local] compute price of the catalog".to_owned()),
        tokens: None,
        per_image: BTreeMap::new(),
        output_tokens: BTreeMap::new(),
        output_token_formula: None,
        usd_per_hour: Some(per_hour),
        flat_per_image: None,
    }
}

fn provider_config(name: &str, p: ProviderFile, env: &dyn Env) -> Result<ProviderConfig, ConfigError> {
    let key = |field: &str| format!("providers.{name}.{field}");
    if name.is_empty() || name.contains('/') {
        return err(format!("providers.{name}: a provider name must be non-empty and contain no '/'"));
    }
    check_url(&key("base_url"), &p.base_url)?;
    let api_key = match &p.api_key_env {
        None => None,
        Some(var) => match env.var(var) {
            Some(v) => Some(v),
            None => {
                return err(format!("{}: the environment variable {var} is not set", key("api_key_env")));
            }
        },
    };
    if p.models.is_empty() {
        return err(format!("{}: list at least one model", key("models")));
    }
    let mut models = Vec::new();
    for (i, m) in p.models.into_iter().enumerate() {
        let (model, family) = match m {
            ModelFile::Known(n) => match ModelFamily::of_openai_model(&n) {
                Some(f) => (n, f),
                None => {
                    return err(format!(
                        "{}[{i}]: '{n}' is not an OpenAI image model ({}); for another model write {{ name = \"{n}\", like = \"gpt-image-1\" }}",
                        key("models"),
                        OPENAI_IMAGE_MODELS.join(", ")
                    ));
                }
            },
            ModelFile::Custom { name: n, like } => match ModelFamily::of_openai_model(&like) {
                Some(f) => (n, f),
                None => {
                    return err(format!(
                        "{}[{i}].like: '{like}' is not one of {}",
                        key("models"),
                        OPENAI_IMAGE_MODELS.join(", ")
                    ));
                }
            },
        };
        if model.is_empty() || model.contains('/') {
            return err(format!("{}[{i}]: a model name must be non-empty and contain no '/'", key("models")));
        }
        models.push((model, family));
    }
    let discount_percent = match p.discount_percent {
        None => Decimal::ZERO,
        Some(DecimalText::Integer(i)) => Decimal::from(i),
        Some(DecimalText::Text(t)) => t
            .trim()
            .trim_end_matches('%')
            .parse::<Decimal>()
            .map_err(|_| ConfigError(format!("{}: '{t}' is not a decimal number", key("discount_percent"))))?,
    };
    if discount_percent >= Decimal::from(100) || discount_percent <= Decimal::from(-1000) {
        return err(format!("{}: must be below 100 (and above -1000 for a markup)", key("discount_percent")));
    }
    let timeout_secs = p.timeout_secs.unwrap_or(600);
    if timeout_secs == 0 {
        return err(format!("{}: must be at least 1", key("timeout_secs")));
    }
    let defaults = QueueLimits::default();
    let concurrency = p.concurrency.unwrap_or(defaults.capacity);
    if concurrency == 0 {
        return err(format!("{}: must be at least 1", key("concurrency")));
    }
    let queue = QueueLimits {
        capacity: concurrency,
        background_queue: p.flex_queue.unwrap_or(defaults.background_queue),
        max_background_wait: p.flex_max_wait_secs.map_or(defaults.max_background_wait, Duration::from_secs),
    };
    Ok(ProviderConfig {
        name: name.to_owned(),
        base_url: p.base_url,
        api_key,
        models,
        discount_percent,
        timeout: Duration::from_secs(timeout_secs),
        max_retries: p.max_retries.unwrap_or(2),
        queue,
    })
}

fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        err(format!("{key}: '{url}' is not an http:// or https:// URL"))
    }
}

fn parse_key_hash(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, &'static str>);
    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }

    fn env(pairs: &[(&'static str, &'static str)]) -> FakeEnv {
        FakeEnv(pairs.iter().copied().collect())
    }

    #[test]
    fn zero_config_from_openai_variables() {
        let c =
            Config::from_toml("", &env(&[("OPENAI_API_KEY", "sk-up"), ("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")]))
                .unwrap();
        assert_eq!(c.providers.len(), 1);
        assert_eq!(c.providers[0].name, "openai");
        assert_eq!(c.providers[0].base_url, "http://127.0.0.1:1/v1");
        // OpenAI's live image models only (the others are shut down: see tests/lifecycle.rs).
        let models: Vec<&str> = c.providers[0].models.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(models, ["gpt-image-2", "gpt-image-2-2026-04-21"]);
        assert!(Config::from_toml("", &env(&[])).unwrap().providers.is_empty());
    }

    #[test]
    fn a_local_model_picks_its_sampler_and_a_wrong_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let model = |extra: &str| {
            let text = format!("[models.m]\npath = {:?}\nprofile = \"standard\"\n{extra}", dir.path());
            Config::from_toml(&text, &env(&[]))
        };
        let standard = model("").unwrap().local_models[0].profile;
        assert_eq!(standard, providers::local::Profile::STANDARD);
        let own = model("sampler = \"checkpoint\"").unwrap().local_models[0].profile;
        assert_eq!(own, providers::local::Profile::STANDARD_OWN_SAMPLER);
        let e = model("sampler = \"euler\"").unwrap_err().0;
        assert!(e.contains("models.m.sampler") && e.contains("'dpm++2m-karras'"), "{e}");
    }

    #[test]
    fn a_gpu_build_replaces_shut_down_models_with_z_image_and_a_cpu_build_with_the_quickest() {
        let dir = tempfile::tempdir().unwrap();
        let zimage = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/parity/zimage-tiny");
        let text = format!(
            "[models.sd]\npath = {:?}\nprofile = \"standard\"\n[models.turbo]\npath = {:?}\nprofile = \"turbo\"\n\
             [models.z]\npath = {:?}\n",
            dir.path(),
            dir.path(),
            zimage
        );
        let config = Config::from_toml(&text, &env(&[])).unwrap();
        // The family is read from the checkpoint: a Z-Image model gets the Z-Image profile.
        let z = config.local_models.iter().find(|m| m.name == "z").unwrap();
        assert_eq!(z.profile, providers::local::Profile::Z_IMAGE);
        assert_eq!(config.default_replacement_for(true).as_deref(), Some("z"));
        assert_eq!(config.default_replacement_for(false).as_deref(), Some("turbo"));
        let e = Config::from_toml(&format!("{text}sampler = \"dpm++2m-karras\"\n"), &env(&[])).unwrap_err().0;
        assert!(e.contains("models.z.sampler") && e.contains("FlowMatch"), "{e}");
    }

    #[test]
    fn a_full_file_parses() {
        let text = r#"
            default_model = "mini"
            api_keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
            [providers.comet]
            base_url = "https://api.cometapi.com/v1"
            api_key_env = "COMET_KEY"
            models = ["gpt-image-1-mini", { name = "flux", like = "gpt-image-1" }]
            discount_percent = "20"
            [aliases]
            mini = "comet/gpt-image-1-mini"
            [prices.flux]
            billing_basis = "flat"
            flat_per_image = "0.003"
            [tiers]
            flex = "0.6"
        "#;
        let c = Config::from_toml(text, &env(&[("COMET_KEY", "k")])).unwrap();
        assert_eq!(c.prices.tier_multiplier("flex"), Some("0.6".parse().unwrap()));
        assert!(c.prices.model("flux").is_some());
        let p = &c.providers[0];
        assert_eq!(p.discount_percent, Decimal::from(20));
        assert_eq!(p.models[1], ("flux".to_owned(), ModelFamily::GptImage));
        assert_eq!(c.api_key_hashes.len(), 1);
    }

    /// Each broken config is refused with a message naming the key at fault.
    #[test]
    fn errors_name_the_key() {
        let base = "[providers.p]\nbase_url = \"http://x\"\nmodels = [\"dall-e-2\"]\n";
        let cases: &[(&str, &str)] = &[
            ("colour = 1", "colour"),
            ("[providers.p]\nbase_url = \"ftp://x\"\nmodels = [\"dall-e-2\"]", "providers.p.base_url"),
            ("[providers.p]\nbase_url = \"http://x\"\nmodels = []", "providers.p.models"),
            ("[providers.p]\nbase_url = \"http://x\"\nmodels = [\"flux\"]", "providers.p.models[0]"),
            (
                "[providers.p]\nbase_url = \"http://x\"\nmodels = [{ name = \"f\", like = \"sd\" }]",
                "providers.p.models[0].like",
            ),
            (
                "[providers.p]\nbase_url = \"http://x\"\napi_key_env = \"NOPE\"\nmodels = [\"dall-e-2\"]",
                "providers.p.api_key_env",
            ),
            (&format!("{base}discount_percent = \"lots\""), "providers.p.discount_percent"),
            (&format!("{base}discount_percent = 100"), "providers.p.discount_percent"),
            (&format!("{base}timeout_secs = 0"), "providers.p.timeout_secs"),
            (&format!("{base}speed = 1"), "speed"),
            ("api_keys = [\"sk-plain\"]", "api_keys[0]"),
            (
                "[providers.p]\nbase_url = \"http://x\"\nmodels = [{ name = \"f\", like = \"gpt-image-1\" }]",
                "providers.p.models[0]: model 'f' has no price",
            ),
            ("[prices.x]\nbilling_basis = \"per_image\"", "prices.\"x\""),
        ];
        for (text, key) in cases {
            let e = Config::from_toml(text, &env(&[])).unwrap_err();
            assert!(e.0.contains(key), "config {text:?}: error {:?} does not name {key}", e.0);
        }
    }
}

//! `imagegate generate` and `imagegate edit`: an OpenAI Images API client that writes the images to
//! files. Without `--server` it starts the server inside this process on a private loopback port, so the
//! command line and the HTTP API share one code path.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::Args;
use reqwest::multipart::{Form, Part};
use serde_json::{Map, Value};

use crate::ConfigArgs;

/// Options both commands share.
#[derive(Args)]
pub struct CommonArgs {
    /// Model name or alias (default: the server's default, as OpenAI's API picks it).
    #[arg(long)]
    model: Option<String>,
    /// WIDTHxHEIGHT or auto.
    #[arg(long)]
    size: Option<String>,
    /// low, medium, high, auto (GPT image models); standard, hd (DALL-E).
    #[arg(long)]
    quality: Option<String>,
    /// png, jpeg or webp.
    #[arg(long)]
    output_format: Option<String>,
    /// 0..100, for jpeg and webp.
    #[arg(long)]
    output_compression: Option<u8>,
    /// transparent, opaque or auto.
    #[arg(long)]
    background: Option<String>,
    /// vivid or natural (dall-e-3).
    #[arg(long)]
    style: Option<String>,
    /// low or auto (GPT image models).
    #[arg(long)]
    moderation: Option<String>,
    /// An end-user id, passed on for abuse monitoring.
    #[arg(long)]
    user: Option<String>,
    /// Number of images.
    #[arg(short = 'n', long = "n")]
    n: Option<u8>,
    /// Seed for reproducible results (local models).
    #[arg(long)]
    seed: Option<u64>,
    /// Denoising steps, instead of the quality's (local models).
    #[arg(long)]
    steps: Option<u16>,
    /// The decoder of local models: `full` (the model's own VAE), `tiny` (TAESD: far faster, softer;
    /// `imagegate models pull taesd`, or `taesdxl` for SDXL), or the directory of a tiny decoder to use
    /// (without --server). Default: tiny for --quality low when one is installed, else full.
    #[arg(long, value_name = "full|tiny|DIR")]
    decoder: Option<String>,
    /// Output file; with several images, `-2`, `-3`... are added before the extension.
    #[arg(long)]
    out: PathBuf,
    /// A running imagegate (or any OpenAI-compatible) server, e.g. http://127.0.0.1:8080. Without it the
    /// server runs in-process.
    #[arg(long, env = "IMAGEGATE_SERVER")]
    server: Option<String>,
    /// API key for --server.
    #[arg(long, env = "IMAGEGATE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// What to draw.
    prompt: String,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args)]
pub struct EditArgs {
    /// What to change.
    prompt: String,
    /// Input image (png, jpeg, webp); repeat for up to 16 reference images.
    #[arg(long, required = true)]
    image: Vec<PathBuf>,
    /// PNG mask with alpha: fully transparent pixels mark where to edit the first image.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// high or low (gpt-image-1, gpt-image-1.5).
    #[arg(long)]
    input_fidelity: Option<String>,
    #[command(flatten)]
    common: CommonArgs,
}

impl CommonArgs {
    fn fields(&self) -> Vec<(&'static str, Value)> {
        let mut out: Vec<(&'static str, Value)> = Vec::new();
        let strings = [
            ("model", &self.model),
            ("size", &self.size),
            ("quality", &self.quality),
            ("output_format", &self.output_format),
            ("background", &self.background),
            ("style", &self.style),
            ("moderation", &self.moderation),
            ("user", &self.user),
        ];
        for (k, v) in strings {
            if let Some(v) = v {
                out.push((k, Value::from(v.clone())));
            }
        }
        if let Some(c) = self.output_compression {
            out.push(("output_compression", c.into()));
        }
        if let Some(n) = self.n {
            out.push(("n", n.into()));
        }
        if let Some(s) = self.seed {
            out.push(("seed", s.into()));
        }
        if let Some(s) = self.steps {
            out.push(("steps", s.into()));
        }
        match self.decoder() {
            Ok(Some(DecoderArg::Full)) => out.push(("decoder", "full".into())),
            Ok(Some(DecoderArg::Tiny | DecoderArg::Dir(_))) => out.push(("decoder", "tiny".into())),
            Ok(None) | Err(_) => {}
        }
        out
    }

    /// `--decoder`, read: `full`, `tiny`, or an existing directory.
    fn decoder(&self) -> Result<Option<DecoderArg<'_>>, String> {
        match self.decoder.as_deref() {
            None => Ok(None),
            Some("full") => Ok(Some(DecoderArg::Full)),
            Some("tiny") => Ok(Some(DecoderArg::Tiny)),
            Some(dir) if Path::new(dir).is_dir() => Ok(Some(DecoderArg::Dir(Path::new(dir)))),
            Some(other) => Err(format!(
                "--decoder {other}: expected full, tiny, or the directory of a tiny decoder (config.json and \
                 diffusion_pytorch_model.safetensors), and no such directory exists"
            )),
        }
    }
}

/// What `--decoder` says.
enum DecoderArg<'a> {
    Full,
    Tiny,
    /// A tiny decoder directory, given to the in-process server's local model.
    Dir(&'a Path),
}

pub async fn generate(args: GenerateArgs) -> Result<(), String> {
    let target = Target::start(&args.common).await?;
    let mut body = Map::new();
    body.insert("prompt".into(), args.prompt.clone().into());
    for (k, v) in target.fields(&args.common) {
        body.insert(k.into(), v);
    }
    let response = target
        .request("images/generations")
        .json(&Value::Object(body))
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    write_images(&target, response, &args.common.out).await
}

pub async fn edit(args: EditArgs) -> Result<(), String> {
    let target = Target::start(&args.common).await?;
    let mut form = Form::new().text("prompt", args.prompt.clone());
    for (k, v) in target.fields(&args.common) {
        form = form.text(k, v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()));
    }
    if let Some(f) = &args.input_fidelity {
        form = form.text("input_fidelity", f.clone());
    }
    let field = if args.image.len() == 1 { "image" } else { "image[]" };
    for path in &args.image {
        form = form.part(field, file_part(path).await?);
    }
    if let Some(mask) = &args.mask {
        form = form.part("mask", file_part(mask).await?);
    }
    let response =
        target.request("images/edits").multipart(form).send().await.map_err(|e| format!("request failed: {e}"))?;
    write_images(&target, response, &args.common.out).await
}

async fn file_part(path: &Path) -> Result<Part, String> {
    let bytes = tokio::fs::read(path).await.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let mime = match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "image/png",
    };
    Part::bytes(bytes).file_name(name).mime_str(mime).map_err(|e| e.to_string())
}

/// The server a command talks to: the one named by `--server`, or one started in this process.
struct Target {
    base: String,
    api_key: Option<String>,
    http: reqwest::Client,
    /// The model name to send, when `--model` named a directory served under another name.
    model: Option<String>,
    /// Keeps the in-process server alive for the command's duration.
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Target {
    async fn start(args: &CommonArgs) -> Result<Target, String> {
        let http = reqwest::Client::new();
        let tiny_dir = match args.decoder()? {
            Some(DecoderArg::Dir(dir)) => Some(dir),
            _ => None,
        };
        if let Some(url) = &args.server {
            if let Some(dir) = tiny_dir {
                return Err(format!(
                    "--decoder {}: a tiny decoder directory only works without --server (a server uses the tiny \
                     decoders it was configured with: pass --decoder tiny)",
                    dir.display()
                ));
            }
            let base = url.trim_end_matches('/');
            let base = if base.ends_with("/v1") { base.to_owned() } else { format!("{base}/v1") };
            return Ok(Target { base, api_key: args.api_key.clone(), http, model: None, server: None });
        }
        // In-process: open (no keys), on an ephemeral loopback port nobody else knows. A model directory
        // or built-in local model named by --model is served too (pulled first if need be).
        let (state, model) = args.config.state_with(&[], args.model.as_deref(), tiny_dir)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let app = server::app(state);
        let handle = tokio::spawn(async move {
            if let Err(e) = server::run(listener, app, std::future::pending()).await {
                tracing::error!(error = %e, "in-process server stopped");
            }
        });
        Ok(Target { base: format!("http://{addr}/v1"), api_key: None, http, model, server: Some(handle) })
    }

    /// The request fields, with the model name this target knows the model by.
    fn fields(&self, args: &CommonArgs) -> Vec<(&'static str, Value)> {
        let mut fields = args.fields();
        if let Some(m) = &self.model {
            for (k, v) in &mut fields {
                if *k == "model" {
                    *v = Value::from(m.clone());
                }
            }
        }
        fields
    }

    fn request(&self, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.post(format!("{}/{path}", self.base));
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }
}

/// Decodes each image of an `ImagesResponse` (or downloads its URL) and writes it; errors become the
/// server's message.
async fn write_images(target: &Target, response: reqwest::Response, out: &Path) -> Result<(), String> {
    let status = response.status();
    let cost = response.headers().get("x-imagegate-cost-usd").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = response.bytes().await.map_err(|e| format!("reading the response failed: {e}"))?;
    if !status.is_success() {
        return Err(match api::parse_error_body(&body) {
            // In-process, a model nothing serves usually means nothing is configured at all.
            Some(e) if target.server.is_some() && e.code.as_deref() == Some("model_not_found") => format!(
                "{} Set OPENAI_API_KEY (and OPENAI_BASE_URL) to reach an upstream, pass --config, or name a local \
                 model: --model sd-turbo (a built-in model, downloaded on first use) or --model ./a-diffusers-dir.",
                e.message
            ),
            Some(e) => format!(
                "HTTP {}: {} (param: {}, code: {})",
                status.as_u16(),
                e.message,
                e.param.as_deref().unwrap_or("-"),
                e.code.as_deref().unwrap_or("-")
            ),
            None => format!("HTTP {}: {}", status.as_u16(), String::from_utf8_lossy(&body)),
        });
    }
    let result = api::parse_images_response(&body).map_err(|e| format!("unexpected response: {e}"))?;
    let count = result.images.len();
    let mut stdout = std::io::stdout().lock();
    for (i, image) in result.images.iter().enumerate() {
        let bytes = match &image.payload {
            domain::ImagePayload::Base64(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("image {i} is not valid base64: {e}"))?,
            domain::ImagePayload::Url(url) => target
                .http
                .get(url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| format!("downloading {url} failed: {e}"))?
                .bytes()
                .await
                .map_err(|e| format!("downloading {url} failed: {e}"))?
                .to_vec(),
        };
        let path = numbered(out, i, count);
        std::fs::write(&path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let _ = writeln!(stdout, "{}", path.display());
    }
    let r = &result.resolved;
    let mut summary = format!(
        "{count} image(s), {} {} {}",
        r.size.map(|s| s.to_string()).unwrap_or_default(),
        r.quality.map(|q| q.as_str()).unwrap_or_default(),
        r.output_format.map(|f| f.as_str()).unwrap_or_default()
    );
    if let Some(u) = result.usage {
        summary.push_str(&format!(", {} input + {} output tokens", u.input_tokens, u.output_tokens));
    }
    if let Some(c) = cost {
        summary.push_str(&format!(", cost ${c}"));
    }
    eprintln!("{summary}");
    Ok(())
}

/// `out.png` for the first image, `out-2.png`, `out-3.png`... for the others.
fn numbered(out: &Path, i: usize, count: usize) -> PathBuf {
    if count <= 1 || i == 0 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match out.extension() {
        Some(ext) => format!("{stem}-{}.{}", i + 1, ext.to_string_lossy()),
        None => format!("{stem}-{}", i + 1),
    };
    out.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_images_get_numbered_names() {
        let out = Path::new("/tmp/otter.png");
        assert_eq!(numbered(out, 0, 3), PathBuf::from("/tmp/otter.png"));
        assert_eq!(numbered(out, 2, 3), PathBuf::from("/tmp/otter-3.png"));
        assert_eq!(numbered(Path::new("x"), 1, 2), PathBuf::from("x-2"));
    }
}

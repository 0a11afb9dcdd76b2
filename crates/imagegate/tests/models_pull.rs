//! `imagegate models pull|list` against a fake Hugging Face hub speaking real HTTP on 127.0.0.1.
//!
//! The fake answers what hf-hub's synchronous client asks: `GET {endpoint}/{repo}/resolve/{revision}/{file}`,
//! first with `Range: bytes=0-0` (it reads the `etag`, `x-repo-commit` and `content-range` headers), then
//! with `Range: bytes=N-` for the body (N > 0 when resuming a `.part` file).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use engine::registry::{self, BuiltinModel};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const PROXY_VARS: [&str; 6] = ["ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"];

/// One request the fake hub saw.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    authorization: Option<String>,
}

#[derive(Clone)]
struct Hub {
    /// repo id -> file path -> contents
    repos: Arc<HashMap<String, HashMap<String, Vec<u8>>>>,
    /// When set, requests without `Authorization: Bearer TOKEN` get 401, as for a gated repository.
    token: Option<String>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct FakeHub {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeHub {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Serves `repos` on a fresh loopback port from a thread of its own (it lives as long as the test process).
fn spawn_hub(repos: HashMap<String, HashMap<String, Vec<u8>>>, token: Option<&str>) -> FakeHub {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hub = Hub { repos: Arc::new(repos), token: token.map(str::to_string), seen: seen.clone() };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().route("/{*path}", axum::routing::get(resolve)).with_state(hub);
            axum::serve(listener, app).await.unwrap();
        });
    });
    FakeHub { url, seen }
}

fn etag(bytes: &[u8]) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    format!("{:016x}{:08x}", hasher.finish(), bytes.len())
}

async fn resolve(State(hub): State<Hub>, UrlPath(path): UrlPath<String>, headers: HeaderMap) -> Response {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let range = text(header::RANGE);
    let authorization = text(header::AUTHORIZATION);
    hub.seen.lock().unwrap().push(Seen {
        path: path.clone(),
        range: range.clone(),
        authorization: authorization.clone(),
    });

    let Some((repo, rest)) = path.split_once("/resolve/") else {
        return (StatusCode::NOT_FOUND, "not a resolve URL").into_response();
    };
    let Some((revision, file)) = rest.split_once('/') else {
        return (StatusCode::NOT_FOUND, "no file").into_response();
    };
    if let Some(token) = &hub.token
        && authorization.as_deref() != Some(&format!("Bearer {token}"))
    {
        let mut response = (StatusCode::UNAUTHORIZED, "Access to this model is restricted.").into_response();
        response.headers_mut().insert("x-error-code", "GatedRepo".parse().unwrap());
        return response;
    }
    let Some(bytes) = hub.repos.get(repo).and_then(|files| files.get(file)).filter(|_| revision == "main") else {
        let mut response = (StatusCode::NOT_FOUND, "Entry not found").into_response();
        response.headers_mut().insert("x-error-code", "EntryNotFound".parse().unwrap());
        return response;
    };

    let len = bytes.len();
    let (status, start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap();
            let start: usize = a.parse().unwrap();
            let end: usize = if b.is_empty() { len - 1 } else { b.parse::<usize>().unwrap().min(len - 1) };
            if start >= len {
                return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))])
                    .into_response();
            }
            (StatusCode::PARTIAL_CONTENT, start, end)
        }
        None => (StatusCode::OK, 0, len - 1),
    };
    let mut response = (status, bytes[start..=end].to_vec()).into_response();
    let h = response.headers_mut();
    h.insert(header::ETAG, format!("\"{}\"", etag(bytes)).parse().unwrap());
    h.insert("x-repo-commit", COMMIT.parse().unwrap());
    h.insert(header::ACCEPT_RANGES, "bytes".parse().unwrap());
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}").parse().unwrap());
    }
    response
}

/// Small but distinct contents for every file of `model`; the weights are binary and span several reads.
fn contents(model: &BuiltinModel) -> HashMap<String, Vec<u8>> {
    model
        .files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let bytes = if file.ends_with(".safetensors") {
                (0..70_000u32).map(|n| (n.wrapping_mul(31).wrapping_add(i as u32) % 251) as u8).collect()
            } else {
                format!("{{\"file\": \"{}/{file}\", \"i\": {i}}}\n", model.repo).into_bytes()
            };
            (file.to_string(), bytes)
        })
        .collect()
}

fn imagegate(args: &[&str], hub: Option<&FakeHub>, env: &[(&str, &str)], dir: &Path) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imagegate"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("IMAGEGATE_DATA_DIR")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        // No token file from the real home directory either.
        .env("HF_HOME", dir.join("hf-home"));
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    if let Some(hub) = hub {
        cmd.env("HF_ENDPOINT", &hub.url);
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn pull_downloads_every_file_exactly_and_list_then_reports_it_installed() {
    let model = registry::builtin("sd-turbo").unwrap();
    let files = contents(model);
    let hub = spawn_hub(HashMap::from([(model.repo.to_string(), files.clone())]), None);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data_arg = data.to_str().unwrap();
    let models_dir = registry::models_dir(&data);

    let out = imagegate(
        &["models", "pull", "sd-turbo", "--data-dir", data_arg],
        Some(&hub),
        &[("HF_TOKEN", "hf_test_token")],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Before downloading it said what, from where, and how large.
    let err = stderr(&out);
    assert!(err.contains("stabilityai/sd-turbo") && err.contains("12 files") && err.contains("GB"), "{err}");
    assert!(err.contains(&hub.url), "{err}");

    // The last stdout line is the snapshot directory, in the hub cache layout.
    let printed = PathBuf::from(stdout(&out).lines().last().unwrap());
    let expected = models_dir.join("models--stabilityai--sd-turbo").join("snapshots").join(COMMIT);
    assert_eq!(printed, expected);
    assert_eq!(std::fs::read_to_string(models_dir.join("models--stabilityai--sd-turbo/refs/main")).unwrap(), COMMIT);
    for (file, bytes) in &files {
        assert_eq!(&std::fs::read(printed.join(file)).unwrap(), bytes, "{file}");
    }
    assert_eq!(registry::installed_dir(&models_dir, model), Some(expected.clone()));
    let total: u64 = files.values().map(|b| b.len() as u64).sum();
    assert_eq!(registry::installed_size(&expected), total);

    // Every file was asked for, metadata first, always with the token.
    let seen = hub.seen();
    for file in model.files {
        let path = format!("{}/resolve/main/{file}", model.repo);
        let ranges: Vec<_> = seen.iter().filter(|s| s.path == path).map(|s| s.range.clone()).collect();
        assert_eq!(ranges, [Some("bytes=0-0".to_string()), Some("bytes=0-".to_string())], "{file}");
    }
    assert!(seen.iter().all(|s| s.authorization.as_deref() == Some("Bearer hf_test_token")), "{seen:?}");

    // `models list` reports it installed, with its size and place, and the others not.
    let out = imagegate(&["models", "list", "--data-dir", data_arg], None, &[], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let list = stdout(&out);
    let block = |name: &str| -> String {
        let start = list.find(&format!("{name}  (")).unwrap_or_else(|| panic!("{name} missing from:\n{list}"));
        list[start..].lines().take(3).collect::<Vec<_>>().join("\n")
    };
    let turbo = block("sd-turbo");
    assert!(turbo.contains("installed:") && turbo.contains(expected.to_str().unwrap()), "{list}");
    assert!(turbo.contains("stabilityai/sd-turbo") && turbo.contains("download about"), "{list}");
    assert!(block("sdxl-turbo").contains("not downloaded"), "{list}");
    for builtin in registry::builtins() {
        assert!(list.contains(builtin.repo), "{} missing from:\n{list}", builtin.name);
    }
    assert!(list.contains("imagegate models pull NAME"), "{list}");

    // Pulling again asks the hub nothing.
    let before = hub.seen().len();
    let out = imagegate(&["models", "pull", "sd-turbo", "--data-dir", data_arg], Some(&hub), &[], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("already downloaded"), "{}", stderr(&out));
    assert_eq!(PathBuf::from(stdout(&out).trim()), expected);
    assert_eq!(hub.seen().len(), before);

    // A lost file is partly downloaded; pulling fetches just that one.
    std::fs::remove_file(expected.join("unet/config.json")).unwrap();
    assert_eq!(registry::installed_dir(&models_dir, model), None);
    let out = imagegate(&["models", "list", "--data-dir", data_arg], None, &[], tmp.path());
    assert!(stdout(&out).contains("partly downloaded: 1 of 12 files missing"), "{}", stdout(&out));
    let out = imagegate(&["models", "pull", "sd-turbo", "--data-dir", data_arg], Some(&hub), &[], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let again: Vec<_> = hub.seen()[before..].iter().map(|s| s.path.clone()).collect();
    assert_eq!(again, vec![format!("{}/resolve/main/unet/config.json", model.repo); 2]);
    assert_eq!(std::fs::read(expected.join("unet/config.json")).unwrap(), files["unet/config.json"]);
    assert_eq!(registry::installed_dir(&models_dir, model), Some(expected));
}

#[test]
fn the_data_dir_comes_from_imagegate_data_dir_too() {
    let model = registry::builtin("sd-2.1").unwrap();
    let hub = spawn_hub(HashMap::from([(model.repo.to_string(), contents(model))]), None);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("from-env");
    let out = imagegate(
        &["models", "pull", "sd-2.1"],
        Some(&hub),
        &[("IMAGEGATE_DATA_DIR", data.to_str().unwrap())],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(registry::installed_dir(&registry::models_dir(&data), model).is_some());
}

#[test]
fn pulling_an_unknown_name_fails_listing_the_builtin_names() {
    let tmp = tempfile::tempdir().unwrap();
    let out = imagegate(&["models", "pull", "sd-9", "--data-dir", tmp.path().to_str().unwrap()], None, &[], tmp.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("unknown model `sd-9`"), "{err}");
    for model in registry::builtins() {
        assert!(err.contains(model.name), "{} missing from: {err}", model.name);
    }
    assert!(!tmp.path().join("models").exists(), "nothing is created for an unknown name");
}

#[test]
fn a_gated_repository_without_a_token_says_to_set_hf_token() {
    let model = registry::builtin("sdxl").unwrap();
    let hub = spawn_hub(HashMap::from([(model.repo.to_string(), contents(model))]), Some("hf_right"));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().to_str().unwrap();
    let out = imagegate(&["models", "pull", "sdxl", "--data-dir", data], Some(&hub), &[], tmp.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("HTTP 401") && err.contains("HF_TOKEN") && err.contains("none is set"), "{err}");
    assert!(err.contains(&format!("{}/{}", hub.url, model.repo)), "{err}");

    let out =
        imagegate(&["models", "pull", "sdxl", "--data-dir", data], Some(&hub), &[("HF_TOKEN", "hf_wrong")], tmp.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("a token was sent"), "{}", stderr(&out));
    assert_eq!(registry::installed_dir(&registry::models_dir(tmp.path()), model), None);

    let out =
        imagegate(&["models", "pull", "sdxl", "--data-dir", data], Some(&hub), &[("HF_TOKEN", "hf_right")], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(registry::installed_dir(&registry::models_dir(tmp.path()), model).is_some());
}

#[test]
fn an_unreachable_hub_is_named_in_the_error() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let out = imagegate(
        &["models", "pull", "sd-turbo", "--data-dir", tmp.path().to_str().unwrap()],
        None,
        &[("HF_ENDPOINT", &url)],
        tmp.path(),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&format!("cannot reach {url}")) && err.contains("HF_ENDPOINT"), "{err}");
}

#[test]
fn a_pulled_tiny_decoder_is_used_by_the_models_of_its_family() {
    use engine::testing::{TinyDecoderSpec, TinySpec, write_checkpoint, write_tiny_decoder};
    let model = registry::builtin("taesd").unwrap();
    assert_eq!(model.kind, registry::ModelKind::TinyDecoder);
    // The hub serves a real (tiny, random) AutoencoderTiny under the repository's file names.
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_decoder(&tmp.path().join("source"), &TinyDecoderSpec::default()).unwrap();
    let files: HashMap<String, Vec<u8>> = model
        .files
        .iter()
        .map(|f| (f.to_string(), std::fs::read(tmp.path().join("source").join(f)).unwrap()))
        .collect();
    let hub = spawn_hub(HashMap::from([(model.repo.to_string(), files)]), None);

    let out = imagegate(&["models", "pull", "taesd", "--data-dir", "data"], Some(&hub), &[], tmp.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("madebyollin/taesd") && stderr(&out).contains("2 files"), "{}", stderr(&out));
    let models_dir = registry::models_dir(&tmp.path().join("data"));
    assert!(registry::installed_dir(&models_dir, model).is_some());

    // An SD-family model now decodes quality=low, and --decoder tiny, with it.
    write_checkpoint(&tmp.path().join("tiny-model"), &TinySpec::default()).unwrap();
    let generate = |extra: &[&str], out: &str| {
        let base = ["generate", "otter", "--model", "./tiny-model", "--data-dir", "data", "--size", "64x64"];
        let args = [&base[..], &["--seed", "1", "--steps", "2", "--out", out], extra].concat();
        let result = imagegate(&args, None, &[], tmp.path());
        assert!(result.status.success(), "{}", stderr(&result));
        // The pixels: each file's manifest is its own.
        image::open(tmp.path().join(out)).unwrap().to_rgb8()
    };
    let tiny = generate(&["--decoder", "tiny"], "tiny.png");
    let low = generate(&["--quality", "low"], "low.png");
    let full = generate(&["--quality", "low", "--decoder", "full"], "full.png");
    assert_eq!(tiny, low);
    assert_ne!(tiny, full);
}

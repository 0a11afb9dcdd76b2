//! The `imagegate` binary as a user runs it, in a temporary directory, against the fake upstream.

// Test helpers unwrap freely: a failure here is a failing test, not a user-facing panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Output;

fn imagegate(args: &[&str], upstream: Option<&str>, dir: &Path) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imagegate"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("IMAGEGATE_CONFIG")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL");
    if let Some(url) = upstream {
        cmd.env("OPENAI_API_KEY", "sk-upstream").env("OPENAI_BASE_URL", url);
    }
    cmd.output().unwrap()
}

#[test]
fn estimate_prints_the_campaign_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "estimate",
        "--model",
        "gpt-image-1-mini",
        "--quality",
        "medium",
        "--size",
        "1024x1024",
        "--count",
        "100",
        "--prompt-words",
        "30",
    ];
    let out = imagegate(&args, None, dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for expected in ["4,000", "105,600", "$0.8448", "$0.008", "$1.948", "twice", "Total: $0.8528", "$1.10"] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = imagegate(&json_args, None, dir.path());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total_usd"], "0.8528");
}

#[test]
fn generate_without_any_provider_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let args = ["generate", "otter", "--model", "gpt-image-1-mini", "--data-dir", data, "--out", "o.png"];
    let out = imagegate(&args, None, dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("OPENAI_API_KEY") && err.contains("--model sd-turbo"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_and_edit_write_real_images() {
    let fake = fake_openai::spawn().await.unwrap();
    let url = fake.base_url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        imagegate(
            &[
                "generate",
                "a cute baby sea otter",
                "--model",
                "gpt-image-2",
                "--size",
                "1024x1536",
                "-n",
                "2",
                "--out",
                "otter.png",
            ],
            Some(&url),
            &d,
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for name in ["otter.png", "otter-2.png"] {
        let img = image::open(dir.path().join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (1024, 1536), "{name}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("cost $"), "the cost is shown");

    let mut mask = image::RgbaImage::new(1024, 1536);
    mask.pixels_mut().for_each(|p| *p = image::Rgba([0, 0, 0, 0]));
    mask.save(dir.path().join("mask.png")).unwrap();
    let url = fake.base_url();
    let d = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        imagegate(
            &[
                "edit",
                "add a beret",
                "--image",
                "otter.png",
                "--mask",
                "mask.png",
                "--model",
                "gpt-image-2",
                "--out",
                "beret.png",
            ],
            Some(&url),
            &d,
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(image::open(dir.path().join("beret.png")).is_ok());
    let edit = fake.requests().into_iter().find(|r| r.path.ends_with("/edits")).unwrap();
    assert!(edit.part("mask").is_some() && edit.part("image").is_some());

    let url = fake.base_url();
    let d = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        imagegate(
            &["generate", "otter", "--model", "gpt-image-2", "--size", "1254x836", "--out", "x.png"],
            Some(&url),
            &d,
        )
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HTTP 400") && err.contains("size") && err.contains("1254x836"), "{err}");
    assert!(!dir.path().join("x.png").exists());
}

#[test]
fn generate_and_edit_run_a_local_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-model");
    engine::testing::write_checkpoint(&model, &engine::testing::TinySpec::default()).unwrap();
    let model = model.to_str().unwrap();
    let args = ["generate", "a cute baby sea otter", "--model", model, "--size", "64x64", "--seed", "1"];
    let out = imagegate(
        &[&args[..], &["--steps", "1", "--data-dir", "data", "--out", "otter.png"]].concat(),
        None,
        dir.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(dir.path().join("otter.png")).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));

    let args = ["edit", "a red cat", "--image", "otter.png", "--model", model, "--output-format", "jpeg"];
    let out = imagegate(&[&args[..], &["--data-dir", "data", "--out", "cat.jpg"]].concat(), None, dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(dir.path().join("cat.jpg")).unwrap();
    assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::Jpeg);

    // A path that is not there is named.
    let out = imagegate(&["generate", "x", "--model", "./nowhere/model", "--out", "x.png"], None, dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The acceptance: `imagegate generate ... --out a.png && imagegate verify a.png`.
#[test]
fn generated_images_verify_with_their_content_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-model");
    engine::testing::write_checkpoint(&model, &engine::testing::TinySpec::default()).unwrap();
    let model = model.to_str().unwrap();
    let text = |out: &Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let err = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let common = ["--model", model, "--size", "64x64", "--steps", "1", "--data-dir", "data"];
    let out = imagegate(&[&["generate", "an otter"][..], &common, &["--out", "a.png"]].concat(), None, dir.path());
    assert!(out.status.success(), "{}", err(&out));

    let out = imagegate(&["verify", "a.png"], None, dir.path());
    assert!(out.status.success(), "{}{}", text(&out), err(&out));
    let shown = text(&out);
    for expected in [
        "image/png",
        "signed by:   imagegate local signer",
        "generator:   imagegate",
        "action:      c2pa.created (trainedAlgorithmicMedia)",
        "model:       tiny-model",
        "checkpoint:  files sha256:",
        "validation:  valid",
        "trust:       untrusted",
    ] {
        assert!(shown.contains(expected), "{expected:?} missing from:\n{shown}");
    }
    assert!(!shown.contains("an otter"), "the prompt is private by default:\n{shown}");
    // Trusted when the server's own chain is given as the trust anchors.
    let out = imagegate(&["verify", "a.png", "--trust", "data/provenance/signer-chain.pem"], None, dir.path());
    assert!(text(&out).contains("trust:       trusted"), "{}{}", text(&out), err(&out));
    let out = imagegate(&["verify", "a.png", "--json"], None, dir.path());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["manifests"].as_object().unwrap().len(), 1);

    // An edit of it: the input is the parent ingredient, its own manifest carried along.
    let out = imagegate(
        &[&["edit", "a red cat", "--image", "a.png"][..], &common, &["--out", "b.webp", "--output-format", "webp"]]
            .concat(),
        None,
        dir.path(),
    );
    assert!(out.status.success(), "{}", err(&out));
    let out = imagegate(&["verify", "b.webp"], None, dir.path());
    let shown = text(&out);
    assert!(out.status.success(), "{shown}{}", err(&out));
    assert!(shown.contains("image/webp") && shown.contains("action:      c2pa.opened"), "{shown}");
    assert!(shown.contains("ingredient:  input image 1 (parentOf)"), "{shown}");

    // One changed pixel byte: the hash binding no longer holds, and verify says so and fails.
    let mut bytes = std::fs::read(dir.path().join("a.png")).unwrap();
    let idat = bytes.windows(4).rposition(|w| w == b"IDAT").unwrap();
    bytes[idat + 20] ^= 1;
    std::fs::write(dir.path().join("tampered.png"), &bytes).unwrap();
    let out = imagegate(&["verify", "tampered.png"], None, dir.path());
    assert!(!out.status.success());
    assert!(text(&out).contains("INVALID") && text(&out).contains("dataHash.mismatch"), "{}", text(&out));
    // No manifest at all.
    image::RgbImage::new(8, 8).save(dir.path().join("plain.png")).unwrap();
    let out = imagegate(&["verify", "plain.png"], None, dir.path());
    assert!(!out.status.success() && err(&out).contains("no C2PA manifest"), "{}", err(&out));
}

#[test]
fn the_decoder_flag_picks_the_tiny_decoder_or_says_what_to_pull() {
    use engine::testing::{TinyDecoderSpec, TinySpec, write_checkpoint, write_tiny_decoder};
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(&dir.path().join("tiny-model"), &TinySpec::default()).unwrap();
    write_tiny_decoder(&dir.path().join("taesd-dir"), &TinyDecoderSpec::default()).unwrap();
    // An empty data dir: no tiny decoder is installed.
    let base = ["generate", "otter", "--model", "./tiny-model", "--size", "64x64", "--seed", "1", "--steps", "2"];
    let run = |extra: &[&str]| imagegate(&[&base[..], &["--data-dir", "data"], extra].concat(), None, dir.path());
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();

    let out = run(&["--decoder", "tiny", "--out", "x.png"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("HTTP 400") && err.contains("decoder") && err.contains("imagegate models pull taesd"),
        "{err}"
    );

    let out = run(&["--decoder", "full", "--out", "full.png"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["--decoder", "./taesd-dir", "--out", "tiny.png"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let full = image::open(dir.path().join("full.png")).unwrap().to_rgb8();
    let tiny = image::open(dir.path().join("tiny.png")).unwrap().to_rgb8();
    assert_eq!(tiny.dimensions(), (64, 64));
    assert_ne!(full, tiny, "the tiny decoder's image is the full decoder's");

    let out = run(&["--decoder", "./nowhere", "--out", "x.png"]);
    assert!(!out.status.success() && stderr(&out).contains("--decoder ./nowhere"), "{}", stderr(&out));
    let out = run(&["--decoder", "./taesd-dir", "--server", "http://127.0.0.1:9", "--out", "x.png"]);
    assert!(!out.status.success() && stderr(&out).contains("without --server"), "{}", stderr(&out));
    // A tiny decoder is pulled, never served.
    let out =
        imagegate(&["generate", "x", "--model", "taesd", "--data-dir", "data", "--out", "x.png"], None, dir.path());
    assert!(!out.status.success() && stderr(&out).contains("is a tiny decoder"), "{}", stderr(&out));
    assert!(!dir.path().join("x.png").exists());
}

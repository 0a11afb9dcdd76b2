//! What Content Credentials cost per image: encoding, signing and reading back a 1024x1024 image in
//! each format imagegate writes, encoded as the engine encodes (PNG, JPEG at quality 100, lossless
//! WebP). Medians of `RUNS` runs, one thread, the local identity's algorithm (ES256).
//!
//!     cargo run --release -p provenance --example sign_cost

// A measurement, not the service: a failure here is a failed measurement, and the table is its output.
#![allow(clippy::expect_used, clippy::print_stdout)]

use std::io::Cursor;
use std::time::{Duration, Instant};

use image::RgbImage;
use provenance::{Checkpoint, Generation, Identity, MediaType, Origin, Signer};

const RUNS: usize = 15;
const SIDE: u32 = 1024;

/// A photo-like image: smooth gradients with fine noise (a generated image compresses about so).
fn picture() -> RgbImage {
    let mut state = 0x2545_f491_u32;
    RgbImage::from_fn(SIDE, SIDE, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 24) as i32 - 12;
        let base = [(x * 255 / SIDE) as i32, (y * 255 / SIDE) as i32, ((x + y) * 127 / SIDE) as i32];
        image::Rgb(base.map(|v| (v + noise).clamp(0, 255) as u8))
    })
}

fn encode(img: &RgbImage, media: MediaType) -> Vec<u8> {
    match media {
        MediaType::Png => {
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).expect("png");
            out.into_inner()
        }
        MediaType::Jpeg => {
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 100).encode_image(img).expect("jpeg");
            out
        }
        MediaType::Webp => webp::Encoder::from_rgb(img.as_raw(), img.width(), img.height()).encode_lossless().to_vec(),
    }
}

fn median(mut d: Vec<Duration>) -> f64 {
    d.sort();
    d[d.len() / 2].as_secs_f64() * 1e3
}

fn timed<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
    }
    (median(times), last.expect("RUNS > 0"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // What a server adds to its start: the identity made (first start) or read, and a signer that signs
    // and validates one image of its own.
    let dir = std::env::temp_dir().join(format!("imagegate-sign-cost-{}", std::process::id()));
    let started = Instant::now();
    let (identity, _) = Identity::local(&dir)?;
    let made = started.elapsed();
    let started = Instant::now();
    let (identity_again, _) = Identity::local(&dir)?;
    let read = started.elapsed();
    let started = Instant::now();
    let signer = Signer::new(&identity, ("imagegate", env!("CARGO_PKG_VERSION")))?;
    let ready = started.elapsed();
    // A model directory without a hub commit is named by the SHA-256 of its files: read once, then
    // remembered by size and modification time.
    let weights = dir.join("model");
    std::fs::create_dir_all(&weights)?;
    std::fs::write(weights.join("w.safetensors"), vec![7u8; 512 << 20])?;
    let started = Instant::now();
    provenance::digest(&weights)?;
    let hashed = started.elapsed().as_secs_f64();
    provenance::Checkpoint::identify_cached(&weights, &dir)?;
    let started = Instant::now();
    provenance::Checkpoint::identify_cached(&weights, &dir)?;
    let recalled = started.elapsed().as_secs_f64() * 1e3;
    println!(
        "checkpoint digest: {:.2} GB/s (512 MiB in {hashed:.2} s, page cache warm); recalled at the next start in {recalled:.2} ms",
        0.5 * 1.073_741_824 / hashed
    );
    std::fs::remove_dir_all(&dir)?;
    println!(
        "start-up: identity made in {:.1} ms (read back in {:.2} ms), signer ready in {:.1} ms ({})\n",
        made.as_secs_f64() * 1e3,
        read.as_secs_f64() * 1e3,
        ready.as_secs_f64() * 1e3,
        identity_again.algorithm()
    );
    let checkpoint = Checkpoint::Hub { repo: "stabilityai/sd-turbo".into(), revision: "0".repeat(40) };
    let generation =
        Generation { model: "sd-turbo", checkpoint: Some(&checkpoint), prompt: None, partial_image_index: None };
    let img = picture();
    println!("| format | encode ms | sign ms | sign / encode | bytes | + manifest bytes | verify ms |");
    println!("|---|---|---|---|---|---|---|");
    for media in [MediaType::Png, MediaType::Jpeg, MediaType::Webp] {
        let (encode_ms, bytes) = timed(|| encode(&img, media));
        let (sign_ms, signed) = timed(|| signer.sign(&bytes, media, Origin::Generated, &generation).expect("sign"));
        let (verify_ms, found) = timed(|| provenance::verify(&signed, media, None).expect("read"));
        assert!(found.is_some_and(|v| v.valid), "{media:?}: the signed image does not validate");
        println!(
            "| {} | {encode_ms:.1} | {sign_ms:.2} | {:.1}% | {} | {} | {verify_ms:.2} |",
            media.mime(),
            100.0 * sign_ms / encode_ms,
            bytes.len(),
            signed.len() - bytes.len()
        );
    }
    Ok(())
}

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The tiny decoder (TAESD, diffusers' `AutoencoderTiny`) on random weights written in the hub
//! repositories' layout: its wiring against a plain reading of the tensors, the fast kernels against
//! candle's, and the pipeline choosing it for `Decoder::Tiny` and for partial images.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use engine::sd::taesd::{TinyConfig, TinyDecoder};
use engine::testing::{TinyDecoderSpec, TinySpec, remove_tensor, replace_tensor, write_checkpoint, write_tiny_decoder};
use engine::{Decoder, EngineError, GenerateParams, Hooks, Kernels, LoadOptions, Pipeline};
use image::RgbImage;

fn tiny_decoder(spec: &TinyDecoderSpec) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_decoder(dir.path(), spec).unwrap();
    dir
}

fn weights(dir: &Path) -> std::path::PathBuf {
    dir.join("diffusion_pytorch_model.safetensors")
}

/// `[n, 3, h, w]` in -1..1 to 0..=255 the way the pipeline rounds.
fn to_bytes(pixels: &Tensor) -> Vec<u8> {
    ((pixels + 1.0).unwrap() * 127.5)
        .unwrap()
        .clamp(0.0, 255.0)
        .unwrap()
        .round()
        .unwrap()
        .to_dtype(DType::U8)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
}

fn max_byte_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

/// DecoderTiny read straight off the tensors, module by module as diffusers' `nn.Sequential` numbers
/// them, with candle's own convolution: an independent check of the decoder's wiring.
fn decode_by_hand(tensors: &HashMap<String, Tensor>, config: &TinyConfig, latents: &Tensor) -> Tensor {
    let conv = |x: &Tensor, index: usize, sub: &str| -> Tensor {
        let name = |what: &str| format!("decoder.layers.{index}{sub}.{what}");
        let y = x.conv2d(&tensors[&name("weight")], 1, 1, 1, 1).unwrap();
        match tensors.get(&name("bias")) {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap(),
            None => y,
        }
    };
    let mut x = ((latents / 3.0).unwrap().tanh().unwrap() * 3.0).unwrap();
    x = conv(&x, 0, "").relu().unwrap();
    let mut index = 2;
    let stages = config.num_decoder_blocks.len();
    for (i, &blocks) in config.num_decoder_blocks.iter().enumerate() {
        for _ in 0..blocks {
            let h = conv(&x, index, ".conv.0").relu().unwrap();
            let h = conv(&h, index, ".conv.2").relu().unwrap();
            let h = conv(&h, index, ".conv.4");
            x = (h + &x).unwrap().relu().unwrap();
            index += 1;
        }
        if i + 1 < stages {
            let (_, _, h, w) = x.dims4().unwrap();
            x = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
            index += 1;
        }
        x = conv(&x, index, "");
        index += 1;
    }
    ((x * 2.0).unwrap() - 1.0).unwrap()
}

#[test]
fn the_published_shape_decodes_eight_pixels_per_latent_as_the_layers_say() {
    let dir = tiny_decoder(&TinyDecoderSpec::taesd());
    let tensors = candle_core::safetensors::load(weights(dir.path()), &Device::Cpu).unwrap();
    // The real file holds the encoder too, and the decoder's convs before an upsampling have no bias.
    for name in
        ["encoder.layers.0.bias", "encoder.layers.2.weight", "encoder.layers.13.conv.4.bias", "encoder.layers.14.bias"]
    {
        assert!(tensors.contains_key(name), "{name}");
    }
    assert!(!tensors.contains_key("encoder.layers.2.bias"));
    assert!(tensors.contains_key("decoder.layers.2.conv.4.bias"));
    assert!(!tensors.contains_key("decoder.layers.6.bias") && tensors.contains_key("decoder.layers.18.bias"));
    let config = TinyConfig::read(dir.path()).unwrap();
    assert_eq!(config.factor(), 8);

    let decoder = TinyDecoder::load(dir.path(), DType::F32, &Device::Cpu, Kernels::Reference).unwrap();
    // Batch 2 and a non-square latent; latents beyond +-3 exercise the soft clamp.
    let latents = (Tensor::randn(0f32, 1.0, (2, 4, 5, 3), &Device::Cpu).unwrap() * 2.5).unwrap();
    let got = decoder.decode(&latents).unwrap();
    assert_eq!(got.dims(), &[2, 3, 40, 24]);
    let want = decode_by_hand(&tensors, &config, &latents);
    let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "decoder vs the tensors read by hand: {diff}");
    // Mid-range, not clipped flat: the comparisons below mean something.
    let bytes = to_bytes(&got);
    let distinct: std::collections::BTreeSet<u8> = bytes.iter().copied().collect();
    assert!(distinct.len() > 50, "{} distinct byte values", distinct.len());
}

#[test]
fn the_fast_kernels_decode_what_the_reference_ops_decode() {
    let dir = tiny_decoder(&TinyDecoderSpec::taesd());
    let load = |kernels| TinyDecoder::load(dir.path(), DType::F32, &Device::Cpu, kernels).unwrap();
    let (fast, reference) = (load(Kernels::Fast), load(Kernels::Reference));
    // 12x10 latents: 96x80 pixels, large enough for the Winograd paths at 64 channels.
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 12, 10), &Device::Cpu).unwrap();
    let a = to_bytes(&fast.decode(&latents).unwrap());
    let b = to_bytes(&reference.decode(&latents).unwrap());
    let diff = max_byte_diff(&a, &b);
    assert!(diff <= 2, "max pixel difference {diff}");
    assert!(a.iter().any(|&v| v != a[0]), "a flat image");
}

#[test]
fn decoding_by_strips_gives_the_whole_image() {
    let dir = tiny_decoder(&TinyDecoderSpec::taesd());
    for kernels in [Kernels::Fast, Kernels::Reference] {
        let decoder = TinyDecoder::load(dir.path(), DType::F32, &Device::Cpu, kernels).unwrap();
        // 13 latent rows: 104 output rows, cut into strips of 16 (the last one partial) and of 40.
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 13, 6), &Device::Cpu).unwrap();
        let whole = decoder.decode_in_strips(&latents, usize::MAX).unwrap();
        assert_eq!(whole.dims(), &[2, 3, 104, 48]);
        for rows in [16, 40] {
            let strips = decoder.decode_in_strips(&latents, rows).unwrap();
            assert_eq!(strips.dims(), whole.dims());
            let diff = (&strips - &whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{kernels:?}, strips of {rows} rows: max difference {diff}");
        }
    }
}

fn params(seed: u64) -> GenerateParams {
    GenerateParams {
        prompt: "a cute baby sea otter".into(),
        negative_prompt: String::new(),
        width: 80,
        height: 64,
        n: 1,
        steps: 3,
        guidance_scale: 0.0,
        seed,
        edit: None,
        partial_images: 0,
        decoder: Decoder::Full,
        sampler: engine::Sampler::Checkpoint,
    }
}

/// A tiny checkpoint loaded twice: with the matching tiny decoder, and without one.
struct Pair {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    with: Pipeline,
    without: Pipeline,
}

fn pair() -> Pair {
    let model = tempfile::tempdir().unwrap();
    write_checkpoint(model.path(), &TinySpec::default()).unwrap();
    let tiny = tiny_decoder(&TinyDecoderSpec::default());
    let options = LoadOptions { tiny_decoder: Some(tiny.path().to_path_buf()), ..LoadOptions::default() };
    let with = Pipeline::load_with(model.path(), &Device::Cpu, options).unwrap();
    let without = Pipeline::load(model.path(), &Device::Cpu).unwrap();
    Pair { _dirs: (model, tiny), with, without }
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    max_byte_diff(a.as_raw(), b.as_raw())
}

#[test]
fn a_pipeline_asked_for_the_tiny_decoder_uses_it_and_otherwise_the_full_one() {
    let p = pair();
    assert!(p.with.has_tiny_decoder() && !p.without.has_tiny_decoder());
    let tiny = p.with.generate(&GenerateParams { decoder: Decoder::Tiny, ..params(4) }, &mut engine::NoHooks).unwrap();
    let full = p.with.generate(&params(4), &mut engine::NoHooks).unwrap();
    let plain = p.without.generate(&params(4), &mut engine::NoHooks).unwrap();
    assert_eq!(tiny[0].dimensions(), (80, 64));
    // Full stays the checkpoint's own decoder, loaded tiny decoder or not.
    assert_eq!(full[0], plain[0]);
    let diff = max_diff(&tiny[0], &full[0]);
    assert!(diff > 20, "the tiny decoder's image is the full one's (max difference {diff})");
    let first = tiny[0].get_pixel(0, 0);
    assert!(tiny[0].pixels().any(|px| px != first), "a flat image");
    // Seeded like every other image.
    let again = p.with.generate(&GenerateParams { decoder: Decoder::Tiny, ..params(4) }, &mut engine::NoHooks).unwrap();
    assert_eq!(tiny[0], again[0]);
    // A batch decodes each image by the tiny decoder too.
    let batch =
        p.with.generate(&GenerateParams { decoder: Decoder::Tiny, n: 2, ..params(4) }, &mut engine::NoHooks).unwrap();
    assert!(max_diff(&batch[0], &tiny[0]) <= 2);
}

#[test]
fn asking_for_the_tiny_decoder_without_one_says_what_to_pull() {
    let model = tempfile::tempdir().unwrap();
    write_checkpoint(model.path(), &TinySpec::default()).unwrap();
    let p = Pipeline::load(model.path(), &Device::Cpu).unwrap();
    let e = p.generate(&GenerateParams { decoder: Decoder::Tiny, ..params(1) }, &mut engine::NoHooks).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, EngineError::InvalidInput(_)), "{msg}");
    assert!(msg.contains("tiny decoder") && msg.contains("imagegate models pull taesd"), "{msg}");
}

struct Collect(Vec<RgbImage>);

impl Hooks for Collect {
    fn partial(&mut self, _image: usize, _index: usize, image: RgbImage) {
        self.0.push(image);
    }
}

#[test]
fn partial_images_come_from_the_tiny_decoder_when_one_is_loaded() {
    let p = pair();
    let run = |pipeline: &Pipeline| {
        let mut hooks = Collect(Vec::new());
        let out = pipeline.generate(&GenerateParams { steps: 4, partial_images: 2, ..params(6) }, &mut hooks).unwrap();
        (hooks.0, out)
    };
    let (tiny_partials, tiny_out) = run(&p.with);
    let (full_partials, full_out) = run(&p.without);
    assert_eq!(tiny_partials.len(), 2);
    assert_eq!(full_partials.len(), 2);
    assert!(tiny_partials.iter().all(|img| img.dimensions() == (80, 64)));
    // The same latents: the final images (full decoder) agree, the previews do not.
    assert_eq!(tiny_out[0], full_out[0]);
    for (t, f) in tiny_partials.iter().zip(&full_partials) {
        assert!(max_diff(t, f) > 20, "a preview from the full decoder although a tiny one is loaded");
    }
}

#[test]
fn broken_tiny_decoders_are_refused_naming_the_file_and_the_tensor() {
    let model = tempfile::tempdir().unwrap();
    write_checkpoint(model.path(), &TinySpec::default()).unwrap();
    let load = |tiny: &Path| {
        let options = LoadOptions { tiny_decoder: Some(tiny.to_path_buf()), ..LoadOptions::default() };
        Pipeline::load_with(model.path(), &Device::Cpu, options).err().unwrap().to_string()
    };

    let dir = tiny_decoder(&TinyDecoderSpec::default());
    remove_tensor(&weights(dir.path()), "decoder.layers.3.conv.2.weight").unwrap();
    let msg = load(dir.path());
    assert!(
        msg.contains("diffusion_pytorch_model.safetensors") && msg.contains("decoder.layers.3.conv.2.weight"),
        "{msg}"
    );

    let dir = tiny_decoder(&TinyDecoderSpec::default());
    replace_tensor(&weights(dir.path()), "decoder.layers.0.weight").unwrap();
    let msg = load(dir.path());
    assert!(msg.contains("diffusion_pytorch_model.safetensors") && msg.contains("decoder.layers.0.weight"), "{msg}");

    std::fs::remove_file(weights(dir.path())).unwrap();
    let msg = load(dir.path());
    assert!(msg.contains("missing file") && msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let msg = load(dir.path());
    assert!(msg.contains("missing file") && msg.contains("config.json"), "{msg}");

    // The published 8x decoder does not fit the tiny checkpoint's 2x VAE; other latent widths neither.
    let dir = tiny_decoder(&TinyDecoderSpec::taesd());
    let msg = load(dir.path());
    assert!(msg.contains("config.json") && msg.contains("upsampling_scaling_factor"), "{msg}");
    let dir = tiny_decoder(&TinyDecoderSpec { latent_channels: 16, ..TinyDecoderSpec::default() });
    let msg = load(dir.path());
    assert!(msg.contains("config.json") && msg.contains("latent_channels") && msg.contains("16"), "{msg}");
}

#[test]
fn configs_the_decoder_cannot_run_are_refused_naming_the_key() {
    let dir = tiny_decoder(&TinyDecoderSpec::default());
    let path = dir.path().join("config.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (key, value) in [
        ("act_fn", serde_json::json!("silu")),
        ("upsample_fn", serde_json::json!("bilinear")),
        ("decoder_block_out_channels", serde_json::json!([16, 32])),
        ("num_decoder_blocks", serde_json::json!([3, 3, 1])),
        ("_class_name", serde_json::json!("AutoencoderKL")),
        ("out_channels", serde_json::json!(4)),
    ] {
        let mut config = original.clone();
        config[key] = value;
        std::fs::write(&path, config.to_string()).unwrap();
        let e = TinyConfig::read(dir.path()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, EngineError::Unsupported { .. }) && msg.contains(key), "{key}: {msg}");
    }
    // diffusers' defaults fill in what a config leaves out: TAESD's shape.
    std::fs::write(&path, r#"{"_class_name": "AutoencoderTiny"}"#).unwrap();
    let config = TinyConfig::read(dir.path()).unwrap();
    assert_eq!((config.factor(), config.latent_channels, config.scaling_factor), (8, 4, 1.0));
}

/// The KL decoder is read on the first full decode: a generation with the tiny decoder never needs
/// it, so one whose VAE lacks a decoder tensor still runs, and the first full decode names the file
/// and the tensor. A VAE file that is missing or not a safetensors file is refused at load all the same.
#[test]
fn the_full_decoder_is_read_on_first_use_and_a_broken_file_refused_at_load() {
    let model = tempfile::tempdir().unwrap();
    write_checkpoint(model.path(), &TinySpec::default()).unwrap();
    let tiny = tiny_decoder(&TinyDecoderSpec::default());
    let vae = model.path().join("vae/diffusion_pytorch_model.safetensors");
    remove_tensor(&vae, "decoder.conv_out.weight").unwrap();
    let options = LoadOptions { tiny_decoder: Some(tiny.path().to_path_buf()), ..LoadOptions::default() };
    let p = Pipeline::load_with(model.path(), &Device::Cpu, options.clone()).unwrap();
    let images = p.generate(&GenerateParams { decoder: Decoder::Tiny, ..params(2) }, &mut engine::NoHooks).unwrap();
    assert_eq!(images[0].dimensions(), (80, 64));
    let e = p.generate(&params(2), &mut engine::NoHooks).unwrap_err().to_string();
    assert!(e.contains("diffusion_pytorch_model.safetensors") && e.contains("decoder.conv_out.weight"), "{e}");

    std::fs::write(&vae, b"not a safetensors file").unwrap();
    let e = Pipeline::load_with(model.path(), &Device::Cpu, options.clone()).err().unwrap().to_string();
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    std::fs::remove_file(&vae).unwrap();
    let e = Pipeline::load_with(model.path(), &Device::Cpu, options).err().unwrap().to_string();
    assert!(e.contains("vae"), "{e}");
}

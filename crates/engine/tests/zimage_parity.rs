#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Reference parity for the Z-Image family: a tiny random Z-Image checkpoint saved by diffusers and
//! transformers (`tests/parity/zimage-tiny`), and what they compute on it
//! (`tests/parity/zimage-tiny-reference.safetensors`, written by `tests/parity/make_zimage_fixtures.py`,
//! which says what each entry is and how to regenerate them). Token ids exactly; the text encoder,
//! the transformer and the VAE within 1e-4 of the reference's largest magnitude; schedules to f32
//! rounding; whole pipelines (given diffusers' noise) within 1 level of diffusers' 8-bit image.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use engine::flow_match::{FlowMatch, FlowMatchFile};
use engine::zimage::{ZImageCheckpoint, ZImagePipeline};
use engine::{Draw, Edit, GenerateParams, Hooks, Kernels, LoadOptions, NoHooks};

mod common;

use common::{DiffusersNoise, levels_off, relative_error};

const TOLERANCE: f32 = 1e-4;
const PROMPT: &str = "a cute baby sea otter!";
const WIDTH: u32 = 72;
const HEIGHT: u32 = 80;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/parity/zimage-tiny")
}

struct Reference(std::collections::HashMap<String, Tensor>);

impl Reference {
    fn load() -> Reference {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/parity/zimage-tiny-reference.safetensors");
        Reference(candle_core::safetensors::load(path, &Device::Cpu).unwrap())
    }

    fn get(&self, name: &str) -> &Tensor {
        self.0.get(name).unwrap_or_else(|| panic!("the reference has no {name}"))
    }
}

fn pipeline(kernels: Kernels) -> ZImagePipeline {
    ZImagePipeline::load(&dir(), &Device::Cpu, LoadOptions { kernels, ..Default::default() }).unwrap()
}

#[test]
fn chat_templated_token_ids_are_transformers_ids() {
    let r = Reference::load();
    let p = pipeline(Kernels::Fast);
    for (key, prompt) in [("ids", PROMPT), ("ids_uncond", "")] {
        let want: Vec<i64> = r.get(key).to_vec1().unwrap();
        let got: Vec<i64> = p.prompt_ids(prompt).unwrap().into_iter().map(i64::from).collect();
        assert_eq!(got, want, "{prompt:?}");
    }
}

#[test]
fn the_text_encoder_gives_the_hidden_states_diffusers_takes() {
    let r = Reference::load();
    let p = pipeline(Kernels::Fast);
    for (key, prompt) in [("text", PROMPT), ("text_uncond", "")] {
        let e = relative_error(&p.encode_prompt(prompt).unwrap(), r.get(key));
        assert!(e < TOLERANCE, "{key}: {e}");
    }
}

#[test]
fn the_transformer_gives_diffusers_output_on_both_kernel_sets() {
    let r = Reference::load();
    let t: f32 = r.get("tr_t").to_vec1::<f32>().unwrap()[0];
    for kernels in [Kernels::Reference, Kernels::Fast] {
        let p = pipeline(kernels);
        for (caption, want) in [("text", "tr_out"), ("text_uncond", "tr_out_uncond")] {
            let out = p.transformer().forward(r.get("tr_x"), t, r.get(caption)).unwrap();
            let e = relative_error(&out, r.get(want));
            assert!(e < TOLERANCE, "{kernels:?}, {want}: {e}");
        }
    }
}

#[test]
fn the_schedules_are_diffusers_schedules() {
    let r = Reference::load();
    let ckpt = ZImageCheckpoint::open(&dir()).unwrap();
    let mut dynamic = ckpt.scheduler.clone();
    dynamic.use_dynamic_shifting = true;
    let tokens = (HEIGHT as usize / 4) * (WIDTH as usize / 4);
    let close = |got: &[f32], want: &Tensor, what: &str| {
        let want: Vec<f32> = want.to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{what}: {got:?} against {want:?}");
        }
    };
    for steps in [1, 2, 4, 8] {
        let s = FlowMatch::new(&ckpt.scheduler, steps, tokens).unwrap();
        close(s.sigmas(), r.get(&format!("sched.{steps}.sigmas")), &format!("{steps} sigmas"));
        close(s.timesteps(), r.get(&format!("sched.{steps}.timesteps")), &format!("{steps} timesteps"));
        let d = FlowMatch::new(&dynamic, steps, tokens).unwrap();
        close(d.sigmas(), r.get(&format!("sched_dyn.{steps}.sigmas")), &format!("{steps} dynamic sigmas"));
    }
    // The file says what diffusers wrote.
    let _: FlowMatchFile = ckpt.scheduler;
}

#[test]
fn the_vae_decoder_gives_diffusers_pixels() {
    let r = Reference::load();
    let p = pipeline(Kernels::Fast);
    let e = relative_error(&p.decode_raw(r.get("vae_latents")).unwrap(), r.get("vae_out"));
    assert!(e < TOLERANCE, "{e}");
}

fn params(steps: usize, guidance_scale: f64) -> GenerateParams {
    GenerateParams {
        prompt: PROMPT.into(),
        negative_prompt: String::new(),
        width: WIDTH,
        height: HEIGHT,
        n: 1,
        steps,
        guidance_scale,
        seed: 0,
        edit: None,
        partial_images: 0,
        decoder: engine::Decoder::Full,
        sampler: engine::Sampler::Checkpoint,
    }
}

#[test]
fn text_to_image_gives_diffusers_pixels_with_and_without_guidance() {
    let r = Reference::load();
    let p = pipeline(Kernels::Fast);
    for (key, guidance) in [("pipe_g0", 0.0), ("pipe_g3", 3.0)] {
        let mut noise = DiffusersNoise::new(r.get("pipe_noise"));
        let images = p.generate(&params(2, guidance), &mut noise).unwrap();
        let worst = levels_off(&images[0], r.get(key), |_, _| true);
        assert!(worst <= 1, "{key}: {worst} levels off");
    }
}

fn edit_inputs(r: &Reference) -> (image::RgbImage, image::GrayImage) {
    let image: Vec<u8> = r.get("edit_image").flatten_all().unwrap().to_vec1().unwrap();
    let mask: Vec<u8> = r.get("edit_mask").flatten_all().unwrap().to_vec1().unwrap();
    (image::RgbImage::from_raw(WIDTH, HEIGHT, image).unwrap(), image::GrayImage::from_raw(WIDTH, HEIGHT, mask).unwrap())
}

#[test]
fn image_to_image_gives_diffusers_pixels() {
    // The input's latents are sampled from the VAE's distribution (the generator's first draw), then
    // noised to the first of the 3 steps that 4 steps at strength 0.6 run.
    let r = Reference::load();
    let p = pipeline(Kernels::Fast);
    let (image, _) = edit_inputs(&r);
    let request =
        GenerateParams { edit: Some(Edit { images: vec![image], mask: None, strength: 0.6 }), ..params(4, 0.0) };
    let mut noise = DiffusersNoise::new(r.get("i2i.noise")).with(Draw::Image(0), r.get("i2i.image_noise"));
    let images = p.generate(&request, &mut noise).unwrap();
    let worst = levels_off(&images[0], r.get("pipe_i2i"), |_, _| true);
    assert!(worst <= 1, "{worst} levels off");
}

#[test]
fn inpainting_gives_diffusers_pixels_inside_the_mask_and_the_input_outside() {
    let r = Reference::load();
    let p = pipeline(Kernels::Fast);
    let (image, mask) = edit_inputs(&r);
    let edit = Edit { images: vec![image.clone()], mask: Some(mask.clone()), strength: 1.0 };
    let request = GenerateParams { edit: Some(edit), ..params(3, 0.0) };
    let mut noise = DiffusersNoise::new(r.get("inp.noise")).with(Draw::Image(0), r.get("inp.image_noise"));
    let got = &p.generate(&request, &mut noise).unwrap()[0];
    let inside = |x: u32, y: u32| mask.get_pixel(x, y).0[0] == 255;
    let worst = levels_off(got, r.get("pipe_inp"), inside);
    assert!(worst <= 1, "{worst} levels off inside the mask");
    for (x, y, px) in got.enumerate_pixels() {
        if !inside(x, y) {
            assert_eq!(px, image.get_pixel(x, y), "pixel {x},{y} outside the mask changed");
        }
    }
}

#[test]
fn a_batch_of_n_equals_the_same_seeds_one_at_a_time() {
    // Text-to-image with and without guidance, and inpainting below full strength; in one batch and
    // in batches of 2 and 1. A batch runs other matrix shapes, so the floats may round differently:
    // at most one level apart.
    let mut p = pipeline(Kernels::Fast);
    let (image, mask) = edit_inputs(&Reference::load());
    let edit = Edit { images: vec![image], mask: Some(mask), strength: 0.8 };
    for request in [params(2, 0.0), params(2, 2.0), GenerateParams { edit: Some(edit), ..params(3, 0.0) }] {
        let alone: Vec<image::RgbImage> = (0..3)
            .map(|i| p.generate(&GenerateParams { n: 1, seed: 40 + i, ..request.clone() }, &mut NoHooks).unwrap())
            .map(|mut images| images.remove(0))
            .collect();
        for max_batch in [3, 2] {
            p.max_batch = max_batch;
            let batch = p.generate(&GenerateParams { n: 3, seed: 40, ..request.clone() }, &mut NoHooks).unwrap();
            assert_eq!(batch.len(), 3);
            for (i, (image, single)) in batch.iter().zip(&alone).enumerate() {
                let diff = image.as_raw().iter().zip(single.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
                assert!(diff <= 1, "batches of {max_batch}: image {i} differs from its seed alone by {diff} levels");
            }
        }
        assert!(alone[0] != alone[1], "different seeds gave the same image");
    }
}

/// Copies the fixture checkpoint into `to`, with the transformer's and the text encoder's weights split
/// into three shards and an index, as the hub repository ships them.
fn sharded_copy(to: &std::path::Path) {
    let from = dir();
    for entry in ["model_index.json", "scheduler", "tokenizer", "vae", "transformer", "text_encoder"] {
        let src = from.join(entry);
        if src.is_file() {
            std::fs::copy(&src, to.join(entry)).unwrap();
            continue;
        }
        std::fs::create_dir_all(to.join(entry)).unwrap();
        for file in std::fs::read_dir(&src).unwrap() {
            let file = file.unwrap().path();
            let name = file.file_name().unwrap().to_str().unwrap().to_owned();
            let (stem, shard_stem) = match name.as_str() {
                "diffusion_pytorch_model.safetensors" => ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                "model.safetensors" => ("model", "model"),
                _ => {
                    std::fs::copy(&file, to.join(entry).join(&name)).unwrap();
                    continue;
                }
            };
            let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            let mut map = serde_json::Map::new();
            for (i, chunk) in names.chunks(names.len().div_ceil(3)).enumerate() {
                let shard = format!("{shard_stem}-0000{}-of-00003.safetensors", i + 1);
                let part: std::collections::HashMap<String, Tensor> =
                    chunk.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
                candle_core::safetensors::save(&part, to.join(entry).join(&shard)).unwrap();
                for n in chunk {
                    map.insert((*n).clone(), serde_json::Value::String(shard.clone()));
                }
            }
            let index = serde_json::json!({ "metadata": {}, "weight_map": map });
            std::fs::write(to.join(entry).join(format!("{stem}.safetensors.index.json")), index.to_string()).unwrap();
        }
    }
}

#[test]
fn sharded_weights_load_and_compute_the_same() {
    let r = Reference::load();
    let tmp = tempfile::tempdir().unwrap();
    sharded_copy(tmp.path());
    assert!(tmp.path().join("transformer/diffusion_pytorch_model-00003-of-00003.safetensors").is_file());
    assert!(!tmp.path().join("transformer/diffusion_pytorch_model.safetensors").exists());
    let sharded = ZImagePipeline::load(tmp.path(), &Device::Cpu, LoadOptions::default()).unwrap();
    let single = pipeline(Kernels::Fast);
    let t: f32 = r.get("tr_t").to_vec1::<f32>().unwrap()[0];
    let a = sharded.transformer().forward(r.get("tr_x"), t, r.get("text")).unwrap();
    let b = single.transformer().forward(r.get("tr_x"), t, r.get("text")).unwrap();
    assert_eq!(relative_error(&a, &b), 0.0);
    let e = relative_error(&sharded.encode_prompt(PROMPT).unwrap(), r.get("text"));
    assert!(e < TOLERANCE, "{e}");
    // A shard the index names that is missing is named in the error.
    std::fs::remove_file(tmp.path().join("text_encoder/model-00002-of-00003.safetensors")).unwrap();
    let e = ZImagePipeline::load(tmp.path(), &Device::Cpu, LoadOptions::default()).err().unwrap().to_string();
    assert!(e.contains("model-00002-of-00003.safetensors"), "{e}");
}

#[test]
fn a_checkpoint_the_engine_cannot_run_is_refused_by_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    sharded_copy(tmp.path());
    let config = tmp.path().join("transformer/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"cap_feat_dim\": 32", "\"cap_feat_dim\": 48")).unwrap();
    let e = engine::inspect(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("transformer/config.json") && e.contains("cap_feat_dim"), "{e}");
    std::fs::write(&config, text.replace("\"all_patch_size\": [\n    2\n  ]", "\"all_patch_size\": [\n    4\n  ]"))
        .unwrap();
    let e = engine::inspect(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("all_patch_size"), "{e}");
    std::fs::write(&config, &text).unwrap();
    let info = engine::inspect(tmp.path()).unwrap();
    assert_eq!((info.family, info.size_multiple, info.max_side), (engine::Family::ZImage, 4, 256));
    let index = tmp.path().join("model_index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, text.replace("ZImagePipeline", "QwenImagePipeline")).unwrap();
    let e = engine::inspect(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("model_index.json") && e.contains("QwenImagePipeline"), "{e}");
}

struct Collect {
    partials: Vec<(usize, usize, image::RgbImage)>,
    steps: usize,
    cancel_after: Option<usize>,
}

impl Hooks for Collect {
    fn after_step(&mut self, _step: usize) {
        self.steps += 1;
    }
    fn cancelled(&self) -> bool {
        self.cancel_after.is_some_and(|n| self.steps >= n)
    }
    fn partial(&mut self, image: usize, index: usize, partial: image::RgbImage) {
        self.partials.push((image, index, partial));
    }
}

#[test]
fn partial_images_come_from_intermediate_steps_and_a_run_stops_between_steps() {
    let p = pipeline(Kernels::Fast);
    let mut hooks = Collect { partials: vec![], steps: 0, cancel_after: None };
    let request = GenerateParams { n: 2, partial_images: 2, ..params(3, 0.0) };
    let images = p.generate(&request, &mut hooks).unwrap();
    let mut got: Vec<(usize, usize)> = hooks.partials.iter().map(|(i, k, _)| (*i, *k)).collect();
    got.sort_unstable();
    assert_eq!(got, [(0, 0), (0, 1), (1, 0), (1, 1)]);
    for (_, _, partial) in &hooks.partials {
        assert_eq!(partial.dimensions(), (WIDTH, HEIGHT));
        assert!(images.iter().all(|final_image| final_image != partial));
    }
    let mut hooks = Collect { partials: vec![], steps: 0, cancel_after: Some(1) };
    let e = p.generate(&params(3, 0.0), &mut hooks).unwrap_err();
    assert!(matches!(e, engine::EngineError::Cancelled), "{e}");
    assert_eq!(hooks.steps, 1);
}

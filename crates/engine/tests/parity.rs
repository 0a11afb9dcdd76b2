#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Reference parity: tiny SD 1.x-, SD 2.x-, SDXL-style and 9-channel inpainting checkpoints saved by
//! diffusers and transformers themselves (`tests/parity/sd15-tiny`, `sd2-tiny`, `sdxl-tiny`,
//! `sd15-inpaint-tiny`), and what they compute on them (`tests/parity/*-reference.safetensors`, written by
//! `tests/parity/make_fixtures.py`, which says how to regenerate them). Every stage is compared: token
//! ids exactly, tensors within 1e-4 of the reference's largest magnitude, whole pipelines (given
//! diffusers' noise) within 1 level of diffusers' 8-bit image.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use engine::scheduler::Scheduler;
use engine::sd::checkpoint::SchedulerFile;
use engine::sd::unet::Unet;
use engine::text::clip::TextEncoder;
use engine::text::clip_tokenizer::ClipTokenizer;
use engine::vae::decoder::VaeDecoder;
use engine::{Checkpoint, Kernels};

mod common;

use common::{DiffusersNoise, levels_off, relative_error};

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/parity")
}

struct Fixture {
    ckpt: Checkpoint,
    reference: std::collections::HashMap<String, Tensor>,
}

fn fixture(name: &str) -> Fixture {
    let dir = fixtures();
    let ckpt = Checkpoint::open(&dir.join(name)).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join(format!("{name}-reference.safetensors")), &Device::Cpu).unwrap();
    Fixture { ckpt, reference }
}

/// SD 1.x style (QuickGELU, pad token `<|endoftext|>`, Euler, epsilon).
fn sd15() -> Fixture {
    fixture("sd15-tiny")
}

/// Both checkpoints; SD 2.x style: GELU, pad token `!`, a linear-projection UNet with heads per block,
/// DDIM at its default spacing, v-prediction.
fn both() -> [(&'static str, Fixture); 2] {
    [("sd15", sd15()), ("sd2", fixture("sd2-tiny"))]
}

impl Fixture {
    fn get(&self, name: &str) -> &Tensor {
        self.reference.get(name).unwrap_or_else(|| panic!("the reference has no {name}"))
    }

    fn weights(&self, component: &str) -> VarBuilder<'static> {
        let path = self.ckpt.weights(component).unwrap();
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
    }
}

#[test]
fn token_ids_are_transformers_ids() {
    for (name, f) in both() {
        // transformers 5 saved only tokenizer.json: the engine reads the vocabulary and merges from it.
        assert!(!f.ckpt.dir.join("tokenizer/vocab.json").exists());
        let tokenizer = ClipTokenizer::load(&f.ckpt.dir.join("tokenizer"), 77).unwrap();
        for (key, prompt) in [("ids", "a cute baby sea otter!"), ("ids_uncond", "")] {
            let want: Vec<i64> = f.get(key).flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<i64> = tokenizer.encode(prompt).unwrap().into_iter().map(i64::from).collect();
            assert_eq!(got, want, "{name}: {prompt:?}");
        }
    }
}

#[test]
fn the_text_encoder_gives_transformers_hidden_states() {
    for (name, f) in both() {
        let encoder = TextEncoder::new(f.weights("text_encoder").into(), &f.ckpt.text_encoder).unwrap();
        for key in ["", "_uncond"] {
            let ids = f.get(&format!("ids{key}")).to_dtype(DType::U32).unwrap();
            let e = relative_error(&encoder.forward(&ids).unwrap(), f.get(&format!("text{key}")));
            assert!(e < TOLERANCE, "{name}, text{key}: {e}");
        }
    }
}

#[test]
fn the_unet_gives_diffusers_output_on_both_kernel_sets() {
    for (name, f) in both() {
        let config = f.ckpt.unet_config().unwrap();
        let context = Tensor::cat(&[f.get("text"), f.get("text_uncond")], 0).unwrap();
        for kernels in [Kernels::Reference, Kernels::Fast] {
            let unet = Unet::new(f.weights("unet").into(), &config, kernels).unwrap();
            let out = unet.forward(f.get("unet_sample"), 801.0, &context, None).unwrap();
            let e = relative_error(&out, f.get("unet_out"));
            assert!(e < TOLERANCE, "{name}, {kernels:?}: {e}");
        }
    }
}

#[test]
fn the_vae_decoder_gives_diffusers_pixels_for_a_batch_of_3() {
    for (name, f) in both() {
        let config = f.ckpt.vae_config().unwrap();
        for kernels in [Kernels::Reference, Kernels::Fast] {
            let vae = VaeDecoder::load(f.weights("vae").into(), &config, kernels).unwrap();
            let out = vae.decode(f.get("vae_latents")).unwrap();
            for i in 0..3 {
                let e = relative_error(&out.get(i).unwrap(), &f.get("vae_out").get(i).unwrap());
                assert!(e < TOLERANCE, "{name}, {kernels:?}, image {i}: {e}");
            }
        }
    }
}

#[test]
fn every_scheduler_takes_diffusers_timesteps_and_sigmas() {
    let f = sd15();
    let mut failures = Vec::new();
    for class in ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler", DPM] {
        // DPM-Solver's Karras sigmas are written as a spacing of their own (they replace the spacing).
        let karras = if class == DPM { &["karras"][..] } else { &[] };
        for spacing in ["leading", "linspace", "trailing"].iter().chain(karras) {
            for steps in [1, 2, 4, 16, 25] {
                let config = match *spacing {
                    "karras" => dpm_config(&f, &[("use_karras_sigmas", serde_json::json!(true))]),
                    spacing => SchedulerFile {
                        class_name: class.into(),
                        timestep_spacing: Some(spacing.into()),
                        ..f.ckpt.scheduler.clone()
                    },
                };
                let s = Scheduler::new(&config, steps).unwrap();
                let name = format!("sched.{class}.{spacing}.{steps}");
                let want: Vec<f64> = f.get(&format!("{name}.timesteps")).to_vec1().unwrap();
                // diffusers keeps timesteps in float32 (66.6 is 66.6000061 there).
                let close = s.timesteps().len() == want.len()
                    && s.timesteps().iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-4);
                if !close {
                    failures.push(format!("{name}: timesteps {:?}, diffusers {want:?}", s.timesteps()));
                }
                if let Some(sigmas) = f.reference.get(&format!("{name}.sigmas")) {
                    let want: Vec<f64> = sigmas.to_vec1().unwrap();
                    let close = s.sigmas().len() == want.len()
                        && s.sigmas().iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0));
                    if !close {
                        failures.push(format!("{name}: sigmas {:?}, diffusers {want:?}", s.sigmas()));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn one_step_of_each_deterministic_sampler_is_diffusers_step() {
    let f = sd15();
    let (sample, model_output) = (f.get("step_sample"), f.get("step_model_output"));
    for class in ["EulerDiscreteScheduler", "DDIMScheduler"] {
        for spacing in ["leading", "linspace", "trailing"] {
            for prediction in ["epsilon", "v_prediction"] {
                let config = SchedulerFile {
                    class_name: class.into(),
                    timestep_spacing: Some(spacing.into()),
                    prediction_type: prediction.into(),
                    ..f.ckpt.scheduler.clone()
                };
                for steps in [1, 2, 4, 16, 25] {
                    let mut s = Scheduler::new(&config, steps).unwrap();
                    let got = s.step(model_output, 1.min(steps - 1), sample, None).unwrap();
                    let e = relative_error(&got, f.get(&format!("step.{class}.{spacing}.{prediction}.{steps}")));
                    assert!(e < TOLERANCE, "{class}, {spacing}, {prediction}, {steps} steps: {e}");
                }
            }
        }
    }
}

const DPM: &str = "DPMSolverMultistepScheduler";

/// sd15-tiny's scheduler config as DPM-Solver++ (linspace, its default spacing) with `keys` set.
fn dpm_config(f: &Fixture, keys: &[(&str, serde_json::Value)]) -> SchedulerFile {
    let mut config =
        SchedulerFile { class_name: DPM.into(), timestep_spacing: Some("linspace".into()), ..f.ckpt.scheduler.clone() };
    for (key, value) in keys {
        config.other.insert((*key).into(), value.clone());
    }
    config
}

#[test]
fn dpm_solver_runs_are_diffusers_runs() {
    // Whole runs over given model outputs: the multistep history, the first and last steps' lower order,
    // both second-order formulas, both final sigmas, both prediction types, with and without Karras
    // sigmas, at 4 steps and at 16 (where a final sigma_min keeps the second order to the end).
    let f = sd15();
    let outputs = f.get("dpm_outputs");
    for karras in [false, true] {
        for prediction in ["epsilon", "v_prediction"] {
            for solver in ["midpoint", "heun"] {
                for last in ["zero", "sigma_min"] {
                    for steps in [4, 16] {
                        if karras && solver == "heun" && last == "sigma_min" {
                            // A last step of length 0, where diffusers' heun formula gives NaN (the engine
                            // takes its limit, 0).
                            continue;
                        }
                        let mut config = dpm_config(
                            &f,
                            &[
                                ("use_karras_sigmas", serde_json::json!(karras)),
                                ("solver_type", serde_json::json!(solver)),
                                ("final_sigmas_type", serde_json::json!(last)),
                            ],
                        );
                        config.prediction_type = prediction.into();
                        let mut s = Scheduler::new(&config, steps).unwrap();
                        let mut x = f.get("dpm_sample").clone();
                        for k in 0..steps {
                            x = s.step(&outputs.narrow(0, k, 1).unwrap(), k, &x, None).unwrap();
                        }
                        let name = format!(
                            "dpm.{}.{prediction}.{solver}.{last}.{steps}",
                            if karras { "karras" } else { "plain" }
                        );
                        let e = relative_error(&x, f.get(&name));
                        assert!(e < TOLERANCE, "{name}: {e}");
                    }
                }
            }
        }
    }
}

/// The fixtures' whole-pipeline request: the prompt, 64x80, one image.
fn pipeline_params(steps: usize, guidance_scale: f64) -> engine::GenerateParams {
    engine::GenerateParams {
        prompt: "a cute baby sea otter!".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 80,
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
    for (name, f) in both() {
        let pipeline = engine::sd::SdPipeline::load(&f.ckpt.dir, &Device::Cpu).unwrap();
        for (key, guidance) in [("pipe_g0", 0.0), ("pipe_g75", 7.5)] {
            let params = pipeline_params(2, guidance);
            let images = pipeline.generate(&params, &mut DiffusersNoise::new(f.get("pipe_noise"))).unwrap();
            let worst = levels_off(&images[0], f.get(key), |_, _| true);
            assert!(worst <= 1, "{name}, guidance {guidance}: {worst} levels off");
        }
    }
}

#[test]
fn euler_ancestral_with_diffusers_noise_gives_diffusers_pixels() {
    let f = sd15();
    let mut pipeline = engine::sd::SdPipeline::load(&f.ckpt.dir, &Device::Cpu).unwrap();
    pipeline.checkpoint.scheduler.class_name = "EulerAncestralDiscreteScheduler".into();
    let params = pipeline_params(3, 7.5);
    let noise = f.get("eulera_noise");
    let mut hooks = DiffusersNoise::new(f.get("pipe_noise"));
    for k in 0..3 {
        hooks = hooks.with(engine::Draw::Step(k), &noise.narrow(0, k, 1).unwrap());
    }
    let images = pipeline.generate(&params, &mut hooks).unwrap();
    let worst = levels_off(&images[0], f.get("pipe_eulera"), |_, _| true);
    assert!(worst <= 1, "{worst} levels off");
}

#[test]
fn dpm_solver_2m_karras_gives_diffusers_pixels() {
    let f = sd15();
    // The sampler the standard profile picks, over the checkpoint's own (Euler) config.
    let pipeline = engine::sd::SdPipeline::load(&f.ckpt.dir, &Device::Cpu).unwrap();
    let params = engine::GenerateParams { sampler: engine::Sampler::DpmSolver2mKarras, ..pipeline_params(4, 7.5) };
    let images = pipeline.generate(&params, &mut DiffusersNoise::new(f.get("pipe_noise"))).unwrap();
    let worst = levels_off(&images[0], f.get("pipe_dpm"), |_, _| true);
    assert!(worst <= 1, "{worst} levels off");
}

/// The edits' input image and mask.
fn edit_inputs(f: &Fixture) -> (image::RgbImage, image::GrayImage) {
    let image: Vec<u8> = f.get("edit_image").flatten_all().unwrap().to_vec1().unwrap();
    let mask: Vec<u8> = f.get("edit_mask").flatten_all().unwrap().to_vec1().unwrap();
    (image::RgbImage::from_raw(64, 80, image).unwrap(), image::GrayImage::from_raw(64, 80, mask).unwrap())
}

fn edit_params(f: &Fixture, steps: usize, strength: f64, masked: bool) -> engine::GenerateParams {
    let (image, mask) = edit_inputs(f);
    let edit = engine::Edit { images: vec![image], mask: masked.then_some(mask), strength };
    engine::GenerateParams { edit: Some(edit), ..pipeline_params(steps, 7.5) }
}

#[test]
fn image_to_image_gives_diffusers_pixels() {
    // The input's latents are sampled from the VAE's distribution (diffusers' first draw), then noised.
    let f = sd15();
    let pipeline = engine::sd::SdPipeline::load(&f.ckpt.dir, &Device::Cpu).unwrap();
    let mut noise = DiffusersNoise::new(f.get("i2i.noise")).with(engine::Draw::Image(0), f.get("i2i.image_noise"));
    let images = pipeline.generate(&edit_params(&f, 4, 0.6, false), &mut noise).unwrap();
    let worst = levels_off(&images[0], f.get("pipe_i2i"), |_, _| true);
    assert!(worst <= 1, "{worst} levels off");
}

/// Inpainting output against diffusers' inside the mask, and exactly the input outside it (the engine
/// keeps unmasked pixels; diffusers returns its own decode there).
fn assert_inpainted(got: &image::RgbImage, f: &Fixture, want: &Tensor, label: &str) {
    let (input, mask) = edit_inputs(f);
    let inside = |x: u32, y: u32| mask.get_pixel(x, y).0[0] == 255;
    let worst = levels_off(got, want, inside);
    assert!(worst <= 1, "{label}: {worst} levels off inside the mask");
    for (x, y, px) in got.enumerate_pixels() {
        if !inside(x, y) {
            assert_eq!(px, input.get_pixel(x, y), "{label}: pixel {x},{y} outside the mask changed");
        }
    }
}

#[test]
fn inpainting_by_blending_gives_diffusers_pixels() {
    let f = sd15();
    let pipeline = engine::sd::SdPipeline::load(&f.ckpt.dir, &Device::Cpu).unwrap();
    let mut noise =
        DiffusersNoise::new(f.get("inpaint4.noise")).with(engine::Draw::Image(0), f.get("inpaint4.image_noise"));
    let images = pipeline.generate(&edit_params(&f, 4, 0.75, true), &mut noise).unwrap();
    assert_inpainted(&images[0], &f, f.get("pipe_inpaint4"), "4 channels");
}

#[test]
fn a_9_channel_inpainting_unet_gives_diffusers_output_and_pixels() {
    let sd15 = sd15();
    let f = fixture("sd15-inpaint-tiny");
    let config = f.ckpt.unet_config().unwrap();
    for kernels in [Kernels::Reference, Kernels::Fast] {
        let unet = Unet::new(f.weights("unet").into(), &config, kernels).unwrap();
        let out = unet.forward(f.get("unet_sample"), 801.0, f.get("unet_context"), None).unwrap();
        let e = relative_error(&out, f.get("unet_out"));
        assert!(e < TOLERANCE, "{kernels:?}: {e}");
    }
    let pipeline = engine::sd::SdPipeline::load(&f.ckpt.dir, &Device::Cpu).unwrap();
    assert!(pipeline.is_inpainting());
    // At strength 1 the input's latents are never drawn: the initial noise, then the masked image's sample.
    let mut noise =
        DiffusersNoise::new(f.get("inpaint9.noise")).with(engine::Draw::MaskedImage, f.get("inpaint9.masked_noise"));
    let images = pipeline.generate(&edit_params(&sd15, 3, 1.0, true), &mut noise).unwrap();
    assert_inpainted(&images[0], &sd15, f.get("pipe_inpaint9"), "strength 1");
    let mut noise = DiffusersNoise::new(f.get("inpaint9s.noise"))
        .with(engine::Draw::Image(0), f.get("inpaint9s.image_noise"))
        .with(engine::Draw::MaskedImage, f.get("inpaint9s.masked_noise"));
    let images = pipeline.generate(&edit_params(&sd15, 4, 0.7, true), &mut noise).unwrap();
    assert_inpainted(&images[0], &sd15, f.get("pipe_inpaint9s"), "strength 0.7");
}

#[test]
fn sdxl_conditioning_unet_and_pipeline_are_diffusers() {
    let f = fixture("sdxl-tiny");
    let dir = &f.ckpt.dir;
    // Both tokenizers, both encoders at their penultimate layer side by side, the second's pooled projection.
    let mut penultimate = Vec::new();
    let mut pooled = None;
    for (key, part, config) in [
        ("ids", "text_encoder", &f.ckpt.text_encoder),
        ("ids_2", "text_encoder_2", f.ckpt.text_encoder_2.as_ref().unwrap()),
    ] {
        let tokenizer = ClipTokenizer::load(&dir.join(part.replace("text_encoder", "tokenizer")), 77).unwrap();
        let ids = tokenizer.encode("a cute baby sea otter!").unwrap();
        let want: Vec<i64> = f.get(key).flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ids.iter().map(|i| i64::from(*i)).collect::<Vec<_>>(), want, "{key}");
        let encoder = TextEncoder::new(f.weights(part).into(), config).unwrap();
        let out = encoder
            .forward_sdxl(
                &Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(),
                tokenizer.eos_position(&ids),
            )
            .unwrap();
        penultimate.push(out.penultimate);
        pooled = Some(out.pooled);
    }
    let e = relative_error(&Tensor::cat(&penultimate, 2).unwrap(), f.get("prompt_embeds"));
    assert!(e < TOLERANCE, "prompt embeds: {e}");
    let e = relative_error(&pooled.unwrap(), f.get("pooled"));
    assert!(e < TOLERANCE, "pooled: {e}");

    let config = f.ckpt.unet_config().unwrap();
    let added = engine::sd::unet::AddedCond {
        text_embeds: f.get("unet_text_embeds").clone(),
        time_ids: f.get("unet_time_ids").clone(),
    };
    for kernels in [Kernels::Reference, Kernels::Fast] {
        let unet = Unet::new(f.weights("unet").into(), &config, kernels).unwrap();
        let out = unet.forward(f.get("unet_sample"), 801.0, f.get("unet_context"), Some(&added)).unwrap();
        let e = relative_error(&out, f.get("unet_out"));
        assert!(e < TOLERANCE, "{kernels:?}: {e}");
    }

    let pipeline = engine::sd::SdPipeline::load(dir, &Device::Cpu).unwrap();
    for (key, guidance) in [("pipe_g0", 0.0), ("pipe_g75", 7.5)] {
        let images =
            pipeline.generate(&pipeline_params(2, guidance), &mut DiffusersNoise::new(f.get("pipe_noise"))).unwrap();
        let worst = levels_off(&images[0], f.get(key), |_, _| true);
        assert!(worst <= 1, "guidance {guidance}: {worst} levels off");
    }
}

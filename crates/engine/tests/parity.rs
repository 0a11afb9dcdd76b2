#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Reference parity: tiny SD 1.x- and SD 2.x-style checkpoints saved by diffusers and transformers
//! themselves (`tests/parity/sd15-tiny`, `sd2-tiny`), and what they compute on them
//! (`tests/parity/*-reference.safetensors`, written by `tests/parity/make_fixtures.py`, which says how to
//! regenerate them). Every stage is compared:
//! token ids exactly, tensors within 1e-4 of the reference's largest magnitude.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use engine::checkpoint::SchedulerFile;
use engine::scheduler::Scheduler;
use engine::text_encoder::TextEncoder;
use engine::tokenizer::ClipTokenizer;
use engine::unet::Unet;
use engine::vae_decoder::VaeDecoder;
use engine::{Checkpoint, Kernels};

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

/// The largest difference over the reference's largest magnitude.
fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let want = want.to_dtype(DType::F32).unwrap();
    let got = got.to_dtype(DType::F32).unwrap();
    let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff.is_finite() && scale > 0.0, "diff {diff}, scale {scale}");
    diff / scale
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
    for class in ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler"] {
        for spacing in ["leading", "linspace", "trailing"] {
            for steps in [1, 2, 4, 16, 25] {
                let config = SchedulerFile {
                    class_name: class.into(),
                    timestep_spacing: Some(spacing.into()),
                    ..f.ckpt.scheduler.clone()
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
                let s = Scheduler::new(&config, 4).unwrap();
                let got = s.step(model_output, 1, sample, None).unwrap();
                let e = relative_error(&got, f.get(&format!("step.{class}.{spacing}.{prediction}")));
                assert!(e < TOLERANCE, "{class}, {spacing}, {prediction}: {e}");
            }
        }
    }
}

/// diffusers' initial latents, and the ancestral sampler's noise at each step when given.
struct DiffusersNoise {
    initial: Tensor,
    steps: Vec<Tensor>,
}

impl DiffusersNoise {
    fn new(initial: &Tensor) -> DiffusersNoise {
        DiffusersNoise { initial: initial.clone(), steps: Vec::new() }
    }
}

impl engine::Hooks for DiffusersNoise {
    fn noise(&mut self, _seed: u64, step: Option<usize>, shape: (usize, usize, usize)) -> Option<Tensor> {
        let t = match step {
            None => &self.initial,
            Some(k) => self.steps.get(k).unwrap_or_else(|| panic!("no noise for step {k}")),
        };
        assert_eq!(t.dims()[1..], [shape.0, shape.1, shape.2]);
        Some(t.get(0).unwrap())
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
    }
}

#[test]
fn text_to_image_gives_diffusers_pixels_with_and_without_guidance() {
    for (name, f) in both() {
        let pipeline = engine::Pipeline::load(&f.ckpt.dir, &Device::Cpu).unwrap();
        for (key, guidance) in [("pipe_g0", 0.0), ("pipe_g75", 7.5)] {
            let params = pipeline_params(2, guidance);
            let images = pipeline.generate(&params, &mut DiffusersNoise::new(f.get("pipe_noise"))).unwrap();
            // diffusers' own conversion to 8 bits: round(x * 255).
            let want: Vec<f32> = f.get(key).flatten_all().unwrap().to_vec1().unwrap();
            let got = images[0].as_raw();
            assert_eq!(got.len(), want.len());
            let worst =
                got.iter().zip(&want).map(|(g, w)| (f32::from(*g) - (w * 255.0).round()).abs()).fold(0.0, f32::max);
            assert!(worst <= 1.0, "{name}, guidance {guidance}: {worst} levels off");
            // The reference image is not flat: the comparison means something.
            assert!(want.iter().any(|v| (v - want[0]).abs() > 0.1));
        }
    }
}

#[test]
fn euler_ancestral_with_diffusers_noise_gives_diffusers_pixels() {
    let f = sd15();
    let mut pipeline = engine::Pipeline::load(&f.ckpt.dir, &Device::Cpu).unwrap();
    pipeline.checkpoint.scheduler.class_name = "EulerAncestralDiscreteScheduler".into();
    let params = pipeline_params(3, 7.5);
    let noise = f.get("eulera_noise");
    let mut hooks = DiffusersNoise::new(f.get("pipe_noise"));
    hooks.steps = (0..3).map(|k| noise.narrow(0, k, 1).unwrap()).collect();
    let images = pipeline.generate(&params, &mut hooks).unwrap();
    let want: Vec<f32> = f.get("pipe_eulera").flatten_all().unwrap().to_vec1().unwrap();
    let worst = images[0]
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(g, w)| (f32::from(*g) - (w * 255.0).round()).abs())
        .fold(0.0, f32::max);
    assert!(worst <= 1.0, "{worst} levels off");
}

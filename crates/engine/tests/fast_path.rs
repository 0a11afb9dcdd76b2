#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The engine's own VAE decoder and UNet against candle's, and the fast kernels against the reference
//! ops, on tiny random checkpoints in the real layout.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use engine::testing::{TinySpec, write_checkpoint, write_fp16_variants};
use engine::vae::decoder::VaeDecoder;
use engine::{Checkpoint, GenerateParams, Kernels, LoadOptions, NoHooks, Pipeline};

fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff.is_finite() && scale > 0.0, "diff {diff}, scale {scale}");
    diff / scale
}

#[test]
fn the_vae_decoder_matches_candles_autoencoder_on_both_kernel_paths() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &TinySpec::default()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let path = ckpt.weights("vae").unwrap();
    let cfg = ckpt.vae_config().unwrap();
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let candle = AutoEncoderKL::new(vb.clone(), 3, 3, cfg.clone()).unwrap();
    let reference = VaeDecoder::load(vb.clone().into(), &cfg, Kernels::Reference).unwrap();
    let fast = VaeDecoder::load(vb.into(), &cfg, Kernels::Fast).unwrap();

    // Batch 2, a non-square latent big enough for the Winograd paths after upsampling. candle decodes
    // each latent alone: its own attention block gives wrong values for batch items after the first
    // (it feeds a transposed view to candle 0.11's batched matmul), which the engine's does not.
    let latents = Tensor::randn(0f32, 1.0, (2, 4, 12, 10), &Device::Cpu).unwrap();
    let alone: Vec<Tensor> = (0..2).map(|i| candle.decode(&latents.narrow(0, i, 1).unwrap()).unwrap()).collect();
    let want = Tensor::cat(&alone, 0).unwrap();
    let got_reference = reference.decode(&latents).unwrap();
    let got_fast = fast.decode(&latents).unwrap();
    assert_eq!(got_fast.dims(), &[2, 3, 24, 20]);
    let e_ref = relative_error(&got_reference, &want);
    let e_fast = relative_error(&got_fast, &want);
    assert!(e_ref < 1e-5, "reference path vs candle: {e_ref}");
    assert!(e_fast < 1e-3, "fast path vs candle: {e_fast}");
}

fn params(seed: u64) -> GenerateParams {
    GenerateParams {
        prompt: "a cute baby sea otter".into(),
        negative_prompt: "red".into(),
        width: 96,
        height: 80,
        n: 1,
        steps: 2,
        guidance_scale: 3.0,
        seed,
        edit: None,
        partial_images: 0,
        decoder: engine::Decoder::Full,
        sampler: engine::Sampler::Checkpoint,
    }
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.pixels().zip(b.pixels()).flat_map(|(p, q)| p.0.iter().zip(q.0).map(|(x, y)| x.abs_diff(y))).max().unwrap()
}

#[test]
fn a_whole_pipeline_gives_the_same_image_on_the_fast_and_the_reference_kernels() {
    for spec in [TinySpec::default(), TinySpec { sdxl: true, ..TinySpec::default() }] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &spec).unwrap();
        let load = |kernels, f32_weights| {
            let options = LoadOptions { kernels, f32_weights, ..LoadOptions::default() };
            Pipeline::load_with(dir.path(), &Device::Cpu, options).unwrap()
        };
        // The defaults (fast kernels, weights stored in f16 and computed in f32) against candle's ops
        // on f32 weights.
        let fast = load(Kernels::Fast, false);
        let reference = load(Kernels::Reference, true);
        let a = fast.generate(&params(3), &mut NoHooks).unwrap();
        let b = reference.generate(&params(3), &mut NoHooks).unwrap();
        let diff = max_diff(&a[0], &b[0]);
        assert!(diff <= 3, "sdxl {}: max pixel difference {diff}", spec.sdxl);
        // Only the f16 storage differs: nearly the same image, but not bit for bit.
        let c = load(Kernels::Fast, true).generate(&params(3), &mut NoHooks).unwrap();
        let diff = max_diff(&a[0], &c[0]);
        assert!(diff <= 3, "sdxl {}: f16 vs f32 weights, max pixel difference {diff}", spec.sdxl);
        assert_ne!(a[0], c[0], "sdxl {}: the weights really were stored in f16", spec.sdxl);
        // And the image is not flat: both really ran.
        let first = a[0].get_pixel(0, 0);
        assert!(a[0].pixels().any(|p| p != first));
    }
}

#[test]
fn fp16_files_read_in_place_give_the_image_of_f32_files_narrowed_at_load() {
    for spec in [TinySpec::default(), TinySpec { sdxl: true, ..TinySpec::default() }] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &spec).unwrap();
        let image = || Pipeline::load(dir.path(), &Device::Cpu).unwrap().generate(&params(5), &mut NoHooks).unwrap();
        let narrowed = image();
        // Both files, as the hub repositories have them: the text encoders and the UNet (kept in f16)
        // come from the mapped fp16 files, the VAE (kept in f32) from the f32 one.
        write_fp16_variants(dir.path(), false).unwrap();
        let pipeline = Pipeline::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(pipeline.generate(&params(5), &mut NoHooks).unwrap(), narrowed, "sdxl {}", spec.sdxl);
        // The text encoders' and the UNet's pages were released after use: the next generation reads
        // them back.
        assert_eq!(pipeline.generate(&params(5), &mut NoHooks).unwrap(), narrowed, "sdxl {}", spec.sdxl);
        // Only the fp16 files, as `imagegate models pull` installs them: the VAE is widened from f16.
        write_fp16_variants(dir.path(), true).unwrap();
        let only_half = image();
        let diff = max_diff(&only_half[0], &narrowed[0]);
        assert!(diff <= 2, "sdxl {}: fp16 VAE, max pixel difference {diff}", spec.sdxl);
        // f32 weights asked for with only fp16 files: they are widened, the same values as the
        // f16-stored weights; only the text encoders' linears sum in another order (a gemm on f32
        // weights there, `kernels::linear_f16` on f16 ones), so the images agree within a level or two.
        let options = LoadOptions { f32_weights: true, ..LoadOptions::default() };
        let wide = Pipeline::load_with(dir.path(), &Device::Cpu, options).unwrap();
        let diff = max_diff(&wide.generate(&params(5), &mut NoHooks).unwrap()[0], &only_half[0]);
        assert!(diff <= 2, "sdxl {}: f32 vs f16-stored weights, max pixel difference {diff}", spec.sdxl);
    }
}

#[test]
fn the_unet_matches_the_one_built_from_candles_blocks() {
    use engine::sd::candle_unet::Unet as CandleUnet;
    use engine::sd::unet::{AddedCond, Unet};
    for spec in [TinySpec::default(), TinySpec { sdxl: true, ..TinySpec::default() }] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &spec).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let cfg = ckpt.unet_config().unwrap();
        let tensors = candle_core::safetensors::load(ckpt.weights("unet").unwrap(), &Device::Cpu).unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let candle = CandleUnet::new(vb.clone(), &cfg, false).unwrap();
        let reference = Unet::new(vb.clone().into(), &cfg, Kernels::Reference).unwrap();
        let fast = Unet::new(vb.into(), &cfg, Kernels::Fast).unwrap();

        // Batch 2 at an odd latent size (the up path upsamples to the skips' sizes).
        let xs = Tensor::randn(0f32, 1.0, (2, 4, 11, 9), &Device::Cpu).unwrap();
        let context = Tensor::randn(0f32, 1.0, (2, spec.max_tokens, ckpt.context_dim()), &Device::Cpu).unwrap();
        let added = spec.sdxl.then(|| {
            let pooled = cfg.text_time.unwrap().pooled_dim;
            AddedCond {
                text_embeds: Tensor::randn(0f32, 1.0, (2, pooled), &Device::Cpu).unwrap(),
                time_ids: Tensor::new(&[[88f32, 72., 0., 0., 88., 72.]; 2], &Device::Cpu).unwrap(),
            }
        });
        let want = candle.forward(&xs, 500.0, &context, added.as_ref()).unwrap();
        let got_reference = reference.forward(&xs, 500.0, &context, added.as_ref()).unwrap();
        let got_fast = fast.forward(&xs, 500.0, &context, added.as_ref()).unwrap();
        assert_eq!(got_fast.dims(), &[2, 4, 11, 9]);
        // candle's blocks use the tanh approximation of GELU in the feed-forward, diffusers (and the
        // engine) the exact one: a few 1e-4 apart on these weights. A miswired block is O(1) off.
        let e_ref = relative_error(&got_reference, &want);
        assert!(e_ref < 5e-3, "sdxl {}: engine UNet vs candle's blocks: {e_ref}", spec.sdxl);
        let e_fast = relative_error(&got_fast, &got_reference);
        assert!(e_fast < 1e-4, "sdxl {}: fast kernels vs reference ops: {e_fast}", spec.sdxl);
    }
}

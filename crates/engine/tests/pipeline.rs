#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The pipelines on tiny random checkpoints written in the real diffusers layout and loaded through the
//! real loader.

use candle_core::Device;
use engine::sd::SdPipeline;
use engine::testing::{TinySpec, write_checkpoint};
use engine::{Edit, EngineError, GenerateParams, Hooks, NoHooks};
use image::{GrayImage, Luma, Rgb, RgbImage};

fn tiny(spec: &TinySpec) -> (tempfile::TempDir, SdPipeline) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), spec).unwrap();
    let p = SdPipeline::load(dir.path(), &Device::Cpu).unwrap();
    (dir, p)
}

fn params(seed: u64) -> GenerateParams {
    GenerateParams {
        prompt: "a cute baby sea otter".into(),
        negative_prompt: String::new(),
        width: 80,
        height: 64,
        n: 1,
        steps: 2,
        guidance_scale: 0.0,
        seed,
        edit: None,
        partial_images: 0,
        decoder: engine::Decoder::Full,
        sampler: engine::Sampler::Checkpoint,
    }
}

fn photo(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8]))
}

#[test]
fn text_to_image_has_the_size_and_the_seed_decides_the_pixels() {
    let (_dir, p) = tiny(&TinySpec::default());
    let a = p.generate(&params(1), &mut NoHooks).unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].dimensions(), (80, 64));
    let again = p.generate(&params(1), &mut NoHooks).unwrap();
    assert_eq!(a[0], again[0], "same seed, same pixels");
    let other = p.generate(&params(2), &mut NoHooks).unwrap();
    assert_ne!(a[0], other[0], "another seed, another image");
    // Not a constant image: the model really ran.
    let first = a[0].get_pixel(0, 0);
    assert!(a[0].pixels().any(|px| px != first));
}

#[test]
fn batches_give_n_images_each_as_its_own_seed_would() {
    // In one batch of 3 and in batches of 2 + 1 (every stage, the VAE decoder's attention included,
    // runs on the whole batch): image i of a batch seeded 10 is the image of seed 10 + i.
    let (_dir, mut p) = tiny(&TinySpec::default());
    let singles: Vec<_> = (10..13).map(|seed| p.generate(&params(seed), &mut NoHooks).unwrap()).collect();
    for max_batch in [3, 2] {
        p.max_batch = max_batch;
        let batch = p.generate(&GenerateParams { n: 3, ..params(10) }, &mut NoHooks).unwrap();
        assert_eq!(batch.len(), 3);
        for (i, single) in singles.iter().enumerate() {
            let diff = max_diff(&batch[i], &single[0]);
            assert!(diff <= 1, "batches of {max_batch}: image {i} differs from its seed alone by {diff} levels");
        }
        assert_ne!(batch[0], batch[1]);
    }
}

#[test]
fn batched_edits_give_n_images_each_as_its_own_seed_would() {
    // Image-to-image and inpainting (blending and 9-channel, at full strength and below): each image
    // samples the input's latents and its noise from its own seed, in a batch as alone.
    let input = photo(80, 64);
    for (in_channels, mask, strength) in [
        (4, None, 0.6),
        (4, Some(ring_mask(80, 64)), 1.0),
        (9, Some(ring_mask(80, 64)), 1.0),
        (9, Some(ring_mask(80, 64)), 0.5),
    ] {
        let (_dir, p) = tiny(&TinySpec { in_channels, ..TinySpec::default() });
        let edit = Edit { images: vec![input.clone()], mask, strength };
        let params = |seed, n| GenerateParams { n, edit: Some(edit.clone()), steps: 3, ..params(seed) };
        let batch = p.generate(&params(20, 3), &mut NoHooks).unwrap();
        for (i, image) in batch.iter().enumerate() {
            let single = p.generate(&params(20 + i as u64, 1), &mut NoHooks).unwrap();
            let diff = max_diff(image, &single[0]);
            assert!(diff <= 1, "{in_channels} channels, strength {strength}: image {i} differs by {diff} levels");
        }
        assert_ne!(batch[0], batch[1]);
    }
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

#[test]
fn every_scheduler_and_prediction_type_runs_with_guidance() {
    for (class, prediction, spacing) in [
        ("EulerAncestralDiscreteScheduler", "epsilon", "trailing"),
        ("DDIMScheduler", "v_prediction", "leading"),
        ("EulerDiscreteScheduler", "v_prediction", "linspace"),
    ] {
        let spec = TinySpec {
            scheduler: class.into(),
            prediction_type: prediction.into(),
            timestep_spacing: spacing.into(),
            hidden_act: "quick_gelu".into(),
            ..TinySpec::default()
        };
        let (_dir, p) = tiny(&spec);
        let run = || p.generate(&GenerateParams { steps: 3, guidance_scale: 7.5, ..params(5) }, &mut NoHooks).unwrap();
        let (a, b) = (run(), run());
        assert_eq!(a[0], b[0], "{class}: seeded runs must match, also with ancestral noise");
    }
}

fn ring_mask(w: u32, h: u32) -> GrayImage {
    // Repaint the centre, keep a border.
    GrayImage::from_fn(w, h, |x, y| if x > 16 && x < 48 && y > 12 && y < 36 { Luma([255]) } else { Luma([0]) })
}

fn assert_outside_mask_kept(out: &RgbImage, input: &RgbImage, mask: &GrayImage) {
    let mut changed_inside = false;
    for (x, y, m) in mask.enumerate_pixels() {
        if m.0[0] == 0 {
            assert_eq!(out.get_pixel(x, y), input.get_pixel(x, y), "pixel {x},{y} outside the mask changed");
        } else if out.get_pixel(x, y) != input.get_pixel(x, y) {
            changed_inside = true;
        }
    }
    assert!(changed_inside, "nothing was repainted inside the mask");
}

#[test]
fn inpainting_keeps_every_unmasked_pixel_with_blending_and_with_9_channel_unets() {
    let input = photo(80, 64);
    let mask = ring_mask(80, 64);
    for in_channels in [4, 9] {
        let (_dir, p) = tiny(&TinySpec { in_channels, ..TinySpec::default() });
        assert_eq!(p.is_inpainting(), in_channels == 9);
        let edit = Edit { images: vec![input.clone()], mask: Some(mask.clone()), strength: 1.0 };
        let out = p.generate(&GenerateParams { edit: Some(edit), steps: 3, ..params(3) }, &mut NoHooks).unwrap();
        assert_eq!(out[0].dimensions(), (80, 64));
        assert_outside_mask_kept(&out[0], &input, &mask);
        // Text-to-image works on both kinds too.
        let plain = p.generate(&params(3), &mut NoHooks).unwrap();
        assert_eq!(plain[0].dimensions(), (80, 64));
    }
}

#[test]
fn image_to_image_runs_at_least_one_step_and_depends_on_the_input() {
    let (_dir, p) = tiny(&TinySpec::default());
    let edit = |img: RgbImage, strength| Edit { images: vec![img], mask: None, strength };
    // One turbo step at a low strength still runs one step.
    let a = p
        .generate(&GenerateParams { steps: 1, edit: Some(edit(photo(80, 64), 0.3)), ..params(4) }, &mut NoHooks)
        .unwrap();
    let b = p
        .generate(&GenerateParams { steps: 1, edit: Some(edit(RgbImage::new(80, 64), 0.3)), ..params(4) }, &mut NoHooks)
        .unwrap();
    assert_ne!(a[0], b[0], "the input image must matter");
    // Inputs of another size are resized to the output size; reference images are accepted.
    let refs = Edit { images: vec![photo(100, 70), photo(30, 30)], mask: None, strength: 0.6 };
    let c = p.generate(&GenerateParams { edit: Some(refs), ..params(4) }, &mut NoHooks).unwrap();
    assert_eq!(c[0].dimensions(), (80, 64));
}

struct Collect {
    /// (image, partial index, the partial image)
    partials: Vec<(usize, usize, RgbImage)>,
    cancel_after: Option<usize>,
}

impl Hooks for Collect {
    fn cancelled(&self) -> bool {
        self.cancel_after.is_some_and(|n| self.partials.len() >= n)
    }
    fn partial(&mut self, image: usize, index: usize, partial: RgbImage) {
        self.partials.push((image, index, partial));
    }
}

#[test]
fn partial_images_come_from_intermediate_steps_and_cancellation_stops_the_run() {
    let (_dir, mut p) = tiny(&TinySpec::default());
    let mut hooks = Collect { partials: vec![], cancel_after: None };
    let out = p.generate(&GenerateParams { steps: 4, partial_images: 2, ..params(9) }, &mut hooks).unwrap();
    assert_eq!(hooks.partials.iter().map(|(_, i, _)| *i).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(hooks.partials[0].2.dimensions(), (80, 64));
    assert_ne!(hooks.partials[1].2, out[0]);
    // Every image of n has its partial images, each its own, in batches or not: the same as its seed
    // alone would give.
    for max_batch in [3, 2] {
        p.max_batch = max_batch;
        let mut hooks = Collect { partials: vec![], cancel_after: None };
        p.generate(&GenerateParams { n: 3, steps: 4, partial_images: 2, ..params(9) }, &mut hooks).unwrap();
        let mut got: Vec<(usize, usize)> = hooks.partials.iter().map(|(m, i, _)| (*m, *i)).collect();
        got.sort_unstable();
        assert_eq!(got, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]);
        for (image, index, partial) in &hooks.partials {
            let mut alone = Collect { partials: vec![], cancel_after: None };
            let seed = 9 + *image as u64;
            p.generate(&GenerateParams { steps: 4, partial_images: 2, ..params(seed) }, &mut alone).unwrap();
            let diff = max_diff(partial, &alone.partials[*index].2);
            assert!(diff <= 1, "batches of {max_batch}: partial {index} of image {image} is {diff} levels off");
        }
    }
    // One step leaves no intermediate step to show.
    let mut hooks = Collect { partials: vec![], cancel_after: None };
    p.generate(&GenerateParams { steps: 1, partial_images: 3, ..params(9) }, &mut hooks).unwrap();
    assert!(hooks.partials.is_empty());
    let mut hooks = Collect { partials: vec![], cancel_after: Some(1) };
    let e = p.generate(&GenerateParams { steps: 4, partial_images: 3, ..params(9) }, &mut hooks).unwrap_err();
    assert!(matches!(e, EngineError::Cancelled), "{e}");
}

#[test]
fn sizes_are_checked_before_candle_sees_them() {
    let (_dir, p) = tiny(&TinySpec::default());
    for (w, h) in [(63, 64), (64, 0), (4096, 64), (65, 64), (32, 64)] {
        let e = p.generate(&GenerateParams { width: w, height: h, ..params(1) }, &mut NoHooks).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&format!("{w}x{h}")) && msg.contains("multiple of"), "{msg}");
    }
}

#[test]
fn broken_checkpoints_are_refused_with_the_file_and_tensor_named() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &TinySpec::default()).unwrap();
    let unet = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    engine::testing::replace_tensor(&unet, "conv_in.weight").unwrap();
    let msg = SdPipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("unet/diffusion_pytorch_model.safetensors") && msg.contains("conv_in.weight"), "{msg}");

    std::fs::remove_file(&unet).unwrap();
    let msg = SdPipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("missing file") && msg.contains("unet"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &TinySpec::default()).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer/merges.txt")).unwrap();
    let msg = SdPipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("merges.txt"), "{msg}");
}

#[test]
fn configs_the_engine_cannot_run_are_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &TinySpec::default()).unwrap();
    let path = dir.path().join("unet/config.json");
    let original = std::fs::read_to_string(&path).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        f(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
        SdPipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string()
    };
    let msg = edit(&|v| v["addition_embed_type"] = "text_time".into());
    assert!(msg.contains("addition_embed_type") && msg.contains("second text encoder"), "{msg}");
    let msg = edit(&|v| v["addition_embed_type"] = "image".into());
    assert!(msg.contains("addition_embed_type") && msg.contains("'image'"), "{msg}");
    let msg = edit(&|v| v["attention_head_dim"] = serde_json::json!([3, 4]));
    assert!(msg.contains("attention_head_dim"), "{msg}");
    let msg = edit(&|v| v["down_block_types"] = serde_json::json!(["CrossAttnDownBlock2D"]));
    assert!(msg.contains("down_block_types"), "{msg}");
    let msg = edit(&|v| v["in_channels"] = 5.into());
    assert!(msg.contains("in_channels"), "{msg}");
    std::fs::write(&path, "{ not json").unwrap();
    let msg = SdPipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("unet/config.json"), "{msg}");
}

/// Multiplies one tensor of a safetensors file by `factor`.
fn scale_tensor(path: &std::path::Path, name: &str, factor: f64) {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let t = tensors.get(name).unwrap_or_else(|| panic!("{name} not in {}", path.display()));
    let scaled = (t * factor).unwrap();
    tensors.insert(name.to_owned(), scaled);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn sdxl_checkpoints_run_with_two_encoders_and_their_added_conditioning() {
    let spec = TinySpec { sdxl: true, ..TinySpec::default() };
    let (dir, p) = tiny(&spec);
    let a = p.generate(&params(1), &mut NoHooks).unwrap();
    assert_eq!(a[0].dimensions(), (80, 64));
    assert_eq!(a, p.generate(&params(1), &mut NoHooks).unwrap(), "same seed, same pixels");
    assert_ne!(a, p.generate(&params(2), &mut NoHooks).unwrap());
    // Guidance with SDXL's zero embedding for an empty negative prompt, and with a real one.
    let guided = GenerateParams { guidance_scale: 5.0, ..params(1) };
    let zeros = p.generate(&guided, &mut NoHooks).unwrap();
    let negative = GenerateParams { negative_prompt: "red cat".into(), ..guided };
    assert_ne!(zeros, p.generate(&negative, &mut NoHooks).unwrap());

    // The pooled embedding reaches the UNet: text_projection only acts on it.
    let te2 = dir.path().join("text_encoder_2/model.safetensors");
    scale_tensor(&te2, "text_projection.weight", 3.0);
    let p2 = SdPipeline::load(dir.path(), &Device::Cpu).unwrap();
    let projected = p2.generate(&params(1), &mut NoHooks).unwrap();
    assert_ne!(a, projected, "the pooled text embedding changed nothing");

    // The add_embedding tensors are read: changing them changes the image, a wrong shape is named.
    let unet = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    scale_tensor(&unet, "add_embedding.linear_2.weight", 3.0);
    let p3 = SdPipeline::load(dir.path(), &Device::Cpu).unwrap();
    assert_ne!(projected, p3.generate(&params(1), &mut NoHooks).unwrap(), "add_embedding changed nothing");
    engine::testing::replace_tensor(&unet, "add_embedding.linear_1.weight").unwrap();
    let msg = SdPipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("add_embedding.linear_1.weight"), "{msg}");

    // The second encoder is required, and its files are named when missing.
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &spec).unwrap();
    std::fs::remove_file(dir.path().join("text_encoder_2/model.safetensors")).unwrap();
    let msg = SdPipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("text_encoder_2"), "{msg}");
    std::fs::remove_dir_all(dir.path().join("text_encoder_2")).unwrap();
    let msg = SdPipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("addition_embed_type") && msg.contains("second text encoder"), "{msg}");
}

#[test]
fn sdxl_inpainting_by_blending_keeps_unmasked_pixels() {
    let (_dir, p) = tiny(&TinySpec { sdxl: true, ..TinySpec::default() });
    let input = photo(80, 64);
    let mask = ring_mask(80, 64);
    let edit = Edit { images: vec![input.clone()], mask: Some(mask.clone()), strength: 1.0 };
    let out = p.generate(&GenerateParams { edit: Some(edit), ..params(3) }, &mut NoHooks).unwrap();
    assert_outside_mask_kept(&out[0], &input, &mask);
}

/// transformers 5 saves a `CLIPTextModel` without the `text_model.` prefix that hub repositories (and
/// older transformers) have: such a checkpoint loads and gives the same images.
#[test]
fn a_text_encoder_saved_without_the_text_model_prefix_loads() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &TinySpec::default()).unwrap();
    let before = SdPipeline::load(dir.path(), &Device::Cpu).unwrap().generate(&params(3), &mut NoHooks).unwrap();
    let file = dir.path().join("text_encoder/model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let odd: Vec<_> = tensors.keys().filter(|k| !k.starts_with("text_model.")).collect();
    assert!(odd.is_empty(), "{odd:?}");
    let unprefixed: std::collections::HashMap<String, candle_core::Tensor> =
        tensors.into_iter().map(|(k, t)| (k.trim_start_matches("text_model.").to_owned(), t)).collect();
    candle_core::safetensors::save(&unprefixed, &file).unwrap();
    let after = SdPipeline::load(dir.path(), &Device::Cpu).unwrap().generate(&params(3), &mut NoHooks).unwrap();
    assert_eq!(before[0], after[0]);
}

//! Samplers, as `scheduler/scheduler_config.json` names them: Euler, Euler ancestral and DDIM, with the
//! config's beta schedule, `prediction_type` and `timestep_spacing`.
//!
//! Written here rather than taken from candle because candle has no plain Euler (SD-Turbo's scheduler)
//! and its ancestral sampler draws noise from an unseedable thread RNG: here every noise tensor comes
//! from the caller, so a seed reproduces an image exactly.

use candle_core::{Result, Tensor};

use crate::EngineError;
use crate::checkpoint::SchedulerFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Euler,
    EulerAncestral,
    Ddim,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// The sampler for one run of `steps` steps. Cheap to build; one per request.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub kind: Kind,
    prediction: Prediction,
    /// The model's timestep input at each step, in order.
    timesteps: Vec<f64>,
    /// Euler family: the noise level at each step, then 0.
    sigmas: Vec<f64>,
    /// DDIM: cumulative alpha at each step and at the step after it.
    alphas: Vec<(f64, f64)>,
    init_sigma: f64,
    /// DDIM's `clip_sample`: the clean estimate clamped to `±range`.
    clip: Option<f64>,
}

/// How the config's scheduler class is run. Classes without an implementation of their own run as the
/// closest one here (PNDM, LMS and DPM-Solver as Euler, which samples the same model well), others are
/// refused.
pub fn kind_of(class_name: &str) -> Option<Kind> {
    match class_name {
        "EulerDiscreteScheduler" | "PNDMScheduler" | "LMSDiscreteScheduler" | "DPMSolverMultistepScheduler" => {
            Some(Kind::Euler)
        }
        "EulerAncestralDiscreteScheduler" => Some(Kind::EulerAncestral),
        "DDIMScheduler" => Some(Kind::Ddim),
        _ => None,
    }
}

impl Scheduler {
    pub fn new(cfg: &SchedulerFile, steps: usize) -> std::result::Result<Scheduler, EngineError> {
        let bad = |key: &str, why: String| EngineError::Unsupported {
            file: "scheduler/scheduler_config.json".into(),
            key: key.into(),
            why,
        };
        let kind = kind_of(&cfg.class_name).ok_or_else(|| {
            bad("_class_name", format!("'{}' is not one of EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler (or PNDM/LMS/DPMSolver, run as Euler)", cfg.class_name))
        })?;
        let prediction = match cfg.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            other => return Err(bad("prediction_type", format!("'{other}' is not one of 'epsilon', 'v_prediction'"))),
        };
        let t_train = cfg.num_train_timesteps;
        if t_train < 2 || steps == 0 || steps > t_train {
            return Err(bad(
                "num_train_timesteps",
                format!("{steps} steps cannot be taken from {t_train} training timesteps"),
            ));
        }
        let betas: Vec<f64> = match cfg.beta_schedule.as_str() {
            "scaled_linear" => {
                linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), t_train).iter().map(|b| b * b).collect()
            }
            "linear" => linspace(cfg.beta_start, cfg.beta_end, t_train),
            other => return Err(bad("beta_schedule", format!("'{other}' is not one of 'scaled_linear', 'linear'"))),
        };
        let mut alphas_cumprod = Vec::with_capacity(t_train);
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        refuse_unsupported_keys(cfg).map_err(|(key, why)| bad(&key, why))?;
        let spacing = cfg.timestep_spacing.as_deref().unwrap_or(match kind {
            Kind::Ddim => "leading",
            Kind::Euler | Kind::EulerAncestral => "linspace",
        });
        // diffusers' `set_timesteps`, in the same f64 arithmetic (numpy rounds half to even).
        let last = (t_train - 1) as f64;
        let timesteps: Vec<f64> = match spacing {
            // The Euler samplers keep fractional timesteps (499.5); DDIM rounds them.
            "linspace" => linspace(0.0, last, steps)
                .into_iter()
                .rev()
                .map(|t| if kind == Kind::Ddim { t.round_ties_even() } else { t })
                .collect(),
            "leading" => {
                let ratio = t_train / steps;
                (0..steps).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect()
            }
            "trailing" => {
                let ratio = t_train as f64 / steps as f64;
                (0..steps).map(|i| (t_train as f64 - i as f64 * ratio).round_ties_even() - 1.0).collect()
            }
            other => {
                return Err(bad(
                    "timestep_spacing",
                    format!("'{other}' is not one of 'leading', 'trailing', 'linspace'"),
                ));
            }
        };
        if let Some(t) = timesteps.iter().find(|t| **t < 0.0 || **t > last) {
            return Err(bad(
                "steps_offset",
                format!("with {steps} steps the schedule reaches timestep {t}, outside 0..{t_train}"),
            ));
        }

        let sigma_at = |t: f64| -> f64 {
            // Linear interpolation of sigma over the training timesteps, as diffusers does.
            let lo = t.floor().clamp(0.0, (t_train - 1) as f64) as usize;
            let hi = (lo + 1).min(t_train - 1);
            let frac = t - lo as f64;
            let s = |i: usize| ((1.0 - alphas_cumprod[i]) / alphas_cumprod[i]).sqrt();
            s(lo) * (1.0 - frac) + s(hi) * frac
        };
        let mut sigmas: Vec<f64> = timesteps.iter().map(|t| sigma_at(*t)).collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
        let init_sigma = match (kind, spacing) {
            (Kind::Ddim, _) => 1.0,
            (_, "linspace" | "trailing") => max_sigma,
            _ => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        let final_alpha = if cfg.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        // DDIM steps from t to t - num_train_timesteps / steps, whatever the next listed timestep is.
        let stride = (t_train / steps) as f64;
        let alphas = timesteps
            .iter()
            .map(|t| {
                let prev = t - stride;
                let a_prev = if prev >= 0.0 { alphas_cumprod[prev as usize] } else { final_alpha };
                (alphas_cumprod[*t as usize], a_prev)
            })
            .collect();
        let clip = match kind {
            Kind::Ddim if cfg.clip_sample.unwrap_or(true) => Some(cfg.clip_sample_range),
            _ => None,
        };
        Ok(Scheduler { kind, prediction, timesteps, sigmas, alphas, init_sigma, clip })
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The Euler samplers' noise level at each step, then 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The factor that turns unit gaussian noise into the first latents.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    /// Whether `step` needs fresh noise (the ancestral sampler).
    pub fn needs_noise(&self) -> bool {
        self.kind == Kind::EulerAncestral
    }

    /// The UNet's input at step `i`.
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        match self.kind {
            Kind::Ddim => Ok(sample.clone()),
            _ => sample / (self.sigmas[i].powi(2) + 1.0).sqrt(),
        }
    }

    /// The denoised estimate of the clean latents at step `i` (used for partial images and blending).
    pub fn predict_original(&self, sample: &Tensor, model_output: &Tensor, i: usize) -> Result<Tensor> {
        match self.kind {
            Kind::Ddim => {
                let (a, _) = self.alphas[i];
                let original = match self.prediction {
                    Prediction::Epsilon => ((sample - (model_output * (1.0 - a).sqrt())?)? / a.sqrt())?,
                    Prediction::VPrediction => ((sample * a.sqrt())? - (model_output * (1.0 - a).sqrt())?)?,
                };
                match self.clip {
                    Some(range) => original.clamp(-range, range),
                    None => Ok(original),
                }
            }
            _ => {
                let sigma = self.sigmas[i];
                match self.prediction {
                    Prediction::Epsilon => sample - (model_output * sigma)?,
                    Prediction::VPrediction => {
                        let c = sigma * sigma + 1.0;
                        (model_output * (-sigma / c.sqrt()))? + (sample / c)?
                    }
                }
            }
        }
    }

    /// One step from step `i` to the next. `noise` is required by the ancestral sampler (same shape as
    /// `sample`, unit gaussian) and ignored otherwise.
    pub fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let original = self.predict_original(sample, model_output, i)?;
        match self.kind {
            Kind::Ddim => {
                let (a, a_prev) = self.alphas[i];
                // The noise the model saw, as diffusers has it (from the model's output, not from the
                // clipped clean estimate).
                let eps = match self.prediction {
                    Prediction::Epsilon => model_output.clone(),
                    Prediction::VPrediction => ((model_output * a.sqrt())? + (sample * (1.0 - a).sqrt())?)?,
                };
                (original * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
            }
            Kind::Euler | Kind::EulerAncestral => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let derivative = ((sample - &original)? / sigma)?;
                if self.kind == Kind::Euler {
                    return sample + (derivative * (next - sigma))?;
                }
                let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).max(0.0).sqrt();
                let down = (next * next - up * up).max(0.0).sqrt();
                let prev = (sample + (derivative * (down - sigma))?)?;
                match noise {
                    Some(n) if up > 0.0 => prev + (n * up)?,
                    _ => Ok(prev),
                }
            }
        }
    }

    /// Noises clean latents to the level of step `i` (image-to-image and inpainting).
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        match self.kind {
            Kind::Ddim => {
                let (a, _) = self.alphas[i];
                (original * a.sqrt())? + (noise * (1.0 - a).sqrt())?
            }
            _ => original + (noise * self.sigmas[i])?,
        }
    }
}

/// Keys of diffusers' scheduler configs that change the math, with the value under which the engine
/// computes what diffusers computes (`null` counts as that value too).
const MATH_KEYS: [(&str, &str); 9] = [
    ("use_karras_sigmas", "false"),
    ("use_exponential_sigmas", "false"),
    ("use_beta_sigmas", "false"),
    ("thresholding", "false"),
    ("rescale_betas_zero_snr", "false"),
    ("interpolation_type", "\"linear\""),
    ("timestep_type", "\"discrete\""),
    ("final_sigmas_type", "\"zero\""),
    ("trained_betas", "null"),
];

/// A config key set to something the engine does not compute: its name and why.
fn refuse_unsupported_keys(cfg: &SchedulerFile) -> std::result::Result<(), (String, String)> {
    for (key, supported) in MATH_KEYS {
        let Some(value) = cfg.other.get(key) else { continue };
        let default: serde_json::Value = serde_json::from_str(supported).unwrap_or(serde_json::Value::Null);
        if value.is_null() || *value == default {
            continue;
        }
        return Err((
            key.to_owned(),
            format!(
                "{value} is not supported (only {supported}): running the schedule without it would give other images"
            ),
        ));
    }
    Ok(())
}

fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    (0..n).map(|i| start + (end - start) * i as f64 / (n - 1) as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(class: &str, spacing: &str) -> SchedulerFile {
        SchedulerFile {
            class_name: class.into(),
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: "epsilon".into(),
            timestep_spacing: Some(spacing.into()),
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: Some(false),
            clip_sample_range: 1.0,
            other: Default::default(),
        }
    }

    #[test]
    fn timestep_spacings_match_diffusers() {
        // SD-Turbo: Euler, trailing, one step at t = 999.
        let s = Scheduler::new(&cfg("EulerDiscreteScheduler", "trailing"), 1).unwrap();
        assert_eq!(s.timesteps(), &[999.0]);
        // diffusers gives sigma(999) = 14.6146 for this beta schedule, and init sigma = max sigma when trailing.
        assert!((s.init_noise_sigma() - 14.6146).abs() < 1e-3, "{}", s.init_noise_sigma());
        let s = Scheduler::new(&cfg("EulerDiscreteScheduler", "trailing"), 4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
        let s = Scheduler::new(&cfg("DDIMScheduler", "leading"), 4).unwrap();
        assert_eq!(s.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
        let s = Scheduler::new(&cfg("EulerDiscreteScheduler", "linspace"), 3).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 499.5, 0.0]);
        let leading = Scheduler::new(&cfg("EulerDiscreteScheduler", "leading"), 4).unwrap();
        let top = leading.sigmas[0];
        assert!((leading.init_noise_sigma() - (top * top + 1.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn unknown_configs_are_refused_by_name() {
        let e = Scheduler::new(&cfg("HeunDiscreteScheduler", "leading"), 4).unwrap_err();
        assert!(e.to_string().contains("_class_name"), "{e}");
        let mut c = cfg("EulerDiscreteScheduler", "leading");
        c.prediction_type = "sample".into();
        assert!(Scheduler::new(&c, 4).unwrap_err().to_string().contains("prediction_type"));
        assert!(
            Scheduler::new(&cfg("DDIMScheduler", "weird"), 4).unwrap_err().to_string().contains("timestep_spacing")
        );
        assert!(Scheduler::new(&cfg("DDIMScheduler", "leading"), 0).is_err());
        // Keys that change the math are refused by name, never run as something else.
        for (key, value) in [
            ("use_karras_sigmas", serde_json::json!(true)),
            ("thresholding", serde_json::json!(true)),
            ("timestep_type", serde_json::json!("continuous")),
            ("final_sigmas_type", serde_json::json!("sigma_min")),
        ] {
            let mut c = cfg("EulerDiscreteScheduler", "leading");
            c.other.insert(key.into(), value.clone());
            let e = Scheduler::new(&c, 4).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        // Their defaults (and null) are what the engine computes.
        let mut c = cfg("EulerDiscreteScheduler", "leading");
        c.other.insert("use_karras_sigmas".into(), serde_json::json!(false));
        c.other.insert("interpolation_type".into(), serde_json::json!("linear"));
        c.other.insert("trained_betas".into(), serde_json::Value::Null);
        assert!(Scheduler::new(&c, 4).is_ok());
    }

    #[test]
    fn a_config_without_timestep_spacing_takes_the_class_default() {
        let unset = |class: &str| SchedulerFile { timestep_spacing: None, ..cfg(class, "") };
        // Euler and Euler ancestral: linspace; DDIM: leading (steps_offset 1).
        assert_eq!(Scheduler::new(&unset("EulerDiscreteScheduler"), 3).unwrap().timesteps(), &[999.0, 499.5, 0.0]);
        assert_eq!(
            Scheduler::new(&unset("EulerAncestralDiscreteScheduler"), 3).unwrap().timesteps(),
            &[999.0, 499.5, 0.0]
        );
        assert_eq!(Scheduler::new(&unset("DDIMScheduler"), 4).unwrap().timesteps(), &[751.0, 501.0, 251.0, 1.0]);
        // DDIM rounds linspace timesteps (499.5 to 500); trailing ones round half to even as numpy does
        // (at 16 steps 1000 - 3 * 62.5 = 812.5 rounds to 812, minus 1: 811, where rounding half away
        // from zero gave 812).
        assert_eq!(Scheduler::new(&cfg("DDIMScheduler", "linspace"), 3).unwrap().timesteps(), &[999.0, 500.0, 0.0]);
        assert_eq!(Scheduler::new(&cfg("EulerDiscreteScheduler", "trailing"), 16).unwrap().timesteps()[3], 811.0);
    }

    #[test]
    fn a_perfect_model_denoises_in_one_euler_step() {
        // If the model predicts exactly the noise that was added, one Euler step to sigma 0 gives back the
        // clean sample.
        let dev = candle_core::Device::Cpu;
        let s = Scheduler::new(&cfg("EulerDiscreteScheduler", "trailing"), 1).unwrap();
        let clean = Tensor::new(&[0.5f32, -0.25, 1.0], &dev).unwrap();
        let noise = Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
        let noisy = s.add_noise(&clean, &noise, 0).unwrap();
        let out = s.step(&noise, 0, &noisy, None).unwrap();
        let diff: f32 = (out - &clean).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(diff < 1e-4, "{diff}");
        // The same for DDIM (its last step lands on alpha = alphas_cumprod[0] here, close to clean).
        let d = Scheduler::new(&cfg("DDIMScheduler", "leading"), 1).unwrap();
        let noisy = d.add_noise(&clean, &noise, 0).unwrap();
        let orig = d.predict_original(&noisy, &noise, 0).unwrap();
        let diff: f32 = (orig - clean).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
}

//! Samplers, as `scheduler/scheduler_config.json` names them: Euler, Euler ancestral, DDIM and
//! DPM-Solver++ (multistep, first or second order, optionally on Karras sigmas), with the config's beta
//! schedule, `prediction_type` and `timestep_spacing`, computing what diffusers' classes compute.
//!
//! Written here rather than taken from candle because candle has no plain Euler (SD-Turbo's scheduler)
//! and its ancestral sampler draws noise from an unseedable thread RNG: here every noise tensor comes
//! from the caller, so a seed reproduces an image exactly.

use candle_core::{Result, Tensor};

use crate::EngineError;
use crate::sd::checkpoint::SchedulerFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Euler,
    EulerAncestral,
    Ddim,
    /// DPM-Solver++ multistep (`DPMSolverMultistepScheduler` with `algorithm_type` `dpmsolver++`).
    DpmSolver,
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
    dpm: Dpm,
    /// DPM-Solver's history: the step index and clean estimate of the step before.
    previous: Option<(usize, Tensor)>,
}

/// DPM-Solver++'s settings (diffusers' config keys of the same names).
#[derive(Debug, Clone, Copy, Default)]
struct Dpm {
    /// `solver_order` 2: each step after the first uses the previous step's estimate too.
    second_order: bool,
    /// `solver_type` `heun` (else `midpoint`), the second-order formula.
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    /// `final_sigmas_type` `zero` (else `sigma_min`): the last step lands on a clean sample.
    final_zero: bool,
}

/// How the config's scheduler class is run. PNDM and LMS (SD 1.x's and older checkpoints' configs) run
/// as Euler on their noise schedule, which samples the same models well; other classes are refused.
pub fn kind_of(class_name: &str) -> Option<Kind> {
    match class_name {
        "EulerDiscreteScheduler" | "PNDMScheduler" | "LMSDiscreteScheduler" => Some(Kind::Euler),
        "EulerAncestralDiscreteScheduler" => Some(Kind::EulerAncestral),
        "DDIMScheduler" => Some(Kind::Ddim),
        "DPMSolverMultistepScheduler" => Some(Kind::DpmSolver),
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
            bad("_class_name", format!("'{}' is not one of EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler (or PNDM/LMS, run as Euler)", cfg.class_name))
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
        let (dpm, karras) = if kind == Kind::DpmSolver {
            dpm_settings(cfg).map_err(|(key, why)| bad(key, why))?
        } else {
            (Dpm::default(), false)
        };
        refuse_unsupported_keys(cfg, kind).map_err(|(key, why)| bad(&key, why))?;
        let spacing = cfg.timestep_spacing.as_deref().unwrap_or(match kind {
            Kind::Ddim => "leading",
            Kind::Euler | Kind::EulerAncestral | Kind::DpmSolver => "linspace",
        });
        // diffusers' `set_timesteps`, in the same f64 arithmetic (numpy rounds half to even).
        let last = (t_train - 1) as f64;
        let timesteps: Vec<f64> = match spacing {
            // DPM-Solver spaces `steps + 1` points and drops the last (0), rounded.
            "linspace" if kind == Kind::DpmSolver => {
                linspace(0.0, last, steps + 1).into_iter().rev().take(steps).map(f64::round_ties_even).collect()
            }
            // The Euler samplers keep fractional timesteps (499.5); DDIM rounds them.
            "linspace" => linspace(0.0, last, steps)
                .into_iter()
                .rev()
                .map(|t| if kind == Kind::Ddim { t.round_ties_even() } else { t })
                .collect(),
            "leading" if kind == Kind::DpmSolver => {
                let ratio = t_train / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect()
            }
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

        let train_sigmas: Vec<f64> = alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let sigma_at = |t: f64| -> f64 {
            // Linear interpolation of sigma over the training timesteps, as diffusers does.
            let lo = t.floor().clamp(0.0, (t_train - 1) as f64) as usize;
            let hi = (lo + 1).min(t_train - 1);
            let frac = t - lo as f64;
            train_sigmas[lo] * (1.0 - frac) + train_sigmas[hi] * frac
        };
        let (timesteps, mut sigmas) = if karras {
            // Karras et al.'s schedule between the training schedule's extremes (rho 7); the timesteps
            // are where those sigmas fall on the training schedule (log-linear), rounded.
            let (lo, hi) = (train_sigmas[0].powf(1.0 / 7.0), train_sigmas[t_train - 1].powf(1.0 / 7.0));
            let sigmas: Vec<f64> = linspace(0.0, 1.0, steps).iter().map(|r| (hi + r * (lo - hi)).powi(7)).collect();
            let timesteps = sigmas.iter().map(|s| sigma_to_t(*s, &train_sigmas).round_ties_even()).collect();
            (timesteps, sigmas)
        } else {
            let sigmas = timesteps.iter().map(|t| sigma_at(*t)).collect();
            (timesteps, sigmas)
        };
        sigmas.push(if kind != Kind::DpmSolver || dpm.final_zero { 0.0 } else { train_sigmas[0] });
        let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
        let init_sigma = match (kind, spacing) {
            (Kind::Ddim | Kind::DpmSolver, _) => 1.0,
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
        Ok(Scheduler { kind, prediction, timesteps, sigmas, alphas, init_sigma, clip, dpm, previous: None })
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The Euler samplers' and DPM-Solver's noise level at each step, then the last one (0 unless DPM-Solver's
    /// `final_sigmas_type` is `sigma_min`).
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
            Kind::Ddim | Kind::DpmSolver => Ok(sample.clone()),
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
            Kind::DpmSolver => {
                // DPM-Solver's samples are variance-preserving: `alpha * x0 + sigma_t * noise`.
                let (alpha, sigma) = vp(self.sigmas[i]);
                match self.prediction {
                    Prediction::Epsilon => (sample - (model_output * sigma)?)? / alpha,
                    Prediction::VPrediction => (sample * alpha)? - (model_output * sigma)?,
                }
            }
            Kind::Euler | Kind::EulerAncestral => {
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
    /// `sample`, unit gaussian) and ignored otherwise. Steps are taken in order (DPM-Solver remembers the
    /// step before; a run may start at any step, as an edit does).
    pub fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let original = self.predict_original(sample, model_output, i)?;
        match self.kind {
            Kind::DpmSolver => {
                let previous = self.previous.take().filter(|(j, _)| j + 1 == i).map(|(_, x)| x);
                let out = self.dpm_step(&original, previous.as_ref(), i, sample)?;
                self.previous = Some((i, original));
                Ok(out)
            }
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

    /// DPM-Solver++ from step `i` to the next, given this step's clean estimate and the step before's.
    fn dpm_step(&self, x0: &Tensor, previous: Option<&Tensor>, i: usize, sample: &Tensor) -> Result<Tensor> {
        let lambda = |s: f64| -> f64 {
            let (alpha, sigma) = vp(s);
            alpha.ln() - sigma.ln()
        };
        let (s0, t) = (self.sigmas[i], self.sigmas[i + 1]);
        let (alpha_t, sigma_t) = vp(t);
        let sigma_s0 = vp(s0).1;
        let h = lambda(t) - lambda(s0);
        // With a final sigma of 0, lambda is infinite: exp(-h) is 0 and the step lands on `x0`.
        let decay = (-h).exp() - 1.0;
        let first = ((sample * (sigma_t / sigma_s0))? - (x0 * (alpha_t * decay))?)?;
        let last = i + 1 == self.timesteps.len();
        let d = self.dpm;
        let lower_final =
            last && (d.euler_at_final || (d.lower_order_final && self.timesteps.len() < 15) || d.final_zero);
        let Some(m1) = previous.filter(|_| d.second_order && !lower_final && i >= 1) else {
            return Ok(first);
        };
        let h0 = lambda(s0) - lambda(self.sigmas[i - 1]);
        if h0 == 0.0 {
            // A repeated timestep (rounded linspace timesteps repeat from ~500 steps): the history
            // says nothing about the slope, where diffusers divides by 0. First order instead.
            return Ok(first);
        }
        let d1 = ((x0 - m1)? * (h / h0))?;
        // Heun's factor tends to 0 with h (a step of length 0, as Karras sigmas ending on a final
        // `sigma_min` give), where diffusers computes 0 / 0.
        let correction = match (d.heun, h == 0.0) {
            (true, true) => 0.0,
            (true, false) => alpha_t * (decay / h + 1.0),
            (false, _) => -0.5 * alpha_t * decay,
        };
        first + (d1 * correction)?
    }

    /// Noises clean latents to the level of step `i` (image-to-image and inpainting).
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        match self.kind {
            Kind::DpmSolver => {
                let (alpha, sigma) = vp(self.sigmas[i]);
                (original * alpha)? + (noise * sigma)?
            }
            Kind::Ddim => {
                let (a, _) = self.alphas[i];
                (original * a.sqrt())? + (noise * (1.0 - a).sqrt())?
            }
            _ => original + (noise * self.sigmas[i])?,
        }
    }
}

/// A noise level's variance-preserving coefficients: `alpha = 1 / sqrt(sigma^2 + 1)` and `sigma * alpha`.
fn vp(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The (fractional) training timestep of noise level `sigma`: diffusers' `_sigma_to_t`, linear in
/// log-sigma between the two training timesteps around it, clamped to the schedule.
fn sigma_to_t(sigma: f64, train_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = train_sigmas.len();
    let low = train_sigmas.iter().rposition(|s| s.ln() <= log_sigma).unwrap_or(0).min(n - 2);
    let (lo, hi) = (train_sigmas[low].ln(), train_sigmas[low + 1].ln());
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// DPM-Solver's keys, with diffusers' defaults: its settings and whether it runs on Karras sigmas.
fn dpm_settings(cfg: &SchedulerFile) -> std::result::Result<(Dpm, bool), (&'static str, String)> {
    let text = |key: &'static str, default: &'static str| -> std::result::Result<String, (&'static str, String)> {
        match cfg.other.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default.to_owned()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err((key, format!("{other} is not a string"))),
        }
    };
    let flag = |key: &'static str, default: bool| -> std::result::Result<bool, (&'static str, String)> {
        match cfg.other.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            Some(other) => Err((key, format!("{other} is not true or false"))),
        }
    };
    // diffusers runs the deprecated DEIS / UniPC names as these.
    let algorithm = text("algorithm_type", "dpmsolver++")?;
    if !matches!(algorithm.as_str(), "dpmsolver++" | "deis") {
        return Err(("algorithm_type", format!("'{algorithm}' is not supported (only 'dpmsolver++')")));
    }
    let solver = text("solver_type", "midpoint")?;
    let heun = match solver.as_str() {
        "heun" => true,
        "midpoint" | "logrho" | "bh1" | "bh2" => false,
        other => return Err(("solver_type", format!("'{other}' is not one of 'midpoint', 'heun'"))),
    };
    let second_order = match cfg.other.get("solver_order") {
        None | Some(serde_json::Value::Null) => true,
        Some(v) if v.as_u64() == Some(2) => true,
        Some(v) if v.as_u64() == Some(1) => false,
        Some(other) => return Err(("solver_order", format!("{other} is not supported (only 1 or 2)"))),
    };
    let final_zero = match text("final_sigmas_type", "zero")?.as_str() {
        "zero" => true,
        "sigma_min" => false,
        other => return Err(("final_sigmas_type", format!("'{other}' is not one of 'zero', 'sigma_min'"))),
    };
    let dpm = Dpm {
        second_order,
        heun,
        lower_order_final: flag("lower_order_final", true)?,
        euler_at_final: flag("euler_at_final", false)?,
        final_zero,
    };
    Ok((dpm, flag("use_karras_sigmas", false)?))
}

/// Keys of diffusers' scheduler configs that change the math, with the value under which the engine
/// computes what diffusers computes (`null` counts as that value too).
const MATH_KEYS: [(&str, &str); 15] = [
    ("use_karras_sigmas", "false"),
    ("use_exponential_sigmas", "false"),
    ("use_beta_sigmas", "false"),
    ("thresholding", "false"),
    ("rescale_betas_zero_snr", "false"),
    ("interpolation_type", "\"linear\""),
    ("timestep_type", "\"discrete\""),
    ("final_sigmas_type", "\"zero\""),
    ("trained_betas", "null"),
    ("use_lu_lambdas", "false"),
    ("use_flow_sigmas", "false"),
    ("use_dynamic_shifting", "false"),
    ("variance_type", "null"),
    // What `-Infinity` in a config file reads as (see `checkpoint::read_json`).
    ("lambda_min_clipped", "\"-Infinity\""),
    ("sigma_min", "null"),
];

/// The keys DPM-Solver reads itself ([`dpm_settings`]).
const DPM_KEYS: [&str; 2] = ["use_karras_sigmas", "final_sigmas_type"];

/// A config key set to something the engine does not compute: its name and why.
fn refuse_unsupported_keys(cfg: &SchedulerFile, kind: Kind) -> std::result::Result<(), (String, String)> {
    for (key, supported) in MATH_KEYS {
        if kind == Kind::DpmSolver && DPM_KEYS.contains(&key) {
            continue;
        }
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
        SchedulerFile::stable_diffusion(class, Some(spacing))
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
    fn dpm_solver_configs_it_cannot_honour_are_refused_by_name() {
        let dpm = |key: &str, value: serde_json::Value| {
            let mut c = cfg("DPMSolverMultistepScheduler", "linspace");
            c.other.insert(key.into(), value);
            Scheduler::new(&c, 4)
        };
        for (key, value) in [
            ("algorithm_type", serde_json::json!("sde-dpmsolver++")),
            ("solver_order", serde_json::json!(3)),
            ("solver_type", serde_json::json!("bogus")),
            ("final_sigmas_type", serde_json::json!("bogus")),
            ("lambda_min_clipped", serde_json::json!(-5.1)),
            ("use_lu_lambdas", serde_json::json!(true)),
            ("variance_type", serde_json::json!("learned_range")),
        ] {
            let e = dpm(key, value).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        // What real configs carry: its defaults, `-Infinity` as read from the file, Karras sigmas.
        for (key, value) in [
            ("lambda_min_clipped", serde_json::json!("-Infinity")),
            ("algorithm_type", serde_json::json!("dpmsolver++")),
            ("solver_order", serde_json::json!(2)),
            ("use_karras_sigmas", serde_json::json!(true)),
            ("final_sigmas_type", serde_json::json!("sigma_min")),
        ] {
            assert!(dpm(key, value).is_ok(), "{key}");
        }
        // Karras sigmas stay refused where the engine does not implement them.
        let mut c = cfg("EulerDiscreteScheduler", "leading");
        c.other.insert("use_karras_sigmas".into(), serde_json::json!(true));
        assert!(Scheduler::new(&c, 4).unwrap_err().to_string().contains("use_karras_sigmas"));
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
        let mut s = Scheduler::new(&cfg("EulerDiscreteScheduler", "trailing"), 1).unwrap();
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

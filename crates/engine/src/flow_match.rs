//! diffusers' `FlowMatchEulerDiscreteScheduler`, as the flow-matching pipelines (Z-Image; FLUX and
//! Qwen-Image next) drive it: the pipeline hands it sigmas (`linspace(1, 1/steps, steps)`), it shifts
//! them (by the config's `shift`, or by `mu` from the image's token count with `use_dynamic_shifting`),
//! appends a final 0, and an Euler step moves the sample by `(sigma_next - sigma) * velocity`.
//!
//! The arithmetic is diffusers': sigmas in f32 (torch's `linspace`, numpy's f32 shift), timesteps
//! `sigma * num_train_timesteps` in f32. Config keys that change the schedule and are not implemented
//! (Karras, exponential or beta sigmas, `shift_terminal`, `invert_sigmas`, stochastic sampling) are
//! refused by name.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::EngineError;

/// `scheduler/scheduler_config.json` of a flow-matching checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct FlowMatchFile {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "one")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "half")]
    pub base_shift: f64,
    #[serde(default = "max_shift")]
    pub max_shift: f64,
    #[serde(default = "base_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "max_len")]
    pub max_image_seq_len: usize,
    #[serde(default = "exponential")]
    pub time_shift_type: String,
    /// Keys the engine does not implement: refused unless at their default.
    #[serde(flatten)]
    pub other: std::collections::BTreeMap<String, serde_json::Value>,
}

fn default_train_steps() -> usize {
    1000
}
fn one() -> f64 {
    1.0
}
fn half() -> f64 {
    0.5
}
fn max_shift() -> f64 {
    1.15
}
fn base_len() -> usize {
    256
}
fn max_len() -> usize {
    4096
}
fn exponential() -> String {
    "exponential".into()
}

impl FlowMatchFile {
    /// Reads and checks `scheduler/scheduler_config.json`.
    pub fn read(path: &Path) -> Result<FlowMatchFile, EngineError> {
        let file: FlowMatchFile = crate::config::read_json(path)?;
        file.check()?;
        Ok(file)
    }

    fn check(&self) -> Result<(), EngineError> {
        let bad = |key: &str, why: String| EngineError::Unsupported {
            file: "scheduler/scheduler_config.json".into(),
            key: key.into(),
            why,
        };
        if self.class_name != "FlowMatchEulerDiscreteScheduler" {
            return Err(bad(
                "_class_name",
                format!("'{}': this model family runs FlowMatchEulerDiscreteScheduler", self.class_name),
            ));
        }
        if !matches!(self.time_shift_type.as_str(), "exponential" | "linear") {
            return Err(bad("time_shift_type", format!("'{}' is not 'exponential' or 'linear'", self.time_shift_type)));
        }
        for (key, value) in &self.other {
            let at_default = match key.as_str() {
                k if k.starts_with('_') => true,
                "use_karras_sigmas"
                | "use_exponential_sigmas"
                | "use_beta_sigmas"
                | "invert_sigmas"
                | "stochastic_sampling" => matches!(value, serde_json::Value::Bool(false) | serde_json::Value::Null),
                "shift_terminal" => value.is_null(),
                _ => true,
            };
            if !at_default {
                return Err(bad(key, format!("{value} is not implemented (only its default is)")));
            }
        }
        if self.num_train_timesteps == 0 || self.shift <= 0.0 {
            return Err(bad("shift", "num_train_timesteps and shift must be positive".into()));
        }
        Ok(())
    }
}

/// diffusers' `calculate_shift`: `mu` for an image of `image_seq_len` tokens, interpolated linearly
/// between `base_shift` at `base_image_seq_len` and `max_shift` at `max_image_seq_len`.
pub fn mu_for(config: &FlowMatchFile, image_seq_len: usize) -> f64 {
    let (base_len, max_len) = (config.base_image_seq_len as f64, config.max_image_seq_len as f64);
    let m = (config.max_shift - config.base_shift) / (max_len - base_len);
    let b = config.base_shift - m * base_len;
    image_seq_len as f64 * m + b
}

/// torch's `linspace(start, end, steps)` in f32: from both ends towards the middle, as its CPU kernel
/// computes it (so the values are the bits diffusers gets).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 })
        .collect()
}

/// One run's schedule.
#[derive(Debug, Clone)]
pub struct FlowMatch {
    /// `steps + 1` sigmas, the last 0.
    sigmas: Vec<f32>,
    /// `steps` timesteps, `sigma * num_train_timesteps`.
    timesteps: Vec<f32>,
}

impl FlowMatch {
    /// The schedule of `steps` steps for an image of `image_seq_len` tokens (which sets `mu` when the
    /// config shifts dynamically), from the pipelines' default sigmas.
    pub fn new(config: &FlowMatchFile, steps: usize, image_seq_len: usize) -> Result<FlowMatch, EngineError> {
        if steps == 0 {
            return Err(EngineError::InvalidInput("steps must be at least 1".into()));
        }
        let base = linspace_f32(1.0, 1.0 / steps as f32, steps);
        let mu = mu_for(config, image_seq_len);
        let shifted: Vec<f32> = base
            .iter()
            .map(|&s| {
                // numpy on f32 arrays with Python floats: every operation in f32.
                if config.use_dynamic_shifting {
                    let x = 1.0 / s - 1.0;
                    let m = match config.time_shift_type.as_str() {
                        "linear" => mu as f32,
                        _ => mu.exp() as f32,
                    };
                    m / (m + x)
                } else {
                    config.shift as f32 * s / (1.0 + (config.shift - 1.0) as f32 * s)
                }
            })
            .collect();
        let train = config.num_train_timesteps as f32;
        let timesteps = shifted.iter().map(|s| s * train).collect();
        let mut sigmas = shifted;
        sigmas.push(0.0);
        Ok(FlowMatch { sigmas, timesteps })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The time the transformer sees at step `i`, `(1000 - t) / 1000`, in f32 as the pipelines compute it.
    pub fn model_time(&self, i: usize) -> f32 {
        (1000.0 - self.timesteps[i]) / 1000.0
    }

    /// One Euler step from step `i`: `sample + (sigma[i + 1] - sigma[i]) * velocity`.
    pub fn step(&self, velocity: &Tensor, i: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        sample + (velocity * f64::from(dt))?
    }

    /// The clean image the sample at step `i` points to: `sample - sigma[i] * velocity`.
    pub fn predict_original(&self, velocity: &Tensor, i: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        sample - (velocity * f64::from(self.sigmas[i]))?
    }

    /// The forward process at step `i`: `sigma * noise + (1 - sigma) * clean` (`scale_noise`).
    pub fn scale_noise(&self, clean: &Tensor, noise: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let sigma = f64::from(self.sigmas[i]);
        (noise * sigma)? + (clean * (1.0 - sigma))?
    }
}

/// How many of `steps` an edit of `strength` runs in diffusers' flow-matching image-to-image and
/// inpainting pipelines: `steps - int(steps - steps * strength)` (at least one).
pub fn steps_run(steps: usize, strength: f64) -> usize {
    let init = (steps as f64 * strength).min(steps as f64);
    let start = (steps as f64 - init).max(0.0) as usize;
    (steps - start.min(steps)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dynamic: bool) -> FlowMatchFile {
        serde_json::from_value(serde_json::json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": dynamic
        }))
        .unwrap()
    }

    #[test]
    fn the_shifted_schedule_ends_at_zero_and_starts_at_one() {
        let s = FlowMatch::new(&config(false), 4, 256).unwrap();
        assert_eq!(s.sigmas().len(), 5);
        assert_eq!(s.sigmas()[0], 1.0);
        assert_eq!(s.sigmas()[4], 0.0);
        // shift 3 at 0.5: 1.5 / 2 = 0.75.
        assert_eq!(s.sigmas()[2], 0.75);
        assert_eq!(s.timesteps()[2], 750.0);
    }

    #[test]
    fn an_edit_runs_the_pipelines_share_of_steps() {
        // 4 * 0.6 = 2.4: starts at int(1.6) = 1, runs 3 (the SD pipelines' int(2.4) would run 2).
        for (steps, strength, run) in [(4, 0.6, 3), (8, 1.0, 8), (8, 0.5, 4), (3, 0.1, 1), (10, 0.35, 4)] {
            assert_eq!(steps_run(steps, strength), run, "{steps} steps at strength {strength}");
        }
    }

    #[test]
    fn unimplemented_keys_are_refused_by_name() {
        let file: FlowMatchFile = serde_json::from_value(serde_json::json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": true
        }))
        .unwrap();
        let err = file.check().unwrap_err().to_string();
        assert!(err.contains("use_karras_sigmas"), "{err}");
    }
}

//! How close each sampler gets to the exact sample in a given number of steps, on a model whose
//! exact answer is known: data drawn from a mixture of gaussians, whose ideal noise prediction is
//! computed in closed form for every noisy input and timestep. Every run starts from the same noise;
//! the "exact" sample is DPM-Solver++ 2M on every training timestep but the first (999 steps), which Euler's
//! 1000-step run agrees with to the figure printed. Runs the engine's own schedulers through the same
//! loop as `Pipeline` (scale the input, predict at the step's timestep, guide, step).
//!
//!     cargo run --release -p engine --example sampler_convergence
//!
//! Prints, for guidance 1 (none) and 7.5, the RMS distance from the exact sample (relative to its RMS)
//! of Euler on SD's scheduler config (leading spacing, the checkpoint default that PNDM and LMS
//! configs run as) and of DPM-Solver++ 2M with Karras sigmas, at each step count. A proxy for image
//! quality with real weights, which cannot be downloaded here: it measures how far a sampler is from
//! the sample the model defines, not how good that sample looks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use candle_core::{Device, Tensor};
use engine::Sampler;
use engine::scheduler::Scheduler;
use engine::sd::checkpoint::SchedulerFile;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

/// Dimensions of a sample, clusters of the mixture, samples per run.
const DIM: usize = 256;
const CLUSTERS: usize = 16;
const SAMPLES: usize = 256;
/// Spread of each cluster around its mean (the means are unit gaussian).
const CLUSTER_STD: f64 = 0.25;
/// The clusters the "prompt" asks for (the conditional model knows only these); the unconditional
/// model knows all.
const PROMPTED: usize = 4;

struct Mixture {
    means: Vec<Vec<f64>>,
    /// Training sigma at each training timestep.
    train_sigmas: Vec<f64>,
}

impl Mixture {
    /// sigma at fractional timestep `t`, interpolated as diffusers does.
    fn sigma(&self, t: f64) -> f64 {
        let n = self.train_sigmas.len();
        let lo = (t.floor().max(0.0) as usize).min(n - 1);
        let hi = (lo + 1).min(n - 1);
        let frac = t - lo as f64;
        self.train_sigmas[lo] * (1.0 - frac) + self.train_sigmas[hi] * frac
    }

    /// The ideal noise prediction for `x` (the model's input: variance-preserving, `(x0 + sigma * eps)
    /// / sqrt(sigma^2 + 1)`) at timestep `t`, knowing clusters `0..known`.
    fn eps(&self, x: &[f64], t: f64, known: usize) -> Vec<f64> {
        let sigma = self.sigma(t);
        let xe: Vec<f64> = x.iter().map(|v| v * (sigma * sigma + 1.0).sqrt()).collect();
        let var = CLUSTER_STD * CLUSTER_STD + sigma * sigma;
        let logits: Vec<f64> = self.means[..known]
            .iter()
            .map(|m| -xe.iter().zip(m).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / (2.0 * var))
            .collect();
        let top = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
        let total: f64 = weights.iter().sum();
        let shrink = CLUSTER_STD * CLUSTER_STD / var;
        let mut x0 = vec![0.0; DIM];
        for (w, m) in weights.iter().zip(&self.means) {
            for d in 0..DIM {
                x0[d] += w / total * (m[d] + shrink * (xe[d] - m[d]));
            }
        }
        xe.iter().zip(&x0).map(|(a, b)| (a - b) / sigma).collect()
    }
}

/// Runs `steps` steps of the scheduler from `noise`; returns the final samples, flattened.
fn sample(m: &Mixture, config: &SchedulerFile, steps: usize, guidance: f64, noise: &Tensor) -> Vec<f64> {
    let mut s = Scheduler::new(config, steps).unwrap();
    let mut latents = (noise * s.init_noise_sigma()).unwrap();
    for i in 0..steps {
        let t = s.timesteps()[i];
        let input: Vec<f32> = s.scale_model_input(&latents, i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mut out = Vec::with_capacity(input.len());
        for x in input.chunks(DIM) {
            let x: Vec<f64> = x.iter().map(|v| f64::from(*v)).collect();
            let cond = m.eps(&x, t, PROMPTED);
            if guidance > 1.0 {
                let uncond = m.eps(&x, t, CLUSTERS);
                out.extend(uncond.iter().zip(&cond).map(|(u, c)| (u + guidance * (c - u)) as f32));
            } else {
                out.extend(cond.iter().map(|c| *c as f32));
            }
        }
        let out = Tensor::from_vec(out, (SAMPLES, DIM), &Device::Cpu).unwrap();
        latents = s.step(&out, i, &latents, None).unwrap();
    }
    latents.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect()
}

fn relative_rms(got: &[f64], want: &[f64]) -> f64 {
    let err: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let scale: f64 = want.iter().map(|b| b * b).sum();
    (err / scale).sqrt()
}

fn main() {
    let mut rng = StdRng::seed_from_u64(0);
    let mut gaussian = |n: usize| -> Vec<f64> { (0..n).map(|_| StandardNormal.sample(&mut rng)).collect() };
    let means = (0..CLUSTERS).map(|_| gaussian(DIM)).collect();
    let betas: Vec<f64> = (0..1000)
        .map(|i| (0.00085f64.sqrt() + (0.012f64.sqrt() - 0.00085f64.sqrt()) * i as f64 / 999.0).powi(2))
        .collect();
    let mut acc = 1.0;
    let train_sigmas = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            ((1.0 - acc) / acc).sqrt()
        })
        .collect();
    let m = Mixture { means, train_sigmas };
    let noise: Vec<f32> = gaussian(SAMPLES * DIM).into_iter().map(|v| v as f32).collect();
    let noise = Tensor::from_vec(noise, (SAMPLES, DIM), &Device::Cpu).unwrap();

    // SD 1.5's config (PNDM, run as Euler), and what the standard profile runs on it.
    let euler = SchedulerFile::stable_diffusion("EulerDiscreteScheduler", Some("leading"));
    let dpm = Sampler::DpmSolver2mKarras.config(&euler);
    let dpm_plain = SchedulerFile::stable_diffusion("DPMSolverMultistepScheduler", None);
    for guidance in [1.0, 7.5] {
        let exact = sample(&m, &dpm_plain, 999, guidance, &noise);
        let euler_500 = sample(&m, &euler, 500, guidance, &noise);
        println!(
            "guidance {guidance}: Euler at 500 steps is {:.5} from the exact sample (DPM-Solver++ 2M, 999 steps)",
            relative_rms(&euler_500, &exact)
        );
        println!("  steps   Euler (leading)   DPM++ 2M Karras");
        for steps in [5, 8, 10, 12, 15, 20, 25, 30, 40, 50] {
            let e = relative_rms(&sample(&m, &euler, steps, guidance, &noise), &exact);
            let d = relative_rms(&sample(&m, &dpm, steps, guidance, &noise), &exact);
            println!("  {steps:>5}   {e:>15.5}   {d:>15.5}");
        }
    }
}

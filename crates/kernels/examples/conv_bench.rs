//! CPU convolution throughput, candle's `conv2d` against `kernels::conv2d`, in GFLOP/s.
//!
//!     cargo run --release -p kernels --example conv_bench -- [--runs 5] [--threads N] [--only TEXT]
//!         [--algos candle,gemm,winograd2,winograd4,auto] [--all] [--check]
//!
//! The rows are bench/op_gflops.py's (PyTorch's numbers for the same convolutions, batch 1, f32, with
//! bias) plus a 1x1 and a stride-2 convolution. Each cell is the median of `--runs` timed runs after
//! one warm-up run, the algorithms taking turns run by run (the machine is shared: load from other
//! processes then hits all columns alike); FLOPs are 2 * Cout * Ho * Wo * Cin * k * k. `--threads N` builds rayon's global
//! pool with N threads; candle sizes its own gemm from RAYON_NUM_THREADS (else the CPU count), so set
//! that too when N is not the CPU count. `--all` adds more of the models' shapes; `--check` prints each
//! algorithm's error against candle under each row (`max|a - b| / max|b|`).
#![allow(clippy::print_stdout)]

use std::time::Instant;

use candle_core::{Device, Result, Tensor, bail};
use kernels::{Algorithm, conv2d_with};

/// (name, Cin, Cout, H, W, kernel, stride, padding)
type Row = (&'static str, usize, usize, usize, usize, usize, usize, usize);

const ROWS: &[Row] = &[
    ("conv3x3 128->128 @512x512", 128, 128, 512, 512, 3, 1, 1),
    ("conv3x3 256->256 @256x256", 256, 256, 256, 256, 3, 1, 1),
    ("conv3x3 512->512 @128x128", 512, 512, 128, 128, 3, 1, 1),
    ("conv3x3 320->320 @64x64", 320, 320, 64, 64, 3, 1, 1),
    ("conv3x3 640->640 @32x32", 640, 640, 32, 32, 3, 1, 1),
    ("conv1x1 512->512 @128x128", 512, 512, 128, 128, 1, 1, 0),
    ("conv3x3/2 320->320 @64x64", 320, 320, 64, 64, 3, 2, 1),
];

/// More of the models' shapes, with `--all`: the rest of the VAE decoder and the UNet's low resolutions.
const EXTRA_ROWS: &[Row] = &[
    ("conv3x3 4->512 @64x64", 4, 512, 64, 64, 3, 1, 1),
    ("conv3x3 512->512 @64x64", 512, 512, 64, 64, 3, 1, 1),
    ("conv3x3 128->3 @512x512", 128, 3, 512, 512, 3, 1, 1),
    ("conv1x1 256->128 @512x512", 256, 128, 512, 512, 1, 1, 0),
    ("conv3x3 1920->640 @32x32", 1920, 640, 32, 32, 3, 1, 1),
    ("conv3x3 1280->1280 @16x16", 1280, 1280, 16, 16, 3, 1, 1),
    ("conv3x3 2560->1280 @16x16", 2560, 1280, 16, 16, 3, 1, 1),
    ("conv3x3 1280->1280 @8x8", 1280, 1280, 8, 8, 3, 1, 1),
    ("conv3x3 2560->1280 @8x8", 2560, 1280, 8, 8, 3, 1, 1),
    ("conv3x3/2 640->640 @32x32", 640, 640, 32, 32, 3, 2, 1),
];

const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("candle", Algorithm::Candle),
    ("gemm", Algorithm::Gemm),
    ("winograd2", Algorithm::Winograd2),
    ("winograd4", Algorithm::Winograd4),
    ("auto", Algorithm::Auto),
];

struct Args {
    runs: usize,
    threads: Option<usize>,
    only: Option<String>,
    algos: Vec<(&'static str, Algorithm)>,
    all: bool,
    check: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { runs: 5, threads: None, only: None, algos: ALGORITHMS.to_vec(), all: false, check: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--all" || flag == "--check" {
            args.all |= flag == "--all";
            args.check |= flag == "--check";
            continue;
        }
        let value = it.next();
        match (flag.as_str(), value) {
            ("--runs", Some(v)) => {
                args.runs = v.parse().map_err(|e| candle_core::Error::Msg(format!("--runs: {e}")))?
            }
            ("--threads", Some(v)) => {
                args.threads = Some(v.parse().map_err(|e| candle_core::Error::Msg(format!("--threads: {e}")))?)
            }
            ("--only", Some(v)) => args.only = Some(v),
            ("--algos", Some(v)) => {
                let wanted: Vec<&str> = v.split(',').collect();
                args.algos = ALGORITHMS.iter().copied().filter(|(name, _)| wanted.contains(name)).collect();
            }
            (flag, _) => bail!("unknown or incomplete flag {flag}; see the example's doc comment"),
        }
    }
    Ok(args)
}

/// Median seconds of each closure over `runs` rounds, after one warm-up round. The closures take turns
/// within each round, so that load from other processes hits them alike.
fn median_seconds(runs: usize, fs: &mut [Box<dyn FnMut() -> Result<()> + '_>]) -> Result<Vec<f64>> {
    for f in fs.iter_mut() {
        f()?; // warm-up: first-touch page faults, per-thread buffers
    }
    let mut times = vec![Vec::with_capacity(runs); fs.len()];
    for _ in 0..runs.max(1) {
        for (f, times) in fs.iter_mut().zip(&mut times) {
            let start = Instant::now();
            f()?;
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

/// `max|got - want| / max|want|`, the tests' error measure.
fn relative_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
    Ok((got - want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().map_err(candle_core::Error::wrap)?;
    }
    println!(
        "kernels::conv2d vs candle 0.11 conv2d, f32, batch 1, with bias, {} rayon threads (candle's gemm: {}), median of {} runs, GFLOP/s",
        rayon::current_num_threads(),
        candle_core::utils::get_num_threads(),
        args.runs
    );
    println!();
    let names: Vec<&str> = args.algos.iter().map(|(name, _)| *name).collect();
    println!("| op | GFLOP | {} |", names.join(" | "));
    println!("|---|---:|{}", "---:|".repeat(names.len()));
    let dev = Device::Cpu;
    let extra = if args.all { EXTRA_ROWS } else { &[] };
    for &(name, cin, cout, h, w, k, stride, padding) in ROWS.iter().chain(extra) {
        if args.only.as_deref().is_some_and(|only| !name.contains(only)) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (1, cin, h, w), &dev)?;
        let weight = (Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)? / ((cin * k * k) as f64).sqrt())?;
        let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
        let (ho, wo) = ((h + 2 * padding - k) / stride + 1, (w + 2 * padding - k) / stride + 1);
        let flops = 2.0 * (cout * ho * wo * cin * k * k) as f64;
        let applies = |algorithm: Algorithm| {
            !matches!(algorithm, Algorithm::Winograd2 | Algorithm::Winograd4) || (k, stride) == (3, 1)
        };
        let algos: Vec<Algorithm> = args.algos.iter().map(|(_, a)| *a).filter(|a| applies(*a)).collect();
        let (x, weight, bias) = (&x, &weight, &bias);
        let mut fs: Vec<Box<dyn FnMut() -> Result<()>>> = algos
            .iter()
            .map(|&algorithm| -> Box<dyn FnMut() -> Result<()>> {
                Box::new(move || conv2d_with(x, weight, Some(bias), stride, padding, algorithm).map(drop))
            })
            .collect();
        let mut seconds = median_seconds(args.runs, &mut fs)?.into_iter();
        let cells: Vec<String> = args
            .algos
            .iter()
            .map(|(_, a)| match applies(*a) {
                true => seconds.next().map_or("?".to_string(), |s| format!("{:.1}", flops / s / 1e9)),
                false => "-".to_string(),
            })
            .collect();
        println!("| {name} | {:.1} | {} |", flops / 1e9, cells.join(" | "));
        if args.check {
            let want = conv2d_with(x, weight, Some(bias), stride, padding, Algorithm::Candle)?;
            let errors = algos
                .iter()
                .map(|&a| {
                    Ok(format!(
                        "{a:?} {:.1e}",
                        relative_error(&conv2d_with(x, weight, Some(bias), stride, padding, a)?, &want)?
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            println!("|   error vs candle: {} |", errors.join(", "));
        }
    }
    Ok(())
}

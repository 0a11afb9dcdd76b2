//! The instruction-set level the hand-written loops run at: every `pulp` dispatch of the crate
//! (`linear_f16`'s tiles, attention's softmax, Winograd's transforms, f16 widening) asks [`arch`] instead
//! of `pulp::Arch::new()`, so that one binary, which serves every x86-64 CPU, can have each of its code
//! paths tested on one machine.
//!
//! In production nothing is forced and [`arch`] is `pulp::Arch::new()`, the CPU's best level, after one
//! read of a thread-local flag (no lock, no atomic read-modify-write). [`with_level`] runs a closure on a
//! rayon pool of its own whose every thread has the flag set, so that the kernels' parallel work sees
//! the forced level too (a flag on the calling thread alone would not reach the pool's threads, and a
//! process-wide one would change the level under tests running beside it).
//!
//! Not forced: the `gemm` crate's matrix products, which pick AVX-512, FMA or scalar kernels with
//! std's feature detection once per process (a private function pointer; no feature, setting or
//! environment variable chooses it), and `half`'s f16 conversion, which the f16 widening uses below
//! AVX-512 and which detects F16C the same way.

use std::cell::Cell;

use candle_core::{Result, bail};

/// One of the instruction sets the kernels are compiled for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    /// x86-64-v4: AVX-512 (F, BW, CD, DQ, VL) on top of V3.
    V4,
    /// x86-64-v3: AVX2, FMA, F16C and friends.
    V3,
    /// What the crate is built for without run-time detection: SSE2 on x86-64 (`pulp`'s scalar
    /// path, which the compiler vectorizes for it).
    Baseline,
}

impl Level {
    /// Every level, best first.
    pub const ALL: [Level; 3] = [Level::V4, Level::V3, Level::Baseline];

    /// Whether this CPU can run the level.
    pub fn is_supported(self) -> bool {
        self.arch().is_some()
    }

    /// Every level this CPU supports, best first (the baseline always).
    pub fn supported() -> impl Iterator<Item = Level> {
        Level::ALL.into_iter().filter(|level| level.is_supported())
    }

    /// The best level this CPU supports: the one the kernels use unless [`with_level`] says otherwise.
    pub fn best() -> Level {
        Level::supported().next().unwrap_or(Level::Baseline)
    }

    /// `pulp`'s dispatch at this level, if the CPU has it.
    fn arch(self) -> Option<pulp::Arch> {
        match self {
            #[cfg(target_arch = "x86_64")]
            Level::V4 => pulp::x86::V4::try_new().map(pulp::Arch::V4),
            #[cfg(target_arch = "x86_64")]
            Level::V3 => pulp::x86::V3::try_new().map(pulp::Arch::V3),
            #[cfg(target_arch = "x86_64")]
            Level::Baseline => Some(pulp::Arch::Scalar),
            #[cfg(not(target_arch = "x86_64"))]
            Level::V4 | Level::V3 => None,
            // Elsewhere `pulp`'s own best is the only level the kernels know.
            #[cfg(not(target_arch = "x86_64"))]
            Level::Baseline => Some(pulp::Arch::new()),
        }
    }
}

thread_local! {
    /// The level forced on this thread: set only on the threads of a [`with_level`] pool.
    static FORCED: Cell<Option<Level>> = const { Cell::new(None) };
}

/// The dispatch every kernel runs its vector loops through: the CPU's best level, or the one
/// [`with_level`] forces on this thread.
#[inline]
pub(crate) fn arch() -> pulp::Arch {
    match FORCED.with(Cell::get).and_then(Level::arch) {
        Some(arch) => arch,
        None => pulp::Arch::new(),
    }
}

/// Runs `f` with every kernel it calls dispatched at `level` instead of the CPU's best: on a rayon pool
/// of as many threads as the current one, each of them (and so all the kernels' parallel work) forced to
/// `level`. For tests and benchmarks: this is how the AVX2 paths are checked on an AVX-512 machine.
/// A panic in `f` reaches the caller. Errors if the CPU lacks `level` or the pool cannot be started.
/// Work that `f` hands to another pool or thread runs at that thread's level (the best, unless it too
/// is in a `with_level` pool): call `with_level` inside the pool the work should run on.
///
/// The `gemm` crate's products and `half`'s conversions keep their own detection (module docs).
pub fn with_level<R: Send>(level: Level, f: impl FnOnce() -> R + Send) -> Result<R> {
    if !level.is_supported() {
        bail!("kernels: this CPU cannot run the {level:?} level")
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(move |i| format!("kernels-{level:?}-{i}"))
        .start_handler(move |_| FORCED.with(|forced| forced.set(Some(level))))
        .build()
        .map_err(candle_core::Error::wrap)?;
    Ok(pool.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which level a `pulp::Arch` is.
    fn level_of(arch: pulp::Arch) -> Level {
        match arch {
            #[cfg(target_arch = "x86_64")]
            pulp::Arch::V4(_) => Level::V4,
            #[cfg(target_arch = "x86_64")]
            pulp::Arch::V3(_) => Level::V3,
            _ => Level::Baseline,
        }
    }

    #[test]
    fn every_thread_of_the_pool_runs_at_the_forced_level_and_others_at_the_best() {
        assert!(Level::Baseline.is_supported());
        assert_eq!(level_of(arch()), Level::best());
        assert_eq!(level_of(pulp::Arch::new()), Level::best());
        for level in Level::supported() {
            let seen = with_level(level, || {
                let threads = rayon::current_num_threads();
                (threads, level_of(arch()), rayon::broadcast(|_| level_of(arch())))
            })
            .unwrap();
            assert_eq!(seen.0, rayon::current_num_threads(), "{level:?}");
            assert_eq!(seen.1, level);
            assert_eq!(seen.2, vec![level; seen.0]);
            // Nothing leaks out of the pool.
            assert_eq!(level_of(arch()), Level::best());
            assert_eq!(rayon::broadcast(|_| level_of(arch())), vec![Level::best(); rayon::current_num_threads()]);
        }
    }

    #[test]
    fn refuses_a_level_the_cpu_lacks_and_passes_panics_on() {
        for level in Level::ALL.into_iter().filter(|l| !l.is_supported()) {
            let e = with_level(level, || ()).unwrap_err().to_string();
            assert!(e.contains(&format!("{level:?}")), "{e}");
        }
        let panicked = std::panic::catch_unwind(|| with_level(Level::Baseline, || panic!("inside")));
        assert!(panicked.is_err());
    }
}

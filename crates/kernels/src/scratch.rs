//! Reusable per-thread buffers for the big scratch (a band's matrices, the transformed weight), so
//! that a convolution does not pay for fresh pages on every band and every call: on the development
//! VM a page fault costs about 2 µs per 4 KiB, some 0.5 ms per MB touched.

use std::cell::Cell;

use rayon::prelude::*;

/// Which of the thread's buffers: a band's scratch, a transformed weight that outlives the bands, or
/// f16 weights widened for use ([`Values`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Slot {
    Band = 0,
    Weights = 1,
    Widened = 2,
}

thread_local! {
    static BUFFERS: [Cell<Vec<f32>>; 3] = const { [Cell::new(Vec::new()), Cell::new(Vec::new()), Cell::new(Vec::new())] };
}

/// Runs `f` on this thread's `slot` buffer, grown to at least `len` floats; what it holds on entry is
/// unspecified (the caller writes before it reads). A nested call on the same thread and slot (rayon
/// may run another job while this one waits) gets a fresh buffer instead. The buffer is kept for the
/// next call: a thread holds on to the largest size it has needed.
pub(crate) fn with_scratch<R>(slot: Slot, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buffer = BUFFERS.with(|b| b[slot as usize].take());
    if buffer.len() < len {
        // A new buffer of exactly `len`, the old one freed first: growing in place would copy the old
        // contents (which nobody reads) and round the capacity up to twice the old one.
        drop(buffer);
        buffer = vec![0.0; len];
    }
    let result = f(&mut buffer[..len]);
    BUFFERS.with(|b| b[slot as usize].set(buffer));
    result
}

/// Frees this thread's buffers.
pub(crate) fn free_this_thread() {
    BUFFERS.with(|b| b.iter().for_each(|cell| drop(cell.take())));
}

/// A weight's values as f32, or as the f16 they are stored in (the UNet's weights, read in place from
/// their file): f16 values are widened just before use into this thread's [`Slot::Widened`] buffer,
/// reused between calls, never into a fresh f32 copy.
#[derive(Clone, Copy)]
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl<'a> Values<'a> {
    /// The values in `range`.
    pub(crate) fn slice(self, range: std::ops::Range<usize>) -> Values<'a> {
        match self {
            Values::F32(w) => Values::F32(&w[range]),
            Values::F16(w) => Values::F16(&w[range]),
        }
    }

    /// `f` on the values as f32: in place, or widened into this thread's [`Slot::Widened`] buffer.
    pub(crate) fn with_f32<R>(self, f: impl FnOnce(&[f32]) -> R) -> R {
        match self {
            Values::F32(w) => f(w),
            Values::F16(w) => with_scratch(Slot::Widened, w.len(), |wide| {
                crate::widen_into(w, wide);
                f(wide)
            }),
        }
    }
}

/// Below this many floats a buffer is zeroed by the calling thread: sharing it out costs more.
const PARALLEL_ZERO_FLOATS: usize = 1 << 16;

/// `len` zeros, written by the threads of the current rayon pool for big buffers. An output of many
/// megabytes (a 64x64 latent's feed-forward: 42 MB) zeroed on one thread, by `vec![0.0; len]`'s memset
/// or by the page faults of fresh memory, leaves every other thread idle meanwhile: on the 2-core
/// development VM that was a tenth of a generation's wall time with one core idle.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    if len < PARALLEL_ZERO_FLOATS {
        return vec![0.0; len];
    }
    let mut out = Vec::with_capacity(len);
    out.par_extend(rayon::iter::repeat_n(0.0f32, len).with_min_len(PARALLEL_ZERO_FLOATS));
    out
}

//! f16 and bf16 values widened to f32: every f16 weight the engine keeps meets the f32 arithmetic
//! here, once per use (a one-step generation widens each of the UNet's 866M weights once, the text
//! encoder's 340M too).
//!
//! The `half` crate converts eight f16 values per call of a function compiled for F16C (runtime
//! detection, arrays in and out): about 0.4 ns a value on the development VM, 4-5% of a tiny-decoder
//! run's CPU time. On CPUs with AVX-512 the conversion here runs inside one function compiled for it
//! (`pulp`'s dispatch), sixteen values per `vcvtph2ps` instruction. Both conversions are exact (every
//! f16 is an f32), so the results are the same bits; elsewhere the `half` crate's.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

/// The 16-bit float formats weights are stored in.
pub trait HalfFloat: Copy + Sync + sealed::Sealed {
    /// `src` widened into `dst` (as long as `src`) on the calling thread.
    fn widen_slice(src: &[Self], dst: &mut [f32]);
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

impl HalfFloat for f16 {
    fn widen_slice(src: &[f16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if let pulp::Arch::V4(simd) = crate::level::arch() {
            let bits: &[u16] = src.reinterpret_cast();
            simd.vectorize(F16Avx512 { simd, src: bits, dst });
            return;
        }
        src.convert_to_f32_slice(dst);
    }
}

impl HalfFloat for bf16 {
    fn widen_slice(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

/// [`HalfFloat::widen_slice`] for f16 on AVX-512: sixteen values at a time, the tail by `half`.
#[cfg(target_arch = "x86_64")]
struct F16Avx512<'a> {
    simd: pulp::x86::V4,
    src: &'a [u16],
    dst: &'a mut [f32],
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for F16Avx512<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        use core::arch::x86_64::{__m256i, __m512};
        let F16Avx512 { simd, src, dst } = self;
        let (src_blocks, src_tail) = src.as_chunks::<16>();
        let (dst_blocks, dst_tail) = dst.as_chunks_mut::<16>();
        for (s, d) in src_blocks.iter().zip(dst_blocks.iter_mut()) {
            let packed: __m256i = pulp::cast(*s);
            let wide: __m512 = simd.avx512f._mm512_cvtph_ps(packed);
            *d = pulp::cast(wide);
        }
        let tail: &[f16] = src_tail.reinterpret_cast();
        tail.convert_to_f32_slice(dst_tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widens_every_f16_exactly_at_every_level() {
        // Every bit pattern (a NaN must stay a NaN), at an odd length so that the tail is used, and at an
        // offset; at each level this CPU has (AVX-512: sixteen at a time; below: `half`'s path).
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        for level in crate::Level::supported() {
            for skip in [0, 3] {
                let src = &all[skip..];
                let mut got = vec![0.0f32; src.len()];
                crate::with_level(level, || f16::widen_slice(src, &mut got)).unwrap();
                for (h, g) in src.iter().zip(&got) {
                    let want = h.to_f32();
                    let same = g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
                    assert!(same, "{level:?} {h:?}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn widens_bf16() {
        let src: Vec<bf16> = (0..37).map(|i| bf16::from_f32(i as f32 * 0.37 - 5.0)).collect();
        let mut got = vec![0.0f32; src.len()];
        bf16::widen_slice(&src, &mut got);
        assert!(src.iter().zip(&got).all(|(h, g)| h.to_f32() == *g));
    }
}

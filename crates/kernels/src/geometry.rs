//! Convolution shapes, and the split of the output into row bands that threads fill independently.

use candle_core::{Result, bail};
use rayon::prelude::*;

/// The shape of one convolution: NCHW input, OIHW weight, square stride and symmetric zero padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geometry {
    /// Checks that the shapes go together and computes the output size.
    pub fn new(
        input: (usize, usize, usize, usize),
        weight: (usize, usize, usize, usize),
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        let (batch, cin, h, w) = input;
        let (cout, cin_w, kh, kw) = weight;
        if cin != cin_w {
            bail!("conv2d: input has {cin} channels but the weight expects {cin_w}")
        }
        if stride == 0 {
            bail!("conv2d: stride must be at least 1")
        }
        if kh == 0 || kw == 0 {
            bail!("conv2d: empty {kh}x{kw} kernel")
        }
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        if hp < kh || wp < kw {
            bail!("conv2d: {kh}x{kw} kernel larger than the {hp}x{wp} padded input")
        }
        let (ho, wo) = ((hp - kh) / stride + 1, (wp - kw) / stride + 1);
        Ok(Self { batch, cin, h, w, cout, kh, kw, stride, pad, ho, wo })
    }

    pub fn input_len(&self) -> usize {
        self.batch * self.cin * self.h * self.w
    }

    pub fn weight_len(&self) -> usize {
        self.cout * self.cin * self.kh * self.kw
    }

    pub fn output_len(&self) -> usize {
        self.batch * self.cout * self.ho * self.wo
    }
}

/// Output rows `row0 .. row0 + rows` of one image, all channels: `channels[co]` is that channel's
/// `rows * wo` values, row-major.
pub(crate) struct Band<'a> {
    pub image: usize,
    pub row0: usize,
    pub rows: usize,
    pub channels: Vec<&'a mut [f32]>,
}

/// Splits an NCHW output into bands of `rows` output rows (the last band of each image may be shorter),
/// ordered by image then row. Safe disjoint borrows: each band gets one slice per channel.
pub(crate) fn split_rows<'a>(out: &'a mut [f32], g: &Geometry, rows: usize) -> Vec<Band<'a>> {
    let rows = rows.clamp(1, g.ho.max(1));
    let per_image = g.ho.div_ceil(rows);
    let mut bands: Vec<Band<'a>> = (0..g.batch * per_image)
        .map(|i| {
            let row0 = (i % per_image) * rows;
            Band { image: i / per_image, row0, rows: rows.min(g.ho - row0), channels: Vec::with_capacity(g.cout) }
        })
        .collect();
    let plane = g.ho * g.wo;
    if plane == 0 {
        return bands;
    }
    for (index, channel) in out.chunks_mut(plane).enumerate() {
        let image = index / g.cout;
        for (b, piece) in channel.chunks_mut(rows * g.wo).enumerate() {
            bands[image * per_image + b].channels.push(piece);
        }
    }
    bands
}

/// What a convolution does to each output value after adding the bias, band by band while the band
/// is in cache: add the matching value of `residual` (the output's shape, NCHW), then ReLU.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Epilogue<'a> {
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

impl Epilogue<'_> {
    /// Applies it to `dst`: output channel `co` of image `image`, from output row `row0` on.
    #[inline]
    pub fn apply(&self, g: &Geometry, image: usize, co: usize, row0: usize, dst: &mut [f32]) {
        let relu = |v: f32| if v < 0.0 { 0.0 } else { v };
        match self.residual {
            Some(residual) => {
                let start = ((image * g.cout + co) * g.ho + row0) * g.wo;
                let residual = &residual[start..start + dst.len()];
                if self.relu {
                    dst.iter_mut().zip(residual).for_each(|(d, r)| *d = relu(*d + r));
                } else {
                    dst.iter_mut().zip(residual).for_each(|(d, r)| *d += r);
                }
            }
            None if self.relu => dst.iter_mut().for_each(|d| *d = relu(*d)),
            None => {}
        }
    }
}

/// How many units (output rows, or rows of Winograd tiles) each band gets: near `target` units, but
/// chosen so that the bands of all `batch` images keep `threads` threads busy in whole rounds (a band
/// much smaller than the target is penalized: its gemm is less efficient).
pub(crate) fn band_units(units: usize, batch: usize, threads: usize, target: usize) -> usize {
    let units = units.max(1);
    let (threads, target) = (threads.max(1), target.clamp(1, units));
    let score = |u: usize| {
        let bands = units.div_ceil(u) * batch.max(1);
        let rounds = bands.div_ceil(threads);
        let busy = (units * batch.max(1)) as f64 / (threads * rounds * u) as f64;
        busy * (2.0 * u as f64 / target as f64).min(1.0)
    };
    let mut best = (target, score(target));
    for u in 1..=(2 * target).min(units) {
        let s = score(u);
        if s > best.1 + 1e-9 || (s > best.1 - 1e-9 && u.abs_diff(target) < best.0.abs_diff(target)) {
            best = (u, s);
        }
    }
    best.0
}

/// Runs `work` on every band: in parallel (one band per thread at a time) or one after the other.
pub(crate) fn run_bands<F>(bands: Vec<Band<'_>>, parallel: bool, work: F) -> Result<()>
where
    F: Fn(Band<'_>) -> Result<()> + Sync + Send,
{
    if parallel {
        bands.into_par_iter().with_max_len(1).try_for_each(work)
    } else {
        bands.into_iter().try_for_each(work)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_size() {
        let g = Geometry::new((1, 4, 7, 6), (3, 4, 3, 3), 2, 1).unwrap();
        assert_eq!((g.ho, g.wo), (4, 3));
        assert!(Geometry::new((1, 4, 7, 6), (3, 5, 3, 3), 1, 1).is_err());
        assert!(Geometry::new((1, 4, 2, 2), (3, 4, 3, 3), 1, 0).is_err());
        assert!(Geometry::new((1, 4, 2, 2), (3, 4, 3, 3), 0, 1).is_err());
    }

    #[test]
    fn bands_cover_the_output_once() {
        let g = Geometry::new((2, 1, 5, 3), (3, 1, 1, 1), 1, 0).unwrap();
        let mut out = vec![0.0; g.output_len()];
        for band in split_rows(&mut out, &g, 2) {
            assert_eq!(band.channels.len(), 3);
            for (co, channel) in band.channels.into_iter().enumerate() {
                assert_eq!(channel.len(), band.rows * g.wo);
                channel.iter_mut().for_each(|v| *v += (band.image * 100 + co * 10 + band.row0) as f32);
            }
        }
        let plane = g.ho * g.wo;
        for (i, v) in out.iter().enumerate() {
            let (image, co, row) = (i / (3 * plane), i / plane % 3, i % plane / g.wo);
            assert_eq!(*v, (image * 100 + co * 10 + row / 2 * 2) as f32, "element {i}");
        }
    }

    #[test]
    fn bands_fill_every_thread() {
        assert_eq!(band_units(128, 1, 2, 8), 8);
        assert_eq!(band_units(3, 1, 2, 8), 2); // bands of 2 and 1 rows
        assert_eq!(band_units(9, 1, 2, 4), 5); // 3 bands of 3 would leave a thread idle half the time
        assert_eq!(band_units(9, 2, 2, 4), 3); // 2 images x 3 bands: three rounds, all busy
        assert_eq!(band_units(1, 1, 2, 8), 1);
    }
}

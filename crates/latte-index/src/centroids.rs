//! The index's centroids, read where they lie: f32 in format-1 codec files, IEEE half precision (format 2)
//! straight from the memory-mapped codec file, so search never holds an f32 copy.

use std::ops::Range;

use half::f16;

use crate::storage::{cast, Mapped};

/// Centroids of one index (`k × dim`).
#[derive(Clone)]
pub(crate) enum Centroids {
    /// Format 1: f32, copied out of the file.
    F32(Vec<f32>),
    /// Format 2: f16, in place in the mapped codec file.
    F16 { file: Mapped, range: Range<usize> },
}

impl Centroids {
    fn half(&self) -> Option<&[f16]> {
        match self {
            Centroids::F32(_) => None,
            Centroids::F16 { file, range } => Some(
                cast(&file.payload()[range.clone()], file.path(), "centroids")
                    .expect("checked at open"),
            ),
        }
    }

    /// All centroids as f32 (exactly the values search and decoding use).
    pub(crate) fn to_f32(&self) -> Vec<f32> {
        match self {
            Centroids::F32(v) => v.clone(),
            Centroids::F16 { .. } => {
                let h = self.half().expect("f16");
                let mut out = vec![0f32; h.len()];
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, &mut out);
                out
            }
        }
    }

    /// Centroid `c` as f32 into `out` (`dim` values).
    pub(crate) fn row_into(&self, c: usize, out: &mut [f32]) {
        let dim = out.len();
        match self {
            Centroids::F32(v) => out.copy_from_slice(&v[c * dim..(c + 1) * dim]),
            Centroids::F16 { .. } => {
                let h = self.half().expect("f16");
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                    &h[c * dim..(c + 1) * dim],
                    out,
                );
            }
        }
    }

    /// Centroid-major scores: `out[c * stride + j] = ⟨centroid c, q_j⟩` for the `lq` query tokens; the
    /// `stride − lq` padding entries of each row are set to 0. `qt` is the query transposed and padded
    /// ([`latte_kernels::half::transpose_query`]). Returns the largest `|score|` (for the i8 quantisation).
    pub(crate) fn scores(
        &self,
        q: &[f32],
        qt: &[f32],
        lq: usize,
        dim: usize,
        stride: usize,
        out: &mut [f32],
    ) -> f32 {
        match self {
            Centroids::F32(v) => {
                latte_kernels::half::dots_f32(v, dim, stride, q, lq, out);
                latte_kernels::search::max_abs(out)
            }
            Centroids::F16 { .. } => {
                let h = self.half().expect("f16");
                // Blocks of rows in parallel: this is the largest serial step of a search otherwise.
                const ROWS: usize = 1024;
                use rayon::prelude::*;
                // Centroid scores only rank cells and seed the approximate passes: bf16 products where the
                // CPU has them. Each block also returns its largest |score| while its rows are in cache.
                let pairs = latte_kernels::half::bf16_query(qt, dim, stride);
                let pairs = pairs.as_deref();
                h.par_chunks(ROWS * dim)
                    .zip(out.par_chunks_mut(ROWS * stride))
                    .map(|(h, out)| {
                        latte_kernels::half::approx_dots(h, dim, qt, pairs, stride, q, lq, out);
                        latte_kernels::search::max_abs(out)
                    })
                    .reduce(|| 0f32, f32::max)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{as_bytes, write_sections};

    #[test]
    fn half_and_single_precision_score_alike() {
        let (k, dim, lq) = (1100usize, 16usize, 3usize);
        let c: Vec<f32> = (0..k * dim)
            .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
            .collect();
        let h: Vec<f16> = c.iter().map(|&v| f16::from_f32(v)).collect();
        let rounded: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("codec.lt");
        write_sections(&p, b"CODC", &[as_bytes(&h)]).unwrap();
        let file = Mapped::open(&p, b"CODC").unwrap();
        let range = {
            let base = file.payload().as_ptr() as usize;
            let s = file.sections().unwrap()[0];
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let half = Centroids::F16 { file, range };
        let single = Centroids::F32(rounded.clone());
        assert_eq!(half.to_f32(), rounded);
        let q: Vec<f32> = (0..lq * dim).map(|i| (i % 7) as f32 * 0.1).collect();
        let (qt, qstride) = latte_kernels::half::transpose_query(&q, lq, dim);
        assert_eq!(qstride, 32);
        let stride = qstride;
        let mut a = vec![1f32; k * stride];
        let mut b = vec![1f32; k * stride];
        let ma = half.scores(&q, &qt, lq, dim, stride, &mut a);
        let mb = single.scores(&q, &qt, lq, dim, stride, &mut b);
        // The returned maximum is the largest |score| written.
        assert_eq!(ma, a.iter().fold(0f32, |m, v| m.max(v.abs())));
        assert_eq!(mb, b.iter().fold(0f32, |m, v| m.max(v.abs())));
        // The half-precision centroids are scored with bf16 products where the CPU has them: within
        // 2⁻⁸ · Σ_d |c_d q_d| of the exact score (and exactly where it does not).
        for r in 0..k {
            for j in 0..stride {
                let (x, y) = (a[r * stride + j], b[r * stride + j]);
                let bound = if j < lq {
                    (0..dim)
                        .map(|d| (rounded[r * dim + d] * q[j * dim + d]).abs())
                        .sum::<f32>()
                        / 256.0
                } else {
                    0.0
                };
                assert!(
                    (x - y).abs() <= bound + 1e-5,
                    "row {r} lane {j}: {x} vs {y}"
                );
            }
        }
        let mut row = vec![0f32; dim];
        half.row_into(1099, &mut row);
        let want: f32 = (0..dim).map(|d| rounded[1099 * dim + d] * q[dim + d]).sum();
        assert!((a[1099 * stride + 1] - want).abs() < 1e-2 * want.abs() + 1e-5);
        assert!((b[1099 * stride + 1] - want).abs() < 1e-5);
        assert_eq!(a[1099 * stride + lq], 0.0);
        assert_eq!(row, rounded[1099 * dim..1100 * dim]);
    }
}

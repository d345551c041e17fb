//! Dot products of half-precision rows (centroids, the f16 copy of the documents) with a query, read in place
//! (no f32 copy of the rows): an AVX-512 kernel where the CPU has it, a convert-then-matmul fallback elsewhere.
//!
//! The query is passed transposed and padded, `qt[d * stride + j]` = query token `j`'s dimension `d` (`stride`
//! a multiple of [`LANES`], zero past the query's tokens), and scores come out row-major with the same stride.

use half::f16;

use crate::kernels::{simd_level, LANES};
use crate::linalg::matmul_abt;

/// Transposes a query (`lq × dim`) into the padded layout above.
pub(crate) fn transpose_query(q: &[f32], lq: usize, dim: usize) -> (Vec<f32>, usize) {
    let stride = lq.div_ceil(LANES).max(1) * LANES;
    let mut qt = vec![0f32; dim * stride];
    for j in 0..lq {
        for d in 0..dim {
            qt[d * stride + j] = q[j * dim + d];
        }
    }
    (qt, stride)
}

/// `out[r * stride + j] = Σ_d rows[r][d] · qt[d * stride + j]` for the `rows.len() / dim` rows.
/// `q` is the same query untransposed (`lq × dim`), used by the fallback.
pub(crate) fn dots(
    rows: &[f16],
    dim: usize,
    qt: &[f32],
    stride: usize,
    q: &[f32],
    lq: usize,
    out: &mut [f32],
) {
    let n = rows.len() / dim;
    assert!(qt.len() >= dim * stride && out.len() >= n * stride && stride.is_multiple_of(LANES));
    #[cfg(target_arch = "x86_64")]
    if simd_level() >= 2 {
        // SAFETY: AVX-512 F is available (simd_level); the buffer sizes are asserted above.
        unsafe { dots_avx512(rows, n, dim, qt, stride, out) };
        return;
    }
    dots_fallback(rows, dim, stride, q, lq, out)
}

fn dots_fallback(rows: &[f16], dim: usize, stride: usize, q: &[f32], lq: usize, out: &mut [f32]) {
    let mut conv = vec![0f32; rows.len()];
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(rows, &mut conv);
    dots_f32(&conv, dim, stride, q, lq, out);
}

/// The same product for f32 rows, in the same output layout, through the matmul.
pub(crate) fn dots_f32(
    rows: &[f32],
    dim: usize,
    stride: usize,
    q: &[f32],
    lq: usize,
    out: &mut [f32],
) {
    let n = rows.len() / dim;
    let mut tmp = vec![0f32; n * lq];
    matmul_abt(rows, n, q, lq, dim, &mut tmp, false);
    for r in 0..n {
        let dst = &mut out[r * stride..(r + 1) * stride];
        dst[..lq].copy_from_slice(&tmp[r * lq..(r + 1) * lq]);
        dst[lq..].fill(0.0);
    }
}

/// Rows per register block: 8 rows × 2 × 16 lanes = 16 accumulators per group of 32 query tokens.
const ROWS: usize = 8;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(
    rows: &[f16],
    n: usize,
    dim: usize,
    qt: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut buf = vec![0f32; ROWS * dim];
    let bp = buf.as_mut_ptr();
    let hp = rows.as_ptr() as *const u16;
    let mut r0 = 0;
    while r0 < n {
        let nr = ROWS.min(n - r0);
        // Convert the block's rows to f32 (16 at a time; a scalar tail for dims not a multiple of 16).
        for i in 0..nr {
            let src = hp.add((r0 + i) * dim);
            let dst = bp.add(i * dim);
            let mut d = 0;
            while d + 16 <= dim {
                // SAFETY: d + 16 ≤ dim, inside row r0 + i < n of `rows` and row i of `buf`.
                let h = _mm256_loadu_si256(src.add(d) as *const __m256i);
                _mm512_storeu_ps(dst.add(d), _mm512_cvtph_ps(h));
                d += 16;
            }
            while d < dim {
                *dst.add(d) = rows[(r0 + i) * dim + d].to_f32();
                d += 1;
            }
        }
        for i in nr..ROWS {
            std::ptr::write_bytes(bp.add(i * dim), 0, dim);
        }
        for g in (0..stride).step_by(LANES) {
            let mut acc = [_mm512_setzero_ps(); 2 * ROWS];
            let qp = qt.as_ptr().add(g);
            for d in 0..dim {
                // SAFETY: d < dim and g + 32 ≤ stride: inside qt (asserted dim × stride).
                let q0 = _mm512_loadu_ps(qp.add(d * stride));
                let q1 = _mm512_loadu_ps(qp.add(d * stride + 16));
                for i in 0..ROWS {
                    let x = _mm512_set1_ps(*bp.add(i * dim + d));
                    acc[2 * i] = _mm512_fmadd_ps(x, q0, acc[2 * i]);
                    acc[2 * i + 1] = _mm512_fmadd_ps(x, q1, acc[2 * i + 1]);
                }
            }
            for i in 0..nr {
                // SAFETY: row r0 + i < n and g + 32 ≤ stride: inside out (asserted n × stride).
                let o = out.as_mut_ptr().add((r0 + i) * stride + g);
                _mm512_storeu_ps(o, acc[2 * i]);
                _mm512_storeu_ps(o.add(16), acc[2 * i + 1]);
            }
        }
        r0 += nr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_naive_dot_products() {
        for (n, dim, lq) in [
            (1usize, 16usize, 1usize),
            (7, 128, 32),
            (9, 24, 40),
            (4, 8, 3),
        ] {
            let rows: Vec<f16> = (0..n * dim)
                .map(|i| f16::from_f32(((i * 31 % 97) as f32 / 97.0) - 0.5))
                .collect();
            let q: Vec<f32> = (0..lq * dim)
                .map(|i| ((i * 17 % 53) as f32 / 53.0) - 0.5)
                .collect();
            let (qt, stride) = transpose_query(&q, lq, dim);
            let mut out = vec![f32::NAN; n * stride];
            dots(&rows, dim, &qt, stride, &q, lq, &mut out);
            let mut fallback = vec![f32::NAN; n * stride];
            dots_fallback(&rows, dim, stride, &q, lq, &mut fallback);
            for (a, b) in out.iter().zip(&fallback) {
                assert!((a - b).abs() < 1e-4, "kernel {a} vs fallback {b}");
            }
            for r in 0..n {
                for j in 0..stride {
                    let want: f32 = if j < lq {
                        (0..dim)
                            .map(|d| rows[r * dim + d].to_f32() * q[j * dim + d])
                            .sum()
                    } else {
                        0.0
                    };
                    let got = out[r * stride + j];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "n {n} dim {dim} r {r} j {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

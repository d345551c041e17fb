//! Dot products of half-precision rows (centroids, the f16 copy of the documents) with a query, read in place
//! (no f32 copy of the rows): an AVX-512 kernel where the CPU has it, a convert-then-matmul fallback elsewhere.
//!
//! The query is passed transposed and padded, `qt[d * stride + j]` = query token `j`'s dimension `d` (`stride`
//! a multiple of [`LANES`], zero past the query's tokens), and scores come out row-major with the same stride.

//!
//! Each runs at the process's level ([`crate::cpu()`]); the `*_at` forms take a level (capped at the
//! process's, so they are safe) for tests that compare every level in one process.

use half::f16;

use crate::cpu::{self, Level};
use crate::dot::matmul_abt;
use crate::search::LANES;

/// Rounds an f32 to bf16, to nearest with ties to even; NaN stays NaN (made quiet), infinities stay. The one
/// f32 → bf16 conversion of the workspace (the bf16 linear layers, the bf16 centroid query).
#[inline(always)]
pub fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        ((b >> 16) | 0x0040) as u16
    } else {
        // The carry out of the low half rounds up, ties going to the even upper half; an overflow lands on
        // the infinity of the right sign.
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// The f32 a bf16 stands for (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Transposes a query (`lq × dim`) into the padded layout above.
pub fn transpose_query(q: &[f32], lq: usize, dim: usize) -> (Vec<f32>, usize) {
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
pub fn dots(
    rows: &[f16],
    dim: usize,
    qt: &[f32],
    stride: usize,
    q: &[f32],
    lq: usize,
    out: &mut [f32],
) {
    dots_at(cpu::level(), rows, dim, qt, stride, q, lq, out)
}

/// [`dots`] at `level` (capped at this process's level).
#[allow(clippy::too_many_arguments)]
pub fn dots_at(
    level: Level,
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
    if level.min(cpu::level()) >= Level::Avx512 {
        // SAFETY: the process's level includes AVX-512 F; the buffer sizes are asserted above.
        unsafe { dots_avx512(rows, n, dim, qt, stride, out) };
        return;
    }
    let _ = level;
    dots_fallback(rows, dim, stride, q, lq, out)
}

fn dots_fallback(rows: &[f16], dim: usize, stride: usize, q: &[f32], lq: usize, out: &mut [f32]) {
    let mut conv = vec![0f32; rows.len()];
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(rows, &mut conv);
    dots_f32(&conv, dim, stride, q, lq, out);
}

/// The same product for f32 rows, in the same output layout, through the matmul.
pub fn dots_f32(rows: &[f32], dim: usize, stride: usize, q: &[f32], lq: usize, out: &mut [f32]) {
    let n = rows.len() / dim;
    let mut tmp = vec![0f32; n * lq];
    matmul_abt(rows, n, q, lq, dim, &mut tmp, false);
    for r in 0..n {
        let dst = &mut out[r * stride..(r + 1) * stride];
        dst[..lq].copy_from_slice(&tmp[r * lq..(r + 1) * lq]);
        dst[lq..].fill(0.0);
    }
}

/// The query for [`approx_dots`]: pairs of dimensions as bf16 (`pairs[p * stride + j]` holds token `j`'s
/// dimensions `2p` (low half) and `2p + 1`, rounded to nearest even), or `None` where the bf16 kernel cannot
/// run (no AVX-512 BF16, `LATTE_SIMD` below AVX-512, or an odd dimension).
pub fn bf16_query(qt: &[f32], dim: usize, stride: usize) -> Option<Vec<u32>> {
    bf16_query_at(cpu::level(), qt, dim, stride)
}

/// Whether the bf16 kernel may run at `level`.
fn bf16_here(level: Level) -> bool {
    cpu::cpu().avx512_bf16 && level.min(cpu::level()) >= Level::Avx512
}

/// [`bf16_query`] at `level` (capped at this process's level).
pub fn bf16_query_at(level: Level, qt: &[f32], dim: usize, stride: usize) -> Option<Vec<u32>> {
    #[cfg(target_arch = "x86_64")]
    {
        if bf16_here(level) && dim.is_multiple_of(2) {
            let bits = |v: f32| f32_to_bf16(v) as u32;
            let mut pairs = vec![0u32; dim / 2 * stride];
            for p in 0..dim / 2 {
                for j in 0..stride {
                    pairs[p * stride + j] =
                        bits(qt[2 * p * stride + j]) | (bits(qt[(2 * p + 1) * stride + j]) << 16);
                }
            }
            return Some(pairs);
        }
    }
    let _ = (level, qt, dim, stride);
    None
}

/// [`dots`] for scores that only need to be close (centroid scores): with a [`bf16_query`], the rows are
/// rounded to bf16 and multiplied pairwise (`vdpbf16ps`, twice the products per instruction of f32 FMAs;
/// each score is within about `2⁻⁸ · Σ_d |row_d · q_d|` of the exact one); otherwise exactly [`dots`].
#[allow(clippy::too_many_arguments)]
pub fn approx_dots(
    rows: &[f16],
    dim: usize,
    qt: &[f32],
    pairs: Option<&[u32]>,
    stride: usize,
    q: &[f32],
    lq: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(pairs) = pairs.filter(|_| bf16_here(cpu::level())) {
        let n = rows.len() / dim;
        assert!(
            pairs.len() >= dim / 2 * stride
                && out.len() >= n * stride
                && stride.is_multiple_of(LANES)
                && dim.is_multiple_of(2)
        );
        // SAFETY: the process's level includes AVX-512 F and the CPU has AVX-512 BF16 (checked just above);
        // sizes are asserted above.
        unsafe { dots_bf16(rows, n, dim, pairs, stride, out) };
        return;
    }
    let _ = pairs;
    dots_at(cpu::level(), rows, dim, qt, stride, q, lq, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dots_bf16(
    rows: &[f16],
    n: usize,
    dim: usize,
    pairs: &[u32],
    stride: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let half_dim = dim / 2;
    // The block's rows as bf16 pairs (one u32 per pair of dimensions).
    let mut buf = vec![0u32; ROWS * half_dim];
    let bp = buf.as_mut_ptr();
    let hp = rows.as_ptr() as *const u16;
    let mut r0 = 0;
    while r0 < n {
        let nr = ROWS.min(n - r0);
        for i in 0..nr {
            let src = hp.add((r0 + i) * dim);
            let dst = bp.add(i * half_dim) as *mut u16;
            let mut d = 0;
            while d + 32 <= dim {
                // SAFETY: d + 32 ≤ dim, inside row r0 + i of `rows` and row i of `buf`.
                let lo = _mm512_cvtph_ps(_mm256_loadu_si256(src.add(d) as *const __m256i));
                let hi = _mm512_cvtph_ps(_mm256_loadu_si256(src.add(d + 16) as *const __m256i));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.add(d) as *mut __m512i, v);
                d += 32;
            }
            while d < dim {
                *dst.add(d) = f32_to_bf16(rows[(r0 + i) * dim + d].to_f32());
                d += 1;
            }
        }
        for i in nr..ROWS {
            std::ptr::write_bytes(bp.add(i * half_dim), 0, half_dim);
        }
        for g in (0..stride).step_by(LANES) {
            let mut acc = [_mm512_setzero_ps(); 2 * ROWS];
            let qp = pairs.as_ptr().add(g);
            for p in 0..half_dim {
                // SAFETY: p < dim / 2 and g + 32 ≤ stride: inside `pairs` (asserted dim / 2 × stride).
                let q0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(qp.add(p * stride) as *const __m512i));
                let q1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                    qp.add(p * stride + 16) as *const __m512i
                ));
                for i in 0..ROWS {
                    let x: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*bp.add(i * half_dim + p) as i32));
                    acc[2 * i] = _mm512_dpbf16_ps(acc[2 * i], x, q0);
                    acc[2 * i + 1] = _mm512_dpbf16_ps(acc[2 * i + 1], x, q1);
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
    fn bf16_rounding_is_the_half_crates_to_nearest_even() {
        // Every sign, every exponent, mantissas around the rounding point (ties, just below and above) and
        // a sweep: the same bits as the `half` crate's conversion, NaN aside (both quiet NaNs).
        let mut bits: Vec<u32> = (0..=0xffff_u32)
            .map(|i| i.wrapping_mul(0x9e37_79b9))
            .collect();
        for hi in (0..=0xffff_u32).step_by(7) {
            for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
                bits.push(hi << 16 | lo);
            }
        }
        for b in bits {
            let v = f32::from_bits(b);
            let got = f32_to_bf16(v);
            if v.is_nan() {
                assert!(bf16_to_f32(got).is_nan(), "{b:#010x}");
            } else {
                assert_eq!(got, half::bf16::from_f32(v).to_bits(), "{b:#010x}");
                assert_eq!(bf16_to_f32(got), half::bf16::from_bits(got).to_f32());
            }
        }
    }

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
            let mut fallback = vec![f32::NAN; n * stride];
            dots_fallback(&rows, dim, stride, &q, lq, &mut fallback);
            for level in cpu::levels_here() {
                eprintln!("half::dots at {level}, n {n} dim {dim} lq {lq}");
                let mut out = vec![f32::NAN; n * stride];
                dots_at(level, &rows, dim, &qt, stride, &q, lq, &mut out);
                for (a, b) in out.iter().zip(&fallback) {
                    assert!((a - b).abs() < 1e-4, "{level}: kernel {a} vs fallback {b}");
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
                            "{level}: n {n} dim {dim} r {r} j {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_centroid_products_stay_within_their_bound() {
        for (n, dim, lq) in [
            (9usize, 128usize, 32usize),
            (17, 24, 40),
            (3, 2, 1),
            (8, 64, 5),
        ] {
            let rows: Vec<f16> = (0..n * dim)
                .map(|i| f16::from_f32(((i * 31 % 97) as f32 / 97.0) - 0.5))
                .collect();
            let q: Vec<f32> = (0..lq * dim)
                .map(|i| ((i * 17 % 53) as f32 / 53.0) - 0.5)
                .collect();
            let (qt, stride) = transpose_query(&q, lq, dim);
            for level in cpu::levels_here() {
                let pairs = bf16_query_at(level, &qt, dim, stride);
                eprintln!(
                    "half::approx_dots at {level} (bf16 {}), n {n} dim {dim}",
                    pairs.is_some()
                );
                let mut out = vec![f32::NAN; n * stride];
                approx_dots(&rows, dim, &qt, pairs.as_deref(), stride, &q, lq, &mut out);
                for r in 0..n {
                    for j in 0..stride {
                        let (want, bound) = if j < lq {
                            let terms =
                                (0..dim).map(|d| rows[r * dim + d].to_f32() * q[j * dim + d]);
                            (
                                terms.clone().sum::<f32>(),
                                terms.map(f32::abs).sum::<f32>() / 256.0,
                            )
                        } else {
                            (0.0, 0.0)
                        };
                        let got = out[r * stride + j];
                        assert!(
                            (got - want).abs() <= bound + 1e-5,
                            "{level}: n {n} dim {dim} r {r} j {j}: {got} vs {want} (bf16 {})",
                            pairs.is_some()
                        );
                    }
                }
            }
        }
    }
}

//! Hot loops of the approximate search passes, compiled twice: portable, and with AVX2 + FMA selected at run
//! time (the default x86-64 target has only SSE2).
#![allow(clippy::too_many_arguments)] // kernels take their operands explicitly

/// Query tokens processed together (fixed width, so the loops vectorise).
pub(crate) const LANES: usize = 32;

/// A centroid code as stored (u16 or u32).
pub(crate) trait Code: Copy + Send + Sync {
    fn idx(self) -> usize;
}
impl Code for u16 {
    #[inline(always)]
    fn idx(self) -> usize {
        self as usize
    }
}
impl Code for u32 {
    #[inline(always)]
    fn idx(self) -> usize {
        self as usize
    }
}

macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident<C: Code>($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        pub(crate) fn $name<C: Code>($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn generic<C: Code>($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<C: Code>($($arg: $ty),*) -> $ret {
                    generic($($arg),*)
                }
                if simd_level() >= 1 {
                    // SAFETY: the CPU supports the enabled features (checked by simd_level).
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// Quantises padded centroid scores to i8: `sq[i] = round(sp[i] · scale)` with `scale = 127 / max |sp|`.
pub(crate) fn quantize_scores(sp: &[f32]) -> (Vec<i8>, f32) {
    let max = sp.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 { 127.0 / max } else { 1.0 };
    (
        sp.iter().map(|&v| round_i32(v * scale) as i8).collect(),
        scale,
    )
}

/// Round half away from zero without a libm call (`f32::round` is not inlined on the baseline target).
#[inline(always)]
pub(crate) fn round_i32(x: f32) -> i32 {
    (x + 0.5f32.copysign(x)) as i32
}

multiversion! {
    /// Centroid-interaction score of one document on i8-quantised centroid scores: `Σ_j max(0, max_t
    /// sq[code_t][j])` in quantisation units, skipping tokens whose centroid scores below `threshold` for every
    /// query token (`cmax[c] < threshold`; an empty `cmax` prunes nothing). `sq` is padded, `groups` blocks of `LANES` per centroid; i8 rows are
    /// a quarter of the memory traffic of f32 scores.
    fn bag_score_i8<C: Code>(codes: &[C], sq: &[i8], groups: usize, cmax: &[f32], threshold: f32) -> i32 {
        let mut total = 0i32;
        for g in 0..groups {
            // Zero start, as in `bag_score`: a query token no kept token matches contributes 0.
            let mut acc = [0i8; LANES];
            for &c in codes {
                let c = c.idx();
                if cmax.is_empty() || cmax[c] >= threshold {
                    let row: &[i8; LANES] = sq[(c * groups + g) * LANES..][..LANES].try_into().expect("lanes");
                    for i in 0..LANES {
                        acc[i] = acc[i].max(row[i]);
                    }
                }
            }
            total += acc.iter().map(|&v| v as i32).sum::<i32>();
        }
        total
    }
}

multiversion! {
    /// Token pruning for the residual pass (query of `lq` tokens): the positions of the document tokens whose i8 centroid score comes
    /// within `margin` (quantisation units) of the document's best centroid score for at least one query
    /// token. A token further below every maximum can only win a query token if its residual correction
    /// beats the best token's by more than the margin.
    fn keep_tokens<C: Code>(codes: &[C], sq: &[i8], groups: usize, lq: usize, margin: i16, out: &mut Vec<u32>) -> () {
        out.clear();
        let row = |c: usize, g: usize| -> &[i8; LANES] {
            sq[(c * groups + g) * LANES..][..LANES].try_into().expect("lanes")
        };
        // Per group: max over the document's tokens minus the margin, saturated to i8 (a threshold below -128
        // keeps every token, as the exact comparison would). Padding lanes get 127, which no padding entry
        // (always 0) reaches.
        let mut small = [[0i8; LANES]; 4];
        let mut big = Vec::new();
        let thr: &mut [[i8; LANES]] = if groups <= 4 {
            &mut small[..groups]
        } else {
            big.resize(groups, [0i8; LANES]);
            &mut big
        };
        for (g, t) in thr.iter_mut().enumerate() {
            let mut best = [i8::MIN; LANES];
            for &c in codes {
                let r = row(c.idx(), g);
                for i in 0..LANES {
                    best[i] = best[i].max(r[i]);
                }
            }
            let real = (lq - g * LANES).min(LANES);
            for i in 0..LANES {
                t[i] = if i < real {
                    (best[i] as i16 - margin).max(i8::MIN as i16) as i8
                } else {
                    i8::MAX
                };
            }
        }
        for (t, &c) in codes.iter().enumerate() {
            let mut any = 0u8;
            for (g, th) in thr.iter().enumerate() {
                let r = row(c.idx(), g);
                for i in 0..LANES {
                    any |= (r[i] >= th[i]) as u8;
                }
            }
            if any != 0 {
                out.push(t as u32);
            }
        }
    }
}

/// Residual-aware score of one document (see [`residual_score_portable`]); AVX2 intrinsics when available.
/// Every code must be below the number of centroids `sp` was built for (checked when the index is opened).
pub(crate) fn residual_score<C: Code>(
    codes: &[C],
    keep: &[u32],
    res: &[u8],
    bpt: usize,
    sp: &[f32],
    groups: usize,
    tables: &[(Vec<i16>, f32)],
    lq: usize,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd_level() >= 2 {
            // SAFETY: the CPU supports AVX-512 F and BW (checked by simd_level); see the function for bounds.
            return unsafe { residual_score_avx512(codes, keep, res, bpt, sp, groups, tables, lq) };
        }
        if simd_level() >= 1 {
            // SAFETY: the CPU supports AVX2 and FMA (checked by simd_level); see the function for bounds.
            return unsafe { residual_score_avx2(codes, keep, res, bpt, sp, groups, tables, lq) };
        }
    }
    residual_score_portable(codes, keep, res, bpt, sp, groups, tables, lq)
}

/// The widest SIMD level usable here: 0 portable, 1 AVX2 + FMA, 2 AVX-512 (F, BW). `LATTE_SIMD=portable|avx2`
/// caps it (to test every level on one machine).
pub(crate) fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("LATTE_SIMD").as_deref() {
            Ok("portable") => 0,
            Ok("avx2") => 1,
            _ => 2,
        };
        #[cfg(target_arch = "x86_64")]
        let found = if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            2
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            1
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let found = 0;
        found.min(cap)
    })
}

/// [`residual_score_avx2`] with 512-bit registers: one load and add per packed byte for all 32 query lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn residual_score_avx512<C: Code>(
    codes: &[C],
    keep: &[u32],
    res: &[u8],
    bpt: usize,
    sp: &[f32],
    groups: usize,
    tables: &[(Vec<i16>, f32)],
    lq: usize,
) -> f32 {
    use std::arch::x86_64::*;
    assert!(res.len() >= codes.len() * bpt);
    let n_centroids = sp.len() / (groups * LANES);
    let mut total = 0f32;
    for (g, (table, scale)) in tables.iter().enumerate() {
        assert_eq!(table.len(), bpt * 256 * LANES);
        let inv = _mm512_set1_ps(1.0 / scale);
        let mut acc0 = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut acc1 = acc0;
        let tp = table.as_ptr();
        for &t in keep {
            let t = t as usize;
            let c = codes[t].idx();
            assert!(c < n_centroids, "code out of range");
            let bytes = &res[t * bpt..(t + 1) * bpt];
            let mut v0 = _mm512_setzero_si512();
            let mut v1 = _mm512_setzero_si512();
            let mut p = 0;
            // Two accumulators hide the add latency.
            while p + 1 < bpt {
                // SAFETY: p + 1 < bpt and bytes < 256: both rows of 32 i16 lie inside the table (length asserted).
                let r0 = tp.add((p * 256 + bytes[p] as usize) * LANES);
                let r1 = tp.add(((p + 1) * 256 + bytes[p + 1] as usize) * LANES);
                v0 = _mm512_add_epi16(v0, _mm512_loadu_si512(r0 as *const __m512i));
                v1 = _mm512_add_epi16(v1, _mm512_loadu_si512(r1 as *const __m512i));
                p += 2;
            }
            if p < bpt {
                // SAFETY: as above, for the last position.
                let r0 = tp.add((p * 256 + bytes[p] as usize) * LANES);
                v0 = _mm512_add_epi16(v0, _mm512_loadu_si512(r0 as *const __m512i));
            }
            let v = _mm512_add_epi16(v0, v1);
            let lo = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(v));
            let hi = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(v));
            // SAFETY: c < n_centroids (asserted), so the LANES floats of this row are inside `sp`.
            let srow = sp.as_ptr().add((c * groups + g) * LANES);
            acc0 = _mm512_max_ps(
                acc0,
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), inv, _mm512_loadu_ps(srow)),
            );
            acc1 = _mm512_max_ps(
                acc1,
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), inv, _mm512_loadu_ps(srow.add(16))),
            );
        }
        let mut out = [0f32; LANES];
        // SAFETY: out has 2 × 16 floats.
        _mm512_storeu_ps(out.as_mut_ptr(), acc0);
        _mm512_storeu_ps(out.as_mut_ptr().add(16), acc1);
        let rows = (lq - g * LANES).min(LANES);
        total += out[..rows].iter().sum::<f32>();
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn residual_score_avx2<C: Code>(
    codes: &[C],
    keep: &[u32],
    res: &[u8],
    bpt: usize,
    sp: &[f32],
    groups: usize,
    tables: &[(Vec<i16>, f32)],
    lq: usize,
) -> f32 {
    use std::arch::x86_64::*;
    assert!(res.len() >= codes.len() * bpt);
    let n_centroids = sp.len() / (groups * LANES);
    let mut total = 0f32;
    for (g, (table, scale)) in tables.iter().enumerate() {
        assert_eq!(table.len(), bpt * 256 * LANES);
        let inv = _mm256_set1_ps(1.0 / scale);
        let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        let tp = table.as_ptr();
        for &t in keep {
            let t = t as usize;
            let c = codes[t].idx();
            assert!(c < n_centroids, "code out of range");
            let mut v0 = _mm256_setzero_si256();
            let mut v1 = _mm256_setzero_si256();
            for (p, &b) in res[t * bpt..(t + 1) * bpt].iter().enumerate() {
                // SAFETY: p < bpt and b < 256, so the row's 32 i16 lie inside the table (length asserted).
                let row = tp.add((p * 256 + b as usize) * LANES);
                v0 = _mm256_add_epi16(v0, _mm256_loadu_si256(row as *const __m256i));
                v1 = _mm256_add_epi16(v1, _mm256_loadu_si256(row.add(16) as *const __m256i));
            }
            let parts = [
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v0)),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(v0)),
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v1)),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(v1)),
            ];
            // SAFETY: c < n_centroids (asserted), so the LANES floats of this row are inside `sp`.
            let srow = sp.as_ptr().add((c * groups + g) * LANES);
            for (k, x) in parts.iter().enumerate() {
                let f = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(*x),
                    inv,
                    _mm256_loadu_ps(srow.add(8 * k)),
                );
                acc[k] = _mm256_max_ps(acc[k], f);
            }
        }
        let mut out = [0f32; LANES];
        for (k, a) in acc.iter().enumerate() {
            // SAFETY: out has 4 × 8 floats.
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * k), *a);
        }
        let rows = (lq - g * LANES).min(LANES);
        total += out[..rows].iter().sum::<f32>();
    }
    total
}

multiversion! {
    /// Residual-aware score of one document: `Σ_j max_t (sp[code_t][j] + Σ_p table[p][byte_tp][j] / scale)`,
    /// where `tables[g]` is group `g`'s per-query lookup table quantised to i16 (rows `LANES` wide; the scale
    /// is chosen so that sums over a token's bytes cannot overflow) and `res` holds `bpt` packed bytes per token.
    fn residual_score_portable<C: Code>(
        codes: &[C],
        keep: &[u32],
        res: &[u8],
        bpt: usize,
        sp: &[f32],
        groups: usize,
        tables: &[(Vec<i16>, f32)],
        lq: usize,
    ) -> f32 {
        let mut total = 0f32;
        for (g, (table, scale)) in tables.iter().enumerate() {
            let inv = 1.0 / scale;
            let mut acc = [f32::NEG_INFINITY; LANES];
            for &t in keep {
                let t = t as usize;
                let c = codes[t];
                let mut vi = [0i16; LANES];
                for (p, &b) in res[t * bpt..(t + 1) * bpt].iter().enumerate() {
                    let row: &[i16; LANES] =
                        table[(p * 256 + b as usize) * LANES..][..LANES].try_into().expect("lanes");
                    for i in 0..LANES {
                        vi[i] = vi[i].wrapping_add(row[i]);
                    }
                }
                let srow: &[f32; LANES] = sp[(c.idx() * groups + g) * LANES..][..LANES].try_into().expect("lanes");
                for i in 0..LANES {
                    acc[i] = acc[i].max(srow[i] + vi[i] as f32 * inv);
                }
            }
            let rows = (lq - g * LANES).min(LANES);
            total += acc[..rows].iter().sum::<f32>();
        }
        total
    }
}

/// Quantises a lookup table to i16 so that the sum of `positions` entries stays within i16.
pub(crate) fn quantize_table(table: &[f32], positions: usize) -> (Vec<i16>, f32) {
    let max = table.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 {
        32_000.0 / (max * positions as f32)
    } else {
        1.0
    };
    (
        table.iter().map(|&v| round_i32(v * scale) as i16).collect(),
        scale,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8_bag_score_and_token_pruning_match_naive_code() {
        let (k, lq, groups) = (6usize, 40usize, 2usize);
        let sp: Vec<f32> = (0..k * groups * LANES)
            .map(|i| {
                let lane = i % (groups * LANES);
                if lane < lq {
                    ((i * 29 % 83) as f32 / 83.0) - 0.3
                } else {
                    0.0
                }
            })
            .collect();
        let (sq, scale) = quantize_scores(&sp);
        assert!((sq[5] as f32 / scale - sp[5]).abs() <= 0.5 / scale + 1e-6);
        let codes: Vec<u16> = vec![0, 3, 5, 3, 1];
        let row = |c: usize, j: usize| sq[(c * groups + j / LANES) * LANES + j % LANES];
        let cmax = vec![0f32; k];
        // Naive: sum over query tokens of max(0, max over tokens).
        let want: i32 = (0..lq)
            .map(|j| {
                codes
                    .iter()
                    .map(|&c| row(c as usize, j) as i32)
                    .max()
                    .unwrap()
                    .max(0)
            })
            .sum();
        assert_eq!(
            bag_score_i8(&codes, &sq, groups, &cmax, f32::NEG_INFINITY),
            want
        );
        // Pruning every token's centroid away leaves 0.
        assert_eq!(bag_score_i8(&codes, &sq, groups, &cmax, 1.0), 0);
        for margin in [0i16, 5, 30, 300] {
            let mut keep = Vec::new();
            keep_tokens(&codes, &sq, groups, lq, margin, &mut keep);
            let naive: Vec<u32> = (0..codes.len())
                .filter(|&t| {
                    (0..lq).any(|j| {
                        let best = codes
                            .iter()
                            .map(|&c| row(c as usize, j) as i16)
                            .max()
                            .unwrap();
                        row(codes[t] as usize, j) as i16 >= best - margin
                    })
                })
                .map(|t| t as u32)
                .collect();
            assert_eq!(keep, naive, "margin {margin}");
            assert!(!keep.is_empty());
        }
        let mut all = Vec::new();
        keep_tokens(&codes, &sq, groups, lq, 300, &mut all);
        assert_eq!(all.len(), codes.len());
    }

    #[test]
    fn simd_residual_score_matches_portable() {
        let (k, groups, bpt, lq, n_tok) = (5usize, 2usize, 4usize, 40usize, 7usize);
        let mut x = 12345u32;
        let mut next = || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let sp: Vec<f32> = (0..k * groups * LANES).map(|_| next()).collect();
        let tables: Vec<(Vec<i16>, f32)> = (0..groups)
            .map(|_| {
                let t: Vec<f32> = (0..bpt * 256 * LANES).map(|_| next() * 0.1).collect();
                quantize_table(&t, bpt)
            })
            .collect();
        let codes: Vec<u16> = (0..n_tok).map(|i| (i * 3 % k) as u16).collect();
        let res: Vec<u8> = (0..n_tok * bpt).map(|i| (i * 37 % 256) as u8).collect();
        let keep: Vec<u32> = (0..n_tok as u32).filter(|t| t % 3 != 1).collect();
        let portable = residual_score_portable(&codes, &keep, &res, bpt, &sp, groups, &tables, lq);
        let dispatched = residual_score(&codes, &keep, &res, bpt, &sp, groups, &tables, lq);
        assert!(
            (portable - dispatched).abs() < 1e-4,
            "{portable} vs {dispatched}"
        );
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: features checked just above.
                let v = unsafe {
                    residual_score_avx2(&codes, &keep, &res, bpt, &sp, groups, &tables, lq)
                };
                assert!((portable - v).abs() < 1e-4, "avx2 {v} vs {portable}");
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                // SAFETY: features checked just above.
                let v = unsafe {
                    residual_score_avx512(&codes, &keep, &res, bpt, &sp, groups, &tables, lq)
                };
                assert!((portable - v).abs() < 1e-4, "avx512 {v} vs {portable}");
            }
        }
        // Odd byte counts take the tail path of the AVX-512 loop.
        let bpt3 = 3;
        let tables3: Vec<(Vec<i16>, f32)> = (0..groups)
            .map(|_| {
                let t: Vec<f32> = (0..bpt3 * 256 * LANES).map(|_| next() * 0.1).collect();
                quantize_table(&t, bpt3)
            })
            .collect();
        let res3: Vec<u8> = (0..n_tok * bpt3).map(|i| (i * 53 % 256) as u8).collect();
        let a = residual_score_portable(&codes, &keep, &res3, bpt3, &sp, groups, &tables3, lq);
        let b = residual_score(&codes, &keep, &res3, bpt3, &sp, groups, &tables3, lq);
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        // Quantisation keeps the table sums close to the float ones.
        let (q, scale) = &tables[0];
        let sum: f32 = (0..bpt)
            .map(|p| q[(p * 256 + 7) * LANES] as f32 / scale)
            .sum();
        assert!(sum.abs() < 0.5 * bpt as f32);
    }
}

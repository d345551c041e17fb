//! Hot loops of the approximate search passes, compiled twice: portable, and with AVX2 + FMA selected at run
//! time (the default x86-64 target has only SSE2).

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
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the enabled features (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

multiversion! {
    /// Centroid-interaction score of one document: `Σ_j max_t sp[code_t][j]`, skipping tokens whose centroid
    /// scores below `threshold` for every query token (`cmax[c] < threshold`). `sp` is the padded centroid-score
    /// matrix, `groups` blocks of `LANES` per centroid.
    fn bag_score<C: Code>(codes: &[C], sp: &[f32], groups: usize, cmax: &[f32], threshold: f32) -> f32 {
        let mut total = 0f32;
        for g in 0..groups {
            let mut acc = [0f32; LANES];
            for &c in codes {
                let c = c.idx();
                if cmax[c] >= threshold {
                    let row: &[f32; LANES] = sp[(c * groups + g) * LANES..][..LANES].try_into().expect("lanes");
                    for i in 0..LANES {
                        acc[i] = acc[i].max(row[i]);
                    }
                }
            }
            total += acc.iter().sum::<f32>();
        }
        total
    }
}

/// Residual-aware score of one document (see [`residual_score_portable`]); AVX2 intrinsics when available.
/// Every code must be below the number of centroids `sp` was built for (checked when the index is opened).
pub(crate) fn residual_score<C: Code>(
    codes: &[C],
    res: &[u8],
    bpt: usize,
    sp: &[f32],
    groups: usize,
    tables: &[(Vec<i16>, f32)],
    lq: usize,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above); see the function for bounds.
            return unsafe { residual_score_avx2(codes, res, bpt, sp, groups, tables, lq) };
        }
    }
    residual_score_portable(codes, res, bpt, sp, groups, tables, lq)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn residual_score_avx2<C: Code>(
    codes: &[C],
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
        for (t, &c) in codes.iter().enumerate() {
            let c = c.idx();
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
            for (t, &c) in codes.iter().enumerate() {
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
        table.iter().map(|v| (v * scale).round() as i16).collect(),
        scale,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let portable = residual_score_portable(&codes, &res, bpt, &sp, groups, &tables, lq);
        let dispatched = residual_score(&codes, &res, bpt, &sp, groups, &tables, lq);
        assert!(
            (portable - dispatched).abs() < 1e-4,
            "{portable} vs {dispatched}"
        );
        // Quantisation keeps the table sums close to the float ones.
        let (q, scale) = &tables[0];
        let sum: f32 = (0..bpt)
            .map(|p| q[(p * 256 + 7) * LANES] as f32 / scale)
            .sum();
        assert!(sum.abs() < 0.5 * bpt as f32);
    }
}

//! The search kernels of latte-index: the i8 centroid-interaction pass (which also keeps each document's
//! per-lane maxima), token pruning against them, the residual lookup-table pass run position-major over
//! blocks of gathered tokens ([`Gathered`], [`residual_block`]), and the i16 query-table fill.
//!
//! Each runs at the process's level ([`crate::cpu()`]); the `*_at` forms take a level (capped at the
//! process's, so they are safe) for tests that compare every level in one process.
#![allow(clippy::too_many_arguments)] // kernels take their operands explicitly

use crate::cpu::{self, Level};

/// Query tokens processed together (fixed width, so the loops vectorise).
pub const LANES: usize = 32;

/// A centroid code as stored (u16 or u32).
pub trait Code: Copy + Send + Sync {
    /// The code as an index.
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

/// Compiles a function twice, portable and with AVX2 + FMA enabled, and defines `name` (at the process's level)
/// and `name_at` (at a given level, capped at the process's).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident / $at:ident <C: Code>($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name<C: Code>($($arg: $ty),*) -> $ret {
            $at($crate::cpu::level(), $($arg),*)
        }
        /// The same at `level` (capped at this process's level).
        $vis fn $at<C: Code>(level: $crate::cpu::Level, $($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn generic<C: Code>($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<C: Code>($($arg: $ty),*) -> $ret {
                    generic($($arg),*)
                }
                if level.min($crate::cpu::level()) >= $crate::cpu::Level::Avx2 {
                    // SAFETY: the process's level (detected, then capped) includes AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            let _ = level;
            generic($($arg),*)
        }
    };
    // The same for a non-generic function.
    ($(#[$m:meta])* $vis:vis fn $name:ident / $at:ident ($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            $at($crate::cpu::level(), $($arg),*)
        }
        /// The same at `level` (capped at this process's level).
        $vis fn $at(level: $crate::cpu::Level, $($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn generic($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    generic($($arg),*)
                }
                if level.min($crate::cpu::level()) >= $crate::cpu::Level::Avx2 {
                    // SAFETY: the process's level (detected, then capped) includes AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            let _ = level;
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Quantises padded centroid scores to i8: `sq[i] = round(sp[i] · scale)` with `scale = 127 / max |sp|`.
pub fn quantize_scores(sp: &[f32]) -> (Vec<i8>, f32) {
    let mut sq = Vec::new();
    let scale = quantize_scores_into(sp, max_abs(sp), &mut sq);
    (sq, scale)
}

multiversion! {
    /// The largest `|v|` of `v` (vectorised: no NaN handling; AVX2 when available).
    pub fn max_abs / max_abs_at(v: &[f32]) -> f32 {
        // `if` rather than f32::max: no NaN handling, so the loop vectorises.
        v.iter().fold(0f32, |m, x| if x.abs() > m { x.abs() } else { m })
    }
}

multiversion! {
    /// `out[i] = round(sp[i] · scale)` as i8 (|values| ≤ 127 by the choice of scale).
    fn quantize_block / quantize_block_at(sp: &[f32], scale: f32, out: &mut [i8]) -> () {
        for (o, &v) in out.iter_mut().zip(sp) {
            *o = round_clamp_i32(v * scale, 127.0) as i8;
        }
    }
}

/// [`quantize_scores`] into a reused buffer, in parallel blocks, given `max = max |sp|` (as returned by the
/// centroid scoring); returns the scale.
pub fn quantize_scores_into(sp: &[f32], max: f32, sq: &mut Vec<i8>) -> f32 {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 16;
    let scale = if max > 0.0 { 127.0 / max } else { 1.0 };
    sq.resize(sp.len(), 0);
    sp.par_chunks(BLOCK)
        .zip(sq.par_chunks_mut(BLOCK))
        .for_each(|(b, o)| quantize_block(b, scale, o));
    scale
}

/// [`round_i32`] clamped to `±lim` (`lim` well inside i32), written so that loops over it vectorise: the
/// saturating `as` cast of a float is scalarised by LLVM, an unchecked one on a clamped value is not.
#[inline(always)]
pub fn round_clamp_i32(x: f32, lim: f32) -> i32 {
    // max / min turn a NaN into a bound, so the value is always finite and in range.
    let r = (x + 0.5f32.copysign(x)).max(-lim).min(lim);
    // SAFETY: r is finite and within ±lim ⊂ i32 (see above).
    unsafe { r.to_int_unchecked::<i32>() }
}

/// Round half away from zero without a libm call (`f32::round` is not inlined on the baseline target).
#[inline(always)]
pub fn round_i32(x: f32) -> i32 {
    (x + 0.5f32.copysign(x)) as i32
}

multiversion! {
    /// Centroid-interaction score of one document on i8-quantised centroid scores: `Σ_j max(0, max_t
    /// sq[code_t][j])` in quantisation units, skipping tokens whose centroid scores below `threshold` for every
    /// query token (`cmax[c] < threshold`; an empty `cmax` prunes nothing). `sq` is padded, `groups` blocks of
    /// `LANES` per centroid; i8 rows are a quarter of the memory traffic of f32 scores. When `best` is not
    /// empty (`groups` rows), it receives the per-lane maxima `max_t sq[code_t][j]` (`i8::MIN` without tokens),
    /// which [`keep_tokens`] needs.
    pub fn bag_score_i8 / bag_score_i8_at<C: Code>(codes: &[C], sq: &[i8], groups: usize, cmax: &[f32], threshold: f32, best: &mut [[i8; LANES]]) -> i32 {
        let mut total = 0i32;
        for g in 0..groups {
            let mut acc = [i8::MIN; LANES];
            for &c in codes {
                let c = c.idx();
                if cmax.is_empty() || cmax[c] >= threshold {
                    let row: &[i8; LANES] = sq[(c * groups + g) * LANES..][..LANES].try_into().expect("lanes");
                    for i in 0..LANES {
                        acc[i] = acc[i].max(row[i]);
                    }
                }
            }
            // A query token no kept token matches positively contributes 0.
            total += acc.iter().map(|&v| v.max(0) as i32).sum::<i32>();
            if let Some(b) = best.get_mut(g) {
                *b = acc;
            }
        }
        total
    }
}

/// Token pruning for the residual pass (query of `lq` tokens): the positions of the document tokens whose i8
/// centroid score comes within `margin` (quantisation units) of the document's best centroid score `best`
/// (per group, from [`bag_score_i8`]) for at least one query token. A token further below every maximum can
/// only win a query token if its residual correction beats the best token's by more than the margin.
pub fn keep_tokens<C: Code>(
    codes: &[C],
    sq: &[i8],
    groups: usize,
    lq: usize,
    margin: i16,
    best: &[[i8; LANES]],
    out: &mut Vec<u32>,
) {
    keep_tokens_at(cpu::level(), codes, sq, groups, lq, margin, best, out)
}

/// [`keep_tokens`] at `level` (capped at this process's level).
pub fn keep_tokens_at<C: Code>(
    level: Level,
    codes: &[C],
    sq: &[i8],
    groups: usize,
    lq: usize,
    margin: i16,
    best: &[[i8; LANES]],
    out: &mut Vec<u32>,
) {
    assert_eq!(best.len(), groups);
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
    for (g, (t, b)) in thr.iter_mut().zip(best).enumerate() {
        let real = (lq - g * LANES).min(LANES);
        for i in 0..LANES {
            t[i] = if i < real {
                (b[i] as i16 - margin).max(i8::MIN as i16) as i8
            } else {
                i8::MAX
            };
        }
    }
    let n_centroids = sq.len() / (LANES * groups);
    // Branch-free: every position is written, the count advances only for kept tokens.
    out.clear();
    out.resize(codes.len(), 0);
    #[cfg(target_arch = "x86_64")]
    if level.min(cpu::level()) >= Level::Avx2 {
        // SAFETY: the process's level includes AVX2; keep_avx2 checks each code against n_centroids.
        let n = unsafe { keep_avx2(codes, sq, n_centroids, groups, thr, out) };
        out.truncate(n);
        return;
    }
    let _ = level;
    let mut n = 0;
    for (t, &c) in codes.iter().enumerate() {
        let mut any = false;
        for (g, th) in thr.iter().enumerate() {
            let r = &sq[(c.idx() * groups + g) * LANES..][..LANES];
            any |= r.iter().zip(th).any(|(v, t)| v >= t);
        }
        out[n] = t as u32;
        n += any as usize;
    }
    out.truncate(n);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn keep_avx2<C: Code>(
    codes: &[C],
    sq: &[i8],
    n_centroids: usize,
    groups: usize,
    thr: &[[i8; LANES]],
    out: &mut [u32],
) -> usize {
    use std::arch::x86_64::*;
    let mut n = 0;
    let sp = sq.as_ptr();
    assert!(sq.len() >= n_centroids * groups * LANES && out.len() >= codes.len());
    for (t, &c) in codes.iter().enumerate() {
        assert!(c.idx() < n_centroids, "code out of range");
        let mut any = _mm256_setzero_si256();
        for (g, th) in thr.iter().enumerate() {
            // SAFETY: c < n_centroids (asserted), so its `groups` rows lie inside `sq`.
            let r = _mm256_loadu_si256(sp.add((c.idx() * groups + g) * LANES) as *const __m256i);
            let th = _mm256_loadu_si256(th.as_ptr() as *const __m256i);
            // r ≥ th exactly where max(r, th) = r.
            any = _mm256_or_si256(any, _mm256_cmpeq_epi8(_mm256_max_epi8(r, th), r));
        }
        // SAFETY: n ≤ t < codes.len() = out.len().
        *out.get_unchecked_mut(n) = t as u32;
        n += (_mm256_movemask_epi8(any) != 0) as usize;
    }
    n
}

/// The kept tokens of a block of documents, gathered for [`residual_block`]: each token's centroid code and
/// packed residual bytes, and per document the end of its tokens. The scratch buffers are reused.
#[derive(Default)]
pub struct Gathered {
    codes: Vec<u32>,
    res: Vec<u8>,
    ends: Vec<u32>,
    acc: Vec<[i16; LANES]>,
    best: Vec<[f32; LANES]>,
}

impl Gathered {
    /// Appends one document: the tokens at positions `keep` of `codes` / `res` (`bpt` bytes per token).
    pub fn push_doc<C: Code>(&mut self, codes: &[C], keep: &[u32], res: &[u8], bpt: usize) {
        // Fixed-size copies for the usual widths (a memcpy call per 32-byte token costs more than the copy).
        fn copy<const N: usize>(dst: &mut Vec<u8>, res: &[u8], keep: &[u32]) {
            let (rows, _) = res.as_chunks::<N>();
            for &t in keep {
                dst.extend_from_slice(&rows[t as usize]);
            }
        }
        self.codes
            .extend(keep.iter().map(|&t| codes[t as usize].idx() as u32));
        match bpt {
            16 => copy::<16>(&mut self.res, res, keep),
            32 => copy::<32>(&mut self.res, res, keep),
            64 => copy::<64>(&mut self.res, res, keep),
            _ => {
                for &t in keep {
                    let t = t as usize;
                    self.res.extend_from_slice(&res[t * bpt..(t + 1) * bpt]);
                }
            }
        }
        self.ends.push(self.codes.len() as u32);
    }
}

/// Tokens whose i16 accumulators are swept together: 128 × 64 B of accumulators and one 16 KB slice of the
/// table stay in L1 while every token of the block reads it.
const SWEEP: usize = 128;

/// [`residual_score`] for every document of a [`Gathered`] block, position-major: for each packed byte
/// position the block's tokens read the same 256-row slice of the table (L1-resident), instead of each token
/// reading rows all over the table. `out[d]` is document `d`'s score (`-inf` for one without tokens).
pub fn residual_block(
    gath: &mut Gathered,
    bpt: usize,
    sp: &[f32],
    groups: usize,
    tables: &[(Vec<i16>, f32)],
    lq: usize,
    out: &mut Vec<f32>,
) {
    residual_block_at(cpu::level(), gath, bpt, sp, groups, tables, lq, out)
}

/// [`residual_block`] at `level` (capped at this process's level).
pub fn residual_block_at(
    level: Level,
    gath: &mut Gathered,
    bpt: usize,
    sp: &[f32],
    groups: usize,
    tables: &[(Vec<i16>, f32)],
    lq: usize,
    out: &mut Vec<f32>,
) {
    let n_centroids = sp.len() / (groups * LANES);
    assert!(
        gath.codes.iter().all(|&c| (c as usize) < n_centroids),
        "code out of range"
    );
    assert_eq!(gath.res.len(), gath.codes.len() * bpt);
    assert!(gath
        .ends
        .last()
        .is_none_or(|&e| e as usize == gath.codes.len()));
    for (table, _) in tables {
        assert_eq!(table.len(), bpt * 256 * LANES);
    }
    let level = level.min(cpu::level());
    #[cfg(target_arch = "x86_64")]
    {
        if level >= Level::Avx512 {
            // SAFETY: the process's level includes AVX-512 F and BW.
            return unsafe { residual_block_avx512(gath, bpt, sp, groups, tables, lq, out) };
        }
        if level >= Level::Avx2 {
            // SAFETY: the process's level includes AVX2 and FMA.
            return unsafe { residual_block_avx2(gath, bpt, sp, groups, tables, lq, out) };
        }
    }
    let _ = level;
    residual_block_generic(gath, bpt, sp, groups, tables, lq, out, sweep_portable)
}

/// One sweep of [`residual_block`]: `acc[t] += Σ_p rows[p·256 + tok_t[p]]` over the byte positions, for the
/// tokens of `res` (`bpt` bytes each, `acc.len()` tokens). Rows are `LANES` i16 wide.
type Sweep = unsafe fn(&mut [[i16; LANES]], &[[i16; LANES]], &[u8], usize);

fn sweep_portable(acc: &mut [[i16; LANES]], rows: &[[i16; LANES]], res: &[u8], bpt: usize) {
    for p in 0..bpt {
        let slice: &[[i16; LANES]; 256] =
            rows[p * 256..(p + 1) * 256].try_into().expect("256 rows");
        for (a, tok) in acc.iter_mut().zip(res.chunks_exact(bpt)) {
            let row = &slice[tok[p] as usize];
            for i in 0..LANES {
                a[i] = a[i].wrapping_add(row[i]);
            }
        }
    }
}

/// Two byte positions per pass over the accumulators (two 16 KB table slices and the accumulators stay in L1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn sweep_avx512(acc: &mut [[i16; LANES]], rows: &[[i16; LANES]], res: &[u8], bpt: usize) {
    use std::arch::x86_64::*;
    assert!(rows.len() >= bpt * 256 && res.len() >= acc.len() * bpt);
    let n = acc.len();
    let ap = acc.as_mut_ptr() as *mut __m512i;
    let rp = rows.as_ptr() as *const __m512i;
    let bp = res.as_ptr();
    let mut p = 0;
    while p + 1 < bpt {
        let (s0, s1) = (rp.add(p * 256), rp.add((p + 1) * 256));
        for t in 0..n {
            // SAFETY: t < n tokens of acc and res (asserted); a byte indexes one of the 256 rows of a slice.
            let b0 = *bp.add(t * bpt + p) as usize;
            let b1 = *bp.add(t * bpt + p + 1) as usize;
            let r = _mm512_add_epi16(
                _mm512_loadu_si512(s0.add(b0)),
                _mm512_loadu_si512(s1.add(b1)),
            );
            _mm512_storeu_si512(
                ap.add(t),
                _mm512_add_epi16(_mm512_loadu_si512(ap.add(t)), r),
            );
        }
        p += 2;
    }
    if p < bpt {
        let s0 = rp.add(p * 256);
        for t in 0..n {
            // SAFETY: as above, for the last position.
            let b0 = *bp.add(t * bpt + p) as usize;
            let v = _mm512_add_epi16(
                _mm512_loadu_si512(ap.add(t)),
                _mm512_loadu_si512(s0.add(b0)),
            );
            _mm512_storeu_si512(ap.add(t), v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sweep_avx2(acc: &mut [[i16; LANES]], rows: &[[i16; LANES]], res: &[u8], bpt: usize) {
    use std::arch::x86_64::*;
    assert!(rows.len() >= bpt * 256 && res.len() >= acc.len() * bpt);
    let n = acc.len();
    let ap = acc.as_mut_ptr() as *mut __m256i;
    let rp = rows.as_ptr() as *const __m256i;
    let bp = res.as_ptr();
    for p in 0..bpt {
        let s0 = rp.add(p * 256 * 2);
        for t in 0..n {
            // SAFETY: t < n tokens of acc and res (asserted); a byte indexes one of the 256 rows (2 × 256 bits).
            let b = *bp.add(t * bpt + p) as usize;
            let (a0, a1) = (ap.add(2 * t), ap.add(2 * t + 1));
            let (r0, r1) = (s0.add(2 * b), s0.add(2 * b + 1));
            _mm256_storeu_si256(
                a0,
                _mm256_add_epi16(_mm256_loadu_si256(a0), _mm256_loadu_si256(r0)),
            );
            _mm256_storeu_si256(
                a1,
                _mm256_add_epi16(_mm256_loadu_si256(a1), _mm256_loadu_si256(r1)),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn residual_block_avx512(
    gath: &mut Gathered,
    bpt: usize,
    sp: &[f32],
    groups: usize,
    tables: &[(Vec<i16>, f32)],
    lq: usize,
    out: &mut Vec<f32>,
) {
    residual_block_generic(gath, bpt, sp, groups, tables, lq, out, sweep_avx512)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn residual_block_avx2(
    gath: &mut Gathered,
    bpt: usize,
    sp: &[f32],
    groups: usize,
    tables: &[(Vec<i16>, f32)],
    lq: usize,
    out: &mut Vec<f32>,
) {
    residual_block_generic(gath, bpt, sp, groups, tables, lq, out, sweep_avx2)
}

/// The body of [`residual_block`], with the sweep of the target it is compiled for (LLVM keeps the i16 adds
/// scalar when left to itself, hence the explicit sweeps). Bounds are checked by the caller's asserts.
#[inline(always)]
fn residual_block_generic(
    gath: &mut Gathered,
    bpt: usize,
    sp: &[f32],
    groups: usize,
    tables: &[(Vec<i16>, f32)],
    lq: usize,
    out: &mut Vec<f32>,
    sweep: Sweep,
) {
    let Gathered {
        codes,
        res,
        ends,
        acc,
        best,
    } = gath;
    let n_docs = ends.len();
    out.clear();
    out.resize(n_docs, 0.0);
    acc.resize(SWEEP, [0; LANES]);
    best.resize(n_docs, [0.0; LANES]);
    let (sp_rows, _) = sp.as_chunks::<LANES>();
    for (g, (table, scale)) in tables.iter().enumerate() {
        let inv = 1.0 / scale;
        let (rows, _) = table.as_chunks::<LANES>();
        best.fill([f32::NEG_INFINITY; LANES]);
        let mut d = 0usize;
        for (ci, (cc, rc)) in codes.chunks(SWEEP).zip(res.chunks(SWEEP * bpt)).enumerate() {
            let acc = &mut acc[..cc.len()];
            acc.fill([0; LANES]);
            // SAFETY: the sweeps chosen by the callers run on CPUs with their features; sizes are asserted inside.
            unsafe { sweep(acc, rows, rc, bpt) };
            for (t, (a, &c)) in acc.iter().zip(cc).enumerate() {
                let tok = ci * SWEEP + t;
                while ends[d] as usize <= tok {
                    d += 1;
                }
                let srow = &sp_rows[c as usize * groups + g];
                let b = &mut best[d];
                for i in 0..LANES {
                    b[i] = b[i].max(srow[i] + a[i] as f32 * inv);
                }
            }
        }
        let real = (lq - g * LANES).min(LANES);
        for (o, b) in out.iter_mut().zip(best.iter()) {
            *o += b[..real].iter().sum::<f32>();
        }
    }
}

/// Quantises a lookup table to i16 so that the sum of `positions` entries stays within i16 (a plain reference
/// for tests).
pub fn quantize_table(table: &[f32], positions: usize) -> (Vec<i16>, f32) {
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

multiversion! {
    /// The i16 query table from per-nibble partial sums: `table[p][byte][j] = round((hi[p][byte >> 4][j] +
    /// lo[p][byte & 15][j]) · scale)`, `sums` holding for each byte position `p` the 16 high-nibble rows then
    /// the 16 low-nibble rows, each `stride` wide.
    pub fn fill_i16_table / fill_i16_table_at(sums: &[f32], table: &mut [i16], positions: usize, stride: usize, scale: f32) -> () {
        for p in 0..positions {
            for byte in 0..256usize {
                let h = &sums[((p * 2) * 16 + (byte >> 4)) * stride..][..stride];
                let l = &sums[((p * 2 + 1) * 16 + (byte & 15)) * stride..][..stride];
                let dst = &mut table[(p * 256 + byte) * stride..][..stride];
                for ((o, a), b) in dst.iter_mut().zip(h).zip(l) {
                    *o = round_clamp_i32((a + b) * scale, 32_767.0) as i16;
                }
            }
        }
    }
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
        for level in cpu::levels_here() {
            eprintln!("bag_score_i8 / keep_tokens at {level}");
            let mut best = vec![[0i8; LANES]; groups];
            assert_eq!(
                bag_score_i8_at(
                    level,
                    &codes,
                    &sq,
                    groups,
                    &cmax,
                    f32::NEG_INFINITY,
                    &mut best
                ),
                want,
                "{level}"
            );
            assert_eq!(
                bag_score_i8_at(
                    level,
                    &codes,
                    &sq,
                    groups,
                    &cmax,
                    f32::NEG_INFINITY,
                    &mut []
                ),
                want,
                "{level}"
            );
            check_maxima_and_pruning(level, &codes, &sq, groups, lq, &cmax, &best, row);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_maxima_and_pruning(
        level: Level,
        codes: &[u16],
        sq: &[i8],
        groups: usize,
        lq: usize,
        cmax: &[f32],
        best: &[[i8; LANES]],
        row: impl Fn(usize, usize) -> i8,
    ) {
        for j in 0..lq {
            let m = codes.iter().map(|&c| row(c as usize, j)).max().unwrap();
            assert_eq!(best[j / LANES][j % LANES], m, "maximum of lane {j}");
        }
        // Pruning every token's centroid away leaves 0.
        assert_eq!(
            bag_score_i8_at(level, codes, sq, groups, cmax, 1.0, &mut []),
            0
        );
        for margin in [0i16, 5, 30, 300] {
            let mut keep = Vec::new();
            keep_tokens_at(level, codes, sq, groups, lq, margin, best, &mut keep);
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
            assert_eq!(keep, naive, "{level}: margin {margin}");
            assert!(!keep.is_empty());
        }
        let mut all = Vec::new();
        keep_tokens_at(level, codes, sq, groups, lq, 300, best, &mut all);
        assert_eq!(all.len(), codes.len());
    }

    #[test]
    fn residual_block_matches_naive_code_at_every_level() {
        let (k, groups, lq) = (5usize, 2usize, 40usize);
        let mut x = 12345u32;
        let mut next = || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let sp: Vec<f32> = (0..k * groups * LANES).map(|_| next()).collect();
        // Odd byte counts and blocks longer than one sweep, with an empty document in between.
        for bpt in [4usize, 3] {
            let tables: Vec<(Vec<i16>, f32)> = (0..groups)
                .map(|_| {
                    let t: Vec<f32> = (0..bpt * 256 * LANES).map(|_| next() * 0.1).collect();
                    quantize_table(&t, bpt)
                })
                .collect();
            let lens = [7usize, 0, SWEEP + 5, 1, 2 * SWEEP];
            let mut gath = Gathered::default();
            let mut docs = Vec::new();
            for (i, &n) in lens.iter().enumerate() {
                let codes: Vec<u16> = (0..n).map(|t| ((t * 3 + i) % k) as u16).collect();
                let res: Vec<u8> = (0..n * bpt)
                    .map(|j| ((j * 37 + i * 11) % 256) as u8)
                    .collect();
                let keep: Vec<u32> = (0..n as u32).filter(|t| t % 3 != 1 || n < 3).collect();
                gath.push_doc(&codes, &keep, &res, bpt);
                docs.push((codes, res, keep));
            }
            let naive: Vec<f32> = docs
                .iter()
                .map(|(codes, res, keep)| {
                    (0..lq)
                        .map(|j| {
                            let (g, i) = (j / LANES, j % LANES);
                            let (table, scale) = &tables[g];
                            keep.iter()
                                .map(|&t| {
                                    let t = t as usize;
                                    let r: i32 = (0..bpt)
                                        .map(|p| {
                                            let b = res[t * bpt + p] as usize;
                                            table[(p * 256 + b) * LANES + i] as i32
                                        })
                                        .sum();
                                    sp[(codes[t] as usize * groups + g) * LANES + i]
                                        + r as f32 / scale
                                })
                                .fold(f32::NEG_INFINITY, f32::max)
                        })
                        .sum()
                })
                .collect();
            let check = |got: &[f32], what: &str| {
                assert_eq!(got.len(), naive.len());
                for (g, w) in got.iter().zip(&naive) {
                    if w.is_finite() {
                        assert!((g - w).abs() < 1e-3, "{what} bpt {bpt}: {g} vs {w}");
                    } else {
                        assert_eq!(g, w, "{what}: empty document");
                    }
                }
            };
            let mut out = Vec::new();
            for level in cpu::levels_here() {
                eprintln!("residual_block at {level}, bpt {bpt}");
                residual_block_at(level, &mut gath, bpt, &sp, groups, &tables, lq, &mut out);
                check(&out, level.name());
            }
            residual_block(&mut gath, bpt, &sp, groups, &tables, lq, &mut out);
            check(&out, "dispatched");
        }
        // Quantisation keeps the table sums close to the float ones.
        let t: Vec<f32> = (0..4 * 256 * LANES).map(|_| next() * 0.1).collect();
        let (q, scale) = quantize_table(&t, 4);
        for j in [0usize, 77, 4 * 256 * LANES - 1] {
            assert!((q[j] as f32 / scale - t[j]).abs() <= 0.5 / scale + 1e-6);
        }
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn max_abs_quantisation_and_table_fill_match_plain_code_at_every_level() {
        let v: Vec<f32> = (0..1037)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let want = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let (positions, stride) = (3usize, LANES);
        let sums: Vec<f32> = (0..positions * 2 * 16 * stride)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 30.0)
            .collect();
        let scale = 1000.0;
        let mut plain = vec![0i16; positions * 256 * stride];
        for p in 0..positions {
            for byte in 0..256 {
                for j in 0..stride {
                    let h = sums[((p * 2) * 16 + (byte >> 4)) * stride + j];
                    let l = sums[((p * 2 + 1) * 16 + (byte & 15)) * stride + j];
                    plain[(p * 256 + byte) * stride + j] = ((h + l) * scale).round() as i16;
                }
            }
        }
        for level in cpu::levels_here() {
            eprintln!("max_abs / fill_i16_table at {level}");
            assert_eq!(max_abs_at(level, &v), want, "{level}");
            assert_eq!(
                max_abs_at(level, &v[..5]),
                v[..5].iter().fold(0f32, |m, x| m.max(x.abs()))
            );
            let mut table = vec![0i16; plain.len()];
            fill_i16_table_at(level, &sums, &mut table, positions, stride, scale);
            assert_eq!(table, plain, "{level}");
        }
        let (sq, s) = quantize_scores(&v);
        for (q, x) in sq.iter().zip(&v) {
            assert!((*q as f32 / s - x).abs() <= 0.5 / s + 1e-6);
        }
        assert_eq!(round_i32(2.5), 3);
        assert_eq!(round_i32(-2.5), -3);
        assert_eq!(round_clamp_i32(1e9, 127.0), 127);
        assert_eq!(round_clamp_i32(f32::NAN, 127.0).abs(), 127);
    }
}

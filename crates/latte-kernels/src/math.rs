//! Element-wise math of the models: `exp` (vectorised), erf, the normal CDF, exact GELU and its
//! derivative, and the row softmax — one implementation of each per level.
//!
//! Portable: the scalar functions below ([`erf`], [`normal_cdf`], [`gelu`], [`gelu_grad`], one
//! implementation each, used by the f32 path and by the reduced-precision kernels of [`crate::lowp`]
//! through [`gelu_in_place`]), with a Cephes `exp` polynomial written branch-free.
//! AVX-512: the same erf (Abramowitz & Stegun 7.1.26) on 16 lanes, with the same Cephes `exp` (about 1 ulp,
//! `2ⁿ` through `scalef`). AVX2: the scalar functions compiled for AVX2 + FMA (branch-free, so the loops
//! vectorise); its softmax takes `exp` from the same branch-free polynomial instead of libm.

use rayon::prelude::*;

use crate::Level;

/// `1 / √(2π)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The error function in f32 (Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7, plus f32 rounding),
/// branch-free so that loops over it vectorise.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    (1.0 - erfc_pos(x.abs())).copysign(x)
}

/// The standard normal CDF `Φ(x) = (1 + erf(x/√2)) / 2`. For negative `x` it uses `1 + erf(-z) = erfc(z)`
/// directly, so the small values of the negative tail keep their relative accuracy.
#[inline(always)]
pub fn normal_cdf(x: f32) -> f32 {
    0.5 * two_phi(x)
}

/// `2 Φ(x)` (see [`normal_cdf`]).
#[inline(always)]
fn two_phi(x: f32) -> f32 {
    let c = erfc_pos(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    if x < 0.0 {
        c
    } else {
        2.0 - c
    }
}

/// The exact GELU, `x Φ(x) = x (1 + erf(x / √2)) / 2`, with the tail-accurate Φ of [`normal_cdf`].
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * two_phi(x)
}

/// The derivative of exact GELU, `Φ(x) + x·φ(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    normal_cdf(x) + x * exp_neg(0.5 * x * x) * INV_SQRT_2PI
}

/// `erfc(z)` for `z >= 0` (A & S 7.1.26: `t (a1 + t (a2 + ...)) e^-z²`, `t = 1 / (1 + p z)`).
#[inline(always)]
fn erfc_pos(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    poly * exp_neg(z * z)
}

/// `e^-w` for `w >= 0` to f32 accuracy, 0 past `w = 87` (where [`erf`] has long saturated):
/// `2^n e^r`, `n` the integer nearest `-w / ln 2`, `|r| <= ln 2 / 2`, and a degree-7 polynomial for `e^r`
/// (the polynomial of the AVX-512 `exp`, branch-free so that loops over it vectorise).
#[inline(always)]
fn exp_neg(w: f32) -> f32 {
    // 1.5 × 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let y = -w.min(87.0);
    let t = y * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2 in two parts (Cody and Waite), so that n ln 2 is subtracted almost exactly.
    let r = (y - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p = ((((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5)
        * r
        + 1.0)
        * r
        + 1.0;
    let e = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((e + 127) as u32) << 23);
    // Below e^-87 the answer is 0 for every use here (erfc(9.3) < 1e-38).
    p * if w > 87.0 { 0.0 } else { scale }
}

/// In place: `v[i] ← GELU(v[i])` with the scalar [`gelu`], bit for bit at every level (the plain loop
/// compiled for the widest vector level here; Rust never contracts into fused multiply-adds). The reduced
/// precision kernels use it, so that their levels agree exactly.
pub fn gelu_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let c = crate::cpu::cpu();
        if c.avx512() {
            // SAFETY: the CPU has AVX512F and AVX512BW (`Level::Avx512`, from `cpu()`).
            return unsafe { gelu_in_place_avx512(v) };
        }
        if c.avx2() {
            // SAFETY: the CPU has AVX2 and FMA (`Level::Avx2`, from `cpu()`).
            return unsafe { gelu_in_place_avx2(v) };
        }
    }
    gelu_in_place_plain(v)
}

#[inline(always)]
fn gelu_in_place_plain(v: &mut [f32]) {
    for x in v {
        *x = gelu(*x);
    }
}

/// The plain loop compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn gelu_in_place_avx512(v: &mut [f32]) {
    gelu_in_place_plain(v)
}

/// The plain loop compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_in_place_avx2(v: &mut [f32]) {
    gelu_in_place_plain(v)
}

/// The level the kernels of this module run at when asked for `level`: never above the process's
/// [`crate::cpu`] (so an `*_at` call is sound whatever level it is given).
pub(crate) fn usable(level: Level) -> Level {
    level.min(crate::cpu().level)
}

/// Elements handed to one rayon task by the parallel element-wise passes.
const CHUNK: usize = 1 << 14;

/// `out[i] = GELU(x[i])` at `level`, single-threaded.
pub fn gelu_slice_at(level: Level, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "gelu: input and output lengths differ");
    #[cfg(target_arch = "x86_64")]
    match usable(level) {
        Level::Avx512 | Level::Amx => return x86::gelu(x, out),
        // SAFETY: AVX2 and FMA are present (`usable` never exceeds the CPU's level).
        Level::Avx2 => return unsafe { gelu_slice_avx2(x, out) },
        Level::Portable => {}
    }
    let _ = level;
    gelu_slice_plain(x, out)
}

#[inline(always)]
fn gelu_slice_plain(x: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(x).for_each(|(o, &v)| *o = gelu(v));
}

/// The plain loop compiled for AVX2 (branch-free: it vectorises).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_slice_avx2(x: &[f32], out: &mut [f32]) {
    gelu_slice_plain(x, out)
}

/// `out[i] = GELU(x[i])` at the process's level, in parallel over chunks.
pub fn gelu_slice(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "gelu: input and output lengths differ");
    let level = crate::level();
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| gelu_slice_at(level, x, o));
}

/// In place: `g[i] ← g[i] · GELU′(x[i])` at `level`, single-threaded.
pub fn gelu_backward_at(level: Level, x: &[f32], g: &mut [f32]) {
    assert_eq!(
        x.len(),
        g.len(),
        "gelu backward: input and gradient lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    match usable(level) {
        Level::Avx512 | Level::Amx => return x86::gelu_backward(x, g),
        // SAFETY: AVX2 and FMA are present (`usable` never exceeds the CPU's level).
        Level::Avx2 => return unsafe { gelu_backward_avx2(x, g) },
        Level::Portable => {}
    }
    let _ = level;
    gelu_backward_plain(x, g)
}

#[inline(always)]
fn gelu_backward_plain(x: &[f32], g: &mut [f32]) {
    g.iter_mut().zip(x).for_each(|(g, &v)| *g *= gelu_grad(v));
}

/// The plain loop compiled for AVX2 (branch-free: it vectorises).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_backward_avx2(x: &[f32], g: &mut [f32]) {
    gelu_backward_plain(x, g)
}

/// In place: `g[i] ← g[i] · GELU′(x[i])` at the process's level, in parallel over chunks.
pub fn gelu_backward(x: &[f32], g: &mut [f32]) {
    assert_eq!(
        x.len(),
        g.len(),
        "gelu backward: input and gradient lengths differ"
    );
    let level = crate::level();
    g.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(g, x)| gelu_backward_at(level, x, g));
}

/// In place: `row ← softmax(row · scale + bias)` at `level` (`bias`, when given, at least as long as
/// `row`).
pub fn softmax_row_at(level: Level, row: &mut [f32], scale: f32, bias: Option<&[f32]>) {
    if let Some(b) = bias {
        assert!(b.len() >= row.len(), "softmax: bias shorter than the row");
    }
    #[cfg(target_arch = "x86_64")]
    match usable(level) {
        Level::Avx512 | Level::Amx => return x86::softmax_row(row, scale, bias),
        // SAFETY: AVX2 and FMA are present (`usable` never exceeds the CPU's level).
        Level::Avx2 => return unsafe { softmax_row_avx2(row, scale, bias) },
        Level::Portable => {}
    }
    let _ = level;
    let mut max = f32::NEG_INFINITY;
    match bias {
        Some(b) => {
            for (v, &b) in row.iter_mut().zip(b) {
                *v = *v * scale + b;
                max = max.max(*v);
            }
        }
        None => {
            for v in row.iter_mut() {
                *v *= scale;
                max = max.max(*v);
            }
        }
    }
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// In place: `row ← softmax(row · scale + bias)` (`bias` at least as long as `row`, checked by the
/// callers), compiled for AVX2 + FMA with the branch-free `exp` of the scalar functions (`e^(v − max)`
/// through [`exp_neg`]), so that all three passes vectorise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn softmax_row_avx2(row: &mut [f32], scale: f32, bias: Option<&[f32]>) {
    const L: usize = 8;
    match bias {
        Some(b) => row
            .iter_mut()
            .zip(b)
            .for_each(|(v, &b)| *v = *v * scale + b),
        None => row.iter_mut().for_each(|v| *v *= scale),
    }
    // Maximum and sum over eight lanes (a single running value would not vectorise).
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    // The tail goes to the lanes of its positions, so that position `i` is always summed in lane `i % 8`
    // in the same order: a row padded with masked keys (whose terms are exactly 0) then gives the very
    // same probabilities as the unpadded row, whatever the batch it was encoded in.
    for (m, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *m = m.max(v);
    }
    let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        // Every position masked: 0 / 0, as the scalar path gives.
        row.iter_mut().for_each(|v| *v = f32::NAN);
        return;
    }
    row.iter_mut().for_each(|v| *v = exp_neg(max - *v));
    let mut lanes = [0f32; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for (s, &v) in lanes.iter_mut().zip(c) {
            *s += v;
        }
    }
    for (s, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *s += v;
    }
    let sum: f32 = lanes.iter().sum();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// In place: `row ← softmax(row · scale + bias)` at the process's level.
pub fn softmax_row(row: &mut [f32], scale: f32, bias: Option<&[f32]>) {
    softmax_row_at(crate::level(), row, scale, bias)
}

/// `out = softmax(x)` over every row of `n` values, at `level`, in parallel over blocks of rows.
pub fn softmax_rows_at(level: Level, x: &[f32], n: usize, out: &mut [f32]) {
    assert!(
        x.len() == out.len() && n > 0 && x.len().is_multiple_of(n),
        "softmax: {} values in, {} out, rows of {n}",
        x.len(),
        out.len()
    );
    let rows_per_task = CHUNK / n + 1;
    out.par_chunks_mut(rows_per_task * n)
        .zip(x.par_chunks(rows_per_task * n))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_mut(n).zip(x.chunks(n)) {
                o.copy_from_slice(x);
                softmax_row_at(level, o, 1.0, None);
            }
        });
}

/// `out = softmax(x)` over every row of `n` values at the process's level.
pub fn softmax_rows(x: &[f32], n: usize, out: &mut [f32]) {
    softmax_rows_at(crate::level(), x, n, out)
}

/// The AVX-512 lanes. Every function requires AVX-512F; the safe ones check it.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// The first `n` of 16 lanes.
    #[inline(always)]
    pub(crate) fn tail_mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// `exp(x)` on 16 lanes: Cephes' range reduction and degree-6 polynomial (about 1 ulp), `2ⁿ` applied
    /// with `scalef`, so very negative inputs give 0 as libm does.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp_ps(x: __m512) -> __m512 {
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(88.376_26)),
            _mm512_set1_ps(-104.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_2e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        let y = _mm512_fmadd_ps(
            p,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(y, n)
    }

    /// `(erf(x/√2), exp(−x²/2))` on 16 lanes: the erf of [`super::erf`], whose `exp(−z²)` is also the
    /// unnormalised normal density.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn erf_and_density(x: __m512) -> (__m512, __m512) {
        let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN));
        let a = _mm512_abs_ps(z);
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.327_591_1), a, one));
        let mut p = _mm512_set1_ps(1.061_405_4);
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453_152_1));
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421_413_7));
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284_496_72));
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254_829_6));
        p = _mm512_mul_ps(p, t);
        let e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
        let y = _mm512_fnmadd_ps(p, e, one);
        let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
        (erf, e)
    }

    /// `0.5·x·(1 + erf(x/√2))` on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn gelu_ps(x: __m512) -> __m512 {
        let (erf, _) = erf_and_density(x);
        _mm512_mul_ps(
            _mm512_mul_ps(_mm512_set1_ps(0.5), x),
            _mm512_add_ps(_mm512_set1_ps(1.0), erf),
        )
    }

    /// `GELU′(x) = Φ(x) + x·φ(x)` on 16 lanes, with the erf of [`gelu_ps`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gelu_grad_ps(x: __m512) -> __m512 {
        let (erf, e) = erf_and_density(x);
        let cdf = _mm512_mul_ps(_mm512_set1_ps(0.5), _mm512_add_ps(_mm512_set1_ps(1.0), erf));
        _mm512_fmadd_ps(
            x,
            _mm512_mul_ps(e, _mm512_set1_ps(super::INV_SQRT_2PI)),
            cdf,
        )
    }

    fn check() {
        assert!(
            std::arch::is_x86_feature_detected!("avx512f"),
            "AVX-512 kernel called on a CPU without AVX-512F"
        );
    }

    /// `out = GELU(x)` (same lengths, checked by the caller).
    pub(crate) fn gelu(x: &[f32], out: &mut [f32]) {
        check();
        let n = x.len().min(out.len());
        let mut i = 0;
        while i < n {
            let m = tail_mask(n - i);
            // SAFETY: AVX-512F is present (checked above); the masked loads and stores stay inside `x`
            // and `out` (both at least `n` long).
            unsafe {
                let v = gelu_ps(_mm512_maskz_loadu_ps(m, x.as_ptr().add(i)));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, v);
            }
            i += 16;
        }
    }

    /// `g ← g · GELU′(x)` (same lengths, checked by the caller).
    pub(crate) fn gelu_backward(x: &[f32], g: &mut [f32]) {
        check();
        let n = x.len().min(g.len());
        let gp = g.as_mut_ptr();
        let mut i = 0;
        while i < n {
            let m = tail_mask(n - i);
            // SAFETY: AVX-512F is present (checked above); the masked loads and stores stay inside `x`
            // and `g`.
            unsafe {
                let d = gelu_grad_ps(_mm512_maskz_loadu_ps(m, x.as_ptr().add(i)));
                let v = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, gp.add(i)));
                _mm512_mask_storeu_ps(gp.add(i), m, v);
            }
            i += 16;
        }
    }

    /// In place: `s ← softmax(s · scale + bias)` (`bias` at least as long as `s`, checked by the caller).
    pub(crate) fn softmax_row(s: &mut [f32], scale: f32, bias: Option<&[f32]>) {
        check();
        // SAFETY: AVX-512F is present (checked above).
        unsafe { softmax_row_unchecked(s, scale, bias) }
    }

    /// [`softmax_row`] without the feature check, for the kernels' inner loops.
    ///
    /// # Safety
    /// AVX-512F must be present, and `bias` (when given) at least as long as `s`.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn softmax_row_unchecked(s: &mut [f32], scale: f32, bias: Option<&[f32]>) {
        let n = s.len();
        let sp = s.as_mut_ptr();
        let vscale = _mm512_set1_ps(scale);
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < n {
            let m = tail_mask(n - i);
            let mut x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sp.add(i)), vscale);
            if let Some(b) = bias {
                x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, b.as_ptr().add(i)));
            }
            _mm512_mask_storeu_ps(sp.add(i), m, x);
            mx = _mm512_mask_max_ps(mx, m, mx, x);
            i += 16;
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut sum = _mm512_setzero_ps();
        i = 0;
        while i < n {
            let m = tail_mask(n - i);
            let e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sp.add(i)), mx));
            _mm512_mask_storeu_ps(sp.add(i), m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            i += 16;
        }
        let sum = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
        i = 0;
        while i < n {
            let m = tail_mask(n - i);
            let v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, sp.add(i)), sum);
            _mm512_mask_storeu_ps(sp.add(i), m, v);
            i += 16;
        }
    }

    /// `out[i] = exp(x[i])` on the vectorised `exp` (tests compare it with libm).
    #[cfg(test)]
    pub(crate) fn exp(x: &[f32], out: &mut [f32]) {
        check();
        for (o, x) in out.chunks_mut(16).zip(x.chunks(16)) {
            let m = tail_mask(x.len());
            // SAFETY: AVX-512F is present; the masked load and store stay inside the chunks.
            unsafe {
                let v = exp_ps(_mm512_maskz_loadu_ps(m, x.as_ptr()));
                _mm512_mask_storeu_ps(o.as_mut_ptr(), m, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{close, values};

    /// GELU through an f64 erf of the same formula (within 1.5e-7 of the true erf).
    fn gelu_ref(x: f32) -> f32 {
        let z = (x as f64) * std::f64::consts::FRAC_1_SQRT_2;
        let a = z.abs();
        let t = 1.0 / (1.0 + 0.3275911 * a);
        let y = 1.0
            - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
                + 0.254829592)
                * t
                * (-a * a).exp();
        (0.5 * x as f64 * (1.0 + y.copysign(z))) as f32
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_matches_libm() {
        if crate::level() < Level::Avx512 {
            eprintln!("exp: no AVX-512 here, nothing to test");
            return;
        }
        let xs: Vec<f32> = (-2000..=1000)
            .map(|i| i as f32 * 0.0883)
            .chain([0.0, -0.0, 88.0, -87.0, -103.0, -200.0, f32::NEG_INFINITY])
            .collect();
        let mut out = vec![0f32; xs.len()];
        x86::exp(&xs, &mut out);
        for (&x, &y) in xs.iter().zip(&out) {
            let want = x.exp();
            assert!(
                (y - want).abs() <= 4e-7 * want.abs() + 1e-38,
                "exp({x}) = {y}, libm {want}"
            );
        }
    }

    #[test]
    fn gelu_and_its_gradient_match_references_at_every_level() {
        let x = values(1037, 3);
        for level in crate::cpu::levels_here() {
            eprintln!("gelu at {level}");
            let mut out = vec![f32::NAN; x.len()];
            gelu_slice_at(level, &x, &mut out);
            let want: Vec<f32> = x.iter().map(|&v| gelu_ref(v)).collect();
            close(&out, &want, 2e-6);
            let mut g = values(x.len(), 9);
            let g0 = g.clone();
            gelu_backward_at(level, &x, &mut g);
            // Reference derivative from f64 central differences of the reference GELU's formula.
            let want: Vec<f32> = x
                .iter()
                .zip(&g0)
                .map(|(&v, &gv)| {
                    let v = v as f64;
                    let cdf = 0.5 * (1.0 + erf_f64(v / std::f64::consts::SQRT_2));
                    let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
                    (gv as f64 * (cdf + v * pdf)) as f32
                })
                .collect();
            close(&g, &want, 2e-6);
        }
        let mut par = vec![0f32; x.len()];
        gelu_slice(&x, &mut par);
        let mut one = vec![0f32; x.len()];
        gelu_slice_at(crate::level(), &x, &mut one);
        assert_eq!(par, one);
    }

    /// erf in f64 (A&S 7.1.26; the reference for the derivative).
    fn erf_f64(z: f64) -> f64 {
        let a = z.abs();
        let t = 1.0 / (1.0 + 0.3275911 * a);
        let y = 1.0
            - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
                + 0.254829592)
                * t
                * (-a * a).exp();
        y.copysign(z)
    }

    #[test]
    fn softmax_matches_reference_at_every_level() {
        for level in crate::cpu::levels_here() {
            eprintln!("softmax at {level}");
            for n in [1usize, 7, 16, 17, 33, 100] {
                let x = values(3 * n, n as u64);
                let bias = values(n, 77);
                for (scale, b) in [(1.0f32, None), (0.37, Some(&bias[..]))] {
                    let mut got = x.clone();
                    for row in got.chunks_mut(n) {
                        softmax_row_at(level, row, scale, b);
                    }
                    let mut want = Vec::new();
                    for row in x.chunks(n) {
                        let s: Vec<f64> = row
                            .iter()
                            .enumerate()
                            .map(|(j, &v)| v as f64 * scale as f64 + b.map_or(0.0, |b| b[j] as f64))
                            .collect();
                        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                        let z: f64 = e.iter().sum();
                        want.extend(e.iter().map(|v| (v / z) as f32));
                    }
                    close(&got, &want, 1e-6);
                }
                let mut rows = vec![0f32; x.len()];
                softmax_rows_at(level, &x, n, &mut rows);
                let mut one = x.clone();
                for row in one.chunks_mut(n) {
                    softmax_row_at(level, row, 1.0, None);
                }
                assert_eq!(rows, one);
            }
        }
    }

    #[test]
    fn softmax_is_the_same_with_masked_padding_at_every_level() {
        // A document encoded in a batch is padded with masked keys (bias −f32::MAX): its probabilities must
        // be bit for bit those of the unpadded row, so that an index does not depend on how it was batched.
        for level in crate::cpu::levels_here() {
            eprintln!("softmax with padding at {level}");
            for n in [1usize, 5, 8, 13, 16, 21, 40, 77, 129, 301] {
                let x = values(n, 3 + n as u64);
                let bias = values(n, 11);
                let mut alone = x.clone();
                softmax_row_at(level, &mut alone, 0.125, Some(&bias));
                for pad in [1usize, 3, 8, 11, 27] {
                    let mut padded = x.clone();
                    padded.extend(values(pad, 5));
                    let mut pbias = bias.clone();
                    pbias.extend(std::iter::repeat_n(-f32::MAX, pad));
                    softmax_row_at(level, &mut padded, 0.125, Some(&pbias));
                    assert_eq!(&padded[..n], &alone[..], "{level}, {n} + {pad} padded");
                    assert!(
                        padded[n..].iter().all(|&p| p == 0.0),
                        "{level}: masked keys weigh 0"
                    );
                }
            }
        }
    }

    /// Abramowitz & Stegun 7.1.26 as `erfc` in f64, for `z >= 0`.
    fn erfc_f64(z: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.327_591_1 * z);
        t * (0.254_829_592
            + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))))
            * (-z * z).exp()
    }

    #[test]
    fn gelu_and_erf_match_known_values() {
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (-2.0, -0.995_322_265_018_952_7),
            (3.5, 0.999_999_256_901_627_7),
        ] {
            assert!(
                (f64::from(erf(x)) - want).abs() < 4e-7,
                "erf({x}) = {}",
                erf(x)
            );
        }
        // The f32 evaluation stays within f32 rounding of the formula evaluated in f64, over the whole range.
        let mut worst = 0f64;
        for i in -12_000..=12_000 {
            let x = i as f32 * 1e-3;
            worst = worst.max((f64::from(erf(x)) - erf_f64(f64::from(x))).abs());
        }
        assert!(
            worst < 4e-7,
            "erf: worst distance to the f64 formula {worst:e}"
        );
        // GELU and Φ in the negative tail keep their relative accuracy (erfc without cancellation).
        for x in [-1.0f32, -3.0, -5.0, -8.0] {
            let erfc = erfc_f64(f64::from(-x) / 2f64.sqrt());
            let want = 0.5 * f64::from(x) * erfc;
            let got = f64::from(gelu(x));
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "gelu({x}) = {got}, want {want}"
            );
            let got = f64::from(normal_cdf(x));
            assert!(
                (got - 0.5 * erfc).abs() <= 1e-5 * 0.5 * erfc,
                "normal_cdf({x}) = {got}, want {}",
                0.5 * erfc
            );
        }
        assert_eq!(erf(20.0), 1.0);
        assert_eq!(erf(-1e30), -1.0);
        assert!((f64::from(gelu(1.0)) - 0.841_344_746_068_542_9).abs() < 4e-7);
        assert!((f64::from(gelu(-1.0)) + 0.158_655_253_931_457_05).abs() < 4e-7);
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu(-30.0), 0.0);
        assert_eq!(gelu(30.0), 30.0);
        assert!(erf(f32::NAN).is_nan() && gelu(f32::NAN).is_nan());
        eprintln!("erf: worst distance to A&S 7.1.26 in f64 on [-12, 12]: {worst:e}");
    }

    #[test]
    fn gelu_in_place_is_the_scalar_gelu_bit_for_bit() {
        let mut v: Vec<f32> = (0..1003).map(|i| (i as f32 - 501.0) * 0.013).collect();
        v.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.0,
            1e-30,
            88.0,
            -88.0,
        ]);
        let want: Vec<f32> = v.iter().map(|&x| gelu(x)).collect();
        gelu_in_place(&mut v);
        for (g, w) in v.iter().zip(&want) {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{g} vs {w}"
            );
        }
        eprintln!("gelu_in_place at {}", crate::cpu());
    }
}

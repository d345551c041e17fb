//! Element-wise math of the models: `exp` (vectorised), erf, the normal CDF, exact GELU and its
//! derivative, and the row softmax — one implementation of each per level.
//!
//! Portable: the scalar functions below ([`erf`], [`normal_cdf`], [`gelu`], [`gelu_grad`], libm's `exp`).
//! AVX-512: the same erf (Abramowitz & Stegun 7.1.26) on 16 lanes, with a Cephes `exp` (about 1 ulp,
//! `2ⁿ` through `scalef`). There is no AVX2 variant: AVX2 runs the portable code.

use rayon::prelude::*;

use crate::Level;

/// `1 / √(2π)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// erf with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_7) * t - 0.284_496_72) * t
            + 0.254_829_6)
            * t
            * (-a * a).exp();
    s * y
}

/// The standard normal CDF `Φ(x) = (1 + erf(x/√2)) / 2`.
#[inline(always)]
pub fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Exact-form GELU, `0.5·x·(1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The derivative of exact GELU, `Φ(x) + x·φ(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    normal_cdf(x) + x * (-0.5 * x * x).exp() * INV_SQRT_2PI
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
    if usable(level) >= Level::Avx512 {
        x86::gelu(x, out);
        return;
    }
    let _ = level;
    out.iter_mut().zip(x).for_each(|(o, &v)| *o = gelu(v));
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
    if usable(level) >= Level::Avx512 {
        x86::gelu_backward(x, g);
        return;
    }
    let _ = level;
    g.iter_mut().zip(x).for_each(|(g, &v)| *g *= gelu_grad(v));
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
    if usable(level) >= Level::Avx512 {
        x86::softmax_row(row, scale, bias);
        return;
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
}

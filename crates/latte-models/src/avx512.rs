//! AVX-512 single-precision kernels for inference, chosen at run time (see [`available`]); the callers in
//! [`crate::fused`] fall back to candle's ops (or plain Rust) on CPUs without AVX-512F.
//!
//! - [`linear`]: `act(x Wᵀ + b + residual)` with `Wᵀ` packed once per layer ([`Packed`]), 8 × 32 register
//!   tiles, the bias (plus the residual) as the initial accumulators and GELU applied before the store;
//! - [`attention`]: `softmax(q kᵀ · scale + bias) v` per (sequence, head), with both products through the
//!   same register tile and the scores kept in a per-thread scratch buffer;
//! - [`softmax_rows`], [`gelu`]: the same vectorised `exp` / erf used standalone.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::fused::{Packed, NR};

/// Rows of the register tile.
pub const MR: usize = 8;

static ZEROS: [f32; NR] = [0.0; NR];

/// AVX-512F is present and not switched off with `LATTE_NO_AVX512=1`.
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::env::var("LATTE_NO_AVX512").map_or(true, |v| v.is_empty() || v == "0")
    })
}

#[inline(always)]
fn tail_mask(n: usize) -> __mmask16 {
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
fn exp_ps(x: __m512) -> __m512 {
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

/// `(erf(x/√2), exp(−x²/2))` on 16 lanes: Abramowitz & Stegun 7.1.26 (the erf of `fused`), whose
/// `exp(−z²)` is also the unnormalised normal density.
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
fn gelu_ps(x: __m512) -> __m512 {
    let (erf, _) = erf_and_density(x);
    _mm512_mul_ps(
        _mm512_mul_ps(_mm512_set1_ps(0.5), x),
        _mm512_add_ps(_mm512_set1_ps(1.0), erf),
    )
}

/// One `rows × cols` tile (rows ≤ MR, cols ≤ NR) of `out = act(bias + residual + A · Bpanel)`.
///
/// # Safety
/// AVX-512F must be present; `a[r]` must be readable for `k` values, `bp` for `k × NR`, `bias` for `NR`,
/// `resid` (when not null) for `rows` rows of `cols` values `ldr` apart and `out` writable likewise.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const GELU: bool>(
    k: usize,
    a: [*const f32; MR],
    bp: *const f32,
    bias: *const f32,
    resid: *const f32,
    ldr: usize,
    out: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    let m0 = tail_mask(cols);
    let m1 = tail_mask(cols.saturating_sub(16));
    let mut c0 = [_mm512_loadu_ps(bias); MR];
    let mut c1 = [_mm512_loadu_ps(bias.add(16)); MR];
    if !resid.is_null() {
        for r in 0..MR {
            if r < rows {
                let p = resid.add(r * ldr);
                c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, p));
                c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, p.add(16)));
            }
        }
    }
    for kk in 0..k {
        let b0 = _mm512_loadu_ps(bp.add(kk * NR));
        let b1 = _mm512_loadu_ps(bp.add(kk * NR + 16));
        for r in 0..MR {
            let av = _mm512_set1_ps(*a[r].add(kk));
            c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
            c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
        }
    }
    for r in 0..MR {
        if r < rows {
            let (mut v0, mut v1) = (c0[r], c1[r]);
            if GELU {
                v0 = gelu_ps(v0);
                v1 = gelu_ps(v1);
            }
            let o = out.add(r * ldc);
            _mm512_mask_storeu_ps(o, m0, v0);
            _mm512_mask_storeu_ps(o.add(16), m1, v1);
        }
    }
}

/// A raw output pointer shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of elements, and the buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `dst[m, n] = act(x[m, k] · Wᵀ + bias + residual[m, n])` with `p` = the packed `W` (`n = p.n`,
/// `k = p.k`). Every element of `dst` is written.
pub fn linear(
    x: &[f32],
    m: usize,
    p: &Packed,
    residual: Option<&[f32]>,
    gelu: bool,
    dst: &mut [MaybeUninit<f32>],
) {
    let (n, k) = (p.n, p.k);
    assert!(x.len() >= m * k && dst.len() >= m * n && p.data.len() >= n.div_ceil(NR) * k * NR);
    if let Some(r) = residual {
        assert!(r.len() >= m * n);
    }
    if m == 0 || n == 0 {
        return;
    }
    assert!(available());
    let panels = n.div_ceil(NR);
    // Row blocks of about 384 KB of `x`, so a block stays in L2 while every panel of `Wᵀ` passes over it.
    let mc = ((96 * 1024) / k.max(1)).clamp(MR, 512) / MR * MR;
    let threads = candle_core::utils::get_num_threads();
    let mc = if threads > 1 && m <= mc * threads {
        // Small inputs: split evenly so every thread gets work.
        m.div_ceil(threads).div_ceil(MR) * MR
    } else {
        mc
    };
    let block = |(bi, d): (usize, &mut [MaybeUninit<f32>])| {
        let r0 = bi * mc;
        let rows_in = d.len() / n;
        let out = d.as_mut_ptr() as *mut f32;
        for pi in 0..panels {
            let cols = NR.min(n - pi * NR);
            let mut mr = 0;
            while mr < rows_in {
                let rows = MR.min(rows_in - mr);
                let mut a = [std::ptr::null::<f32>(); MR];
                for (r, ptr) in a.iter_mut().enumerate() {
                    // Rows past the end repeat the last row; their results are not stored.
                    *ptr = x[(r0 + mr + r.min(rows - 1)) * k..].as_ptr();
                }
                let resid = residual.map_or(std::ptr::null(), |res| {
                    res[(r0 + mr) * n + pi * NR..].as_ptr()
                });
                // SAFETY: AVX-512F is present (asserted above); every pointer stays inside `x`, `p`,
                // `residual` and `d` for the k, rows and cols given (checked by the asserts above).
                unsafe {
                    let f = if gelu {
                        kernel::<true>
                    } else {
                        kernel::<false>
                    };
                    f(
                        k,
                        a,
                        p.data.as_ptr().add(pi * k * NR),
                        p.bias.as_ptr().add(pi * NR),
                        resid,
                        n,
                        out.add(mr * n + pi * NR),
                        n,
                        rows,
                        cols,
                    );
                }
                mr += MR;
            }
        }
    };
    let dst = &mut dst[..m * n];
    if threads > 1 && m > mc {
        dst.par_chunks_mut(mc * n).enumerate().for_each(block);
    } else {
        dst.chunks_mut(mc * n).enumerate().for_each(block);
    }
}

/// In place: `s ← softmax(s · scale + bias)` over one row.
///
/// # Safety
/// AVX-512F must be present.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax_row(s: &mut [f32], scale: f32, bias: Option<&[f32]>) {
    let n = s.len();
    if let Some(b) = bias {
        assert!(b.len() >= n);
    }
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

/// Softmax over every row of `n` values of `x`, into `dst` (same length). Every element is written.
pub fn softmax_rows(x: &[f32], n: usize, dst: &mut [MaybeUninit<f32>]) {
    assert!(available() && x.len() == dst.len() && n > 0 && x.len().is_multiple_of(n));
    let f = |(d, s): (&mut [MaybeUninit<f32>], &[f32])| {
        for (d, s) in d.chunks_mut(n).zip(s.chunks(n)) {
            // SAFETY: MaybeUninit<f32> has f32's layout; every element is written before it is read.
            let d = unsafe { std::slice::from_raw_parts_mut(d.as_mut_ptr() as *mut f32, n) };
            d.copy_from_slice(s);
            // SAFETY: AVX-512F is present (asserted above).
            unsafe { softmax_row(d, 1.0, None) };
        }
    };
    let rows_per_task = (1 << 14) / n + 1;
    if x.len() > 1 << 15 && candle_core::utils::get_num_threads() > 1 {
        dst.par_chunks_mut(rows_per_task * n)
            .zip(x.par_chunks(rows_per_task * n))
            .for_each(f);
    } else {
        f((dst, x));
    }
}

/// GELU (exact form, fast erf) of `x` into `dst` (same length). Every element is written.
pub fn gelu(x: &[f32], dst: &mut [MaybeUninit<f32>]) {
    assert!(available() && x.len() == dst.len());
    let f = |(d, s): (&mut [MaybeUninit<f32>], &[f32])| {
        let n = s.len();
        let dp = d.as_mut_ptr() as *mut f32;
        let mut i = 0;
        while i < n {
            let m = tail_mask(n - i);
            // SAFETY: AVX-512F is present; the masked loads and stores stay inside `s` and `d`.
            unsafe {
                let v = gelu_ps(_mm512_maskz_loadu_ps(m, s.as_ptr().add(i)));
                _mm512_mask_storeu_ps(dp.add(i), m, v);
            }
            i += 16;
        }
    };
    const CHUNK: usize = 1 << 15;
    if x.len() > CHUNK && candle_core::utils::get_num_threads() > 1 {
        dst.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(f);
    } else {
        f((dst, x));
    }
}

/// `GELU′(x) = Φ(x) + x·φ(x)` on 16 lanes, with the erf of [`gelu_ps`].
#[inline]
#[target_feature(enable = "avx512f")]
fn gelu_grad_ps(x: __m512) -> __m512 {
    let (erf, e) = erf_and_density(x);
    let cdf = _mm512_mul_ps(_mm512_set1_ps(0.5), _mm512_add_ps(_mm512_set1_ps(1.0), erf));
    _mm512_fmadd_ps(x, _mm512_mul_ps(e, _mm512_set1_ps(0.398_942_3)), cdf)
}

/// In place: `g[i] ← g[i] · GELU′(x[i])` (the backward pass of exact GELU), single-threaded.
pub(crate) fn gelu_backward(x: &[f32], g: &mut [f32]) {
    assert!(available() && x.len() == g.len());
    let n = x.len();
    let gp = g.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let m = tail_mask(n - i);
        // SAFETY: AVX-512F is present (asserted); the masked loads and stores stay inside `x` and `g`.
        unsafe {
            let d = gelu_grad_ps(_mm512_maskz_loadu_ps(m, x.as_ptr().add(i)));
            let v = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, gp.add(i)));
            _mm512_mask_storeu_ps(gp.add(i), m, v);
        }
        i += 16;
    }
}

/// `out[i, ..n] (+)= Σ_kk a(i)[kk] · B[kk, ..n]` for `i < m`, single-threaded on the register tile: the rows
/// of A by pointer, B in `ceil(n / NR)` panels (panel `p` at `bp + p·panel_stride`, its row `kk` the `NR`
/// values at `+ kk·NR`, zero-padded past `n`). With `accumulate` the current contents of `out` are added.
///
/// # Safety
/// AVX-512F must be present; `a(i)` must be readable for `k` values for every `i < m`; every panel for
/// `k × NR` values; `out` readable and writable for `m` rows of `n` values `ldc` apart.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_tiles(
    m: usize,
    n: usize,
    k: usize,
    a: &dyn Fn(usize) -> *const f32,
    bp: *const f32,
    panel_stride: usize,
    out: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    for p in 0..n.div_ceil(NR) {
        let cols = NR.min(n - p * NR);
        let mut mr = 0;
        while mr < m {
            let rows = MR.min(m - mr);
            let ptrs: [*const f32; MR] = std::array::from_fn(|r| a(mr + r.min(rows - 1)));
            let o = out.add(mr * ldc + p * NR);
            let resid = if accumulate {
                o as *const f32
            } else {
                std::ptr::null()
            };
            kernel::<false>(
                k,
                ptrs,
                bp.add(p * panel_stride),
                ZEROS.as_ptr(),
                resid,
                ldc,
                o,
                ldc,
                rows,
                cols,
            );
            mr += MR;
        }
    }
}

/// A `[b, h, l, d]` operand of [`attention`]: `data[b·s[0] + h·s[1] + i·s[2] + j]`, the last dimension
/// contiguous.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    /// The elements, from the tensor's start offset.
    pub data: &'a [f32],
    /// Strides of the batch, head and position dimensions.
    pub s: [usize; 3],
}

impl<'a> Strided<'a> {
    fn row(self, b: usize, h: usize, i: usize, len: usize) -> &'a [f32] {
        &self.data[b * self.s[0] + h * self.s[1] + i * self.s[2]..][..len]
    }
}

/// Sizes of an [`attention`] call.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    /// Batch.
    pub b: usize,
    /// Heads.
    pub h: usize,
    /// Query positions.
    pub lq: usize,
    /// Key positions.
    pub lk: usize,
    /// Query/key width.
    pub d: usize,
    /// Value width.
    pub dv: usize,
}

/// `out[b, i, h, :] = softmax_j(q[b,h,i]·k[b,h,j] · scale + bias[b·bs[0] + h·bs[1] + i·bs[2] + j]) v[b,h,j]`,
/// with `out` laid out `[b, lq, h, dv]` (every element written).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: Strided,
    k: Strided,
    v: Strided,
    dims: AttnDims,
    scale: f32,
    bias: &[f32],
    bs: [usize; 3],
    out: &mut [MaybeUninit<f32>],
) {
    let AttnDims {
        b,
        h,
        lq,
        lk,
        d,
        dv,
    } = dims;
    assert!(available() && out.len() == b * lq * h * dv);
    if out.is_empty() {
        return;
    }
    assert!(lk > 0, "attention over no keys");
    let last = |s: [usize; 3], l: usize| (b - 1) * s[0] + (h - 1) * s[1] + (l - 1) * s[2];
    assert!(q.data.len() >= last(q.s, lq) + d);
    assert!(k.data.len() >= last(k.s, lk) + d);
    assert!(v.data.len() >= last(v.s, lk) + dv);
    assert!(bias.len() >= last(bs, lq) + lk);
    let panels_k = lk.div_ceil(NR);
    let lkp = panels_k * NR;
    let panels_v = dv.div_ceil(NR);
    let (kp_len, vp_len, s_len) = (panels_k * d * NR, panels_v * lk * NR, lq * lkp);
    let out = OutPtr(out.as_mut_ptr() as *mut f32);
    let task = |t: usize| {
        let (bi, hi) = (t / h, t % h);
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < kp_len + vp_len + s_len {
                buf.resize(kp_len + vp_len + s_len, 0.0);
            }
            let (kp, rest) = buf.split_at_mut(kp_len);
            let (vp, rest) = rest.split_at_mut(vp_len);
            let s = &mut rest[..s_len];
            // Kᵀ in panels of NR keys (columns of the scores).
            for j in 0..lk {
                let row = k.row(bi, hi, j, d);
                let base = (j / NR) * d * NR + j % NR;
                for (kk, &x) in row.iter().enumerate() {
                    kp[base + kk * NR] = x;
                }
            }
            // V in panels of NR value columns.
            for p in 0..panels_v {
                let cols = NR.min(dv - p * NR);
                for j in 0..lk {
                    vp[(p * lk + j) * NR..][..cols]
                        .copy_from_slice(&v.row(bi, hi, j, dv)[p * NR..][..cols]);
                }
            }
            let q_ptr = |i: usize| q.row(bi, hi, i, d).as_ptr();
            let sp = s.as_mut_ptr();
            for p in 0..panels_k {
                let mut mr = 0;
                while mr < lq {
                    let rows = MR.min(lq - mr);
                    let a = std::array::from_fn(|r| q_ptr(mr + r.min(rows - 1)));
                    // SAFETY: AVX-512F is present; `a` rows hold d values, `kp` panel p holds d × NR,
                    // and the tile's rows × NR outputs lie inside `s` (row stride lkp).
                    unsafe {
                        kernel::<false>(
                            d,
                            a,
                            kp.as_ptr().add(p * d * NR),
                            ZEROS.as_ptr(),
                            std::ptr::null(),
                            0,
                            sp.add(mr * lkp + p * NR),
                            lkp,
                            rows,
                            NR,
                        );
                    }
                    mr += MR;
                }
            }
            for i in 0..lq {
                let brow = &bias[bi * bs[0] + hi * bs[1] + i * bs[2]..][..lk];
                // SAFETY: AVX-512F is present.
                unsafe { softmax_row(&mut s[i * lkp..][..lk], scale, Some(brow)) };
            }
            let ldc = h * dv;
            let sp = s.as_ptr();
            for p in 0..panels_v {
                let cols = NR.min(dv - p * NR);
                let mut mr = 0;
                while mr < lq {
                    let rows = MR.min(lq - mr);
                    // SAFETY: the probability rows hold lk values each (row stride lkp).
                    let a =
                        std::array::from_fn(|r| unsafe { sp.add((mr + r.min(rows - 1)) * lkp) });
                    // SAFETY: AVX-512F is present; `vp` panel p holds lk × NR values; the output tile
                    // (rows × cols, row stride h·dv) lies inside `out`, and only this task writes head hi of
                    // sequence bi.
                    unsafe {
                        kernel::<false>(
                            lk,
                            a,
                            vp.as_ptr().add(p * lk * NR),
                            ZEROS.as_ptr(),
                            std::ptr::null(),
                            0,
                            { out }.0.add((bi * lq + mr) * ldc + hi * dv + p * NR),
                            ldc,
                            rows,
                            cols,
                        );
                    }
                    mr += MR;
                }
            }
        });
    };
    if b * h > 1 && candle_core::utils::get_num_threads() > 1 {
        (0..b * h).into_par_iter().for_each(task);
    } else {
        (0..b * h).for_each(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-2, 2).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn gelu_ref(x: f32) -> f32 {
        // erf through f64 Taylor/continued fraction is overkill: A&S 7.1.26 in f64 is within 1.5e-7.
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

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "element {i}: {x} vs {y}"
            );
        }
    }

    fn run<T>(len: usize, f: impl FnOnce(&mut [MaybeUninit<f32>]) -> T) -> Vec<f32> {
        let mut v = vec![f32::NAN; len];
        // SAFETY: MaybeUninit<f32> has the layout of f32; the vector is fully initialised.
        let u =
            unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut MaybeUninit<f32>, len) };
        f(u);
        v
    }

    #[test]
    fn exp_matches_libm() {
        if !available() {
            return;
        }
        let xs: Vec<f32> = (-2000..=1000)
            .map(|i| i as f32 * 0.0883)
            .chain([0.0, -0.0, -1e30, f32::MIN, -f32::INFINITY, -104.0, -87.0])
            .collect();
        for &x in &xs {
            // SAFETY: AVX-512F is present.
            let got = unsafe {
                let mut out = [0f32; 16];
                _mm512_storeu_ps(out.as_mut_ptr(), exp_ps(_mm512_set1_ps(x)));
                out[0]
            };
            let want = (x as f64).exp() as f32;
            assert!(
                (got - want).abs() <= 2e-7 * want + 1e-38,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn gelu_matches_reference() {
        if !available() {
            return;
        }
        for n in [0, 1, 15, 16, 17, 1000, (1 << 15) + 3] {
            let x: Vec<f32> = values(n, n as u64).iter().map(|v| v * 3.0).collect();
            let got = run(n, |d| gelu(&x, d));
            let want: Vec<f32> = x.iter().map(|&v| gelu_ref(v)).collect();
            close(&got, &want, 1e-6);
        }
    }

    #[test]
    fn softmax_matches_reference() {
        if !available() {
            return;
        }
        for (rows, n) in [(1, 1), (3, 7), (2, 16), (5, 33), (1, 300), (200, 170)] {
            let x: Vec<f32> = values(rows * n, n as u64)
                .iter()
                .map(|v| v * 10.0)
                .collect();
            let got = run(rows * n, |d| softmax_rows(&x, n, d));
            let mut want = Vec::new();
            for r in x.chunks(n) {
                let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                want.extend(e.iter().map(|v| (v / s) as f32));
            }
            close(&got, &want, 1e-6);
        }
    }

    #[test]
    fn linear_matches_reference() {
        if !available() {
            return;
        }
        // Remainders in every dimension of the tiling (8 rows, 32 columns), single rows and columns.
        for (m, k, n) in [
            (1, 1, 1),
            (1, 5, 3),
            (9, 7, 33),
            (8, 32, 32),
            (17, 33, 65),
            (130, 64, 40),
            (700, 24, 31),
        ] {
            for (use_bias, use_res, gelu_on) in [
                (true, false, false),
                (false, false, false),
                (true, true, false),
                (true, false, true),
                (false, true, true),
            ] {
                let x = values(m * k, 1);
                let w = values(n * k, 2);
                let bias = values(n, 3);
                let res = values(m * n, 4);
                let layer = crate::nn::Linear::new(
                    candle_core::Tensor::from_vec(w.clone(), (n, k), &candle_core::Device::Cpu)
                        .unwrap(),
                    use_bias.then(|| {
                        candle_core::Tensor::from_vec(bias.clone(), n, &candle_core::Device::Cpu)
                            .unwrap()
                    }),
                );
                let p = Packed::new(&[&layer]).unwrap();
                let got = run(m * n, |d| {
                    linear(&x, m, &p, use_res.then_some(&res[..]), gelu_on, d)
                });
                let mut want = vec![0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = if use_bias { bias[j] as f64 } else { 0.0 };
                        if use_res {
                            acc += res[i * n + j] as f64;
                        }
                        for t in 0..k {
                            acc += x[i * k + t] as f64 * w[j * k + t] as f64;
                        }
                        want[i * n + j] = if gelu_on {
                            gelu_ref(acc as f32)
                        } else {
                            acc as f32
                        };
                    }
                }
                close(&got, &want, 2e-5);
            }
        }
    }

    #[test]
    fn packing_several_layers_concatenates_their_outputs() {
        if !available() {
            return;
        }
        let dev = candle_core::Device::Cpu;
        let (m, k) = (11, 9);
        let layers: Vec<crate::nn::Linear> = [5usize, 30, 7]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                crate::nn::Linear::new(
                    candle_core::Tensor::from_vec(values(n * k, i as u64), (n, k), &dev).unwrap(),
                    (i != 1).then(|| {
                        candle_core::Tensor::from_vec(values(n, 10 + i as u64), n, &dev).unwrap()
                    }),
                )
            })
            .collect();
        let refs: Vec<&crate::nn::Linear> = layers.iter().collect();
        let p = Packed::new(&refs).unwrap();
        let x = values(m * k, 99);
        let got = run(m * p.n, |d| linear(&x, m, &p, None, false, d));
        let xt = candle_core::Tensor::from_vec(x, (m, k), &dev).unwrap();
        let parts: Vec<candle_core::Tensor> = layers
            .iter()
            .map(|l| candle_core::Module::forward(l, &xt).unwrap())
            .collect();
        let want: Vec<f32> = candle_core::Tensor::cat(&parts, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        close(&got, &want, 1e-5);
    }

    #[test]
    fn attention_matches_reference() {
        if !available() {
            return;
        }
        // (b, h, lq, lk, d, dv, bias dims as (per batch, per head, per query))
        for (b, h, lq, lk, d, dv, bdims) in [
            (1, 1, 1, 1, 1, 1, (false, false, false)),
            (2, 3, 5, 5, 7, 7, (true, false, false)),
            (1, 2, 9, 33, 16, 40, (true, true, true)),
            (3, 1, 17, 17, 64, 64, (true, false, true)),
            (2, 2, 40, 70, 33, 1, (false, true, false)),
        ] {
            // q, k, v interleaved in one buffer as a fused projection lays them out: [b, l, 3, h, d].
            let w = d.max(dv);
            let l = lq.max(lk);
            let buf = values(b * l * 3 * h * w, (lq * 7 + lk) as u64);
            let st = [l * 3 * h * w, w, 3 * h * w];
            let view = |part: usize| Strided {
                data: &buf[part * h * w..],
                s: st,
            };
            let (bb, bh, bq) = (
                if bdims.0 { b } else { 1 },
                if bdims.1 { h } else { 1 },
                if bdims.2 { lq } else { 1 },
            );
            let mut bias = values(bb * bh * bq * lk, 5);
            // Mask some keys as the models do.
            for (i, v) in bias.iter_mut().enumerate() {
                if i % 5 == 3 {
                    *v = -f32::MAX;
                }
            }
            let bs = [
                if bdims.0 { bh * bq * lk } else { 0 },
                if bdims.1 { bq * lk } else { 0 },
                if bdims.2 { lk } else { 0 },
            ];
            let scale = 1.0 / (d as f32).sqrt();
            let dims = AttnDims {
                b,
                h,
                lq,
                lk,
                d,
                dv,
            };
            let got = run(b * lq * h * dv, |o| {
                attention(view(0), view(1), view(2), dims, scale, &bias, bs, o)
            });
            let mut want = vec![0f32; b * lq * h * dv];
            for bi in 0..b {
                for hi in 0..h {
                    for i in 0..lq {
                        let q = view(0).row(bi, hi, i, d).to_vec();
                        let mut sc: Vec<f64> = (0..lk)
                            .map(|j| {
                                let k = view(1).row(bi, hi, j, d);
                                let dot: f64 =
                                    q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum();
                                (dot as f32 * scale + bias[bi * bs[0] + hi * bs[1] + i * bs[2] + j])
                                    as f64
                            })
                            .collect();
                        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        sc.iter_mut().for_each(|s| *s = (*s - m).exp());
                        let sum: f64 = sc.iter().sum();
                        for c in 0..dv {
                            let o: f64 = (0..lk)
                                .map(|j| sc[j] / sum * view(2).row(bi, hi, j, dv)[c] as f64)
                                .sum();
                            want[((bi * lq + i) * h + hi) * dv + c] = o as f32;
                        }
                    }
                }
            }
            close(&got, &want, 2e-5);
        }
    }
}

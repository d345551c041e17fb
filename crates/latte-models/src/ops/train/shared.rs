//! What the fused training layers share: the kernel level, dropout sites (masks regenerated row by row
//! from a key), the row-wise passes (layer norm forward and backward, residual, dropout, column sums,
//! rotary q/k), the products of a layer through [`latte_kernels::gemm`], the attention through
//! [`latte_kernels::attention`], GELU through [`latte_kernels::math`], and the switch that turns the fused
//! layers off.

use candle_core::Layout;
use latte_kernels::attention::{self as kattn, PackedDims};
use latte_kernels::lowp::{self, PackedBf16};
use latte_kernels::{gemm, half, math, Level};
use rayon::prelude::*;

/// The kernels an op runs on, chosen when it is built: the register tile and vectorised `exp` / erf from
/// [`Level::Avx512`] up, the `gemm` crate and scalar element-wise code below; and the precision of its
/// products (the linear layers forward and backward).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Kernels {
    /// The level of the f32 kernels (register tile, attention, GELU).
    pub(crate) level: Level,
    /// bf16 products with f32 accumulation ([`latte_kernels::lowp::linear_bf16`]) for the linear layers'
    /// forward, input-gradient and weight-gradient products; everything else stays f32, and so do the
    /// weights the optimiser updates (they are rounded as they are packed for each product).
    pub(crate) bf16: bool,
}

impl Kernels {
    /// Whether the bf16 products run on the bf16 kernels: from [`Level::Avx512`] up, on a CPU with bf16
    /// arithmetic; below, they run on the f32 kernels with rounded operands (see [`bf16_native`]).
    pub(crate) fn bf16_native(self) -> bool {
        self.level >= Level::Avx512 && bf16_native()
    }
}

#[cfg(test)]
impl Kernels {
    /// f32 products at `level`.
    pub(crate) const fn f32(level: Level) -> Self {
        Self { level, bf16: false }
    }

    /// bf16 products, the rest at `level`.
    pub(crate) const fn bf16(level: Level) -> Self {
        Self { level, bf16: true }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: build ops on the portable kernels even where AVX-512F is present.
    pub(crate) static FORCE_PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The kernels of an op built now: this CPU's level, and bf16 products inside a
/// [`crate::dtype::with_dtype`] scope of [`Dtype::Bf16`](crate::Dtype::Bf16) (`latte train --dtype bf16`).
pub(super) fn detect() -> Kernels {
    let bf16 = crate::dtype::current() == crate::Dtype::Bf16;
    #[cfg(test)]
    if FORCE_PORTABLE.with(|c| c.get()) {
        return Kernels {
            level: Level::Portable,
            bf16,
        };
    }
    Kernels {
        level: latte_kernels::level(),
        bf16,
    }
}

/// Rows of `x` per task in the row-wise passes (layer norm, dropout, residual).
pub(super) fn rows_per_task(n: usize) -> usize {
    (16384 / n.max(1)).max(1)
}

/// A dropout site: its key, the drop threshold on 32-bit draws and the keep scale `1 / (1 − p)`.
#[derive(Clone, Copy, Debug)]
pub(super) struct DropSite {
    key: u64,
    threshold: u64,
    keep: f32,
}

impl DropSite {
    /// The next site of the enclosing [`crate::with_dropout`] for probability `p`, if dropout is on.
    pub(super) fn next(p: f64) -> Option<Self> {
        if p <= 0.0 {
            return None;
        }
        let key = crate::ops::dropout::next_dropout_key()?;
        Some(Self {
            key,
            threshold: (p.min(1.0) * (1u64 << 32) as f64) as u64,
            keep: if p >= 1.0 {
                0.0
            } else {
                1.0 / (1.0 - p) as f32
            },
        })
    }

    /// The mask of row `row` (`0` or the keep scale per element), the same on every call: the stream of
    /// the row's own key ([`crate::ops::dropout::mask`]).
    pub(super) fn row(&self, row: usize, out: &mut [f32]) {
        crate::ops::dropout::mask(self.key, row as u64, self.threshold, self.keep, out);
    }
}

/// `Σ` over rows of a row-major `[rows, n]` matrix: partial sums over fixed chunks of rows in parallel, then
/// added in chunk order, so the result is the same bit for bit on every run (a rayon `reduce` adds the
/// partials in the order its work-stealing split them, which varies from run to run).
pub(super) fn col_sums(a: &[f32], n: usize) -> Vec<f32> {
    let chunk = rows_per_task(n) * n;
    let partials: Vec<Vec<f32>> = a
        .par_chunks(chunk)
        .map(|c| {
            let mut s = vec![0f32; n];
            for row in c.chunks(n) {
                s.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            s
        })
        .collect();
    let mut sums = vec![0f32; n];
    for p in &partials {
        sums.iter_mut().zip(p).for_each(|(x, y)| *x += y);
    }
    sums
}

/// Layer norm of one row into `out`, keeping the normalised row and returning `1 / σ`.
pub(super) fn ln_row(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    xhat: &mut [f32],
    out: &mut [f32],
) -> f32 {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let rstd = 1.0 / (var + eps).sqrt();
    for i in 0..x.len() {
        xhat[i] = (x[i] - mean) * rstd;
        out[i] = xhat[i] * w[i] + b[i];
    }
    rstd
}

/// Layer norm backward over rows: `dx` from `dy`, with the sums of `dy ⊙ x̂` (dγ) and `dy` (dβ).
pub(super) fn ln_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    w: &[f32],
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let rpt = rows_per_task(n);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(rpt * n)
        .zip(dy.par_chunks(rpt * n).zip(xhat.par_chunks(rpt * n)))
        .zip(rstd.par_chunks(rpt))
        .map(|((dxc, (gc, hc)), rc)| {
            let mut dw = vec![0f32; n];
            let mut db = vec![0f32; n];
            for (((dxr, gr), hr), &rs) in dxc
                .chunks_mut(n)
                .zip(gc.chunks(n))
                .zip(hc.chunks(n))
                .zip(rc)
            {
                let mut s1 = 0f32;
                let mut s2 = 0f32;
                for i in 0..n {
                    let gw = gr[i] * w[i];
                    s1 += gw;
                    s2 += gw * hr[i];
                    dw[i] += gr[i] * hr[i];
                    db[i] += gr[i];
                }
                let (m1, m2) = (s1 / n as f32, s2 / n as f32);
                for i in 0..n {
                    dxr[i] = rs * (gr[i] * w[i] - m1 - hr[i] * m2);
                }
            }
            (dw, db)
        })
        .collect();
    let mut dw = vec![0f32; n];
    let mut db = vec![0f32; n];
    for (pw, pb) in parts {
        dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
    }
    (dw, db)
}

/// `out = LN(dropout(y) + residual)` row by row, keeping `x̂` and `1 / σ`.
#[allow(clippy::too_many_arguments)]
pub(super) fn residual_norm(
    y: &[f32],
    residual: &[f32],
    drop: Option<DropSite>,
    w: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
) {
    let n = w.len();
    let rpt = rows_per_task(n);
    out.par_chunks_mut(rpt * n)
        .zip(xhat.par_chunks_mut(rpt * n))
        .zip(rstd.par_chunks_mut(rpt))
        .enumerate()
        .for_each(|(c, ((oc, hc), rc))| {
            let mut sum = vec![0f32; n];
            let mut mask = vec![0f32; n];
            for (r, ((orow, hrow), rs)) in
                oc.chunks_mut(n).zip(hc.chunks_mut(n)).zip(rc).enumerate()
            {
                let t = c * rpt + r;
                let (yr, xr) = (&y[t * n..][..n], &residual[t * n..][..n]);
                match drop {
                    Some(d) => {
                        d.row(t, &mut mask);
                        for i in 0..n {
                            sum[i] = yr[i] * mask[i] + xr[i];
                        }
                    }
                    None => {
                        for i in 0..n {
                            sum[i] = yr[i] + xr[i];
                        }
                    }
                }
                *rs = ln_row(&sum, w, b, eps, hrow, orow);
            }
        });
}

/// In place, row by row: `g ← g ⊙ mask` for the dropout site `drop` (nothing without one).
pub(super) fn apply_drop(g: &mut [f32], n: usize, drop: Option<DropSite>) {
    let Some(d) = drop else { return };
    let rpt = rows_per_task(n);
    g.par_chunks_mut(rpt * n).enumerate().for_each(|(c, gc)| {
        let mut mask = vec![0f32; n];
        for (r, row) in gc.chunks_mut(n).enumerate() {
            d.row(c * rpt + r, &mut mask);
            row.iter_mut().zip(&mask).for_each(|(g, m)| *g *= m);
        }
    });
}

/// Sizes of one call.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    /// Sequences.
    pub(super) b: usize,
    /// Positions per sequence.
    pub(super) l: usize,
    /// Hidden width.
    pub(super) h: usize,
    /// Heads.
    pub(super) heads: usize,
    /// Feed-forward width.
    pub(super) f: usize,
}

impl Dims {
    pub(super) fn d(&self) -> usize {
        self.h / self.heads
    }
    pub(super) fn tokens(&self) -> usize {
        self.b * self.l
    }
    /// Offsets of the parameters in the flat weight tensor, in [`bert_layer`]'s order, and its length.
    pub(super) fn offsets(&self) -> ([usize; 12], usize) {
        let (h, f) = (self.h, self.f);
        let sizes = [3 * h * h, 3 * h, h * h, h, h, h, f * h, f, h * f, h, h, h];
        let mut off = [0usize; 12];
        let mut acc = 0;
        for (o, s) in off.iter_mut().zip(sizes) {
            *o = acc;
            acc += s;
        }
        (off, acc)
    }
}

/// Scaled dot-product attention over the packed q/k/v of a layer, with dropout on the probabilities.
pub(super) struct Attn {
    pub(super) kern: Kernels,
    /// Sizes (`f` unused).
    pub(super) dims: Dims,
    pub(super) scale: f32,
    pub(super) drop_probs: Option<DropSite>,
    /// Sliding window: keys at most this many positions from the query (ModernBERT's local layers).
    pub(super) window: Option<usize>,
    /// Unpadded sequences (`dims` is then one sequence of all the tokens): sequence `s` is tokens
    /// `starts[s]..starts[s + 1]` and attends to all of its own tokens (no bias, no window).
    pub(super) starts: Option<Vec<usize>>,
}

impl Attn {
    fn packed(&self) -> PackedDims {
        PackedDims {
            b: self.dims.b,
            l: self.dims.l,
            h: self.dims.h,
            heads: self.dims.heads,
        }
    }

    /// Length of the saved probabilities.
    pub(super) fn probs_len(&self) -> usize {
        match &self.starts {
            Some(starts) => kattn::varlen_probs_len(starts, self.dims.heads),
            None => self.dims.b * self.dims.heads * self.dims.l * self.dims.l,
        }
    }

    /// Probabilities and `ctx` of every (sequence, head) from the packed q/k/v.
    pub(super) fn forward(&self, qkv: &[f32], bias: &[f32], probs: &mut [f32], ctx: &mut [f32]) {
        let drop = self
            .drop_probs
            .map(|d| move |row: usize, out: &mut [f32]| d.row(row, out));
        let drop_ref = drop
            .as_ref()
            .map(|f| f as &(dyn Fn(usize, &mut [f32]) + Sync));
        if let Some(starts) = &self.starts {
            let (h, heads) = (self.dims.h, self.dims.heads);
            kattn::forward_varlen_train_at(
                self.kern.level,
                starts,
                h,
                heads,
                self.scale,
                drop_ref,
                qkv,
                probs,
                ctx,
            );
            return;
        }
        kattn::forward_packed_at(
            self.kern.level,
            self.packed(),
            self.scale,
            self.window,
            drop_ref,
            qkv,
            bias,
            probs,
            ctx,
        );
    }

    /// `dqkv` from `dctx` through the attention of every (sequence, head).
    pub(super) fn backward(&self, qkv: &[f32], probs: &[f32], dctx: &[f32], dqkv: &mut [f32]) {
        let drop = self
            .drop_probs
            .map(|d| move |row: usize, out: &mut [f32]| d.row(row, out));
        let drop_ref = drop
            .as_ref()
            .map(|f| f as &(dyn Fn(usize, &mut [f32]) + Sync));
        if let Some(starts) = &self.starts {
            let (h, heads) = (self.dims.h, self.dims.heads);
            kattn::backward_varlen_at(
                self.kern.level,
                starts,
                h,
                heads,
                self.scale,
                drop_ref,
                qkv,
                probs,
                dctx,
                dqkv,
            );
            return;
        }
        kattn::backward_packed_at(
            self.kern.level,
            self.packed(),
            self.scale,
            drop_ref,
            qkv,
            probs,
            dctx,
            dqkv,
        );
    }
}

/// `y[m, n] = x[m, k] · Wᵀ + b` (`W` as `n` rows of `k`).
pub(super) fn linear_fwd(
    kern: Kernels,
    x: &[f32],
    m: usize,
    w: &[f32],
    b: &[f32],
    n: usize,
    k: usize,
) -> Vec<f32> {
    linear_rows(kern, x, m, w, Some(b), n, k)
}

/// `y[m, n] = x[m, k] · Wᵀ (+ b)` (`W` as `n` rows of `k`) at the precision of `kern`: f32, bf16 products
/// on the bf16 kernels, or (no bf16 arithmetic here) the f32 kernels on operands rounded to bf16.
pub(super) fn linear_rows(
    kern: Kernels,
    x: &[f32],
    m: usize,
    w: &[f32],
    b: Option<&[f32]>,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    if kern.bf16 && !kern.bf16_native() {
        let (x, w) = (bf16_rounded(&x[..m * k]), bf16_rounded(&w[..n * k]));
        gemm::linear_rows_at(kern.level, &x, m, &w, b, n, k, &mut out);
        return out;
    }
    if kern.bf16 && m > 0 && n > 0 && k > 0 {
        let p = PackedBf16::pack(w, n, k).expect("bf16 forward: weight shape checked by the op");
        lowp::linear_bf16(x, m, &p, b, None, false, &mut out)
            .expect("bf16 forward: shapes checked by the op");
        return out;
    }
    gemm::linear_rows_at(kern.level, x, m, w, b, n, k, &mut out);
    out
}

/// `out[n, k] = gᵀ · x` for `g` `[t, n]` and `x` `[t, k]` (a weight gradient).
pub(super) fn grad_weight(
    kern: Kernels,
    g: &[f32],
    t: usize,
    n: usize,
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    if kern.bf16 && !kern.bf16_native() {
        let (g, x) = (bf16_rounded(&g[..t * n]), bf16_rounded(&x[..t * k]));
        return gemm::grad_weight_at(kern.level, &g, t, n, &x, k, out);
    }
    if kern.bf16 && t > 0 {
        // gᵀ [n, t] times the "weights" xᵀ (k outputs of t inputs), packed straight from x [t, k].
        let gt = gemm::transpose(&g[..t * n], t, n);
        let p = PackedBf16::pack_transposed(&x[..t * k], k, t)
            .expect("bf16 weight gradient: shapes checked by the op");
        lowp::linear_bf16(&gt, n, &p, None, None, false, &mut out[..n * k])
            .expect("bf16 weight gradient: shapes checked by the op");
        return;
    }
    gemm::grad_weight_at(kern.level, g, t, n, x, k, out)
}

/// `out[t, k] (+)= g · w` for `g` `[t, n]` and `w` `[n, k]` (an input gradient).
#[allow(clippy::too_many_arguments)]
pub(super) fn grad_input(
    kern: Kernels,
    g: &[f32],
    t: usize,
    n: usize,
    w: &[f32],
    k: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    if kern.bf16 && !kern.bf16_native() {
        let (g, w) = (bf16_rounded(&g[..t * n]), bf16_rounded(&w[..n * k]));
        return gemm::grad_input_at(kern.level, &g, t, n, &w, k, out, accumulate);
    }
    if kern.bf16 && t > 0 {
        // g [t, n] times the "weights" Wᵀ (k outputs of n inputs), packed straight from W [n, k].
        let p = PackedBf16::pack_transposed(&w[..n * k], k, n)
            .expect("bf16 input gradient: shapes checked by the op");
        let out = &mut out[..t * k];
        let prev = accumulate.then(|| out.to_vec());
        lowp::linear_bf16(&g[..t * n], t, &p, None, prev.as_deref(), false, out)
            .expect("bf16 input gradient: shapes checked by the op");
        return;
    }
    gemm::grad_input_at(kern.level, g, t, n, w, k, out, accumulate)
}

/// Whether this CPU multiplies bf16 in hardware (AVX512_BF16 or AMX, [`lowp::bf16_level`]). Where it does
/// not, the bf16 products run on the f32 kernels with both operands rounded to bf16 first: the same numbers
/// (a product of two bf16 values is exact in f32; only the order of the f32 additions differs) at f32
/// speed, instead of the portable bf16 kernel's scalar loops.
pub(crate) fn bf16_native() -> bool {
    lowp::bf16_level() >= Level::Avx512
}

/// `x` rounded to bf16 (to nearest even), kept as f32 values.
pub(crate) fn bf16_rounded(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = half::bf16_to_f32(half::f32_to_bf16(v));
            }
        });
    out
}

/// Exact GELU of every element.
pub(super) fn gelu_fwd(kern: Kernels, x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| math::gelu_slice_at(kern.level, x, o));
    out
}

/// In place: `g ← g ⊙ GELU′(x)`.
pub(super) fn gelu_bwd(kern: Kernels, x: &[f32], g: &mut [f32]) {
    g.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(g, x)| math::gelu_backward_at(kern.level, x, g));
}

/// The float32 elements of a contiguous CPU tensor's storage, borrowed.
pub(super) fn cpu_slice<'a>(
    st: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match st {
        candle_core::Storage::Cpu(cs) => super::slice(cs, l, what),
        _ => candle_core::bail!("{what}: CPU tensors only"),
    }
}

thread_local! {
    static FUSED_ON: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with the fused training layers of this module switched on or off on this thread (off: every
/// backbone runs its elementary differentiable ops, e.g. to check the fused layers against them).
pub fn with_fused_layers<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let prev = FUSED_ON.with(|c| c.replace(on));
    let out = f();
    FUSED_ON.with(|c| c.set(prev));
    out
}

pub(super) fn fused_on() -> bool {
    FUSED_ON.with(|c| c.get())
}

/// Offsets of consecutive segments of these sizes, and their total.
pub(super) fn segments<const N: usize>(sizes: [usize; N]) -> ([usize; N], usize) {
    let mut off = [0usize; N];
    let mut acc = 0;
    for (o, s) in off.iter_mut().zip(sizes) {
        *o = acc;
        acc += s;
    }
    (off, acc)
}

/// `out = LN(x)` row by row, keeping `x̂` and `1 / σ` (`b` empty: no bias).
#[allow(clippy::too_many_arguments)]
pub(super) fn norm_rows(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
) {
    let n = w.len();
    let zeros = vec![0f32; n];
    let b = if b.is_empty() { &zeros[..] } else { b };
    let rpt = rows_per_task(n);
    out.par_chunks_mut(rpt * n)
        .zip(xhat.par_chunks_mut(rpt * n))
        .zip(rstd.par_chunks_mut(rpt).zip(x.par_chunks(rpt * n)))
        .for_each(|((oc, hc), (rc, xc))| {
            for (((orow, hrow), rs), xrow) in oc
                .chunks_mut(n)
                .zip(hc.chunks_mut(n))
                .zip(rc.iter_mut())
                .zip(xc.chunks(n))
            {
                *rs = ln_row(xrow, w, b, eps, hrow, orow);
            }
        });
}

/// Rotary positions on the q and k parts of packed `[b·l, 3h]` rows, in place: forward
/// (`x·cos + rotate_half(x)·sin`, GPT-NeoX halves) or, with `backward`, its transpose (for gradients).
#[allow(clippy::too_many_arguments)]
pub(super) fn rotary_qk(
    qkv: &mut [f32],
    l: usize,
    h: usize,
    heads: usize,
    cos: &[f32],
    sin: &[f32],
    backward: bool,
) {
    let d = h / heads;
    let half = d / 2;
    qkv.par_chunks_mut(3 * h).enumerate().for_each(|(t, row)| {
        let i = t % l;
        let (c, s) = (&cos[i * d..][..d], &sin[i * d..][..d]);
        for part in 0..2 {
            for hd in 0..heads {
                let v = &mut row[part * h + hd * d..][..d];
                for j in 0..half {
                    let (a, b) = (v[j], v[j + half]);
                    if backward {
                        v[j] = a * c[j] + b * s[j + half];
                        v[j + half] = b * c[j + half] - a * s[j];
                    } else {
                        v[j] = a * c[j] - b * s[j];
                        v[j + half] = b * c[j + half] + a * s[j + half];
                    }
                }
            }
        }
    });
}

/// GELU of one row into `out`, single-threaded.
pub(super) fn gelu_row(kern: Kernels, x: &[f32], out: &mut [f32]) {
    math::gelu_slice_at(kern.level, x, out)
}

/// `g ← g ⊙ GELU′(x)` over one row, single-threaded.
pub(super) fn gelu_grad_row(kern: Kernels, x: &[f32], g: &mut [f32]) {
    math::gelu_backward_at(kern.level, x, g)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The column sums add their per-chunk partials in chunk order, whatever the threads: bit for bit the
    /// sequential sum of the same partials (a tree-shaped parallel reduce adds them in another order, which
    /// gives other bits on values of mixed magnitudes like these).
    #[test]
    fn col_sums_add_partials_in_chunk_order_on_any_pool() {
        let n = 48;
        let rows = rows_per_task(n) * 37 + 5;
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let a: Vec<f32> = (0..rows * n)
            .map(|_| {
                state = crate::ops::dropout::splitmix(state);
                let mantissa = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                mantissa * 10f32.powi((state % 9) as i32 - 4)
            })
            .collect();
        let mut want = vec![0f32; n];
        for c in a.chunks(rows_per_task(n) * n) {
            let mut s = vec![0f32; n];
            for row in c.chunks(n) {
                s.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            want.iter_mut().zip(&s).for_each(|(w, s)| *w += s);
        }
        for threads in [1, 2, 4, 7] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for _ in 0..3 {
                let got = pool.install(|| col_sums(&a, n));
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(
                    same,
                    "{threads} threads: column sums differ from the chunk-ordered sum"
                );
            }
        }
    }
}

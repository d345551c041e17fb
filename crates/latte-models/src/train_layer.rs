//! One post-norm encoder layer (BERT's: self-attention, residual, layer norm, GELU feed-forward, residual,
//! layer norm, with dropout after the embeddings' sub-layers and on the attention probabilities) as a
//! single training op with a hand-written backward pass, on the AVX-512 register tile.
//!
//! Written as candle ops, one layer is some thirty graph nodes forward and as many backward, each with its
//! own full-size temporaries, and candle's backward pass zero-fills and re-adds an accumulator for every
//! gradient. Here the forward pass keeps only what the backward pass reads (the packed q/k/v, attention
//! probabilities, the normalised activations and their inverse deviations, the feed-forward input), and the
//! backward pass writes every gradient once. The weights enter as one flat tensor (the concatenation of the
//! layer's parameters, see [`bert_layer`]), so candle hands their gradients back to each `Var` through the
//! concatenation's own backward pass. Dropout masks come from the same keyed generator as
//! [`crate::nn::dropout`] (one key per dropout site), and are regenerated row by row in the backward pass
//! instead of being stored.
//!
//! Used for float32 CPU tensors on CPUs with AVX-512F in [`Mode::Train`](crate::Mode); the elementary
//! differentiable ops run everywhere else.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::avx512::{gemm_tiles, MR};
#[cfg(target_arch = "x86_64")]
use crate::fused::NR;
use crate::nn::{LayerNorm, Linear};
use crate::Result;

/// The kernels an op runs on, chosen when it is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernels {
    /// The AVX-512 register tile and vectorised `exp` / erf.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// The `gemm` crate (operands read through strides) and scalar element-wise code.
    Portable,
}

#[cfg(test)]
thread_local! {
    /// Tests: build ops on the portable kernels even where AVX-512F is present.
    static FORCE_PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Kernels {
    fn detect() -> Self {
        #[cfg(test)]
        if FORCE_PORTABLE.with(|c| c.get()) {
            return Self::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        if crate::avx512::available() {
            return Self::Avx512;
        }
        Self::Portable
    }
}

fn gemm_threads(par: bool) -> gemm::Parallelism {
    let n = rayon::current_num_threads();
    if par && n > 1 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

/// `C (+)= A · B` through the `gemm` crate, every operand given by its row and column strides.
///
/// # Safety
/// Every pointer must be valid for the `m × k`, `k × n` and `m × n` elements its strides reach.
#[allow(clippy::too_many_arguments)]
unsafe fn strided_mm(
    m: usize,
    n: usize,
    k: usize,
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    c: (*mut f32, usize),
    accumulate: bool,
    par: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        c.0,
        1,
        c.1 as isize,
        accumulate,
        a.0,
        a.2 as isize,
        a.1 as isize,
        b.0,
        b.2 as isize,
        b.1 as isize,
        1f32,
        1f32,
        false,
        false,
        false,
        gemm_threads(par),
    );
}

/// Rows of `x` per task in the row-wise passes (layer norm, dropout, residual).
fn rows_per_task(n: usize) -> usize {
    (16384 / n.max(1)).max(1)
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: every task writes a disjoint set of elements, and the buffer outlives the parallel loop.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

/// A dropout site: its key, the drop threshold on 32-bit draws and the keep scale `1 / (1 − p)`.
#[derive(Clone, Copy, Debug)]
struct DropSite {
    key: u64,
    threshold: u64,
    keep: f32,
}

impl DropSite {
    /// The next site of the enclosing [`crate::nn::with_dropout`] for probability `p`, if dropout is on.
    fn next(p: f64) -> Option<Self> {
        if p <= 0.0 {
            return None;
        }
        let key = crate::nn::next_dropout_key()?;
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

    /// The mask of row `row` (`0` or the keep scale per element), the same on every call.
    fn row(&self, row: usize, out: &mut [f32]) {
        let mut state =
            crate::nn::splitmix(self.key ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        for pair in out.chunks_mut(2) {
            state = crate::nn::splitmix(state);
            for (i, v) in pair.iter_mut().enumerate() {
                let r = (state >> (32 * i)) & 0xFFFF_FFFF;
                *v = if r >= self.threshold { self.keep } else { 0.0 };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// Packs a row-major `B[k, n]` (row stride `ldb`): panels of `k × NR`.
fn pack_n(b: &[f32], ldb: usize, k: usize, n: usize) -> Vec<f32> {
    let panels = n.div_ceil(NR);
    let mut out = vec![0f32; panels * k * NR];
    out.par_chunks_mut(k * NR).enumerate().for_each(|(p, dst)| {
        let cols = NR.min(n - p * NR);
        for (kk, d) in dst.chunks_mut(NR).enumerate() {
            d[..cols].copy_from_slice(&b[kk * ldb + p * NR..][..cols]);
        }
    });
    out
}

#[cfg(target_arch = "x86_64")]
/// Depth of one pass over the panels (a `KC × NR` slice of B stays in L1).
const KC: usize = 256;

#[cfg(target_arch = "x86_64")]
/// `out[m, n] (+)= A[m, k] · B`, A row-major (row stride `lda`), B packed by [`pack_n`] (`k` rows), in
/// parallel blocks of rows.
#[allow(clippy::too_many_arguments)]
fn tile_gemm(
    a: &[f32],
    lda: usize,
    m: usize,
    k: usize,
    bp: &[f32],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    assert!(out.len() >= m * n && bp.len() >= n.div_ceil(NR) * k * NR);
    assert!(m == 0 || a.len() >= (m - 1) * lda + k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let mc = (m.div_ceil(threads).div_ceil(MR) * MR).clamp(MR, 64);
    out[..m * n]
        .par_chunks_mut(mc * n)
        .enumerate()
        .for_each(|(bi, o)| {
            let r0 = bi * mc;
            let rows = o.len() / n;
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                let row = |i: usize| a[(r0 + i) * lda + k0..].as_ptr();
                // SAFETY: AVX-512F is present (checked by the caller); rows r0.. of A hold k values from
                // k0 (asserted above), every panel holds k × NR values so its rows k0..k0 + kc exist, and
                // `o` is this block's rows × n outputs.
                unsafe {
                    gemm_tiles(
                        rows,
                        n,
                        kc,
                        &row,
                        bp.as_ptr().add(k0 * NR),
                        k * NR,
                        o.as_mut_ptr(),
                        n,
                        accumulate || k0 > 0,
                    );
                }
                k0 += kc;
            }
        });
}

/// `Σ` over rows of a row-major `[rows, n]` matrix.
fn col_sums(a: &[f32], n: usize) -> Vec<f32> {
    let chunk = rows_per_task(n) * n;
    a.par_chunks(chunk)
        .map(|c| {
            let mut s = vec![0f32; n];
            for row in c.chunks(n) {
                s.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            s
        })
        .reduce(
            || vec![0f32; n],
            |mut x, y| {
                x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
                x
            },
        )
}

/// Layer norm of one row into `out`, keeping the normalised row and returning `1 / σ`.
fn ln_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, xhat: &mut [f32], out: &mut [f32]) -> f32 {
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
fn ln_backward(
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
fn residual_norm(
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
fn apply_drop(g: &mut [f32], n: usize, drop: Option<DropSite>) {
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
struct Dims {
    /// Sequences.
    b: usize,
    /// Positions per sequence.
    l: usize,
    /// Hidden width.
    h: usize,
    /// Heads.
    heads: usize,
    /// Feed-forward width.
    f: usize,
}

impl Dims {
    fn d(&self) -> usize {
        self.h / self.heads
    }
    fn tokens(&self) -> usize {
        self.b * self.l
    }
    /// Offsets of the parameters in the flat weight tensor, in [`bert_layer`]'s order, and its length.
    fn offsets(&self) -> ([usize; 12], usize) {
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

/// Views of the flat weights.
struct Weights<'a> {
    wqkv: &'a [f32],
    bqkv: &'a [f32],
    wo: &'a [f32],
    bo: &'a [f32],
    g1: &'a [f32],
    b1: &'a [f32],
    wi: &'a [f32],
    bi: &'a [f32],
    wout: &'a [f32],
    bout: &'a [f32],
    g2: &'a [f32],
    b2: &'a [f32],
}

impl<'a> Weights<'a> {
    fn new(flat: &'a [f32], dims: &Dims) -> Self {
        let (off, len) = dims.offsets();
        let end = |i: usize| if i + 1 < off.len() { off[i + 1] } else { len };
        let s = |i: usize| &flat[off[i]..end(i)];
        Self {
            wqkv: s(0),
            bqkv: s(1),
            wo: s(2),
            bo: s(3),
            g1: s(4),
            b1: s(5),
            wi: s(6),
            bi: s(7),
            wout: s(8),
            bout: s(9),
            g2: s(10),
            b2: s(11),
        }
    }
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// `[T, 3h]`: q, k and v of every token.
    qkv: Vec<f32>,
    /// `[b, heads, l, l]`: attention probabilities before dropout.
    probs: Vec<f32>,
    /// `[T, h]`: attention output (heads concatenated).
    ctx: Vec<f32>,
    /// `[T, h]`: output of the first layer norm, its `x̂` and `1 / σ`.
    a: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    /// `[T, f]`: feed-forward input to GELU and its output.
    inter: Vec<f32>,
    gelu: Vec<f32>,
    /// `x̂` and `1 / σ` of the second layer norm.
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
}

/// The layer as a candle op: `(x [b, l, h], flat weights, key bias [b, l]) → [b, l, h]`.
struct BertLayerOp {
    kern: Kernels,
    dims: Dims,
    attn: Attn,
    eps1: f32,
    eps2: f32,
    /// The third input holds rotary `cos` and `sin` (`[l, d]` each) after the key bias.
    rotary: bool,
    drop_attn: Option<DropSite>,
    drop_out: Option<DropSite>,
    saved: Mutex<Option<Saved>>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

#[cfg(target_arch = "x86_64")]
/// Transposes an `r × c` block (row stride `lds`) into `dst` (`c × r`, row stride `r`).
fn transpose_block(src: &[f32], lds: usize, r: usize, c: usize, dst: &mut [f32]) {
    for i in 0..r {
        let row = &src[i * lds..][..c];
        for (j, &v) in row.iter().enumerate() {
            dst[j * r + i] = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// Packs `B[kk, j] = src_j[kk]` for `n` rows `src_j` (row stride `lds`) of `k` values: `Bᵀ` given as rows.
fn pack_rows_into(src: &[f32], lds: usize, n: usize, k: usize, dst: &mut [f32]) {
    dst.fill(0.0);
    for j in 0..n {
        let base = (j / NR) * k * NR + j % NR;
        for (kk, &v) in src[j * lds..][..k].iter().enumerate() {
            dst[base + kk * NR] = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// Packs a row-major `B[k, n]` (row stride `lds`) into `dst`.
fn pack_cols_into(src: &[f32], lds: usize, k: usize, n: usize, dst: &mut [f32]) {
    for p in 0..n.div_ceil(NR) {
        let cols = NR.min(n - p * NR);
        for kk in 0..k {
            let d = &mut dst[(p * k + kk) * NR..][..NR];
            d[..cols].copy_from_slice(&src[kk * lds + p * NR..][..cols]);
            d[cols..].fill(0.0);
        }
    }
}

/// Scaled dot-product attention over the packed q/k/v of a layer, with dropout on the probabilities.
struct Attn {
    kern: Kernels,
    /// Sizes (`f` unused).
    dims: Dims,
    scale: f32,
    drop_probs: Option<DropSite>,
    /// Sliding window: keys at most this many positions from the query (ModernBERT's local layers).
    window: Option<usize>,
}

impl Attn {
    /// The additive bias of query row `i`: the key bias, plus the sliding window where there is one
    /// (keys more than `half` positions away masked, as ModernBERT's local layers do).
    fn row_bias<'a>(&self, key: &'a [f32], i: usize, tmp: &'a mut Vec<f32>) -> &'a [f32] {
        let Some(half) = self.window else { return key };
        tmp.clear();
        tmp.extend(key.iter().enumerate().map(
            |(j, &b)| {
                if i.abs_diff(j) <= half {
                    b
                } else {
                    b - 1e30
                }
            },
        ));
        tmp
    }

    /// Probabilities and `ctx` of every (sequence, head) from the packed q/k/v.
    fn forward(&self, qkv: &[f32], bias: &[f32], probs: &mut [f32], ctx: &mut [f32]) {
        match self.kern {
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => self.forward_avx512(qkv, bias, probs, ctx),
            Kernels::Portable => self.forward_portable(qkv, bias, probs, ctx),
        }
    }

    /// `dqkv` from `dctx` through the attention of every (sequence, head).
    fn backward(&self, qkv: &[f32], probs: &[f32], dctx: &[f32], dqkv: &mut [f32]) {
        match self.kern {
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => self.backward_avx512(qkv, probs, dctx, dqkv),
            Kernels::Portable => self.backward_portable(qkv, probs, dctx, dqkv),
        }
    }

    fn forward_portable(&self, qkv: &[f32], bias: &[f32], probs: &mut [f32], ctx: &mut [f32]) {
        let Dims { l, h, heads, .. } = self.dims;
        let d = self.dims.d();
        let h3 = 3 * h;
        assert!(qkv.len() >= self.dims.tokens() * h3 && ctx.len() >= self.dims.tokens() * h);
        let ctx_ptr = Ptr(ctx.as_mut_ptr());
        probs.par_chunks_mut(l * l).enumerate().for_each(|(t, p)| {
            let (bi, hi) = (t / heads, t % heads);
            let base = bi * l * h3 + hi * d;
            let (q, k, v) = (&qkv[base..], &qkv[base + h..], &qkv[base + 2 * h..]);
            // SAFETY (both products): q, k and v rows of this sequence lie inside qkv (asserted
            // above), kᵀ is read through strides (1, 3h), `p` is l × l, and the ctx rows of this
            // (sequence, head) lie inside `ctx` and are written by this task only.
            unsafe {
                strided_mm(
                    l,
                    l,
                    d,
                    (q.as_ptr(), h3, 1),
                    (k.as_ptr(), 1, h3),
                    (p.as_mut_ptr(), l),
                    false,
                    false,
                );
            }
            let mut tmp = Vec::new();
            for (i, row) in p.chunks_mut(l).enumerate() {
                let brow = self.row_bias(&bias[bi * l..][..l], i, &mut tmp);
                softmax_row(self.kern, row, self.scale, brow);
            }
            let mut pd = Vec::new();
            let src: &[f32] = match self.drop_probs {
                Some(dr) => {
                    pd.resize(l * l, 0.0);
                    for (i, (drow, prow)) in pd.chunks_mut(l).zip(p.chunks(l)).enumerate() {
                        dr.row(t * l + i, drow);
                        drow.iter_mut().zip(prow).for_each(|(m, p)| *m *= p);
                    }
                    &pd
                }
                None => p,
            };
            unsafe {
                strided_mm(
                    l,
                    d,
                    l,
                    (src.as_ptr(), l, 1),
                    (v.as_ptr(), h3, 1),
                    ({ ctx_ptr }.0.add(bi * l * h + hi * d), h),
                    false,
                    false,
                );
            }
        });
    }

    fn backward_portable(&self, qkv: &[f32], probs: &[f32], dctx: &[f32], dqkv: &mut [f32]) {
        let Dims { b, l, h, heads, .. } = self.dims;
        let d = self.dims.d();
        let h3 = 3 * h;
        let t_all = self.dims.tokens();
        assert!(qkv.len() >= t_all * h3 && dctx.len() >= t_all * h && dqkv.len() >= t_all * h3);
        let out = Ptr(dqkv.as_mut_ptr());
        (0..b * heads).into_par_iter().for_each(|t| {
            let (bi, hi) = (t / heads, t % heads);
            let base = bi * l * h3 + hi * d;
            let (q, k, v) = (&qkv[base..], &qkv[base + h..], &qkv[base + 2 * h..]);
            let dc = &dctx[bi * l * h + hi * d..];
            let p = &probs[t * l * l..][..l * l];
            let mut mask = Vec::new();
            let mut pd = p.to_vec();
            if let Some(dr) = self.drop_probs {
                mask.resize(l * l, 0.0);
                for (i, m) in mask.chunks_mut(l).enumerate() {
                    dr.row(t * l + i, m);
                }
                pd.iter_mut().zip(&mask).for_each(|(p, m)| *p *= m);
            }
            let mut ds = vec![0f32; l * l];
            let o = { out }.0;
            // SAFETY (all four products): the operands are rows of this sequence inside qkv, dctx and
            // the l × l buffers, read through the strides given; the dqkv rows of this (sequence, head)
            // lie inside dqkv and are written by this task only.
            unsafe {
                // dPd = dC · Vᵀ.
                strided_mm(
                    l,
                    l,
                    d,
                    (dc.as_ptr(), h, 1),
                    (v.as_ptr(), 1, h3),
                    (ds.as_mut_ptr(), l),
                    false,
                    false,
                );
            }
            for i in 0..l {
                let row = &mut ds[i * l..][..l];
                let prow = &p[i * l..][..l];
                if !mask.is_empty() {
                    row.iter_mut()
                        .zip(&mask[i * l..][..l])
                        .for_each(|(g, m)| *g *= m);
                }
                let dot: f32 = row.iter().zip(prow).map(|(g, p)| g * p).sum();
                row.iter_mut()
                    .zip(prow)
                    .for_each(|(g, p)| *g = self.scale * p * (*g - dot));
            }
            unsafe {
                // dQ = dS · K, dK = dSᵀ · Q, dV = Pdᵀ · dC.
                strided_mm(
                    l,
                    d,
                    l,
                    (ds.as_ptr(), l, 1),
                    (k.as_ptr(), h3, 1),
                    (o.add(base), h3),
                    false,
                    false,
                );
                strided_mm(
                    l,
                    d,
                    l,
                    (ds.as_ptr(), 1, l),
                    (q.as_ptr(), h3, 1),
                    (o.add(base + h), h3),
                    false,
                    false,
                );
                strided_mm(
                    l,
                    d,
                    l,
                    (pd.as_ptr(), 1, l),
                    (dc.as_ptr(), h, 1),
                    (o.add(base + 2 * h), h3),
                    false,
                    false,
                );
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    fn forward_avx512(&self, qkv: &[f32], bias: &[f32], probs: &mut [f32], ctx: &mut [f32]) {
        let Dims { l, h, heads, .. } = self.dims;
        let d = self.dims.d();
        let h3 = 3 * h;
        let kp_len = l.div_ceil(NR) * d * NR;
        let vp_len = d.div_ceil(NR) * l * NR;
        let ctx_ptr = Ptr(ctx.as_mut_ptr());
        probs.par_chunks_mut(l * l).enumerate().for_each(|(t, p)| {
            let (bi, hi) = (t / heads, t % heads);
            let base = bi * l * h3 + hi * d;
            let q = &qkv[base..];
            let k = &qkv[base + h..];
            let v = &qkv[base + 2 * h..];
            with_scratch(kp_len + vp_len + l * l, |buf| {
                let (kp, rest) = buf.split_at_mut(kp_len);
                let (vp, pd) = rest.split_at_mut(vp_len);
                pack_rows_into(k, h3, l, d, kp);
                pack_cols_into(v, h3, l, d, vp);
                let qrow = |i: usize| q[i * h3..].as_ptr();
                // SAFETY: AVX-512F is present (the op is only built with it); q rows hold d values,
                // kp holds ceil(l / NR) panels of d × NR, and `p` is l × l.
                unsafe {
                    gemm_tiles(
                        l,
                        l,
                        d,
                        &qrow,
                        kp.as_ptr(),
                        d * NR,
                        p.as_mut_ptr(),
                        l,
                        false,
                    );
                }
                let mut tmp = Vec::new();
                for (i, row) in p.chunks_mut(l).enumerate() {
                    let brow = self.row_bias(&bias[bi * l..][..l], i, &mut tmp);
                    // SAFETY: AVX-512F is present.
                    unsafe { crate::avx512::softmax_row(row, self.scale, Some(brow)) };
                }
                let src: &[f32] = match self.drop_probs {
                    Some(dr) => {
                        for (i, (drow, prow)) in pd.chunks_mut(l).zip(p.chunks(l)).enumerate() {
                            dr.row(t * l + i, drow);
                            drow.iter_mut().zip(prow).for_each(|(m, p)| *m *= p);
                        }
                        pd
                    }
                    None => p,
                };
                let prow = |i: usize| src[i * l..].as_ptr();
                // SAFETY: AVX-512F is present; the probability rows hold l values, vp holds
                // ceil(d / NR) panels of l × NR, and the output rows (stride h) of this (sequence,
                // head) lie inside `ctx`; no other task writes them.
                unsafe {
                    gemm_tiles(
                        l,
                        d,
                        l,
                        &prow,
                        vp.as_ptr(),
                        l * NR,
                        { ctx_ptr }.0.add(bi * l * h + hi * d),
                        h,
                        false,
                    );
                }
            });
        });
    }

    #[cfg(target_arch = "x86_64")]
    fn backward_avx512(&self, qkv: &[f32], probs: &[f32], dctx: &[f32], dqkv: &mut [f32]) {
        let Dims { b, l, h, heads, .. } = self.dims;
        let d = self.dims.d();
        let h3 = 3 * h;
        let kp_len = l.div_ceil(NR) * d * NR;
        let dp_len = d.div_ceil(NR) * l * NR;
        let out = Ptr(dqkv.as_mut_ptr());
        (0..b * heads).into_par_iter().for_each(|t| {
            let (bi, hi) = (t / heads, t % heads);
            let base = bi * l * h3 + hi * d;
            let (q, k, v) = (&qkv[base..], &qkv[base + h..], &qkv[base + 2 * h..]);
            let dc = &dctx[bi * l * h + hi * d..];
            let p = &probs[t * l * l..][..l * l];
            with_scratch(kp_len + dp_len + 4 * l * l, |buf| {
                let (bp_l, rest) = buf.split_at_mut(kp_len);
                let (bp_d, rest) = rest.split_at_mut(dp_len);
                let (pd, rest) = rest.split_at_mut(l * l);
                let (mask, rest) = rest.split_at_mut(l * l);
                let (ds, tr) = rest.split_at_mut(l * l);
                if let Some(dr) = self.drop_probs {
                    for (i, m) in mask.chunks_mut(l).enumerate() {
                        dr.row(t * l + i, m);
                    }
                    pd.iter_mut()
                        .zip(p.iter().zip(mask.iter()))
                        .for_each(|(o, (p, m))| *o = p * m);
                } else {
                    pd.copy_from_slice(p);
                }
                // dPd = dC · Vᵀ.
                pack_rows_into(v, h3, l, d, bp_l);
                let dcrow = |i: usize| dc[i * h..].as_ptr();
                // SAFETY (this and the products below): AVX-512F is present; every row pointer is
                // readable for the depth given, every packed panel holds depth × NR values, and every
                // output block lies inside its buffer (the dqkv rows of this (sequence, head), written
                // by this task only).
                unsafe {
                    gemm_tiles(
                        l,
                        l,
                        d,
                        &dcrow,
                        bp_l.as_ptr(),
                        d * NR,
                        ds.as_mut_ptr(),
                        l,
                        false,
                    );
                }
                // dS = scale · P ⊙ (dP − Σ dP ⊙ P), dP = dPd ⊙ mask.
                for i in 0..l {
                    let row = &mut ds[i * l..][..l];
                    let prow = &p[i * l..][..l];
                    if self.drop_probs.is_some() {
                        row.iter_mut()
                            .zip(&mask[i * l..][..l])
                            .for_each(|(g, m)| *g *= m);
                    }
                    let dot: f32 = row.iter().zip(prow).map(|(g, p)| g * p).sum();
                    row.iter_mut()
                        .zip(prow)
                        .for_each(|(g, p)| *g = self.scale * p * (*g - dot));
                }
                let o = { out }.0;
                // dQ = dS · K.
                pack_cols_into(k, h3, l, d, bp_d);
                let dsrow = |i: usize| ds[i * l..].as_ptr();
                unsafe {
                    gemm_tiles(
                        l,
                        d,
                        l,
                        &dsrow,
                        bp_d.as_ptr(),
                        l * NR,
                        o.add(base),
                        h3,
                        false,
                    );
                }
                // dK = dSᵀ · Q.
                transpose_block(ds, l, l, l, tr);
                pack_cols_into(q, h3, l, d, bp_d);
                let trow = |i: usize| tr[i * l..].as_ptr();
                unsafe {
                    gemm_tiles(
                        l,
                        d,
                        l,
                        &trow,
                        bp_d.as_ptr(),
                        l * NR,
                        o.add(base + h),
                        h3,
                        false,
                    );
                }
                // dV = Pdᵀ · dC.
                transpose_block(pd, l, l, l, tr);
                pack_cols_into(dc, h, l, d, bp_d);
                let trow = |i: usize| tr[i * l..].as_ptr();
                unsafe {
                    gemm_tiles(
                        l,
                        d,
                        l,
                        &trow,
                        bp_d.as_ptr(),
                        l * NR,
                        o.add(base + 2 * h),
                        h3,
                        false,
                    );
                }
            });
        });
    }
}

/// `y[m, n] = x[m, k] · Wᵀ + b` (`W` as `n` rows of `k`).
fn linear_fwd(
    kern: Kernels,
    x: &[f32],
    m: usize,
    w: &[f32],
    b: &[f32],
    n: usize,
    k: usize,
) -> Vec<f32> {
    assert!(x.len() >= m * k && w.len() >= n * k && b.len() >= n);
    match kern {
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512 => {
            let p = crate::fused::Packed::from_rows(w, n, k, Some(b));
            let mut out: Vec<f32> = Vec::with_capacity(m * n);
            crate::avx512::linear(
                x,
                m,
                &p,
                None,
                false,
                &mut out.spare_capacity_mut()[..m * n],
            );
            // SAFETY: the kernel writes every one of the m·n elements.
            unsafe { out.set_len(m * n) };
            out
        }
        Kernels::Portable => {
            let mut out = Vec::with_capacity(m * n);
            for _ in 0..m {
                out.extend_from_slice(&b[..n]);
            }
            // SAFETY: x is m × k (row stride k), Wᵀ is read as k × n through strides (1, k), out is m × n.
            unsafe {
                strided_mm(
                    m,
                    n,
                    k,
                    (x.as_ptr(), k, 1),
                    (w.as_ptr(), 1, k),
                    (out.as_mut_ptr(), n),
                    true,
                    true,
                );
            }
            out
        }
    }
}

/// `out[n, k] = gᵀ · x` for `g` `[t, n]` and `x` `[t, k]` (a weight gradient).
fn grad_weight(kern: Kernels, g: &[f32], t: usize, n: usize, x: &[f32], k: usize, out: &mut [f32]) {
    assert!(g.len() >= t * n && x.len() >= t * k && out.len() >= n * k);
    match kern {
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512 => {
            let gt = crate::train_ops::transpose(&g[..t * n], t, n);
            tile_gemm(&gt, t, n, t, &pack_n(x, k, t, k), k, out, false);
        }
        // SAFETY: gᵀ is n × t through strides (1, n), x is t × k (k, 1), out n × k.
        Kernels::Portable => unsafe {
            strided_mm(
                n,
                k,
                t,
                (g.as_ptr(), 1, n),
                (x.as_ptr(), k, 1),
                (out.as_mut_ptr(), k),
                false,
                true,
            );
        },
    }
}

/// `out[t, k] (+)= g · w` for `g` `[t, n]` and `w` `[n, k]` (an input gradient).
#[allow(clippy::too_many_arguments)]
fn grad_input(
    kern: Kernels,
    g: &[f32],
    t: usize,
    n: usize,
    w: &[f32],
    k: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    assert!(g.len() >= t * n && w.len() >= n * k && out.len() >= t * k);
    match kern {
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512 => tile_gemm(g, n, t, n, &pack_n(w, k, n, k), k, out, accumulate),
        // SAFETY: g is t × n (n, 1), w is n × k (k, 1), out t × k.
        Kernels::Portable => unsafe {
            strided_mm(
                t,
                k,
                n,
                (g.as_ptr(), n, 1),
                (w.as_ptr(), k, 1),
                (out.as_mut_ptr(), k),
                accumulate,
                true,
            );
        },
    }
}

/// In place: `row ← softmax(row · scale + bias)`.
fn softmax_row(kern: Kernels, row: &mut [f32], scale: f32, bias: &[f32]) {
    match kern {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (the op was built for it).
        Kernels::Avx512 => unsafe { crate::avx512::softmax_row(row, scale, Some(bias)) },
        Kernels::Portable => {
            let mut max = f32::NEG_INFINITY;
            for (v, &b) in row.iter_mut().zip(bias) {
                *v = *v * scale + b;
                max = max.max(*v);
            }
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

fn phi_cdf(x: f32) -> f32 {
    0.5 * (1.0 + crate::fused::erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Exact GELU of every element.
fn gelu_fwd(kern: Kernels, x: &[f32]) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(x.len());
    match kern {
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512 => {
            crate::avx512::gelu(x, &mut out.spare_capacity_mut()[..x.len()]);
            // SAFETY: `gelu` writes every element.
            unsafe { out.set_len(x.len()) };
        }
        Kernels::Portable => {
            out.resize(x.len(), 0.0);
            out.par_chunks_mut(1 << 14)
                .zip(x.par_chunks(1 << 14))
                .for_each(|(o, x)| {
                    o.iter_mut().zip(x).for_each(|(o, &x)| *o = x * phi_cdf(x));
                });
        }
    }
    out
}

/// In place: `g ← g ⊙ GELU′(x)`.
fn gelu_bwd(kern: Kernels, x: &[f32], g: &mut [f32]) {
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
    g.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(g, x)| match kern {
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => crate::avx512::gelu_backward(x, g),
            Kernels::Portable => {
                for (g, &x) in g.iter_mut().zip(x) {
                    *g *= phi_cdf(x) + x * (-0.5 * x * x).exp() * inv_sqrt_2pi;
                }
            }
        });
}

/// The float32 elements of a contiguous CPU tensor's storage, borrowed.
fn cpu_slice<'a>(
    st: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match st {
        candle_core::Storage::Cpu(cs) => crate::train_ops::slice(cs, l, what),
        _ => candle_core::bail!("{what}: CPU tensors only"),
    }
}

impl CustomOp3 for BertLayerOp {
    fn name(&self) -> &'static str {
        "latte-bert-layer-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::train_ops::slice(s1, l1, self.name())?;
        let flat = crate::train_ops::slice(s2, l2, self.name())?;
        let aux = crate::train_ops::slice(s3, l3, self.name())?;
        let dims = self.dims;
        let Dims { b, l, h, heads, f } = dims;
        let t = dims.tokens();
        let rot_len = if self.rotary { 2 * l * dims.d() } else { 0 };
        if x.len() != t * h || aux.len() != b * l + rot_len || flat.len() != dims.offsets().1 {
            candle_core::bail!(
                "{}: inputs {:?}, {:?}, {:?} do not fit the layer {dims:?}",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let w = Weights::new(flat, &dims);
        let (bias, rot) = aux.split_at(b * l);
        let mut qkv = linear_fwd(self.kern, x, t, w.wqkv, w.bqkv, 3 * h, h);
        if self.rotary {
            let (cos, sin) = rot.split_at(l * dims.d());
            rotary_qk(&mut qkv, l, h, heads, cos, sin, false);
        }
        let mut probs = vec![0f32; b * heads * l * l];
        let mut ctx = vec![0f32; t * h];
        self.attn.forward(&qkv, bias, &mut probs, &mut ctx);
        let ao = linear_fwd(self.kern, &ctx, t, w.wo, w.bo, h, h);
        let mut a = vec![0f32; t * h];
        let mut xhat1 = vec![0f32; t * h];
        let mut rstd1 = vec![0f32; t];
        residual_norm(
            &ao,
            x,
            self.drop_attn,
            w.g1,
            w.b1,
            self.eps1,
            &mut a,
            &mut xhat1,
            &mut rstd1,
        );
        drop(ao);
        let inter = linear_fwd(self.kern, &a, t, w.wi, w.bi, f, h);
        let gelu = gelu_fwd(self.kern, &inter);
        let o = linear_fwd(self.kern, &gelu, t, w.wout, w.bout, h, f);
        let mut y = vec![0f32; t * h];
        let mut xhat2 = vec![0f32; t * h];
        let mut rstd2 = vec![0f32; t];
        residual_norm(
            &o,
            &a,
            self.drop_out,
            w.g2,
            w.b2,
            self.eps2,
            &mut y,
            &mut xhat2,
            &mut rstd2,
        );
        *self.saved.lock().expect("not poisoned") = Some(Saved {
            qkv,
            probs,
            ctx,
            a,
            xhat1,
            rstd1,
            inter,
            gelu,
            xhat2,
            rstd2,
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        aux: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().expect("not poisoned");
        let Some(s) = guard.as_ref() else {
            candle_core::bail!("{}: backward pass before the forward pass", self.name());
        };
        let dims = self.dims;
        let Dims { h, f, .. } = dims;
        let t = dims.tokens();
        let (xc, fc, gc) = (x.contiguous()?, flat.contiguous()?, grad.contiguous()?);
        let (xg, xl) = xc.storage_and_layout();
        let (fg, fl) = fc.storage_and_layout();
        let (gg, gl) = gc.storage_and_layout();
        let xs = cpu_slice(&xg, xl, self.name())?;
        let flat_v = cpu_slice(&fg, fl, self.name())?;
        let dy = cpu_slice(&gg, gl, self.name())?;
        let (off, len) = dims.offsets();
        if xs.len() != t * h || dy.len() != t * h || flat_v.len() != len {
            candle_core::bail!(
                "{}: backward inputs {:?}, {:?}, {:?} do not fit the layer {dims:?}",
                self.name(),
                x.dims(),
                flat.dims(),
                grad.dims()
            );
        }
        let w = Weights::new(flat_v, &dims);
        let mut dflat = vec![0f32; len];
        let (dwqkv, rest) = dflat.split_at_mut(off[1]);
        let (dbqkv, rest) = rest.split_at_mut(off[2] - off[1]);
        let (dwo, rest) = rest.split_at_mut(off[3] - off[2]);
        let (dbo, rest) = rest.split_at_mut(off[4] - off[3]);
        let (dg1, rest) = rest.split_at_mut(off[5] - off[4]);
        let (db1, rest) = rest.split_at_mut(off[6] - off[5]);
        let (dwi, rest) = rest.split_at_mut(off[7] - off[6]);
        let (dbi, rest) = rest.split_at_mut(off[8] - off[7]);
        let (dwout, rest) = rest.split_at_mut(off[9] - off[8]);
        let (dbout, rest) = rest.split_at_mut(off[10] - off[9]);
        let (dg2, db2) = rest.split_at_mut(off[11] - off[10]);

        // Second layer norm, then the output dropout.
        let mut dr2 = vec![0f32; t * h];
        let (gw, gb) = ln_backward(dy, &s.xhat2, &s.rstd2, w.g2, &mut dr2);
        dg2.copy_from_slice(&gw);
        db2.copy_from_slice(&gb);
        let mut d_o = dr2.clone();
        apply_drop(&mut d_o, h, self.drop_out);
        dbout.copy_from_slice(&col_sums(&d_o, h));
        let k = self.kern;
        // dWout [h, f] = d_oᵀ · gelu.
        grad_weight(k, &d_o, t, h, &s.gelu, f, dwout);
        // d(gelu) = d_o · Wout, then through GELU.
        let mut di = vec![0f32; t * f];
        grad_input(k, &d_o, t, h, w.wout, f, &mut di, false);
        drop(d_o);
        gelu_bwd(k, &s.inter, &mut di);
        dbi.copy_from_slice(&col_sums(&di, f));
        // dWi [f, h] = diᵀ · a.
        grad_weight(k, &di, t, f, &s.a, h, dwi);
        // da = dr2 + di · Wi.
        let mut da = dr2;
        grad_input(k, &di, t, f, w.wi, h, &mut da, true);
        drop(di);
        // First layer norm, then the attention-output dropout.
        let mut dr1 = vec![0f32; t * h];
        let (gw, gb) = ln_backward(&da, &s.xhat1, &s.rstd1, w.g1, &mut dr1);
        dg1.copy_from_slice(&gw);
        db1.copy_from_slice(&gb);
        drop(da);
        let mut dao = dr1.clone();
        apply_drop(&mut dao, h, self.drop_attn);
        dbo.copy_from_slice(&col_sums(&dao, h));
        grad_weight(k, &dao, t, h, &s.ctx, h, dwo);
        let mut dctx = vec![0f32; t * h];
        grad_input(k, &dao, t, h, w.wo, h, &mut dctx, false);
        drop(dao);
        // Attention.
        let mut dqkv = vec![0f32; t * 3 * h];
        self.attn.backward(&s.qkv, &s.probs, &dctx, &mut dqkv);
        drop(dctx);
        if self.rotary {
            let ac = aux.contiguous()?;
            let (ag, al) = ac.storage_and_layout();
            let av = cpu_slice(&ag, al, self.name())?;
            let Dims { b, l, heads, .. } = dims;
            let d = dims.d();
            if av.len() != b * l + 2 * l * d {
                candle_core::bail!("{}: rotary tables do not fit {dims:?}", self.name());
            }
            let (cos, sin) = av[b * l..].split_at(l * d);
            rotary_qk(&mut dqkv, l, h, heads, cos, sin, true);
        }
        dbqkv.copy_from_slice(&col_sums(&dqkv, 3 * h));
        grad_weight(k, &dqkv, t, 3 * h, xs, h, dwqkv);
        // dx = dr1 + dqkv · Wqkv.
        let mut dx = dr1;
        grad_input(k, &dqkv, t, 3 * h, w.wqkv, h, &mut dx, true);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dflat, len, dev)?),
            None,
        ))
    }
}

/// The q, k and v projections of a BERT layer.
#[derive(Clone, Copy)]
pub enum QkvParams<'a> {
    /// Three `[h, h]` layers.
    Separate {
        /// Query projection.
        query: &'a Linear,
        /// Key projection.
        key: &'a Linear,
        /// Value projection.
        value: &'a Linear,
    },
    /// One `[3h, h]` layer, q then k then v (jina's flash XLM-RoBERTa).
    Packed(&'a Linear),
}

/// The parameters of one BERT layer, in the order [`bert_layer`] flattens them.
pub struct BertLayerParams<'a> {
    /// Self-attention projections.
    pub qkv: QkvParams<'a>,
    /// Attention output projection.
    pub attn_out: &'a Linear,
    /// Layer norm after attention.
    pub attn_norm: &'a LayerNorm,
    /// Feed-forward input layer.
    pub inter: &'a Linear,
    /// Feed-forward output layer.
    pub out: &'a Linear,
    /// Layer norm after the feed-forward block.
    pub out_norm: &'a LayerNorm,
    /// Rotary tables (`cos`, `sin`, each `[l, d]`) applied to q and k, for encoders with rotary positions.
    pub rotary: Option<(&'a Tensor, &'a Tensor)>,
}

/// Probabilities of a layer's dropout sites.
#[derive(Clone, Copy, Debug)]
pub struct LayerDropout {
    /// On the attention probabilities.
    pub attention: f64,
    /// After the attention output and after the feed-forward output.
    pub hidden: f64,
}

/// One BERT encoder layer in training, forward here and backward by hand (see the module docs):
/// `x [b, l, h]`, `key_bias [b, l]` (0 where attended, a large negative number elsewhere). On the
/// AVX-512 kernels where the CPU has AVX-512F, else on the `gemm` crate. `None` where the fused op does
/// not apply (not float32 on the CPU, a layer without biases, another activation than exact GELU); the
/// caller runs the elementary ops.
pub fn bert_layer(
    x: &Tensor,
    key_bias: &Tensor,
    p: &BertLayerParams,
    heads: usize,
    act: &str,
    dropout: LayerDropout,
) -> Result<Option<Tensor>> {
    bert_layer_on(Kernels::detect(), x, key_bias, p, heads, act, dropout)
}

fn bert_layer_on(
    kern: Kernels,
    x: &Tensor,
    key_bias: &Tensor,
    p: &BertLayerParams,
    heads: usize,
    act: &str,
    dropout: LayerDropout,
) -> Result<Option<Tensor>> {
    {
        let applies = fused_on()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && key_bias.dtype() == DType::F32
            && matches!(act, "gelu" | "gelu_python");
        if !applies {
            return Ok(None);
        }
        let (b, l, h) = x.dims3()?;
        let qkv_layers: Vec<&Linear> = match p.qkv {
            QkvParams::Separate { query, key, value } => vec![query, key, value],
            QkvParams::Packed(w) => vec![w],
        };
        let mut linears = qkv_layers.clone();
        linears.extend([p.attn_out, p.inter, p.out]);
        if linears
            .iter()
            .any(|l| l.bias.is_none() || l.weight.dtype() != DType::F32)
            || p.attn_norm.bias.is_none()
            || p.out_norm.bias.is_none()
            || heads == 0
        {
            return Ok(None);
        }
        let f = p.inter.out_dim();
        let qkv_ok = match p.qkv {
            QkvParams::Separate { .. } => qkv_layers.iter().all(|w| w.weight.dims() == [h, h]),
            QkvParams::Packed(w) => w.weight.dims() == [3 * h, h],
        };
        let d = h / heads;
        let rotary_ok = p
            .rotary
            .is_none_or(|(c, s)| d.is_multiple_of(2) && c.dims() == [l, d] && s.dims() == [l, d]);
        if !h.is_multiple_of(heads)
            || !qkv_ok
            || !rotary_ok
            || p.attn_out.weight.dims() != [h, h]
            || p.inter.weight.dims() != [f, h]
            || p.out.weight.dims() != [h, f]
            || key_bias.dims() != [b, l]
        {
            return Ok(None);
        }
        let bias = |l: &Linear| l.bias.clone().expect("checked above");
        let nb = |n: &LayerNorm| n.bias.clone().expect("checked above");
        let mut parts = Vec::with_capacity(16);
        for w in &qkv_layers {
            parts.push(w.weight.flatten_all()?);
        }
        for w in &qkv_layers {
            parts.push(bias(w));
        }
        parts.extend([
            p.attn_out.weight.flatten_all()?,
            bias(p.attn_out),
            p.attn_norm.weight.clone(),
            nb(p.attn_norm),
            p.inter.weight.flatten_all()?,
            bias(p.inter),
            p.out.weight.flatten_all()?,
            bias(p.out),
            p.out_norm.weight.clone(),
            nb(p.out_norm),
        ]);
        let flat = Tensor::cat(&parts, 0)?;
        // The dropout sites in the order the elementary path draws them.
        let drop_probs = DropSite::next(dropout.attention);
        let drop_attn = DropSite::next(dropout.hidden);
        let drop_out = DropSite::next(dropout.hidden);
        let dims = Dims { b, l, h, heads, f };
        let op = BertLayerOp {
            kern,
            dims,
            attn: Attn {
                kern,
                dims,
                scale: 1.0 / (d as f32).sqrt(),
                drop_probs,
                window: None,
            },
            eps1: p.attn_norm.eps as f32,
            eps2: p.out_norm.eps as f32,
            rotary: p.rotary.is_some(),
            drop_attn,
            drop_out,
            saved: Mutex::new(None),
        };
        let aux = match p.rotary {
            Some((c, sn)) => Tensor::cat(
                &[
                    key_bias.flatten_all()?,
                    c.to_dtype(DType::F32)?.flatten_all()?,
                    sn.to_dtype(DType::F32)?.flatten_all()?,
                ],
                0,
            )?,
            None => key_bias.flatten_all()?,
        };
        let y = x
            .contiguous()?
            .apply_op3(&flat, &aux.detach().contiguous()?, op)?;
        Ok(Some(y))
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

fn fused_on() -> bool {
    FUSED_ON.with(|c| c.get())
}

/// Offsets of consecutive segments of these sizes, and their total.
fn segments<const N: usize>(sizes: [usize; N]) -> ([usize; N], usize) {
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
fn norm_rows(
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
fn rotary_qk(
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
fn gelu_row(kern: Kernels, x: &[f32], out: &mut [f32]) {
    match kern {
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512 => {
            // SAFETY: MaybeUninit<f32> has f32's layout; `gelu` only writes.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    out.as_mut_ptr() as *mut std::mem::MaybeUninit<f32>,
                    out.len(),
                )
            };
            crate::avx512::gelu(x, dst);
        }
        Kernels::Portable => out
            .iter_mut()
            .zip(x)
            .for_each(|(o, &x)| *o = x * phi_cdf(x)),
    }
}

/// `g ← g ⊙ GELU′(x)` over one row, single-threaded.
fn gelu_grad_row(kern: Kernels, x: &[f32], g: &mut [f32]) {
    match kern {
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512 => crate::avx512::gelu_backward(x, g),
        Kernels::Portable => {
            let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
            for (g, &x) in g.iter_mut().zip(x) {
                *g *= phi_cdf(x) + x * (-0.5 * x * x).exp() * inv_sqrt_2pi;
            }
        }
    }
}

/// Which of a ModernBERT layer's optional parameters exist.
#[derive(Clone, Copy, Debug)]
struct MbLayout {
    /// The attention layer norm (layer 0 has none).
    attn_norm: bool,
    norm_bias: bool,
    attn_bias: bool,
    mlp_bias: bool,
}

impl MbLayout {
    /// Segment offsets in the flat tensor: attention norm weight / bias, Wqkv, bqkv, Wo, bo, MLP norm
    /// weight / bias, Wi, bi, Wo (MLP), bo (MLP); absent ones are empty.
    fn offsets(&self, d: &Dims) -> ([usize; 12], usize) {
        let (h, f) = (d.h, d.f);
        let on = |b: bool, n: usize| if b { n } else { 0 };
        segments([
            on(self.attn_norm, h),
            on(self.attn_norm && self.norm_bias, h),
            3 * h * h,
            on(self.attn_bias, 3 * h),
            h * h,
            on(self.attn_bias, h),
            h,
            on(self.norm_bias, h),
            2 * f * h,
            on(self.mlp_bias, 2 * f),
            h * f,
            on(self.mlp_bias, h),
        ])
    }

    fn split<'a>(&self, flat: &'a [f32], d: &Dims) -> [&'a [f32]; 12] {
        let (off, len) = self.offsets(d);
        std::array::from_fn(|i| {
            let end = if i + 1 < 12 { off[i + 1] } else { len };
            &flat[off[i]..end]
        })
    }
}

/// What the ModernBERT layer's forward pass keeps.
struct MbSaved {
    /// Attention-norm output (`None`: the layer has no attention norm and reads `x`), `x̂`, `1 / σ`.
    y1: Option<Vec<f32>>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    /// q/k (rotated) and v.
    qkv: Vec<f32>,
    probs: Vec<f32>,
    /// Attention output after the masking of window-less rows.
    ctx: Vec<f32>,
    /// MLP-norm output, `x̂`, `1 / σ`.
    y2: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    /// `[T, 2f]`: GLU input and gate.
    gi: Vec<f32>,
    /// `[T, f]`: `gelu(input) ⊙ gate` after dropout.
    inner: Vec<f32>,
}

/// One pre-norm ModernBERT layer as a candle op: `(x [b, l, h], flat weights, aux) → [b, l, h]`, where
/// `aux` holds the key bias `[b, l]`, the rotary `cos` and `sin` `[l, d]` and the row mask `[b, l]` (1
/// where a query has an attended key in its window).
struct ModernBertLayerOp {
    kern: Kernels,
    dims: Dims,
    layout: MbLayout,
    attn: Attn,
    eps: f32,
    mask_rows: bool,
    drop_attn: Option<DropSite>,
    drop_mlp: Option<DropSite>,
    saved: Mutex<Option<MbSaved>>,
}

impl ModernBertLayerOp {
    fn aux<'a>(&self, aux: &'a [f32]) -> (&'a [f32], &'a [f32], &'a [f32], &'a [f32]) {
        let Dims { b, l, .. } = self.dims;
        let d = self.dims.d();
        let (kb, rest) = aux.split_at(b * l);
        let (cos, rest) = rest.split_at(l * d);
        let (sin, rows) = rest.split_at(l * d);
        (kb, cos, sin, rows)
    }

    fn aux_len(&self) -> usize {
        let Dims { b, l, .. } = self.dims;
        2 * b * l + 2 * l * self.dims.d()
    }
}

/// Scales row `t` of `[T, n]` by `rows[t]`.
fn scale_rows(a: &mut [f32], n: usize, rows: &[f32]) {
    a.par_chunks_mut(n)
        .zip(rows.par_iter())
        .for_each(|(r, &s)| r.iter_mut().for_each(|v| *v *= s));
}

/// `a += b` element by element.
fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

impl CustomOp3 for ModernBertLayerOp {
    fn name(&self) -> &'static str {
        "latte-modernbert-layer-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::train_ops::slice(s1, l1, self.name())?;
        let flat = crate::train_ops::slice(s2, l2, self.name())?;
        let aux = crate::train_ops::slice(s3, l3, self.name())?;
        let dims = self.dims;
        let Dims { l, h, heads, f, .. } = dims;
        let t = dims.tokens();
        if x.len() != t * h
            || flat.len() != self.layout.offsets(&dims).1
            || aux.len() != self.aux_len()
        {
            candle_core::bail!(
                "{}: inputs {:?}, {:?}, {:?} do not fit the layer {dims:?}",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let k = self.kern;
        let [n1w, n1b, wqkv, bqkv, wo, bo, n2w, n2b, wi, bi, wout, bout] =
            self.layout.split(flat, &dims);
        let (kb, cos, sin, rows) = self.aux(aux);
        let zeros = vec![0f32; 3 * h.max(f)];
        let bias_or = |b: &'_ [f32], n: usize| -> Vec<f32> {
            if b.is_empty() {
                zeros[..n].to_vec()
            } else {
                b.to_vec()
            }
        };
        let (y1, xhat1, rstd1) = if self.layout.attn_norm {
            let mut y1 = vec![0f32; t * h];
            let mut xhat1 = vec![0f32; t * h];
            let mut rstd1 = vec![0f32; t];
            norm_rows(x, n1w, n1b, self.eps, &mut y1, &mut xhat1, &mut rstd1);
            (Some(y1), xhat1, rstd1)
        } else {
            (None, Vec::new(), Vec::new())
        };
        let input = y1.as_deref().unwrap_or(x);
        let mut qkv = linear_fwd(k, input, t, wqkv, &bias_or(bqkv, 3 * h), 3 * h, h);
        rotary_qk(&mut qkv, l, h, heads, cos, sin, false);
        let mut probs = vec![0f32; dims.b * heads * l * l];
        let mut ctx = vec![0f32; t * h];
        self.attn.forward(&qkv, kb, &mut probs, &mut ctx);
        if self.mask_rows {
            scale_rows(&mut ctx, h, rows);
        }
        let mut x1 = linear_fwd(k, &ctx, t, wo, &bias_or(bo, h), h, h);
        apply_drop(&mut x1, h, self.drop_attn);
        add_into(&mut x1, x);
        let mut y2 = vec![0f32; t * h];
        let mut xhat2 = vec![0f32; t * h];
        let mut rstd2 = vec![0f32; t];
        norm_rows(&x1, n2w, n2b, self.eps, &mut y2, &mut xhat2, &mut rstd2);
        let gi = linear_fwd(k, &y2, t, wi, &bias_or(bi, 2 * f), 2 * f, h);
        let mut inner = vec![0f32; t * f];
        inner
            .par_chunks_mut(f)
            .zip(gi.par_chunks(2 * f))
            .for_each(|(o, g)| {
                gelu_row(k, &g[..f], o);
                o.iter_mut().zip(&g[f..]).for_each(|(o, gate)| *o *= gate);
            });
        apply_drop(&mut inner, f, self.drop_mlp);
        let mut y = linear_fwd(k, &inner, t, wout, &bias_or(bout, h), h, f);
        add_into(&mut y, &x1);
        *self.saved.lock().expect("not poisoned") = Some(MbSaved {
            y1,
            xhat1,
            rstd1,
            qkv,
            probs,
            ctx,
            y2,
            xhat2,
            rstd2,
            gi,
            inner,
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        aux: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().expect("not poisoned");
        let Some(s) = guard.as_ref() else {
            candle_core::bail!("{}: backward pass before the forward pass", self.name());
        };
        let dims = self.dims;
        let Dims { l, h, heads, f, .. } = dims;
        let t = dims.tokens();
        let (xc, fc, ac, gc) = (
            x.contiguous()?,
            flat.contiguous()?,
            aux.contiguous()?,
            grad.contiguous()?,
        );
        let (xg, xl) = xc.storage_and_layout();
        let (fg, fl) = fc.storage_and_layout();
        let (ag, al) = ac.storage_and_layout();
        let (gg, gl) = gc.storage_and_layout();
        let xs = cpu_slice(&xg, xl, self.name())?;
        let flat_v = cpu_slice(&fg, fl, self.name())?;
        let aux_v = cpu_slice(&ag, al, self.name())?;
        let dy = cpu_slice(&gg, gl, self.name())?;
        let (off, len) = self.layout.offsets(&dims);
        if xs.len() != t * h
            || dy.len() != t * h
            || flat_v.len() != len
            || aux_v.len() != self.aux_len()
        {
            candle_core::bail!(
                "{}: backward inputs {:?}, {:?}, {:?} do not fit the layer {dims:?}",
                self.name(),
                x.dims(),
                flat.dims(),
                grad.dims()
            );
        }
        let k = self.kern;
        let [n1w, _, wqkv, _, wo, _, n2w, _, wi, _, wout, _] = self.layout.split(flat_v, &dims);
        let (_, cos, sin, rows) = self.aux(aux_v);
        let mut dflat = vec![0f32; len];
        let mut parts: Vec<&mut [f32]> = Vec::with_capacity(12);
        let mut rest = &mut dflat[..];
        for i in 0..12 {
            let end = if i + 1 < 12 { off[i + 1] } else { len };
            let (a, r) = rest.split_at_mut(end - off[i]);
            parts.push(a);
            rest = r;
        }
        let [dn1w, dn1b, dwqkv, dbqkv, dwo, dbo, dn2w, dn2b, dwi, dbi, dwout, dbout]: [&mut [f32];
            12] = parts.try_into().expect("twelve segments");
        let fill_bias = |dst: &mut [f32], g: &[f32], n: usize| {
            if !dst.is_empty() {
                dst.copy_from_slice(&col_sums(g, n));
            }
        };

        // MLP: y = x1 + inner · Woutᵀ.
        let mut dx1 = dy.to_vec();
        fill_bias(dbout, dy, h);
        grad_weight(k, dy, t, h, &s.inner, f, dwout);
        let mut dinner = vec![0f32; t * f];
        grad_input(k, dy, t, h, wout, f, &mut dinner, false);
        apply_drop(&mut dinner, f, self.drop_mlp);
        let mut dgi = vec![0f32; t * 2 * f];
        dgi.par_chunks_mut(2 * f)
            .zip(s.gi.par_chunks(2 * f).zip(dinner.par_chunks(f)))
            .for_each(|(dg, (g, di))| {
                let (d_in, d_gate) = dg.split_at_mut(f);
                // d_gate = di ⊙ gelu(input); d_input = di ⊙ gate ⊙ gelu′(input).
                gelu_row(k, &g[..f], d_gate);
                d_gate.iter_mut().zip(di).for_each(|(a, d)| *a *= d);
                d_in.iter_mut()
                    .zip(di.iter().zip(&g[f..]))
                    .for_each(|(o, (d, gate))| *o = d * gate);
                gelu_grad_row(k, &g[..f], d_in);
            });
        drop(dinner);
        fill_bias(dbi, &dgi, 2 * f);
        grad_weight(k, &dgi, t, 2 * f, &s.y2, h, dwi);
        let mut dy2 = vec![0f32; t * h];
        grad_input(k, &dgi, t, 2 * f, wi, h, &mut dy2, false);
        drop(dgi);
        let mut tmp = vec![0f32; t * h];
        let (gw, gb) = ln_backward(&dy2, &s.xhat2, &s.rstd2, n2w, &mut tmp);
        dn2w.copy_from_slice(&gw);
        if !dn2b.is_empty() {
            dn2b.copy_from_slice(&gb);
        }
        add_into(&mut dx1, &tmp);
        drop(dy2);
        // Attention: x1 = x + dropout(ctx · Woᵀ).
        let mut dao = dx1.clone();
        apply_drop(&mut dao, h, self.drop_attn);
        fill_bias(dbo, &dao, h);
        grad_weight(k, &dao, t, h, &s.ctx, h, dwo);
        let mut dctx = vec![0f32; t * h];
        grad_input(k, &dao, t, h, wo, h, &mut dctx, false);
        drop(dao);
        if self.mask_rows {
            scale_rows(&mut dctx, h, rows);
        }
        let mut dqkv = vec![0f32; t * 3 * h];
        self.attn.backward(&s.qkv, &s.probs, &dctx, &mut dqkv);
        drop(dctx);
        rotary_qk(&mut dqkv, l, h, heads, cos, sin, true);
        fill_bias(dbqkv, &dqkv, 3 * h);
        let input = s.y1.as_deref().unwrap_or(xs);
        grad_weight(k, &dqkv, t, 3 * h, input, h, dwqkv);
        let mut dy1 = vec![0f32; t * h];
        grad_input(k, &dqkv, t, 3 * h, wqkv, h, &mut dy1, false);
        drop(dqkv);
        if self.layout.attn_norm {
            let (gw, gb) = ln_backward(&dy1, &s.xhat1, &s.rstd1, n1w, &mut tmp);
            dn1w.copy_from_slice(&gw);
            if !dn1b.is_empty() {
                dn1b.copy_from_slice(&gb);
            }
            add_into(&mut dx1, &tmp);
        } else {
            add_into(&mut dx1, &dy1);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx1, x.shape(), dev)?),
            Some(Tensor::from_vec(dflat, len, dev)?),
            None,
        ))
    }
}

/// The parameters of one ModernBERT layer.
pub struct ModernBertLayerParams<'a> {
    /// Layer norm before attention (layer 0 has none).
    pub attn_norm: Option<&'a LayerNorm>,
    /// Packed q, k, v projection `[3h, h]`.
    pub wqkv: &'a Linear,
    /// Attention output projection.
    pub wo: &'a Linear,
    /// Layer norm before the MLP.
    pub mlp_norm: &'a LayerNorm,
    /// GLU input and gate `[2f, h]`.
    pub wi: &'a Linear,
    /// MLP output projection `[h, f]`.
    pub mlp_wo: &'a Linear,
}

/// What a ModernBERT layer's attention sees.
pub struct ModernBertAttention<'a> {
    /// Heads.
    pub heads: usize,
    /// Rotary tables `[l, d]` of this layer type.
    pub cos: &'a Tensor,
    /// See `cos`.
    pub sin: &'a Tensor,
    /// Sliding window half-width for local layers, `None` for global ones.
    pub window: Option<usize>,
    /// `[b, l]`, 1 where a query has an attended key in its window: queries without one get a zero
    /// output. `None` when every query has one (or the layer is global).
    pub row_mask: Option<&'a Tensor>,
    /// Dropout on the attention probabilities and the attention output.
    pub dropout: f64,
}

/// One ModernBERT encoder layer in training, as [`bert_layer`] does for BERT: `x [b, l, h]`, `key_bias
/// [b, l]`; `mlp_dropout` inside the MLP. `None` where the fused op does not apply (not float32 on the
/// CPU, another activation than exact GELU, partial rotary, shapes it does not know); the caller runs
/// the elementary ops.
pub fn modernbert_layer(
    x: &Tensor,
    key_bias: &Tensor,
    p: &ModernBertLayerParams,
    attn: &ModernBertAttention,
    act: &str,
    eps: f64,
    mlp_dropout: f64,
) -> Result<Option<Tensor>> {
    let kern = Kernels::detect();
    let applies = fused_on()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && key_bias.dtype() == DType::F32
        && matches!(act, "gelu" | "gelu_python");
    if !applies {
        return Ok(None);
    }
    let (b, l, h) = x.dims3()?;
    let heads = attn.heads;
    if heads == 0 || !h.is_multiple_of(heads) || !(h / heads).is_multiple_of(2) {
        return Ok(None);
    }
    let d = h / heads;
    let f2 = p.wi.out_dim();
    let f = f2 / 2;
    let all_f32 = [p.wqkv, p.wo, p.wi, p.mlp_wo]
        .iter()
        .all(|l| l.weight.dtype() == DType::F32);
    let norm_bias = p.mlp_norm.bias.is_some();
    let attn_bias = p.wqkv.bias.is_some();
    let mlp_bias = p.wi.bias.is_some();
    if !all_f32
        || !f2.is_multiple_of(2)
        || p.wqkv.weight.dims() != [3 * h, h]
        || p.wo.weight.dims() != [h, h]
        || p.wi.weight.dims() != [f2, h]
        || p.mlp_wo.weight.dims() != [h, f]
        || p.wo.bias.is_some() != attn_bias
        || p.mlp_wo.bias.is_some() != mlp_bias
        || p.attn_norm.is_some_and(|n| n.bias.is_some() != norm_bias)
        || key_bias.dims() != [b, l]
        || attn.cos.dims() != [l, d]
        || attn.sin.dims() != [l, d]
        || attn.row_mask.is_some_and(|m| m.dims() != [b, l])
    {
        return Ok(None);
    }
    let mut parts: Vec<Tensor> = Vec::with_capacity(12);
    if let Some(n) = p.attn_norm {
        parts.push(n.weight.clone());
        if let Some(b) = &n.bias {
            parts.push(b.clone());
        }
    }
    parts.push(p.wqkv.weight.flatten_all()?);
    parts.extend(p.wqkv.bias.clone());
    parts.push(p.wo.weight.flatten_all()?);
    parts.extend(p.wo.bias.clone());
    parts.push(p.mlp_norm.weight.clone());
    parts.extend(p.mlp_norm.bias.clone());
    parts.push(p.wi.weight.flatten_all()?);
    parts.extend(p.wi.bias.clone());
    parts.push(p.mlp_wo.weight.flatten_all()?);
    parts.extend(p.mlp_wo.bias.clone());
    let flat = Tensor::cat(&parts, 0)?;
    let ones;
    let rows = match attn.row_mask {
        Some(m) => m,
        None => {
            ones = Tensor::ones((b, l), DType::F32, x.device())?;
            &ones
        }
    };
    let aux = Tensor::cat(
        &[
            key_bias.flatten_all()?,
            attn.cos.to_dtype(DType::F32)?.flatten_all()?,
            attn.sin.to_dtype(DType::F32)?.flatten_all()?,
            rows.to_dtype(DType::F32)?.flatten_all()?,
        ],
        0,
    )?
    .detach();
    // The dropout sites in the order the elementary path draws them.
    let drop_probs = DropSite::next(attn.dropout);
    let drop_attn = DropSite::next(attn.dropout);
    let drop_mlp = DropSite::next(mlp_dropout);
    let dims = Dims { b, l, h, heads, f };
    let op = ModernBertLayerOp {
        kern,
        dims,
        layout: MbLayout {
            attn_norm: p.attn_norm.is_some(),
            norm_bias,
            attn_bias,
            mlp_bias,
        },
        attn: Attn {
            kern,
            dims,
            scale: 1.0 / (d as f32).sqrt(),
            drop_probs,
            window: attn.window,
        },
        eps: eps as f32,
        mask_rows: attn.row_mask.is_some(),
        drop_attn,
        drop_mlp,
        saved: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op3(&flat, &aux, op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{attention_dropout, hidden_act, qkv_heads, with_dropout, Mode};
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = crate::nn::splitmix(s);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    struct Layer {
        vars: Vec<Var>,
        lin: Vec<Linear>,
        norms: Vec<LayerNorm>,
    }

    fn layer(h: usize, f: usize, seed: u64) -> Layer {
        let dev = Device::Cpu;
        let mut vars = Vec::new();
        let mut var = |shape: &[usize], scale: f32, offset: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = values(n, seed + vars.len() as u64, scale)
                .into_iter()
                .map(|x| x + offset)
                .collect();
            let t = Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap();
            vars.push(t.clone());
            t.as_tensor().clone()
        };
        let mut lin = Vec::new();
        for (n, k) in [(h, h), (h, h), (h, h), (h, h), (f, h), (h, f)] {
            let w = var(&[n, k], 2.0 / (k as f32).sqrt(), 0.0);
            let b = var(&[n], 0.2, 0.0);
            lin.push(Linear::new(w, Some(b)));
        }
        let mut norms = Vec::new();
        for _ in 0..2 {
            let w = var(&[h], 0.4, 1.0);
            let b = var(&[h], 0.2, 0.0);
            norms.push(LayerNorm {
                weight: w,
                bias: Some(b),
                eps: 1e-12,
            });
        }
        Layer { vars, lin, norms }
    }

    fn params(l: &Layer) -> BertLayerParams<'_> {
        BertLayerParams {
            qkv: QkvParams::Separate {
                query: &l.lin[0],
                key: &l.lin[1],
                value: &l.lin[2],
            },
            attn_out: &l.lin[3],
            attn_norm: &l.norms[0],
            inter: &l.lin[4],
            out: &l.lin[5],
            out_norm: &l.norms[1],
            rotary: None,
        }
    }

    /// The layer written with the elementary training ops (as `Bert::forward` runs it without the fused
    /// op), dropout off.
    fn reference(l: &Layer, x: &Tensor, bias: &Tensor, heads: usize) -> Tensor {
        let (b, n, h) = x.dims3().unwrap();
        let m = Mode::Train;
        let cache = std::sync::OnceLock::new();
        let (q, k, v) = qkv_heads([&l.lin[0], &l.lin[1], &l.lin[2]], &cache, x, heads, m).unwrap();
        let scale = 1.0 / ((h / heads) as f64).sqrt();
        let bias4 = bias.reshape((b, 1, 1, n)).unwrap();
        let ctx = attention_dropout(&q, &k, &v, scale, &bias4, m, 0.0).unwrap();
        let ctx = ctx.transpose(1, 2).unwrap().reshape((b, n, h)).unwrap();
        let attn = l.lin[3].run(&ctx, m).unwrap();
        let a = l.norms[0].forward(&(attn + x).unwrap(), m).unwrap();
        let i = hidden_act("gelu", &l.lin[4].run(&a, m).unwrap(), m).unwrap();
        let o = l.lin[5].run(&i, m).unwrap();
        l.norms[1].forward(&(o + a).unwrap(), m).unwrap()
    }

    fn inputs(b: usize, n: usize, h: usize, lens: &[usize]) -> (Var, Tensor, Tensor) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::from_vec(values(b * n * h, 99, 2.0), (b, n, h), &dev).unwrap(),
        )
        .unwrap();
        let mut bias = vec![0f32; b * n];
        for (s, &len) in lens.iter().enumerate() {
            for j in len..n {
                bias[s * n + j] = -f32::MAX;
            }
        }
        let bias = Tensor::from_vec(bias, (b, n), &dev).unwrap();
        let r = Tensor::from_vec(values(b * n * h, 5, 2.0), (b, n, h), &dev).unwrap();
        (x, bias, r)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let m = b.iter().map(|v| v.abs()).fold(0f32, f32::max);
        (d, m)
    }

    /// Every kernel set this CPU runs.
    fn kernels() -> Vec<Kernels> {
        let mut k = vec![Kernels::Portable];
        #[cfg(target_arch = "x86_64")]
        if crate::avx512::available() {
            k.push(Kernels::Avx512);
        }
        k
    }

    const NO_DROPOUT: LayerDropout = LayerDropout {
        attention: 0.0,
        hidden: 0.0,
    };

    fn check_against_reference(
        b: usize,
        n: usize,
        h: usize,
        heads: usize,
        f: usize,
        lens: &[usize],
    ) {
        let l = layer(h, f, 11);
        let (x, bias, r) = inputs(b, n, h, lens);
        let want = reference(&l, x.as_tensor(), &bias, heads);
        let g_want = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for kern in kernels() {
            let fused = bert_layer_on(
                kern,
                x.as_tensor(),
                &bias,
                &params(&l),
                heads,
                "gelu",
                NO_DROPOUT,
            )
            .unwrap()
            .expect("the fused op applies");
            let (d, m) = max_diff(&fused, &want);
            assert!(
                d <= 1e-4 * m.max(1.0),
                "{kern:?}: output differs by {d} (max {m})"
            );
            let g_fused = (&fused * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut all = vec![x.clone()];
            all.extend(l.vars.iter().cloned());
            for (i, v) in all.iter().enumerate() {
                let gf = g_fused.get(v.as_tensor()).expect("fused gradient");
                let gw = g_want.get(v.as_tensor()).expect("reference gradient");
                let (d, m) = max_diff(gf, gw);
                assert!(
                    d <= 2e-4 * m.max(1.0),
                    "{kern:?}: gradient of tensor {i} {:?} differs by {d} (max {m})",
                    v.dims()
                );
            }
        }
    }

    #[test]
    fn matches_the_elementary_ops_on_a_tiny_layer() {
        // d = 4 (a part of one panel), a padded sequence, rows not a multiple of the tile.
        check_against_reference(2, 5, 8, 2, 12, &[5, 3]);
    }

    #[test]
    fn matches_the_elementary_ops_across_panels_and_depth_blocks() {
        // d = 40 (two panels), f = 72, 3 × 100 tokens: the weight-gradient products run over more than
        // one depth block (KC = 256).
        check_against_reference(3, 100, 80, 2, 72, &[100, 37, 1]);
    }

    #[test]
    fn dropout_is_deterministic_and_differentiated_through() {
        for kern in kernels() {
            dropout_case(kern);
        }
    }

    fn dropout_case(kern: Kernels) {
        let (h, heads, f) = (16, 2, 24);
        let l = layer(h, f, 3);
        let (x, bias, r) = inputs(2, 6, h, &[6, 4]);
        let drop = LayerDropout {
            attention: 0.2,
            hidden: 0.3,
        };
        let loss = |seed: u64| -> Tensor {
            with_dropout(Some(seed), || {
                let y = bert_layer_on(kern, x.as_tensor(), &bias, &params(&l), heads, "gelu", drop)
                    .unwrap()
                    .unwrap();
                (y * &r).unwrap().sum_all().unwrap()
            })
        };
        let value = |t: &Tensor| t.to_scalar::<f32>().unwrap();
        let l7 = loss(7);
        assert_eq!(value(&l7), value(&loss(7)), "same seed, same masks");
        assert_ne!(value(&l7), value(&loss(8)), "another seed, other masks");
        let no_drop = bert_layer_on(kern, x.as_tensor(), &bias, &params(&l), heads, "gelu", drop)
            .unwrap()
            .unwrap();
        let plain = value(&(no_drop * &r).unwrap().sum_all().unwrap());
        assert_ne!(
            plain,
            value(&l7),
            "dropout changes the output inside with_dropout"
        );
        // Directional derivative along a random direction of every parameter, against a central
        // difference with the same masks.
        let grads = l7.backward().unwrap();
        let mut all = vec![x.clone()];
        all.extend(l.vars.iter().cloned());
        let dirs: Vec<Tensor> = all
            .iter()
            .enumerate()
            .map(|(i, v)| {
                Tensor::from_vec(
                    values(v.elem_count(), 1000 + i as u64, 2.0),
                    v.shape(),
                    &Device::Cpu,
                )
                .unwrap()
            })
            .collect();
        let mut analytic = 0f64;
        for (v, dir) in all.iter().zip(&dirs) {
            let g = grads
                .get(v.as_tensor())
                .expect("every tensor gets a gradient");
            analytic += (g * dir)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
        }
        let base: Vec<Tensor> = all.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
        let eps = 1e-3;
        let at = |sign: f64| -> f64 {
            for ((v, b), dir) in all.iter().zip(&base).zip(&dirs) {
                v.set(&(b + (dir * (sign * eps)).unwrap()).unwrap())
                    .unwrap();
            }
            value(&loss(7)) as f64
        };
        let numeric = (at(1.0) - at(-1.0)) / (2.0 * eps);
        let rel = (numeric - analytic).abs() / analytic.abs().max(1.0);
        assert!(
            rel < 1e-2,
            "directional derivative {analytic} vs central difference {numeric}"
        );
    }

    fn modernbert_case(biases: bool, dropout: f64) {
        use crate::backbone::modernbert::{ModernBert, ModernBertConfig};
        let config: ModernBertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
            "intermediate_size": 24, "local_attention": 4, "global_attn_every_n_layers": 3,
            "norm_bias": biases, "attention_bias": biases, "mlp_bias": biases,
            "attention_dropout": dropout, "mlp_dropout": dropout, "norm_eps": 1e-5
        }))
        .unwrap();
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model = ModernBert::load(vb, &config).unwrap();
        let mut names: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, v)) in names.iter().enumerate() {
            let (scale, offset) = if name.contains("norm") && name.ends_with("weight") {
                (0.4, 1.0)
            } else {
                (1.0, 0.0)
            };
            let vals: Vec<f32> = values(v.elem_count(), 500 + i as u64, scale)
                .into_iter()
                .map(|x| x + offset)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &dev).unwrap())
                .unwrap();
        }
        let (b, l) = (2, 12);
        let ids: Vec<u32> = (0..b * l).map(|i| ((i * 7 + 3) % 50) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, l), &dev).unwrap();
        // The second sequence has three tokens: its queries past position 4 see no key in their window.
        let mask: Vec<u32> = (0..b * l).map(|i| u32::from(i < l || i % l < 3)).collect();
        let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
        let r = Tensor::from_vec(values(b * l * 16, 77, 2.0), (b, l, 16), &dev).unwrap();
        let run = |fused: bool| {
            with_fused_layers(fused, || {
                with_dropout((dropout > 0.0).then_some(5), || {
                    let y = model.forward(&ids, &mask, Mode::Train).unwrap();
                    let loss = (&y * &r).unwrap().sum_all().unwrap();
                    let g = loss.backward().unwrap();
                    (y, loss, g)
                })
            })
        };
        let (y_f, loss_f, g_f) = run(true);
        if dropout == 0.0 {
            let (y_e, _, g_e) = run(false);
            let (d, m) = max_diff(&y_f, &y_e);
            assert!(
                d <= 1e-4 * m.max(1.0),
                "biases {biases}: output differs by {d} (max {m})"
            );
            for (name, v) in &names {
                let gf = g_f
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no fused gradient for {name}"));
                let ge = g_e.get(v.as_tensor()).expect("reference gradient");
                let (d, m) = max_diff(gf, ge);
                assert!(
                    d <= 2e-4 * m.max(1.0),
                    "biases {biases}: gradient of {name} differs by {d} (max {m})"
                );
            }
            return;
        }
        // With dropout: the same masks on a replay, and the gradient along a random direction against a
        // central difference.
        let (_, loss_again, _) = run(true);
        let value = |t: &Tensor| t.to_scalar::<f32>().unwrap() as f64;
        assert_eq!(value(&loss_f), value(&loss_again));
        let dirs: Vec<Tensor> = names
            .iter()
            .enumerate()
            .map(|(i, (_, v))| {
                Tensor::from_vec(values(v.elem_count(), 900 + i as u64, 1.0), v.shape(), &dev)
                    .unwrap()
            })
            .collect();
        let mut analytic = 0f64;
        for ((name, v), dir) in names.iter().zip(&dirs) {
            let g = g_f
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            analytic += value(&(g * dir).unwrap().sum_all().unwrap());
        }
        let base: Vec<Tensor> = names
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        let eps = 1e-3;
        let at = |sign: f64| -> f64 {
            for (((_, v), b), dir) in names.iter().zip(&base).zip(&dirs) {
                v.set(&(b + (dir * (sign * eps)).unwrap()).unwrap())
                    .unwrap();
            }
            value(&run(true).1)
        };
        let numeric = (at(1.0) - at(-1.0)) / (2.0 * eps);
        let rel = (numeric - analytic).abs() / analytic.abs().max(1.0);
        assert!(
            rel < 1e-2,
            "directional derivative {analytic} vs central difference {numeric}"
        );
    }

    #[test]
    fn modernbert_layers_match_the_elementary_ops() {
        // Layer 0 without an attention norm, global and sliding-window layers, queries without a key in
        // their window; without and with biases; on every kernel set.
        for portable in [false, true] {
            FORCE_PORTABLE.with(|c| c.set(portable));
            modernbert_case(false, 0.0);
            modernbert_case(true, 0.0);
        }
        FORCE_PORTABLE.with(|c| c.set(false));
    }

    #[test]
    fn modernbert_dropout_is_replayed_and_differentiated_through() {
        for portable in [false, true] {
            FORCE_PORTABLE.with(|c| c.set(portable));
            modernbert_case(false, 0.2);
        }
        FORCE_PORTABLE.with(|c| c.set(false));
    }

    #[test]
    fn jina_flash_layers_with_rotary_match_the_elementary_ops() {
        use crate::backbone::xlm_roberta::{XlmRobertaFlash, XlmRobertaFlashConfig};
        let dev = Device::Cpu;
        for portable in [false, true] {
            FORCE_PORTABLE.with(|c| c.set(portable));
            let config: XlmRobertaFlashConfig = serde_json::from_value(serde_json::json!({
                "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 20, "max_position_embeddings": 64
            }))
            .unwrap();
            let varmap = candle_nn::VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let model = XlmRobertaFlash::load(vb, &config).unwrap();
            let mut names: Vec<(String, Var)> = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            names.sort_by(|a, b| a.0.cmp(&b.0));
            for (i, (name, v)) in names.iter().enumerate() {
                let offset = if name.contains("norm") || name.contains("ln") {
                    if name.ends_with("weight") {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    0.0
                };
                let vals: Vec<f32> = values(v.elem_count(), 700 + i as u64, 1.0)
                    .into_iter()
                    .map(|x| x + offset)
                    .collect();
                v.set(&Tensor::from_vec(vals, v.shape(), &dev).unwrap())
                    .unwrap();
            }
            let (b, l) = (2, 9);
            let ids: Vec<u32> = (0..b * l).map(|i| ((i * 5 + 2) % 40) as u32).collect();
            let ids = Tensor::from_vec(ids, (b, l), &dev).unwrap();
            let mask: Vec<u32> = (0..b * l).map(|i| u32::from(i < l || i % l < 4)).collect();
            let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
            let r = Tensor::from_vec(values(b * l * 16, 31, 2.0), (b, l, 16), &dev).unwrap();
            let run = |fused: bool| {
                with_fused_layers(fused, || {
                    let y = model.forward(&ids, &mask, Mode::Train).unwrap();
                    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    (y, g)
                })
            };
            let (y_f, g_f) = run(true);
            let (y_e, g_e) = run(false);
            let (d, m) = max_diff(&y_f, &y_e);
            assert!(d <= 1e-4 * m.max(1.0), "output differs by {d} (max {m})");
            for (name, v) in &names {
                let gf = g_f
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no fused gradient for {name}"));
                let ge = g_e.get(v.as_tensor()).expect("reference gradient");
                let (d, m) = max_diff(gf, ge);
                assert!(
                    d <= 2e-4 * m.max(1.0),
                    "gradient of {name} differs by {d} (max {m})"
                );
            }
        }
        FORCE_PORTABLE.with(|c| c.set(false));
    }
}

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

impl Kernels {
    fn detect() -> Self {
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

fn storage_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: float32 only");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: input must be contiguous");
    };
    Ok(&v[a..b])
}

/// The float32 elements of a contiguous CPU tensor's storage, borrowed.
fn cpu_slice<'a>(
    st: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match st {
        candle_core::Storage::Cpu(cs) => storage_slice(cs, l, what),
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
        let x = storage_slice(s1, l1, self.name())?;
        let flat = storage_slice(s2, l2, self.name())?;
        let bias = storage_slice(s3, l3, self.name())?;
        let dims = self.dims;
        let Dims { b, l, h, heads, f } = dims;
        let t = dims.tokens();
        if x.len() != t * h || bias.len() != b * l || flat.len() != dims.offsets().1 {
            candle_core::bail!(
                "{}: inputs {:?}, {:?}, {:?} do not fit the layer {dims:?}",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let w = Weights::new(flat, &dims);
        let qkv = linear_fwd(self.kern, x, t, w.wqkv, w.bqkv, 3 * h, h);
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
        _bias: &Tensor,
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

/// The parameters of one BERT layer, in the order [`bert_layer`] flattens them.
pub struct BertLayerParams<'a> {
    /// Self-attention projections.
    pub query: &'a Linear,
    /// Key projection.
    pub key: &'a Linear,
    /// Value projection.
    pub value: &'a Linear,
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
        if !(x.device().is_cpu() && x.dtype() == DType::F32)
            || key_bias.dtype() != DType::F32
            || !matches!(act, "gelu" | "gelu_python")
        {
            return Ok(None);
        }
        let linears = [p.query, p.key, p.value, p.attn_out, p.inter, p.out];
        if linears
            .iter()
            .any(|l| l.bias.is_none() || l.weight.dtype() != DType::F32)
            || p.attn_norm.bias.is_none()
            || p.out_norm.bias.is_none()
        {
            return Ok(None);
        }
        let (b, l, h) = x.dims3()?;
        let f = p.inter.out_dim();
        if !h.is_multiple_of(heads)
            || [p.query, p.key, p.value, p.attn_out]
                .iter()
                .any(|w| w.weight.dims() != [h, h])
            || p.inter.weight.dims() != [f, h]
            || p.out.weight.dims() != [h, f]
            || key_bias.dims() != [b, l]
        {
            return Ok(None);
        }
        let d = h / heads;
        let bias = |l: &Linear| l.bias.clone().expect("checked above");
        let nb = |n: &LayerNorm| n.bias.clone().expect("checked above");
        let parts = [
            p.query.weight.flatten_all()?,
            p.key.weight.flatten_all()?,
            p.value.weight.flatten_all()?,
            bias(p.query),
            bias(p.key),
            bias(p.value),
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
        ];
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
            drop_attn,
            drop_out,
            saved: Mutex::new(None),
        };
        let y = x
            .contiguous()?
            .apply_op3(&flat, &key_bias.detach().contiguous()?, op)?;
        Ok(Some(y))
    }
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
            query: &l.lin[0],
            key: &l.lin[1],
            value: &l.lin[2],
            attn_out: &l.lin[3],
            attn_norm: &l.norms[0],
            inter: &l.lin[4],
            out: &l.lin[5],
            out_norm: &l.norms[1],
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
}

//! Scaled dot-product attention per (sequence, head), forward and backward.
//!
//! [`forward_at`] is the one attention forward of the models (inference, and training through
//! [`forward_packed_at`]): `softmax(q kᵀ · scale + bias) v` with q, k, v read through strides, an additive
//! bias broadcast by strides (plus an optional sliding window), optional dropout on the probabilities, and
//! the output written straight into `[b, lq, h, dv]`. On AVX-512 both products run through the register
//! tile of [`crate::gemm`] (k and v packed into panels per (sequence, head)); below, through the `gemm`
//! crate with operands read through strides. [`backward_packed_at`] is its backward pass for a training
//! layer's packed `[tokens, 3h]` q/k/v.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::gemm::x86::Tile;
use crate::gemm::{strided_mm, OutPtr};
use crate::math::usable;
use crate::Level;

/// A `[b, h, l, d]` operand: `data[b·s[0] + h·s[1] + i·s[2] + j]`, the last dimension contiguous.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    /// The elements, from the tensor's start offset.
    pub data: &'a [f32],
    /// Strides of the batch, head and position dimensions.
    pub s: [usize; 3],
}

impl<'a> Strided<'a> {
    /// The elements from row `i` of (sequence `b`, head `h`) on.
    fn from(self, b: usize, h: usize) -> &'a [f32] {
        &self.data[b * self.s[0] + h * self.s[1]..]
    }

    /// The last element a `[b, h, l, len]` view reaches, plus one.
    fn reach(self, d: AttnDims, l: usize, len: usize) -> usize {
        (d.b - 1) * self.s[0] + (d.h - 1) * self.s[1] + (l - 1) * self.s[2] + len
    }
}

/// Sizes of an attention call.
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

/// The additive bias of the scores: row `i` of (sequence `b`, head `h`) is the `lk` values at
/// `data[b·s[0] + h·s[1] + i·s[2]..]` (a zero stride broadcasts), plus, with a `window`, `−1e30` on the keys
/// more than `window` positions from the query (ModernBERT's local layers).
#[derive(Clone, Copy, Debug)]
pub struct Bias<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Strides of the batch, head and query dimensions.
    pub s: [usize; 3],
    /// Sliding window half-width.
    pub window: Option<usize>,
}

/// Dropout masks of the attention probabilities: called with the global row index (`(b·h + head)·lq + i`)
/// and the `lk` values to fill with `0` or the keep scale, the same on every call for a row.
pub type DropRows<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

type Buffer = std::cell::RefCell<Vec<f32>>;

thread_local! {
    /// Packed operands of one head (the AVX-512 kernels).
    static SCRATCH: Buffer = const { std::cell::RefCell::new(Vec::new()) };
    /// The `lq × lk` scores of one head when the caller keeps no probabilities (inference), reused from call
    /// to call instead of allocated per head.
    static SCORES: Buffer = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a per-thread buffer of `len` values (contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buffer(&SCRATCH, len, f)
}

/// Runs `f` on the per-thread buffer `key`, at least `len` values long (contents unspecified). The kernels
/// called inside never enter rayon, so a thread never re-enters the buffer it holds.
fn with_buffer<R>(
    key: &'static std::thread::LocalKey<Buffer>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// One (sequence, head) of [`forward_at`], the operands already offset to it.
struct Head<'a> {
    q: &'a [f32],
    qs: usize,
    k: &'a [f32],
    ks: usize,
    v: &'a [f32],
    vs: usize,
    bias: &'a [f32],
    bs: usize,
    window: Option<usize>,
    /// Global row index of this head's first query (for dropout).
    row0: usize,
}

impl Head<'_> {
    /// The bias of query `i` (with the window applied into `tmp` when there is one).
    fn bias_row<'t>(&'t self, i: usize, lk: usize, tmp: &'t mut Vec<f32>) -> &'t [f32] {
        let key = &self.bias[i * self.bs..][..lk];
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
}

/// `out[b, i, h, :] = dropout(softmax_j(q[b,h,i]·k[b,h,j] · scale + bias)) v[b,h,j]`, with `out` laid out
/// `[b, lq, h, dv]` (every element written), at `level`. With `probs` (`[b, h, lq, lk]`) the probabilities
/// before dropout are kept there; `drop` gives the dropout masks (none: no dropout).
///
/// # Panics
/// When an operand is shorter than its shape and strides reach, or `lk` is 0 while there is output.
#[allow(clippy::too_many_arguments)]
pub fn forward_at(
    level: Level,
    q: Strided,
    k: Strided,
    v: Strided,
    dims: AttnDims,
    scale: f32,
    bias: Bias,
    drop: Option<DropRows>,
    probs: Option<&mut [f32]>,
    out: &mut [f32],
) {
    let AttnDims {
        b,
        h,
        lq,
        lk,
        d,
        dv,
    } = dims;
    assert_eq!(out.len(), b * lq * h * dv, "attention: output length");
    if out.is_empty() {
        return;
    }
    assert!(lk > 0, "attention over no keys");
    assert!(
        q.data.len() >= q.reach(dims, lq, d),
        "attention: q too short"
    );
    assert!(
        k.data.len() >= k.reach(dims, lk, d),
        "attention: k too short"
    );
    assert!(
        v.data.len() >= v.reach(dims, lk, dv),
        "attention: v too short"
    );
    let bview = Strided {
        data: bias.data,
        s: bias.s,
    };
    assert!(
        bias.data.len() >= bview.reach(dims, lq, lk),
        "attention: bias too short"
    );
    let lv = usable(level);
    let out_p = OutPtr(out.as_mut_ptr());
    let ldc = h * dv;
    let head = |t: usize, p: &mut [f32]| {
        let (bi, hi) = (t / h, t % h);
        let hd = Head {
            q: q.from(bi, hi),
            qs: q.s[2],
            k: k.from(bi, hi),
            ks: k.s[2],
            v: v.from(bi, hi),
            vs: v.s[2],
            bias: &bias.data[bi * bias.s[0] + hi * bias.s[1]..],
            bs: bias.s[2],
            window: bias.window,
            row0: t * lq,
        };
        // SAFETY: the output rows of (bi, hi) — `lq` rows of `dv` values, `ldc` apart, from
        // `(bi·lq)·ldc + hi·dv` — lie inside `out` (its length is asserted above) and are written by
        // this task only; the operand slices hold the rows their strides reach (asserted above).
        unsafe {
            let o = { out_p }.0.add(bi * lq * ldc + hi * dv);
            run_head(lv, &hd, dims, scale, drop, p, o, ldc);
        }
    };
    match probs {
        Some(pr) => {
            assert_eq!(pr.len(), b * h * lq * lk, "attention: probabilities length");
            pr.par_chunks_mut(lq * lk)
                .enumerate()
                .for_each(|(t, p)| head(t, p));
        }
        None => (0..b * h)
            .into_par_iter()
            .for_each(|t| with_buffer(&SCORES, lq * lk, |p| head(t, p))),
    }
}

/// One (sequence, head) at `lv`: on the register tile where the level has one, else portable.
///
/// # Safety
/// As [`head_forward_portable`].
#[allow(clippy::too_many_arguments)]
unsafe fn run_head(
    lv: Level,
    hd: &Head,
    dims: AttnDims,
    scale: f32,
    drop: Option<DropRows>,
    p: &mut [f32],
    out: *mut f32,
    ldc: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(tile) = Tile::at(lv) {
        // SAFETY: the caller's contract.
        unsafe { x86::head_forward(tile, hd, dims, scale, drop, p, out, ldc) };
        return;
    }
    let _ = lv;
    // SAFETY: the caller's contract.
    unsafe { head_forward_portable(hd, dims, scale, drop, p, out, ldc) };
}

/// Token rows of q, k or v for [`forward_varlen_at`]: head `h`'s `d` values of token `t` start at
/// `data[t·stride + h·d]` (e.g. `stride = 3·heads·d` inside a packed `[tokens, 3h]` q/k/v, offset to the
/// operand).
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    /// The elements, from token 0's first value.
    pub data: &'a [f32],
    /// Distance between consecutive tokens.
    pub stride: usize,
}

/// Attention over sequences laid end to end without padding: sequence `s` is tokens
/// `starts[s]..starts[s + 1]`, whose queries attend to its own keys, every one of them or, with a `window`,
/// those at most `window` positions away (no bias, no dropout). `out[t, h·d..(h + 1)·d]` is head `h` of token `t` (`[tokens, heads·d]`, every element
/// written, `tokens = starts[last]`). The padded equivalent is [`forward_at`] with a bias that masks the
/// padding keys; here padding costs nothing.
///
/// # Panics
/// When `starts` is empty or decreases, or an operand or `out` is shorter than the tokens need.
#[allow(clippy::too_many_arguments)]
pub fn forward_varlen_at(
    level: Level,
    q: Rows,
    k: Rows,
    v: Rows,
    starts: &[usize],
    heads: usize,
    d: usize,
    scale: f32,
    window: Option<usize>,
    out: &mut [f32],
) {
    let tokens = varlen_tokens(starts);
    let ldc = heads * d;
    assert_eq!(out.len(), tokens * ldc, "attention: output length");
    if out.is_empty() {
        return;
    }
    for (x, name) in [(q, "q"), (k, "k"), (v, "v")] {
        assert!(
            x.stride >= ldc && x.data.len() >= (tokens - 1) * x.stride + ldc,
            "attention: {name} too short for {tokens} tokens of {heads} heads of {d}"
        );
    }
    let longest = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let zeros = vec![0f32; longest];
    let lv = usable(level);
    let out_p = OutPtr(out.as_mut_ptr());
    (0..(starts.len() - 1) * heads)
        .into_par_iter()
        .for_each(|t| {
            let (s, hi) = (t / heads, t % heads);
            let (a, n) = (starts[s], starts[s + 1] - starts[s]);
            if n == 0 {
                return;
            }
            let hd = Head {
                q: &q.data[a * q.stride + hi * d..],
                qs: q.stride,
                k: &k.data[a * k.stride + hi * d..],
                ks: k.stride,
                v: &v.data[a * v.stride + hi * d..],
                vs: v.stride,
                bias: &zeros,
                bs: 0,
                window,
                row0: 0,
            };
            let dims = AttnDims {
                b: 1,
                h: heads,
                lq: n,
                lk: n,
                d,
                dv: d,
            };
            with_buffer(&SCORES, n * n, |p| {
                // SAFETY: the output rows of (s, hi) — `n` rows of `d` values, `ldc` apart, from
                // `a·ldc + hi·d` — lie inside `out` (its length is asserted above) and are written by this
                // task only; the operand slices hold the `n` rows their strides reach (asserted above).
                unsafe {
                    let o = { out_p }.0.add(a * ldc + hi * d);
                    run_head(lv, &hd, dims, scale, None, p, o, ldc);
                }
            });
        });
}

/// [`forward_varlen_at`] at the process's level.
#[allow(clippy::too_many_arguments)]
pub fn forward_varlen(
    q: Rows,
    k: Rows,
    v: Rows,
    starts: &[usize],
    heads: usize,
    d: usize,
    scale: f32,
    window: Option<usize>,
    out: &mut [f32],
) {
    forward_varlen_at(
        crate::level(),
        q,
        k,
        v,
        starts,
        heads,
        d,
        scale,
        window,
        out,
    )
}

/// [`forward_at`] at the process's level.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: Strided,
    k: Strided,
    v: Strided,
    dims: AttnDims,
    scale: f32,
    bias: Bias,
    drop: Option<DropRows>,
    probs: Option<&mut [f32]>,
    out: &mut [f32],
) {
    forward_at(crate::level(), q, k, v, dims, scale, bias, drop, probs, out)
}

/// `p` → `p ⊙ mask` for every row, into `pd` (both `lq × lk`).
fn dropped(drop: DropRows, row0: usize, lk: usize, p: &[f32], pd: &mut [f32]) {
    for (i, (drow, prow)) in pd.chunks_mut(lk).zip(p.chunks(lk)).enumerate() {
        drop(row0 + i, drow);
        drow.iter_mut().zip(prow).for_each(|(m, p)| *m *= p);
    }
}

/// One head on the `gemm` crate and the portable softmax.
///
/// # Safety
/// `out` must be valid for `lq` rows of `dv` values `ldc` apart, and no other thread may access them
/// meanwhile; the slices of `hd` must hold the rows their strides reach.
unsafe fn head_forward_portable(
    hd: &Head,
    dims: AttnDims,
    scale: f32,
    drop: Option<DropRows>,
    p: &mut [f32],
    out: *mut f32,
    ldc: usize,
) {
    let AttnDims { lq, lk, d, dv, .. } = dims;
    // SAFETY: q rows (stride qs) and k rows (stride ks, read as kᵀ) of this head lie inside the slices
    // (bounds asserted by `forward_at`), and `p` is lq × lk.
    unsafe {
        strided_mm(
            lq,
            lk,
            d,
            (hd.q.as_ptr(), hd.qs, 1),
            (hd.k.as_ptr(), 1, hd.ks),
            (p.as_mut_ptr(), lk),
            false,
            false,
        );
    }
    let mut tmp = Vec::new();
    for (i, row) in p.chunks_mut(lk).enumerate() {
        let brow = hd.bias_row(i, lk, &mut tmp);
        crate::math::softmax_row_at(Level::Portable, row, scale, Some(brow));
    }
    let mut pd = Vec::new();
    let src: &[f32] = match drop {
        Some(dr) => {
            pd.resize(lq * lk, 0.0);
            dropped(dr, hd.row0, lk, p, &mut pd);
            &pd
        }
        None => p,
    };
    // SAFETY: the probability rows are lq × lk, v rows (stride vs) lie inside `v`, and `out` is valid
    // for lq rows of dv values ldc apart, written by this task only (the caller's contract).
    unsafe {
        strided_mm(
            lq,
            dv,
            lk,
            (src.as_ptr(), lk, 1),
            (hd.v.as_ptr(), hd.vs, 1),
            (out, ldc),
            false,
            false,
        );
    }
}

/// Sizes of a training layer's attention over packed `[b·l, 3h]` q/k/v rows.
#[derive(Clone, Copy, Debug)]
pub struct PackedDims {
    /// Sequences.
    pub b: usize,
    /// Positions per sequence.
    pub l: usize,
    /// Hidden width (all heads).
    pub h: usize,
    /// Heads.
    pub heads: usize,
}

impl PackedDims {
    fn attn(&self) -> AttnDims {
        let d = self.h / self.heads;
        AttnDims {
            b: self.b,
            h: self.heads,
            lq: self.l,
            lk: self.l,
            d,
            dv: d,
        }
    }
}

/// [`forward_at`] over a training layer's packed q/k/v (`[b·l, 3h]`, q then k then v, heads contiguous in
/// each), with a key bias `[b, l]` and an optional window: the probabilities (`[b, heads, l, l]`, before
/// dropout) into `probs`, the heads' outputs into `ctx` (`[b·l, h]`).
#[allow(clippy::too_many_arguments)]
pub fn forward_packed_at(
    level: Level,
    dims: PackedDims,
    scale: f32,
    window: Option<usize>,
    drop: Option<DropRows>,
    qkv: &[f32],
    key_bias: &[f32],
    probs: &mut [f32],
    ctx: &mut [f32],
) {
    let PackedDims { b, l, h, .. } = dims;
    let ad = dims.attn();
    let h3 = 3 * h;
    assert!(
        qkv.len() >= b * l * h3 && key_bias.len() >= b * l && ctx.len() >= b * l * h,
        "attention: packed operands too short"
    );
    let view = |off: usize| Strided {
        data: &qkv[off..],
        s: [l * h3, ad.d, h3],
    };
    let bias = Bias {
        data: key_bias,
        s: [l, 0, 0],
        window,
    };
    forward_at(
        level,
        view(0),
        view(h),
        view(2 * h),
        ad,
        scale,
        bias,
        drop,
        Some(probs),
        &mut ctx[..b * l * h],
    );
}

/// The backward pass of [`forward_packed_at`]: `dqkv` (`[b·l, 3h]`, every element written) from `dctx`
/// (`[b·l, h]`), the saved `probs` and the same dropout masks.
#[allow(clippy::too_many_arguments)]
pub fn backward_packed_at(
    level: Level,
    dims: PackedDims,
    scale: f32,
    drop: Option<DropRows>,
    qkv: &[f32],
    probs: &[f32],
    dctx: &[f32],
    dqkv: &mut [f32],
) {
    let PackedDims { b, l, h, heads } = dims;
    let t_all = b * l;
    let h3 = 3 * h;
    assert!(
        qkv.len() >= t_all * h3
            && dctx.len() >= t_all * h
            && dqkv.len() >= t_all * h3
            && probs.len() >= b * heads * l * l,
        "attention backward: operands too short"
    );
    let lv = usable(level);
    let out = OutPtr(dqkv.as_mut_ptr());
    (0..b * heads).into_par_iter().for_each(|t| {
        let _ = &out;
        #[cfg(target_arch = "x86_64")]
        if let Some(tile) = Tile::at(lv) {
            // SAFETY: `out` is `dqkv` (its length asserted above); task `t` writes only the rows of its
            // (sequence, head).
            unsafe { x86::head_backward(tile, dims, scale, drop, qkv, probs, dctx, out, t) };
            return;
        }
        // SAFETY: as above.
        unsafe { head_backward_portable(dims, scale, drop, qkv, probs, dctx, out, t) };
    });
}

/// Length of the probabilities of [`forward_varlen_train_at`]: `heads · n²` per sequence of `n` tokens.
pub fn varlen_probs_len(starts: &[usize], heads: usize) -> usize {
    starts
        .windows(2)
        .map(|w| heads * (w[1] - w[0]).pow(2))
        .sum()
}

/// Checks `starts` (from 0, never decreasing) and returns the token count.
fn varlen_tokens(starts: &[usize]) -> usize {
    assert!(
        starts.first() == Some(&0) && starts.windows(2).all(|w| w[0] <= w[1]),
        "attention: sequence starts must begin at 0 and never decrease"
    );
    *starts.last().expect("checked above")
}

/// The dropout masks of one sequence of a varlen call: its rows are numbered after the rows of the sequences
/// before it (`heads · starts[s]` of them), so no two rows of a call share a mask.
fn shifted(
    drop: Option<DropRows<'_>>,
    first: usize,
) -> Option<impl Fn(usize, &mut [f32]) + Sync + '_> {
    drop.map(move |d| move |row: usize, out: &mut [f32]| d(first + row, out))
}

/// [`forward_packed_at`] over sequences laid end to end without padding (sequence `s` is tokens
/// `starts[s]..starts[s + 1]` of the packed `[tokens, 3h]` q/k/v; each attends to all of its own keys):
/// the probabilities before dropout into `probs` (`[heads, n, n]` per sequence, sequences in order:
/// [`varlen_probs_len`] values), the heads' outputs into `ctx` (`[tokens, h]`). Dropout row `i` of head
/// `hd` of sequence `s` is row `heads · starts[s] + hd · n + i` of `drop`.
#[allow(clippy::too_many_arguments)]
pub fn forward_varlen_train_at(
    level: Level,
    starts: &[usize],
    h: usize,
    heads: usize,
    scale: f32,
    drop: Option<DropRows>,
    qkv: &[f32],
    probs: &mut [f32],
    ctx: &mut [f32],
) {
    let tokens = varlen_tokens(starts);
    assert!(
        qkv.len() >= tokens * 3 * h
            && ctx.len() >= tokens * h
            && probs.len() >= varlen_probs_len(starts, heads),
        "attention: varlen operands too short"
    );
    let longest = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let zeros = vec![0f32; longest];
    each_sequence(starts, h, heads, drop, |a, n, po, dims, d| {
        forward_packed_at(
            level,
            dims,
            scale,
            None,
            d,
            &qkv[a * 3 * h..(a + n) * 3 * h],
            &zeros[..n],
            &mut probs[po..po + heads * n * n],
            &mut ctx[a * h..(a + n) * h],
        );
    });
}

/// Runs `f(a, n, po, dims, drop)` for each non-empty sequence of a varlen call: its first token `a`, its
/// length `n`, the offset `po` of its probabilities, its one-sequence sizes, and its dropout masks renumbered
/// after the rows of the sequences before it.
fn each_sequence(
    starts: &[usize],
    h: usize,
    heads: usize,
    drop: Option<DropRows>,
    mut f: impl FnMut(usize, usize, usize, PackedDims, Option<DropRows<'_>>),
) {
    let mut po = 0;
    for w in starts.windows(2) {
        let (a, n) = (w[0], w[1] - w[0]);
        if n == 0 {
            continue;
        }
        let d = shifted(drop, heads * a);
        let d_ref = d.as_ref().map(|f| f as &(dyn Fn(usize, &mut [f32]) + Sync));
        let dims = PackedDims {
            b: 1,
            l: n,
            h,
            heads,
        };
        f(a, n, po, dims, d_ref);
        po += heads * n * n;
    }
}

/// The backward pass of [`forward_varlen_train_at`]: `dqkv` (`[tokens, 3h]`, every element written) from
/// `dctx` (`[tokens, h]`), the saved `probs` and the same dropout masks.
#[allow(clippy::too_many_arguments)]
pub fn backward_varlen_at(
    level: Level,
    starts: &[usize],
    h: usize,
    heads: usize,
    scale: f32,
    drop: Option<DropRows>,
    qkv: &[f32],
    probs: &[f32],
    dctx: &[f32],
    dqkv: &mut [f32],
) {
    let tokens = varlen_tokens(starts);
    assert!(
        qkv.len() >= tokens * 3 * h
            && dctx.len() >= tokens * h
            && dqkv.len() >= tokens * 3 * h
            && probs.len() >= varlen_probs_len(starts, heads),
        "attention backward: varlen operands too short"
    );
    each_sequence(starts, h, heads, drop, |a, n, po, dims, d| {
        backward_packed_at(
            level,
            dims,
            scale,
            d,
            &qkv[a * 3 * h..(a + n) * 3 * h],
            &probs[po..po + heads * n * n],
            &dctx[a * h..(a + n) * h],
            &mut dqkv[a * 3 * h..(a + n) * 3 * h],
        );
    });
}

/// `dS = scale · P ⊙ (dP − Σ dP ⊙ P)` in place over `ds` (holding `dPd`), with `dP = dPd ⊙ mask`.
fn softmax_grad_rows(ds: &mut [f32], p: &[f32], mask: Option<&[f32]>, l: usize, scale: f32) {
    for i in 0..l {
        let row = &mut ds[i * l..][..l];
        let prow = &p[i * l..][..l];
        if let Some(mask) = mask {
            row.iter_mut()
                .zip(&mask[i * l..][..l])
                .for_each(|(g, m)| *g *= m);
        }
        let dot: f32 = row.iter().zip(prow).map(|(g, p)| g * p).sum();
        row.iter_mut()
            .zip(prow)
            .for_each(|(g, p)| *g = scale * p * (*g - dot));
    }
}

/// One head (`t` = sequence · heads + head) of [`backward_packed_at`] on the `gemm` crate.
///
/// # Safety
/// `out` must point to a `dqkv` of at least `b·l·3h` values whose rows of head `t` no other thread
/// accesses meanwhile; the other slices as [`backward_packed_at`] asserts.
#[allow(clippy::too_many_arguments)]
unsafe fn head_backward_portable(
    dims: PackedDims,
    scale: f32,
    drop: Option<DropRows>,
    qkv: &[f32],
    probs: &[f32],
    dctx: &[f32],
    out: OutPtr,
    t: usize,
) {
    let PackedDims { l, h, heads, .. } = dims;
    let d = h / heads;
    let h3 = 3 * h;
    let (bi, hi) = (t / heads, t % heads);
    let base = bi * l * h3 + hi * d;
    let (q, k, v) = (&qkv[base..], &qkv[base + h..], &qkv[base + 2 * h..]);
    let dc = &dctx[bi * l * h + hi * d..];
    let p = &probs[t * l * l..][..l * l];
    let mut mask = Vec::new();
    let mut pd = p.to_vec();
    if let Some(dr) = drop {
        mask.resize(l * l, 0.0);
        for (i, m) in mask.chunks_mut(l).enumerate() {
            dr(t * l + i, m);
        }
        pd.iter_mut().zip(&mask).for_each(|(p, m)| *p *= m);
    }
    let mut ds = vec![0f32; l * l];
    let o = out.0;
    // SAFETY (all four products): the operands are rows of this sequence inside qkv, dctx and the l × l
    // buffers (lengths asserted by the caller), read through the strides given; the dqkv rows of this
    // (sequence, head) lie inside dqkv and are written by this task only.
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
    softmax_grad_rows(&mut ds, p, drop.map(|_| &mask[..]), l, scale);
    // SAFETY: as above.
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
}

/// The heads on the register tiles (AVX-512 or AVX2 + FMA). The functions check the tile's instructions.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{dropped, softmax_grad_rows, with_scratch, AttnDims, DropRows, Head, PackedDims};
    use crate::gemm::x86::{gemm_tiles, Tile};
    use crate::gemm::{OutPtr, NR};
    use crate::math::x86::softmax_row_unchecked;

    /// In place: `row ← softmax(row · scale + bias)` with the tile's instructions.
    ///
    /// # Safety
    /// The CPU has the tile's instructions.
    unsafe fn softmax_row(tile: Tile, row: &mut [f32], scale: f32, bias: &[f32]) {
        match tile {
            // SAFETY: AVX-512F is present (the caller's contract); the bias row holds the row's length.
            Tile::Avx512 => unsafe { softmax_row_unchecked(row, scale, Some(bias)) },
            // SAFETY: AVX2 and FMA are present (the caller's contract).
            Tile::Avx2 => unsafe { crate::math::softmax_row_avx2(row, scale, Some(bias)) },
        }
    }

    /// Transposes an `r × c` block (row stride `lds`) into `dst` (`c × r`, row stride `r`).
    fn transpose_block(src: &[f32], lds: usize, r: usize, c: usize, dst: &mut [f32]) {
        for i in 0..r {
            let row = &src[i * lds..][..c];
            for (j, &v) in row.iter().enumerate() {
                dst[j * r + i] = v;
            }
        }
    }

    /// Packs `B[kk, j] = src_j[kk]` for `n` rows `src_j` (row stride `lds`) of `k` values: `Bᵀ` given as
    /// rows.
    fn pack_rows_into(src: &[f32], lds: usize, n: usize, k: usize, dst: &mut [f32]) {
        dst.fill(0.0);
        for j in 0..n {
            let base = (j / NR) * k * NR + j % NR;
            for (kk, &v) in src[j * lds..][..k].iter().enumerate() {
                dst[base + kk * NR] = v;
            }
        }
    }

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

    /// One head of [`super::forward_at`] on the register tile.
    ///
    /// # Safety
    /// As [`super::head_forward_portable`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn head_forward(
        tile: Tile,
        hd: &Head,
        dims: AttnDims,
        scale: f32,
        drop: Option<DropRows>,
        p: &mut [f32],
        out: *mut f32,
        ldc: usize,
    ) {
        tile.check();
        let AttnDims { lq, lk, d, dv, .. } = dims;
        let kp_len = lk.div_ceil(NR) * d * NR;
        let vp_len = dv.div_ceil(NR) * lk * NR;
        let pd_len = if drop.is_some() { lq * lk } else { 0 };
        with_scratch(kp_len + vp_len + pd_len, |buf| {
            let (kp, rest) = buf.split_at_mut(kp_len);
            let (vp, pd) = rest.split_at_mut(vp_len);
            pack_rows_into(hd.k, hd.ks, lk, d, kp);
            pack_cols_into(hd.v, hd.vs, lk, dv, vp);
            let qrow = |i: usize| hd.q[i * hd.qs..].as_ptr();
            // SAFETY: the tile's instructions are present (checked above); q rows hold d values (bounds asserted by
            // `forward_at`), kp holds ceil(lk / NR) panels of d × NR, and `p` is lq × lk.
            unsafe {
                gemm_tiles(
                    tile,
                    lq,
                    lk,
                    d,
                    &qrow,
                    kp.as_ptr(),
                    d * NR,
                    p.as_mut_ptr(),
                    lk,
                    false,
                );
            }
            let mut tmp = Vec::new();
            for (i, row) in p.chunks_mut(lk).enumerate() {
                let brow = hd.bias_row(i, lk, &mut tmp);
                // SAFETY: the tile's instructions are present (checked above).
                unsafe { softmax_row(tile, row, scale, brow) };
            }
            let src: &[f32] = match drop {
                Some(dr) => {
                    dropped(dr, hd.row0, lk, p, pd);
                    pd
                }
                None => p,
            };
            let prow = |i: usize| src[i * lk..].as_ptr();
            // SAFETY: the tile's instructions are present; the probability rows hold lk values, vp holds ceil(dv / NR)
            // panels of lk × NR, and `out` is valid for lq rows of dv values ldc apart, written by this
            // task only (the caller's contract).
            unsafe {
                gemm_tiles(
                    tile,
                    lq,
                    dv,
                    lk,
                    &prow,
                    vp.as_ptr(),
                    lk * NR,
                    out,
                    ldc,
                    false,
                );
            }
        });
    }

    /// One head (`t` = sequence · heads + head) of [`super::backward_packed_at`] on the register tile.
    ///
    /// # Safety
    /// As [`super::head_backward_portable`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn head_backward(
        tile: Tile,
        dims: PackedDims,
        scale: f32,
        drop: Option<DropRows>,
        qkv: &[f32],
        probs: &[f32],
        dctx: &[f32],
        out: OutPtr,
        t: usize,
    ) {
        tile.check();
        let PackedDims { l, h, heads, .. } = dims;
        let d = h / heads;
        let h3 = 3 * h;
        let kp_len = l.div_ceil(NR) * d * NR;
        let dp_len = d.div_ceil(NR) * l * NR;
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
            if let Some(dr) = drop {
                for (i, m) in mask.chunks_mut(l).enumerate() {
                    dr(t * l + i, m);
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
            // SAFETY (this and the products below): the tile's instructions are present (checked above); every row
            // pointer is readable for the depth given, every packed panel holds depth × NR values, and
            // every output block lies inside its buffer (the dqkv rows of this (sequence, head), written
            // by this task only).
            unsafe {
                gemm_tiles(
                    tile,
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
            softmax_grad_rows(ds, p, drop.map(|_| &mask[..]), l, scale);
            let o = out.0;
            // dQ = dS · K.
            pack_cols_into(k, h3, l, d, bp_d);
            let dsrow = |i: usize| ds[i * l..].as_ptr();
            // SAFETY: as above.
            unsafe {
                gemm_tiles(
                    tile,
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
            // SAFETY: as above.
            unsafe {
                gemm_tiles(
                    tile,
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
            // SAFETY: as above.
            unsafe {
                gemm_tiles(
                    tile,
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{close, values};

    /// The mask of a row: keep scale 2 on a fixed pattern.
    fn mask(row: usize, out: &mut [f32]) {
        for (j, m) in out.iter_mut().enumerate() {
            *m = if (row * 7 + j * 3).is_multiple_of(5) {
                0.0
            } else {
                1.25
            };
        }
    }

    /// Packed-layout attention in f64: (probs, ctx).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        dims: PackedDims,
        scale: f32,
        window: Option<usize>,
        drop: bool,
        qkv: &[f32],
        bias: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let PackedDims { b, l, h, heads } = dims;
        let d = h / heads;
        let h3 = 3 * h;
        let mut probs = vec![0f32; b * heads * l * l];
        let mut ctx = vec![0f32; b * l * h];
        for bi in 0..b {
            for hi in 0..heads {
                let t = bi * heads + hi;
                for i in 0..l {
                    let mut s: Vec<f64> = (0..l)
                        .map(|j| {
                            let mut acc = 0f64;
                            for c in 0..d {
                                acc += qkv[(bi * l + i) * h3 + hi * d + c] as f64
                                    * qkv[(bi * l + j) * h3 + h + hi * d + c] as f64;
                            }
                            let w = match window {
                                Some(half) if i.abs_diff(j) > half => -1e30,
                                _ => 0.0,
                            };
                            acc * scale as f64 + bias[bi * l + j] as f64 + w
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    s.iter_mut().for_each(|v| *v = (*v - mx).exp());
                    let z: f64 = s.iter().sum();
                    let mut m = vec![1f32; l];
                    if drop {
                        mask(t * l + i, &mut m);
                    }
                    for j in 0..l {
                        probs[(t * l + i) * l + j] = (s[j] / z) as f32;
                    }
                    for c in 0..d {
                        let mut acc = 0f64;
                        for j in 0..l {
                            acc += s[j] / z
                                * m[j] as f64
                                * qkv[(bi * l + j) * h3 + 2 * h + hi * d + c] as f64;
                        }
                        ctx[(bi * l + i) * h + hi * d + c] = acc as f32;
                    }
                }
            }
        }
        (probs, ctx)
    }

    #[test]
    fn packed_forward_matches_reference_at_every_level() {
        for level in crate::cpu::levels_here() {
            eprintln!("attention forward at {level}");
            for &(b, l, heads, d) in &[(1, 1, 1, 1), (2, 5, 3, 7), (3, 37, 2, 33)] {
                let dims = PackedDims {
                    b,
                    l,
                    h: heads * d,
                    heads,
                };
                let qkv = values(b * l * 3 * dims.h, 1);
                let mut bias = values(b * l, 2);
                bias.iter_mut().step_by(4).for_each(|v| *v = -1e9);
                for (window, drop) in [(None, false), (Some(2), true)] {
                    let m: &(dyn Fn(usize, &mut [f32]) + Sync) = &mask;
                    let mut probs = vec![f32::NAN; b * heads * l * l];
                    let mut ctx = vec![f32::NAN; b * l * dims.h];
                    forward_packed_at(
                        level,
                        dims,
                        0.4,
                        window,
                        drop.then_some(m),
                        &qkv,
                        &bias,
                        &mut probs,
                        &mut ctx,
                    );
                    let (wp, wc) = reference(dims, 0.4, window, drop, &qkv, &bias);
                    close(&probs, &wp, 2e-6);
                    close(&ctx, &wc, 2e-5);
                }
            }
        }
    }

    #[test]
    fn strided_forward_with_broadcast_bias_matches_packed_layout() {
        // q/k/v as separate [b, h, l, d] tensors with a [1, 1, lq, lk] bias, lq ≠ lk.
        let (b, h, lq, lk, d, dv) = (2, 3, 5, 9, 4, 35);
        let q = values(b * h * lq * d, 1);
        let k = values(b * h * lk * d, 2);
        let v = values(b * h * lk * dv, 3);
        let bias = values(lq * lk, 4);
        let dims = AttnDims {
            b,
            h,
            lq,
            lk,
            d,
            dv,
        };
        let mut want = vec![0f32; b * lq * h * dv];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..lq {
                    let s: Vec<f64> = (0..lk)
                        .map(|j| {
                            let mut acc = 0f64;
                            for c in 0..d {
                                acc += q[((bi * h + hi) * lq + i) * d + c] as f64
                                    * k[((bi * h + hi) * lk + j) * d + c] as f64;
                            }
                            acc * 0.5 + bias[i * lk + j] as f64
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..dv {
                        let acc: f64 = (0..lk)
                            .map(|j| e[j] / z * v[((bi * h + hi) * lk + j) * dv + c] as f64)
                            .sum();
                        want[((bi * lq + i) * h + hi) * dv + c] = acc as f32;
                    }
                }
            }
        }
        for level in crate::cpu::levels_here() {
            eprintln!("strided attention at {level}");
            let run = |probs: Option<&mut [f32]>| {
                let mut out = vec![f32::NAN; want.len()];
                forward_at(
                    level,
                    Strided {
                        data: &q,
                        s: [h * lq * d, lq * d, d],
                    },
                    Strided {
                        data: &k,
                        s: [h * lk * d, lk * d, d],
                    },
                    Strided {
                        data: &v,
                        s: [h * lk * dv, lk * dv, dv],
                    },
                    dims,
                    0.5,
                    Bias {
                        data: &bias,
                        s: [0, 0, lk],
                        window: None,
                    },
                    None,
                    probs,
                    &mut out,
                );
                out
            };
            let out = run(None);
            close(&out, &want, 2e-5);
            // The per-thread score buffers, reused with the previous call's values in them, change nothing,
            // and the scores written to a caller's buffer give the same output bit for bit.
            assert_eq!(run(None), out);
            let mut probs = vec![f32::NAN; b * h * lq * lk];
            assert_eq!(run(Some(&mut probs)), out);
        }
    }

    #[test]
    fn varlen_forward_matches_reference_and_padded_layout_at_every_level() {
        // Sequences of odd lengths (one empty) end to end in packed [tokens, 3h] q/k/v rows.
        let (heads, d) = (3, 7);
        let h = heads * d;
        let lens = [5usize, 1, 0, 37, 12];
        let mut starts = vec![0usize];
        for n in lens {
            starts.push(starts.last().unwrap() + n);
        }
        let tokens = *starts.last().unwrap();
        let qkv = values(tokens * 3 * h, 11);
        let scale = 0.3f32;
        let mut want = vec![0f32; tokens * h];
        for s in 0..lens.len() {
            let (a, e) = (starts[s], starts[s + 1]);
            for hi in 0..heads {
                for i in a..e {
                    let sc: Vec<f64> = (a..e)
                        .map(|j| {
                            (0..d)
                                .map(|c| {
                                    qkv[i * 3 * h + hi * d + c] as f64
                                        * qkv[j * 3 * h + h + hi * d + c] as f64
                                })
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|v| (v - mx).exp()).sum();
                    for c in 0..d {
                        let acc: f64 = (a..e)
                            .zip(&sc)
                            .map(|(j, v)| {
                                (v - mx).exp() / z * qkv[j * 3 * h + 2 * h + hi * d + c] as f64
                            })
                            .sum();
                        want[i * h + hi * d + c] = acc as f32;
                    }
                }
            }
        }
        // The same sequences padded to the longest, the padding keys masked by the bias.
        let l = *lens.iter().max().unwrap();
        let b = lens.len();
        let mut padded = vec![0f32; b * l * 3 * h];
        let mut key_bias = vec![-f32::MAX; b * l];
        for s in 0..b {
            for (p, t) in (starts[s]..starts[s + 1]).enumerate() {
                padded[(s * l + p) * 3 * h..][..3 * h].copy_from_slice(&qkv[t * 3 * h..][..3 * h]);
                key_bias[s * l + p] = 0.0;
            }
        }
        let dims = PackedDims { b, l, h, heads };
        for level in crate::cpu::levels_here() {
            eprintln!("varlen attention at {level}");
            let rows = |off: usize| Rows {
                data: &qkv[off..],
                stride: 3 * h,
            };
            // Every key, then a sliding window of 3 positions either side (ModernBERT's local layers).
            for window in [None, Some(3)] {
                let mut out = vec![f32::NAN; tokens * h];
                forward_varlen_at(
                    level,
                    rows(0),
                    rows(h),
                    rows(2 * h),
                    &starts,
                    heads,
                    d,
                    scale,
                    window,
                    &mut out,
                );
                if window.is_none() {
                    close(&out, &want, 2e-5);
                }
                let mut probs = vec![0f32; b * heads * l * l];
                let mut ctx = vec![0f32; b * l * h];
                forward_packed_at(
                    level, dims, scale, window, None, &padded, &key_bias, &mut probs, &mut ctx,
                );
                for s in 0..b {
                    for (p, t) in (starts[s]..starts[s + 1]).enumerate() {
                        close(&out[t * h..][..h], &ctx[(s * l + p) * h..][..h], 2e-6);
                    }
                }
            }
        }
    }

    #[test]
    fn varlen_training_attention_matches_the_padded_layout_forward_and_backward() {
        // Each sequence of a varlen call equals the same sequence padded in a batch, with the dropout rows
        // of the padded call renumbered: the padded batch puts sequence s's rows at (s·heads + hd)·l + i.
        let (heads, d) = (2, 5);
        let h = heads * d;
        let lens = [4usize, 0, 9, 1];
        let mut starts = vec![0usize];
        for n in lens {
            starts.push(starts.last().unwrap() + n);
        }
        let tokens = *starts.last().unwrap();
        let qkv = values(tokens * 3 * h, 21);
        let up = values(tokens * h, 22);
        let m: &(dyn Fn(usize, &mut [f32]) + Sync) = &mask;
        for level in crate::cpu::levels_here() {
            eprintln!("varlen training attention at {level}");
            let mut probs = vec![f32::NAN; varlen_probs_len(&starts, heads)];
            let mut ctx = vec![f32::NAN; tokens * h];
            forward_varlen_train_at(
                level,
                &starts,
                h,
                heads,
                0.6,
                Some(m),
                &qkv,
                &mut probs,
                &mut ctx,
            );
            let mut dqkv = vec![f32::NAN; tokens * 3 * h];
            backward_varlen_at(
                level,
                &starts,
                h,
                heads,
                0.6,
                Some(m),
                &qkv,
                &probs,
                &up,
                &mut dqkv,
            );
            let mut po = 0;
            for s in 0..lens.len() {
                let (a, n) = (starts[s], lens[s]);
                if n == 0 {
                    continue;
                }
                let dims = PackedDims {
                    b: 1,
                    l: n,
                    h,
                    heads,
                };
                let shifted_mask = |row: usize, out: &mut [f32]| mask(heads * a + row, out);
                let sm: &(dyn Fn(usize, &mut [f32]) + Sync) = &shifted_mask;
                let q = &qkv[a * 3 * h..(a + n) * 3 * h];
                let mut p1 = vec![0f32; heads * n * n];
                let mut c1 = vec![0f32; n * h];
                forward_packed_at(
                    level,
                    dims,
                    0.6,
                    None,
                    Some(sm),
                    q,
                    &vec![0f32; n],
                    &mut p1,
                    &mut c1,
                );
                assert_eq!(
                    &probs[po..po + heads * n * n],
                    &p1[..],
                    "{level}: probabilities of sequence {s}"
                );
                assert_eq!(
                    &ctx[a * h..(a + n) * h],
                    &c1[..],
                    "{level}: output of sequence {s}"
                );
                let mut g1 = vec![0f32; n * 3 * h];
                backward_packed_at(
                    level,
                    dims,
                    0.6,
                    Some(sm),
                    q,
                    &p1,
                    &up[a * h..(a + n) * h],
                    &mut g1,
                );
                assert_eq!(
                    &dqkv[a * 3 * h..(a + n) * 3 * h],
                    &g1[..],
                    "{level}: gradient of sequence {s}"
                );
                po += heads * n * n;
            }
            assert!(ctx.iter().chain(&dqkv).all(|v| v.is_finite()));
        }
    }

    #[test]
    #[should_panic(expected = "never decrease")]
    fn varlen_forward_rejects_decreasing_starts() {
        let qkv = values(4 * 6, 1);
        let rows = Rows {
            data: &qkv,
            stride: 6,
        };
        let mut out = vec![0f32; 4 * 2];
        forward_varlen(rows, rows, rows, &[0, 3, 2, 4], 1, 2, 1.0, None, &mut out);
    }

    #[test]
    fn packed_backward_matches_central_differences_at_every_level() {
        let (b, l, heads, d) = (2, 6, 2, 3);
        let dims = PackedDims {
            b,
            l,
            h: heads * d,
            heads,
        };
        let h = dims.h;
        let qkv = values(b * l * 3 * h, 5);
        let bias = values(b * l, 6);
        let up = values(b * l * h, 7);
        let m: &(dyn Fn(usize, &mut [f32]) + Sync) = &mask;
        // Loss = Σ up ⊙ ctx, in f64 through the reference.
        let loss = |x: &[f32]| -> f64 {
            let (_, c) = reference(dims, 0.7, None, true, x, &bias);
            c.iter().zip(&up).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        for level in crate::cpu::levels_here() {
            eprintln!("attention backward at {level}");
            let mut probs = vec![0f32; b * heads * l * l];
            let mut ctx = vec![0f32; b * l * h];
            forward_packed_at(
                level,
                dims,
                0.7,
                None,
                Some(m),
                &qkv,
                &bias,
                &mut probs,
                &mut ctx,
            );
            let mut g = vec![f32::NAN; qkv.len()];
            backward_packed_at(level, dims, 0.7, Some(m), &qkv, &probs, &up, &mut g);
            for idx in (0..qkv.len()).step_by(5) {
                let eps = 1e-2f32;
                let mut xp = qkv.clone();
                xp[idx] += eps;
                let mut xm = qkv.clone();
                xm[idx] -= eps;
                let num = (loss(&xp) - loss(&xm)) / (2.0 * eps as f64);
                assert!(
                    (g[idx] as f64 - num).abs() <= 2e-3 * (1.0 + num.abs()),
                    "{level}: d/dqkv[{idx}] = {}, central difference {num}",
                    g[idx]
                );
            }
        }
    }
}

//! Single-precision matrix products of the models.
//!
//! * [`Packed`] weights: `ceil(n / NR)` panels of `k × NR` values (the layout the register tile reads);
//! * [`linear_at`]: `act(x Wᵀ + b + residual)` over packed weights — on AVX-512 an 8 × 32 register tile,
//!   on AVX2 + FMA a 6 × 32 one (two halves of 16), with the bias (plus the residual) as the initial
//!   accumulators and GELU applied before the store;
//! * [`linear_rows_at`], [`grad_weight_at`], [`grad_input_at`]: the products of a training layer with
//!   row-major weights, from AVX2 up through the same tiles over k-blocked packed panels, on the portable
//!   level through the `gemm` crate with every operand read through strides ([`matmul`]);
//! * [`transpose`].

use rayon::prelude::*;

use crate::math::usable;
use crate::Level;

/// Columns of the packed weight panels (and of the AVX-512 register tile).
pub const NR: usize = 32;

/// Rows of the register tile.
pub const MR: usize = 8;

/// Depth of one pass over the panels in [`linear_rows_at`] and friends (a `KC × NR` slice stays in L1).
const KC: usize = 256;

/// One or more linear layers' weights, stacked along the outputs, packed for the register tile:
/// `ceil(n / NR)` panels of `k × NR` values (zero-padded), and the biases padded to whole panels.
#[derive(Default, Clone)]
pub struct Packed {
    data: Vec<f32>,
    bias: Vec<f32>,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed {{ n: {}, k: {} }}", self.n, self.k)
    }
}

/// One layer given to [`Packed::stacked`]: its row-major `[n, k]` weight, `n`, and its bias if it has one.
pub type LayerRows<'a> = (&'a [f32], usize, Option<&'a [f32]>);

impl Packed {
    /// Packs a row-major `[n, k]` weight with an optional bias (`n` values).
    pub fn from_rows(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Self {
        Self::stacked(k, &[(w, n, bias)])
    }

    /// Packs these layers (all of input width `k`) as one with their outputs concatenated.
    ///
    /// # Panics
    /// When a weight holds fewer than `n × k` values or a bias fewer than `n`.
    pub fn stacked(k: usize, layers: &[LayerRows]) -> Self {
        let n: usize = layers.iter().map(|l| l.1).sum();
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        let mut bias = vec![0f32; panels * NR];
        // The row-major source of every output column.
        let mut rows: Vec<&[f32]> = Vec::with_capacity(n);
        let mut j0 = 0;
        for &(w, ln, b) in layers {
            assert!(
                w.len() >= ln * k,
                "packing: weight of {} values for [{ln}, {k}]",
                w.len()
            );
            for j in 0..ln {
                rows.push(&w[j * k..(j + 1) * k]);
            }
            if let Some(b) = b {
                assert!(
                    b.len() >= ln,
                    "packing: bias of {} values for {ln} outputs",
                    b.len()
                );
                bias[j0..j0 + ln].copy_from_slice(&b[..ln]);
            }
            j0 += ln;
        }
        if k > 0 {
            data.par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(panel, out)| {
                    for c in 0..NR.min(n.saturating_sub(panel * NR)) {
                        for (kk, &v) in rows[panel * NR + c].iter().enumerate() {
                            out[kk * NR + c] = v;
                        }
                    }
                });
        }
        Self { data, bias, n, k }
    }

    /// Outputs.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `W[j, kk]`.
    fn at(&self, j: usize, kk: usize) -> f32 {
        self.data[(j / NR) * self.k * NR + kk * NR + j % NR]
    }
}

/// `out[m, n] = act(x[m, k] · Wᵀ + bias + residual[m, n])` with `p` the packed `W` (`n = p.n()`,
/// `k = p.k()`), where `act` is exact GELU when `gelu`; at `level` (the register tile from AVX-512 up, a
/// plain loop below), in parallel over row blocks.
///
/// # Panics
/// When `x`, `residual` or `out` are shorter than the shapes say.
pub fn linear_at(
    level: Level,
    x: &[f32],
    m: usize,
    p: &Packed,
    residual: Option<&[f32]>,
    gelu: bool,
    out: &mut [f32],
) {
    let (n, k) = (p.n, p.k);
    assert!(
        x.len() >= m * k && out.len() >= m * n,
        "linear: x of {} values and out of {} for m = {m}, n = {n}, k = {k}",
        x.len(),
        out.len()
    );
    if let Some(r) = residual {
        assert!(
            r.len() >= m * n,
            "linear: residual of {} values for [{m}, {n}]",
            r.len()
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(tile) = x86::Tile::at(level) {
        x86::linear(tile, x, m, p, residual, gelu, &mut out[..m * n]);
        return;
    }
    let _ = level;
    out[..m * n]
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(i, row)| {
            let xr = &x[i * k..(i + 1) * k];
            for (j, o) in row.iter_mut().enumerate() {
                let mut acc = p.bias[j] + residual.map_or(0.0, |r| r[i * n + j]);
                for (kk, &xv) in xr.iter().enumerate() {
                    acc += xv * p.at(j, kk);
                }
                *o = if gelu { crate::math::gelu(acc) } else { acc };
            }
        });
}

/// [`linear_at`] at the process's level.
pub fn linear(
    x: &[f32],
    m: usize,
    p: &Packed,
    residual: Option<&[f32]>,
    gelu: bool,
    out: &mut [f32],
) {
    linear_at(crate::level(), x, m, p, residual, gelu, out)
}

/// A read-only matrix operand of [`matmul`]: element `(i, j)` at `data[i·rs + j·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with row stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// The transpose of a row-major matrix with row stride `rs`.
    pub fn cols(data: &'a [f32], rs: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rs,
        }
    }

    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || self.data.len() > (r - 1) * self.rs + (c - 1) * self.cs
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

/// `C (+)= A · B` through the `gemm` crate, every operand given by pointer and strides.
///
/// # Safety
/// Every pointer must be valid for the `m × k`, `k × n` and `m × n` elements its strides reach, and no
/// other thread may access the output elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn strided_mm(
    m: usize,
    n: usize,
    k: usize,
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    c: (*mut f32, usize),
    accumulate: bool,
    par: bool,
) {
    // SAFETY: the caller's contract covers every element the strides reach.
    unsafe {
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
}

/// `C[m, n] (+)= A[m, k] · B[k, n]` through the `gemm` crate (row-major `C`, row stride `ldc`), with `A` and
/// `B` read through their strides; parallel inside the product when `par`.
///
/// # Panics
/// When an operand is shorter than its shape and strides reach.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    par: bool,
) {
    assert!(
        a.fits(m, k) && b.fits(k, n) && (m == 0 || n == 0 || c.len() >= (m - 1) * ldc + n),
        "matmul: operands too short for [{m}, {k}] · [{k}, {n}]"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above bound every element the strides reach; `c` is borrowed mutably.
    unsafe {
        strided_mm(
            m,
            n,
            k,
            (a.data.as_ptr(), a.rs, a.cs),
            (b.data.as_ptr(), b.rs, b.cs),
            (c.as_mut_ptr(), ldc),
            accumulate,
            par,
        )
    }
}

/// Row-major `[rows, cols]` → `[cols, rows]`, in parallel blocks.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert!(
        src.len() >= rows * cols,
        "transpose: {} values for [{rows}, {cols}]",
        src.len()
    );
    let mut dst = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return dst;
    }
    const B: usize = 64;
    dst.par_chunks_mut(B * rows)
        .enumerate()
        .for_each(|(cb, out)| {
            let c0 = cb * B;
            let cw = out.len() / rows;
            for r0 in (0..rows).step_by(B) {
                for r in r0..(r0 + B).min(rows) {
                    let row = &src[r * cols + c0..r * cols + c0 + cw];
                    for (c, &v) in row.iter().enumerate() {
                        out[c * rows + r] = v;
                    }
                }
            }
        });
    dst
}

/// `y[m, n] = x[m, k] · Wᵀ + b` for a row-major `W` (`n` rows of `k`) and bias (`n` values), at `level`:
/// packed for the register tile from AVX-512 up, else the `gemm` crate with `Wᵀ` read through strides and
/// the bias as the initial output.
#[allow(clippy::too_many_arguments)]
pub fn linear_rows_at(
    level: Level,
    x: &[f32],
    m: usize,
    w: &[f32],
    b: Option<&[f32]>,
    n: usize,
    k: usize,
    out: &mut [f32],
) {
    assert!(
        x.len() >= m * k
            && w.len() >= n * k
            && b.is_none_or(|b| b.len() >= n)
            && out.len() >= m * n,
        "linear: operands too short for x [{m}, {k}], W [{n}, {k}]"
    );
    if usable(level) >= Level::Avx2 {
        let p = Packed::from_rows(w, n, k, b);
        linear_at(level, x, m, &p, None, false, out);
        return;
    }
    let out = &mut out[..m * n];
    match b {
        Some(b) => out
            .chunks_mut(n.max(1))
            .for_each(|r| r.copy_from_slice(&b[..n])),
        None => out.fill(0.0),
    }
    matmul(
        m,
        n,
        k,
        MatRef::rows(x, k),
        MatRef::cols(w, k),
        out,
        n,
        b.is_some(),
        true,
    );
}

/// Packs a row-major `B[k, n]` (row stride `ldb`) into panels of `k × NR`.
fn pack_n(b: &[f32], ldb: usize, k: usize, n: usize) -> Vec<f32> {
    let panels = n.div_ceil(NR);
    let mut out = vec![0f32; panels * k * NR];
    if k == 0 {
        return out;
    }
    out.par_chunks_mut(k * NR).enumerate().for_each(|(p, dst)| {
        let cols = NR.min(n - p * NR);
        for (kk, d) in dst.chunks_mut(NR).enumerate() {
            d[..cols].copy_from_slice(&b[kk * ldb + p * NR..][..cols]);
        }
    });
    out
}

/// `out[n, k] = gᵀ · x` for `g` `[t, n]` and `x` `[t, k]` (a weight gradient), at `level`.
#[allow(clippy::too_many_arguments)]
pub fn grad_weight_at(
    level: Level,
    g: &[f32],
    t: usize,
    n: usize,
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    assert!(
        g.len() >= t * n && x.len() >= t * k && out.len() >= n * k,
        "grad_weight: operands too short for g [{t}, {n}], x [{t}, {k}]"
    );
    #[cfg(target_arch = "x86_64")]
    if let Some(tile) = x86::Tile::at(level) {
        let gt = transpose(&g[..t * n], t, n);
        x86::tile_gemm(tile, &gt, t, n, t, &pack_n(x, k, t, k), k, out, false);
        return;
    }
    let _ = level;
    matmul(
        n,
        k,
        t,
        MatRef::cols(g, n),
        MatRef::rows(x, k),
        out,
        k,
        false,
        true,
    );
}

/// `out[t, k] (+)= g · w` for `g` `[t, n]` and `w` `[n, k]` (an input gradient), at `level`.
#[allow(clippy::too_many_arguments)]
pub fn grad_input_at(
    level: Level,
    g: &[f32],
    t: usize,
    n: usize,
    w: &[f32],
    k: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    assert!(
        g.len() >= t * n && w.len() >= n * k && out.len() >= t * k,
        "grad_input: operands too short for g [{t}, {n}], w [{n}, {k}]"
    );
    #[cfg(target_arch = "x86_64")]
    if let Some(tile) = x86::Tile::at(level) {
        x86::tile_gemm(tile, g, n, t, n, &pack_n(w, k, n, k), k, out, accumulate);
        return;
    }
    let _ = level;
    matmul(
        t,
        k,
        n,
        MatRef::rows(g, n),
        MatRef::rows(w, k),
        out,
        k,
        accumulate,
        true,
    );
}

/// A raw output pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every task writes a disjoint set of elements, and the buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
// SAFETY: as above: shared only to hand each task its own elements.
unsafe impl Sync for OutPtr {}

/// The register tiles (AVX-512, AVX2 + FMA) and their drivers. The safe functions check the tile's
/// instructions.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{Packed, KC, MR, NR};
    use crate::math::usable;
    use crate::math::x86::{gelu_ps, tail_mask};
    use crate::Level;

    static ZEROS: [f32; NR] = [0.0; NR];

    /// Rows of the AVX2 register tile (6 × 16: twelve accumulators, two weight vectors and a broadcast
    /// fill the sixteen `ymm` registers).
    const MR_AVX2: usize = 6;

    /// The deepest k slice the AVX2 driver runs in one pass (a packed tile of 6 × 768 values is 18 KiB).
    const KC_AVX2: usize = 768;

    /// The register tile the drivers run: AVX-512 (8 rows × 32 columns) or AVX2 + FMA (6 rows × 32
    /// columns, as two halves of 16). Both read the same packed panels; a row's result does not depend on
    /// the other rows of its tile, so it is the same whatever the batch around it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Tile {
        /// [`kernel`].
        Avx512,
        /// [`kernel_avx2`].
        Avx2,
    }

    impl Tile {
        /// The widest tile `level` allows on this CPU; `None` below AVX2 (the portable code runs).
        pub(crate) fn at(level: Level) -> Option<Tile> {
            match usable(level) {
                Level::Portable => None,
                Level::Avx2 => Some(Tile::Avx2),
                Level::Avx512 | Level::Amx => Some(Tile::Avx512),
            }
        }

        /// Rows of one tile.
        pub(crate) fn rows(self) -> usize {
            match self {
                Tile::Avx512 => MR,
                Tile::Avx2 => MR_AVX2,
            }
        }

        /// Asserts that this CPU has the tile's instructions (the safe drivers call it once).
        pub(crate) fn check(self) {
            let ok = match self {
                Tile::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Tile::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
            };
            assert!(
                ok,
                "{self:?} kernel called on a CPU without its instructions"
            );
        }

        /// One tile: [`kernel`] or [`kernel_avx2`] with or without GELU; with `packed` (AVX2 only), `a[0]`
        /// points at the tile's rows packed by [`pack_rows_avx2`].
        ///
        /// # Safety
        /// The CPU has the tile's instructions ([`Tile::check`]), and the pointers satisfy [`kernel`]'s
        /// contract for `rows ≤ self.rows()` (with `packed`, `a[0]` readable for `6·k` values).
        #[allow(clippy::too_many_arguments)]
        #[inline(always)]
        unsafe fn run(
            self,
            gelu: bool,
            packed: bool,
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
            // SAFETY: the caller's contract.
            unsafe {
                match (self, gelu, packed) {
                    (Tile::Avx512, false, _) => {
                        kernel::<false>(k, a, bp, bias, resid, ldr, out, ldc, rows, cols)
                    }
                    (Tile::Avx512, true, _) => {
                        kernel::<true>(k, a, bp, bias, resid, ldr, out, ldc, rows, cols)
                    }
                    (Tile::Avx2, false, false) => kernel_avx2::<false, false>(
                        k, a, bp, bias, resid, ldr, out, ldc, rows, cols,
                    ),
                    (Tile::Avx2, true, false) => {
                        kernel_avx2::<true, false>(k, a, bp, bias, resid, ldr, out, ldc, rows, cols)
                    }
                    (Tile::Avx2, false, true) => {
                        kernel_avx2::<false, true>(k, a, bp, bias, resid, ldr, out, ldc, rows, cols)
                    }
                    (Tile::Avx2, true, true) => {
                        kernel_avx2::<true, true>(k, a, bp, bias, resid, ldr, out, ldc, rows, cols)
                    }
                }
            }
        }
    }

    /// Columns `k0..k0 + kc` of the `rows` rows of `x` (row `i` at `x[i·ldx..]`) packed for
    /// [`kernel_avx2`]'s `PACKED` form: tile `t` (rows `6t..6t + 6`) at `t·6kc`, its value `kk` of row `r`
    /// at `+ kk·6 + r`; rows past the end repeat the last row (their results are not stored).
    fn pack_rows_avx2(
        x: &[f32],
        ldx: usize,
        rows: usize,
        k0: usize,
        kc: usize,
        out: &mut Vec<f32>,
    ) {
        let tiles = rows.div_ceil(MR_AVX2);
        out.clear();
        out.resize(tiles * MR_AVX2 * kc, 0.0);
        for (t, dst) in out.chunks_exact_mut(MR_AVX2 * kc).enumerate() {
            for r in 0..MR_AVX2 {
                let row = (t * MR_AVX2 + r).min(rows - 1);
                let src = &x[row * ldx + k0..][..kc];
                for (kk, &v) in src.iter().enumerate() {
                    dst[kk * MR_AVX2 + r] = v;
                }
            }
        }
    }

    /// Loads `n ≤ 16` values from `p` into two vectors of 8 (zeros past `n`).
    ///
    /// # Safety
    /// AVX present; `p` readable for `n` values.
    #[inline(always)]
    unsafe fn load16_avx2(p: *const f32, n: usize) -> (__m256, __m256) {
        // SAFETY: the caller's contract; a short row goes through a zeroed copy.
        unsafe {
            if n >= 16 {
                return (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
            }
            let mut t = [0f32; 16];
            std::ptr::copy_nonoverlapping(p, t.as_mut_ptr(), n);
            (
                _mm256_loadu_ps(t.as_ptr()),
                _mm256_loadu_ps(t.as_ptr().add(8)),
            )
        }
    }

    /// The AVX2 + FMA tile: `rows × cols` (rows ≤ 6, cols ≤ [`NR`]) of `out = act(bias + residual +
    /// A · Bpanel)`, as two 6 × 16 halves of the panel; the accumulators start from the bias (plus the
    /// residual) as [`kernel`]'s do, and GELU is the scalar [`crate::math::gelu`] on the finished values.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; otherwise as [`kernel`] (only `a[..6]` is read).
    /// With `PACKED`, `a[0]` points at the tile's rows packed by [`pack_rows_avx2`] (value `kk` of row `r`
    /// at `a[0] + kk·6 + r`: one sequential stream instead of six rows that may alias in the L1 cache
    /// when they lie a multiple of 4 KiB apart, as the rows of a 3,072-wide layer input do); the sums are
    /// the same, bit for bit.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_avx2<const GELU: bool, const PACKED: bool>(
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
        let rows = rows.min(MR_AVX2);
        // SAFETY: the caller's contract bounds every pointer access below.
        unsafe {
            for half in 0..2 {
                let c0 = half * 16;
                if c0 >= cols {
                    break;
                }
                let hc = (cols - c0).min(16);
                let b = bp.add(c0);
                let mut acc0 = [_mm256_loadu_ps(bias.add(c0)); MR_AVX2];
                let mut acc1 = [_mm256_loadu_ps(bias.add(c0 + 8)); MR_AVX2];
                if !resid.is_null() {
                    for r in 0..rows {
                        let (v0, v1) = load16_avx2(resid.add(r * ldr + c0), hc);
                        acc0[r] = _mm256_add_ps(acc0[r], v0);
                        acc1[r] = _mm256_add_ps(acc1[r], v1);
                    }
                }
                if PACKED {
                    let ap = a[0];
                    for kk in 0..k {
                        let b0 = _mm256_loadu_ps(b.add(kk * NR));
                        let b1 = _mm256_loadu_ps(b.add(kk * NR + 8));
                        for r in 0..MR_AVX2 {
                            let av = _mm256_broadcast_ss(&*ap.add(kk * MR_AVX2 + r));
                            acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
                            acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
                        }
                    }
                } else {
                    for kk in 0..k {
                        let b0 = _mm256_loadu_ps(b.add(kk * NR));
                        let b1 = _mm256_loadu_ps(b.add(kk * NR + 8));
                        for r in 0..MR_AVX2 {
                            let av = _mm256_broadcast_ss(&*a[r].add(kk));
                            acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
                            acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
                        }
                    }
                }
                for r in 0..rows {
                    let o = out.add(r * ldc + c0);
                    if !GELU && hc == 16 {
                        _mm256_storeu_ps(o, acc0[r]);
                        _mm256_storeu_ps(o.add(8), acc1[r]);
                        continue;
                    }
                    let mut t = [0f32; 16];
                    _mm256_storeu_ps(t.as_mut_ptr(), acc0[r]);
                    _mm256_storeu_ps(t.as_mut_ptr().add(8), acc1[r]);
                    if GELU {
                        for v in &mut t[..hc] {
                            *v = crate::math::gelu(*v);
                        }
                    }
                    std::ptr::copy_nonoverlapping(t.as_ptr(), o, hc);
                }
            }
        }
    }

    /// One `rows × cols` tile (rows ≤ MR, cols ≤ NR) of `out = act(bias + residual + A · Bpanel)`.
    ///
    /// # Safety
    /// AVX-512F must be present; `a[r]` must be readable for `k` values, `bp` for `k × NR`, `bias` for
    /// `NR`, `resid` (when not null) for `rows` rows of `cols` values `ldr` apart and `out` writable
    /// likewise.
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
        // SAFETY: the caller's contract bounds every pointer access below.
        unsafe {
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
    }

    /// [`super::linear_at`] on the tile (shapes checked by the caller; `dst` is exactly `m × n`).
    pub(crate) fn linear(
        tile: Tile,
        x: &[f32],
        m: usize,
        p: &Packed,
        residual: Option<&[f32]>,
        gelu: bool,
        dst: &mut [f32],
    ) {
        tile.check();
        let (n, k) = (p.n, p.k);
        assert!(p.data.len() >= n.div_ceil(NR) * k * NR && dst.len() == m * n);
        let panels = n.div_ceil(NR);
        let tr = tile.rows();
        let pack = tile == Tile::Avx2 && k > 0;
        // AVX2 on a deep input (the 3,072-wide one of a BERT-base FFN): k in slices of at most
        // `KC_AVX2`, so that a packed 6-row tile (6·kc values) stays in L1 and a row block plus one
        // panel slice stay in L2; later slices add onto the finished ones (the out tile is the
        // residual), GELU only on the last. Each accumulator goes on from the sum the previous slice
        // stored, in the same order, so the results are the same bit for bit. Otherwise one slice of all k.
        let slices = if pack { k.div_ceil(KC_AVX2) } else { 1 };
        let kc = k.div_ceil(slices);
        // Row blocks of about 384 KB of `x` (per slice), so a block stays in L2 while every panel passes.
        let mc = ((96 * 1024) / kc.max(1)).clamp(tr, 512) / tr * tr;
        let threads = rayon::current_num_threads();
        let mc = if threads > 1 && m <= mc * threads {
            // Small inputs: split evenly so every thread gets work.
            m.div_ceil(threads).div_ceil(tr) * tr
        } else {
            mc
        };
        let block = |(bi, d): (usize, &mut [f32])| {
            let r0 = bi * mc;
            let rows_in = d.len() / n;
            let out = d.as_mut_ptr();
            // AVX2: the block's rows packed once per slice, then every panel streams them (see
            // `kernel_avx2`).
            let mut packed = Vec::new();
            for s in 0..slices {
                let k0 = s * kc;
                let kc = kc.min(k - k0);
                let (first, last) = (s == 0, s + 1 == slices);
                if pack {
                    pack_rows_avx2(&x[r0 * k..], k, rows_in, k0, kc, &mut packed);
                }
                for pi in 0..panels {
                    let cols = NR.min(n - pi * NR);
                    let mut mr = 0;
                    while mr < rows_in {
                        let rows = tr.min(rows_in - mr);
                        let mut a = [std::ptr::null::<f32>(); MR];
                        if pack {
                            a[0] = packed[mr * kc..].as_ptr();
                        } else {
                            for (r, ptr) in a.iter_mut().enumerate() {
                                // Rows past the end repeat the last row; their results are not stored.
                                *ptr = x[(r0 + mr + r.min(rows - 1)) * k..].as_ptr();
                            }
                        }
                        // SAFETY (of the pointer arithmetic): `mr * n + pi * NR` is inside `d`.
                        let o = unsafe { out.add(mr * n + pi * NR) };
                        let (bias, resid) = if first {
                            let resid = residual.map_or(std::ptr::null(), |res| {
                                res[(r0 + mr) * n + pi * NR..].as_ptr()
                            });
                            (p.bias[pi * NR..].as_ptr(), resid)
                        } else {
                            (ZEROS.as_ptr(), o as *const f32)
                        };
                        // SAFETY: the tile's instructions are present (checked above); every pointer
                        // stays inside `x` (or the packed tile of 6·kc values), `p` (panel `pi`'s rows
                        // k0..k0 + kc), `residual` and `d` for the k, rows and cols given (checked by
                        // the caller's asserts and the one above); a later slice reads its out tile as
                        // the residual before it writes it.
                        unsafe {
                            tile.run(
                                gelu && last,
                                pack,
                                kc,
                                a,
                                p.data.as_ptr().add(pi * k * NR + k0 * NR),
                                bias,
                                resid,
                                n,
                                o,
                                n,
                                rows,
                                cols,
                            );
                        }
                        mr += tr;
                    }
                }
            }
        };
        if threads > 1 && m > mc {
            dst.par_chunks_mut(mc * n).enumerate().for_each(block);
        } else {
            dst.chunks_mut(mc * n).enumerate().for_each(block);
        }
    }

    /// `out[i, ..n] (+)= Σ_kk a(i)[kk] · B[kk, ..n]` for `i < m`, single-threaded on the register tile:
    /// the rows of A by pointer, B in `ceil(n / NR)` panels (panel `p` at `bp + p·panel_stride`, its row
    /// `kk` the `NR` values at `+ kk·NR`, zero-padded past `n`). With `accumulate` the current contents of
    /// `out` are added.
    ///
    /// # Safety
    /// The CPU has the tile's instructions ([`Tile::check`]); `a(i)` must be readable for `k` values for
    /// every `i < m`; every panel for `k × NR` values; `out` readable and writable for `m` rows of `n`
    /// values `ldc` apart.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_tiles(
        tile: Tile,
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
        let tr = tile.rows();
        for p in 0..n.div_ceil(NR) {
            let cols = NR.min(n - p * NR);
            let mut mr = 0;
            while mr < m {
                let rows = tr.min(m - mr);
                let ptrs: [*const f32; MR] = std::array::from_fn(|r| a(mr + r.min(rows - 1)));
                // SAFETY: the caller's contract: the tile's outputs and the panel lie inside the
                // buffers it names.
                unsafe {
                    let o = out.add(mr * ldc + p * NR);
                    let resid = if accumulate {
                        o as *const f32
                    } else {
                        std::ptr::null()
                    };
                    tile.run(
                        false,
                        false,
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
                }
                mr += tr;
            }
        }
    }

    /// `out[m, n] (+)= A[m, k] · B`, A row-major (row stride `lda`), B packed by [`super::pack_n`] (`k`
    /// rows), in parallel blocks of rows and k-blocks of [`KC`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn tile_gemm(
        tile: Tile,
        a: &[f32],
        lda: usize,
        m: usize,
        k: usize,
        bp: &[f32],
        n: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        tile.check();
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
        let tr = tile.rows();
        let mc = (m.div_ceil(threads).div_ceil(tr) * tr).clamp(tr, 64 / tr * tr);
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
                    // SAFETY: the tile's instructions are present (checked above); rows r0.. of A
                    // hold k values from k0 (asserted above), every panel holds k × NR values so its
                    // rows k0..k0 + kc exist, and `o` is this block's rows × n outputs.
                    unsafe {
                        gemm_tiles(
                            tile,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{close, values};

    /// `x Wᵀ + b (+ r)` in f64.
    fn reference(
        x: &[f32],
        m: usize,
        w: &[f32],
        n: usize,
        k: usize,
        b: &[f32],
        r: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = b[j] as f64 + r.map_or(0.0, |r| r[i * n + j] as f64);
                for kk in 0..k {
                    acc += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                out[i * n + j] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn packed_linear_matches_reference_at_every_level() {
        for level in crate::cpu::levels_here() {
            eprintln!("linear at {level}");
            // (13, 40, 1700): a deep product; k = 0: bias (and residual) only.
            let shapes = [
                (1, 1, 1),
                (9, 33, 17),
                (17, 70, 300),
                (40, 31, 5),
                (13, 40, 1700),
                (3, 5, 0),
                // Several row blocks of a 3,072-wide input (the packed AVX2 rows).
                (200, 37, 3072),
            ];
            for &(m, n, k) in &shapes {
                // f32 sums of k terms of up to 4 in magnitude: the rounding grows with k.
                let tol = if k > 1000 { 2e-4 } else { 1e-5 };
                let x = values(m * k, 1);
                let w = values(n * k, 2);
                let b = values(n, 3);
                let r = values(m * n, 4);
                let p = Packed::from_rows(&w, n, k, Some(&b));
                let mut out = vec![f32::NAN; m * n];
                linear_at(level, &x, m, &p, None, false, &mut out);
                close(&out, &reference(&x, m, &w, n, k, &b, None), tol);
                linear_at(level, &x, m, &p, Some(&r), true, &mut out);
                let want: Vec<f32> = reference(&x, m, &w, n, k, &b, Some(&r))
                    .into_iter()
                    .map(crate::math::gelu)
                    .collect();
                close(&out, &want, tol);
                let mut rows = vec![f32::NAN; m * n];
                linear_rows_at(level, &x, m, &w, Some(&b), n, k, &mut rows);
                close(&rows, &reference(&x, m, &w, n, k, &b, None), tol);
                linear_rows_at(level, &x, m, &w, None, n, k, &mut rows);
                close(&rows, &reference(&x, m, &w, n, k, &vec![0.0; n], None), tol);
            }
        }
    }

    #[test]
    fn stacking_layers_concatenates_their_outputs() {
        let (m, k) = (5, 19);
        let (w1, w2) = (values(20 * k, 5), values(45 * k, 6));
        let b1 = values(20, 7);
        let both = Packed::stacked(k, &[(&w1, 20, Some(&b1)), (&w2, 45, None)]);
        assert_eq!((both.n(), both.k()), (65, k));
        let x = values(m * k, 8);
        let mut out = vec![0f32; m * 65];
        linear_at(Level::Portable, &x, m, &both, None, false, &mut out);
        let a = reference(&x, m, &w1, 20, k, &b1, None);
        let c = reference(&x, m, &w2, 45, k, &[0.0; 45], None);
        for i in 0..m {
            close(&out[i * 65..i * 65 + 20], &a[i * 20..(i + 1) * 20], 1e-5);
            close(
                &out[i * 65 + 20..(i + 1) * 65],
                &c[i * 45..(i + 1) * 45],
                1e-5,
            );
        }
    }

    #[test]
    fn gradients_products_match_reference_at_every_level() {
        for level in crate::cpu::levels_here() {
            eprintln!("grad products at {level}");
            for &(t, n, k) in &[(1, 1, 1), (13, 37, 9), (70, 33, 300)] {
                let g = values(t * n, 1);
                let x = values(t * k, 2);
                let w = values(n * k, 3);
                // dW = gᵀ x.
                let mut dw = vec![f32::NAN; n * k];
                grad_weight_at(level, &g, t, n, &x, k, &mut dw);
                let gt = transpose(&g, t, n);
                let xt = transpose(&x, t, k);
                close(
                    &dw,
                    &reference(&gt, n, &xt, k, t, &vec![0.0; k], None),
                    1e-5,
                );
                // dx = g w, accumulated onto a start value.
                let start = values(t * k, 4);
                let mut dx = start.clone();
                grad_input_at(level, &g, t, n, &w, k, &mut dx, true);
                let wt = transpose(&w, n, k);
                close(
                    &dx,
                    &reference(&g, t, &wt, k, n, &vec![0.0; k], Some(&start)),
                    1e-5,
                );
                grad_input_at(level, &g, t, n, &w, k, &mut dx, false);
                close(&dx, &reference(&g, t, &wt, k, n, &vec![0.0; k], None), 1e-5);
            }
        }
    }

    #[test]
    fn transpose_and_strided_matmul_agree() {
        let (m, n, k) = (7, 5, 3);
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let at = transpose(&a, m, k);
        assert_eq!(transpose(&at, k, m), a);
        let mut c1 = vec![0f32; m * n];
        matmul(
            m,
            n,
            k,
            MatRef::rows(&a, k),
            MatRef::rows(&b, n),
            &mut c1,
            n,
            false,
            false,
        );
        let mut c2 = vec![0f32; m * n];
        matmul(
            m,
            n,
            k,
            MatRef::cols(&at, m),
            MatRef::rows(&b, n),
            &mut c2,
            n,
            false,
            true,
        );
        close(&c1, &c2, 1e-6);
        let bt = transpose(&b, k, n);
        close(&c1, &reference(&a, m, &bt, n, k, &vec![0.0; n], None), 1e-5);
    }
}

//! bf16 linear layers: weights packed once, activations rounded once per call, f32 accumulation.

use rayon::prelude::*;

use super::{
    check_len, checked_len, for_each_block, round_up, Epilogue, LowpError, OutPtr, BLOCK, PANEL,
};
use crate::cpu::{cpu, Level};
use crate::half::{bf16_to_f32, f32_to_bf16};

/// k is padded to this (the depth of one AMX bf16 tile row: 32 values, 64 bytes).
pub(crate) const K_ALIGN: usize = 32;

/// Weights of a linear layer rounded to bf16 and laid out for the bf16 kernels (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// k padded to [`K_ALIGN`].
    kp: usize,
    /// Panels of [`PANEL`] columns, `kp / 2` rows of `2 × PANEL` values each.
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Packs `w`, `n` outputs × `k` inputs, row-major (PyTorch's `Linear.weight`).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Result<PackedBf16, LowpError> {
        let (kp, mut data) = Self::zeroed("bf16 weights", w.len(), n, k)?;
        data.par_chunks_mut(kp * PANEL)
            .enumerate()
            .for_each(|(jp, panel)| {
                let j0 = jp * PANEL;
                if j0 < n {
                    pack_panel_widest(w, k, j0, PANEL.min(n - j0), panel);
                }
            });
        Ok(PackedBf16 { n, k, kp, data })
    }

    /// Packs the weights of a layer with `n` outputs × `k` inputs given as `wt`, the transpose of W
    /// (`k` rows of `n`, row-major): `w[j][kk] = wt[kk · n + j]`. The same layout as [`PackedBf16::pack`]
    /// without a transposed copy; training uses it for the products of its backward pass (`dy · W` packs
    /// W itself, `dyᵀ · x` packs the activations `x`, up to thousands of rows, every step).
    pub fn pack_transposed(wt: &[f32], n: usize, k: usize) -> Result<PackedBf16, LowpError> {
        let (kp, mut data) = Self::zeroed("bf16 weights (transposed)", wt.len(), n, k)?;
        // A task packs a few neighbouring panels, pair of source rows by pair of source rows: each row is
        // read as one contiguous run of `PANELS_PER_TASK × PANEL` values.
        const PANELS_PER_TASK: usize = 4;
        data.par_chunks_mut(kp * PANEL * PANELS_PER_TASK)
            .enumerate()
            .for_each(|(g, chunk)| {
                let j0 = g * PANELS_PER_TASK * PANEL;
                if j0 < n {
                    pack_panels_transposed_widest(wt, n, k, kp, j0, chunk);
                }
            });
        Ok(PackedBf16 { n, k, kp, data })
    }

    /// Checks the shape (`n`, `k` ≥ 1, `len` = n·k values) and returns the padded depth and a zeroed layout.
    fn zeroed(
        what: &'static str,
        len: usize,
        n: usize,
        k: usize,
    ) -> Result<(usize, Vec<u16>), LowpError> {
        if n == 0 || k == 0 {
            return Err(LowpError::Empty { what, n, k });
        }
        check_len(what, checked_len(what, n, k)?, len)?;
        let kp = round_up(k, K_ALIGN);
        Ok((kp, vec![0u16; checked_len(what, round_up(n, BLOCK), kp)?]))
    }

    /// Outputs (rows of W).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs (columns of W).
    pub fn k(&self) -> usize {
        self.k
    }

    /// k as padded in the layout (tests).
    #[cfg(test)]
    pub(crate) fn kp(&self) -> usize {
        self.kp
    }

    /// Panel `jp` (columns `16 jp .. 16 jp + 16`).
    pub(crate) fn panel(&self, jp: usize) -> &[u16] {
        let len = self.kp * PANEL;
        &self.data[jp * len..(jp + 1) * len]
    }

    /// The packed value standing for `w[j][kk]` (tests).
    #[cfg(test)]
    pub(crate) fn get(&self, j: usize, kk: usize) -> u16 {
        self.panel(j / PANEL)[(kk / 2) * 2 * PANEL + (j % PANEL) * 2 + kk % 2]
    }
}

/// The level [`linear_bf16`] runs at in this process: [`Level::Amx`], [`Level::Avx512`] (with AVX512_BF16),
/// [`Level::Avx2`] (bf16 widened to f32 in registers, FMA; for CPUs without bf16 arithmetic) or
/// [`Level::Portable`].
pub fn bf16_level() -> Level {
    effective(cpu().level)
}

/// The kernel a requested level gets on this CPU.
pub(crate) fn effective(level: Level) -> Level {
    let c = cpu();
    if level >= Level::Amx && c.level >= Level::Amx && super::amx::bf16_ok() {
        Level::Amx
    } else if level >= Level::Avx512 && c.avx512_bf16 {
        Level::Avx512
    } else if level >= Level::Avx2 && c.avx2() {
        Level::Avx2
    } else {
        Level::Portable
    }
}

/// `out = act(x · Wᵀ + bias + residual)` with `x` (`m × k`, row-major) rounded to bf16, bf16 products and
/// f32 accumulation; `bias` has `n` values, `residual` and `out` `m × n`; `gelu` applies the exact GELU.
pub fn linear_bf16(
    x: &[f32],
    m: usize,
    w: &PackedBf16,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    gelu: bool,
    out: &mut [f32],
) -> Result<(), LowpError> {
    linear_bf16_at(cpu().level, x, m, w, bias, residual, gelu, out).map(|_| ())
}

/// [`linear_bf16`] at `level` or the best level below it this CPU has; returns the level that ran.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bf16_at(
    level: Level,
    x: &[f32],
    m: usize,
    w: &PackedBf16,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    gelu: bool,
    out: &mut [f32],
) -> Result<Level, LowpError> {
    let (n, k, kp) = (w.n, w.k, w.kp);
    check_len("bf16 input x", checked_len("bf16 input x", m, k)?, x.len())?;
    let mn = checked_len("bf16 output", m, n)?;
    check_len("bf16 output", mn, out.len())?;
    if let Some(b) = bias {
        check_len("bf16 bias", n, b.len())?;
    }
    if let Some(r) = residual {
        check_len("bf16 residual", mn, r.len())?;
    }
    let level = effective(level);
    if m == 0 {
        return Ok(level);
    }
    // The activations rounded to bf16, rows padded to a whole block and k to the packed depth, with zeros:
    // as bf16 for the kernels with bf16 arithmetic, as the same values in f32 for the AVX2 kernel (which
    // broadcasts them from memory).
    let rows_p = round_up(m, BLOCK);
    let acts = if level == Level::Avx2 {
        let mut af = vec![0f32; checked_len("bf16 input x", rows_p, kp)?];
        af.par_chunks_mut(kp)
            .zip(x.par_chunks(k))
            .for_each(|(dst, src)| to_bf16_f32_row(src, dst));
        Acts::F32(af)
    } else {
        let mut a = vec![0u16; checked_len("bf16 input x", rows_p, kp)?];
        a.par_chunks_mut(kp)
            .zip(x.par_chunks(k))
            .for_each(|(dst, src)| to_bf16_row(src, dst));
        Acts::Bf16(a)
    };
    let epi = Epilogue {
        n,
        bias,
        residual,
        gelu,
    };
    let outp = OutPtr::new(out, n);
    for_each_block(m, n, k, kp * 2, |i0, rows, j0, cols| {
        let mut acc = [0f32; BLOCK * BLOCK];
        let (p0, p1) = (w.panel(j0 / PANEL), w.panel(j0 / PANEL + 1));
        outp.prefetch(i0, rows, j0, cols);
        match &acts {
            Acts::F32(af) => {
                avx2_block(&af[i0 * kp..(i0 + BLOCK) * kp], kp, rows, p0, p1, &mut acc)
            }
            Acts::Bf16(a) => {
                let a_blk = &a[i0 * kp..(i0 + BLOCK) * kp];
                match level {
                    Level::Amx => super::amx::block_bf16(a_blk, kp, p0, p1, &mut acc),
                    Level::Avx512 => avx512_block(a_blk, kp, rows, p0, p1, &mut acc),
                    _ => portable_block(a_blk, kp, rows, p0, p1, &mut acc),
                }
            }
        }
        // SAFETY: this block (rows i0.., columns j0..j0 + cols) belongs to this call of the closure alone:
        // `for_each_block` hands out every block once.
        unsafe { epi.finish_block(&mut acc, rows, cols, i0, j0, &outp) };
    });
    Ok(level)
}

/// The activations of one call, rounded to bf16.
enum Acts {
    /// As bf16 (the kernels with bf16 arithmetic and the portable one).
    Bf16(Vec<u16>),
    /// As f32 holding bf16 values (the AVX2 kernel).
    F32(Vec<f32>),
}

/// Rounds `src` to bf16 and back into `dst` (f32 values that bf16 holds exactly).
fn to_bf16_f32_row(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu().avx2() {
        // SAFETY: the CPU has AVX2 and FMA (`Level::Avx2`, from `cpu()`).
        return unsafe { to_bf16_f32_row_avx2(src, dst) };
    }
    to_bf16_f32_row_plain(src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn to_bf16_f32_row_avx2(src: &[f32], dst: &mut [f32]) {
    to_bf16_f32_row_plain(src, dst)
}

#[inline(always)]
fn to_bf16_f32_row_plain(src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_to_f32(f32_to_bf16(s));
    }
}

/// Rounds `src` to bf16 into `dst`: the same code compiled for the widest vector level here.
fn to_bf16_row(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    {
        let c = cpu();
        if c.avx512() {
            // SAFETY: the CPU has AVX512F and AVX512BW (`Level::Avx512`, from `cpu()`).
            return unsafe { to_bf16_row_avx512(src, dst) };
        }
        if c.avx2() {
            // SAFETY: the CPU has AVX2 and FMA (`Level::Avx2`, from `cpu()`).
            return unsafe { to_bf16_row_avx2(src, dst) };
        }
    }
    to_bf16_row_plain(src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn to_bf16_row_avx512(src: &[f32], dst: &mut [u16]) {
    to_bf16_row_plain(src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn to_bf16_row_avx2(src: &[f32], dst: &mut [u16]) {
    to_bf16_row_plain(src, dst)
}

#[inline(always)]
fn to_bf16_row_plain(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16(s);
    }
}

widest!(pack_panel_widest = pack_panel(w: &[f32], k: usize, j0: usize, cols: usize, panel: &mut [u16]));
widest!(pack_panels_transposed_widest = pack_panels_transposed(
    wt: &[f32],
    n: usize,
    k: usize,
    kp: usize,
    j0: usize,
    chunk: &mut [u16]
));

/// One panel of [`PackedBf16::pack`]: rows `j0 .. j0 + cols` of `w` (`k` values each) into `panel`, each
/// row's values paired along k (`panel[p · 2·PANEL + 2c + e] = w[j0 + c][2p + e]`).
#[inline(always)]
fn pack_panel(w: &[f32], k: usize, j0: usize, cols: usize, panel: &mut [u16]) {
    let mut row = vec![0u16; k.next_multiple_of(2)];
    for c in 0..cols {
        for (d, &v) in row.iter_mut().zip(&w[(j0 + c) * k..][..k]) {
            *d = f32_to_bf16(v);
        }
        for (p, pair) in row.chunks_exact(2).enumerate() {
            let o = p * 2 * PANEL + 2 * c;
            panel[o] = pair[0];
            panel[o + 1] = pair[1];
        }
    }
}

/// Panels of [`PackedBf16::pack_transposed`] from column `j0` of `wt` (`k` rows of `n`) into `chunk`
/// (whole panels of `kp · PANEL` values), two source rows at a time: one row of a panel's layout holds
/// the pair (`wt[2p][j]`, `wt[2p + 1][j]`) of each of its columns.
#[inline(always)]
fn pack_panels_transposed(wt: &[f32], n: usize, k: usize, kp: usize, j0: usize, chunk: &mut [u16]) {
    let zeros = [0f32; PANEL];
    for p in 0..k.div_ceil(2) {
        let (r0, r1) = (2 * p, 2 * p + 1);
        for (i, panel) in chunk.chunks_exact_mut(kp * PANEL).enumerate() {
            let js = j0 + i * PANEL;
            if js >= n {
                break;
            }
            let cols = PANEL.min(n - js);
            let a = &wt[r0 * n + js..][..cols];
            let b = if r1 < k {
                &wt[r1 * n + js..][..cols]
            } else {
                &zeros[..cols]
            };
            let out = &mut panel[p * 2 * PANEL..][..2 * PANEL];
            if let (Ok(a), Ok(b)) = (<&[f32; PANEL]>::try_from(a), <&[f32; PANEL]>::try_from(b)) {
                for c in 0..PANEL {
                    out[2 * c] = f32_to_bf16(a[c]);
                    out[2 * c + 1] = f32_to_bf16(b[c]);
                }
            } else {
                for c in 0..cols {
                    out[2 * c] = f32_to_bf16(a[c]);
                    out[2 * c + 1] = f32_to_bf16(b[c]);
                }
            }
        }
    }
}

/// The portable kernel: `acc[r][c] = Σ_p a[r][2p+1] w[2p+1][c] + a[r][2p] w[2p][c]`, in the order
/// `vdpbf16ps` adds (odd element first), products exact in f32.
pub(super) fn portable_block(
    a: &[u16],
    kp: usize,
    rows: usize,
    p0: &[u16],
    p1: &[u16],
    acc: &mut [f32],
) {
    for r in 0..rows {
        let ar = &a[r * kp..(r + 1) * kp];
        let mut s = [0f32; BLOCK];
        for p in 0..kp / 2 {
            let (a0, a1) = (bf16_to_f32(ar[2 * p]), bf16_to_f32(ar[2 * p + 1]));
            if a0 == 0.0 && a1 == 0.0 {
                continue;
            }
            for (half, panel) in [p0, p1].into_iter().enumerate() {
                let wrow = &panel[p * 2 * PANEL..(p + 1) * 2 * PANEL];
                for c in 0..PANEL {
                    let v = &mut s[half * PANEL + c];
                    *v += a1 * bf16_to_f32(wrow[2 * c + 1]);
                    *v += a0 * bf16_to_f32(wrow[2 * c]);
                }
            }
        }
        acc[r * BLOCK..(r + 1) * BLOCK].copy_from_slice(&s);
    }
}

/// The AVX2 kernel for one block, for CPUs without bf16 arithmetic: the weights are widened to f32 in
/// registers (a bf16 is the upper half of an f32) and multiplied by the activations (`a`: f32 values that
/// are bf16) with FMA, `rows` rows in register tiles of up to 4 × 16. A product of two bf16 is exact in f32,
/// so each FMA rounds once, as the portable kernel's separate add does: the same sums in the same order,
/// bit for bit.
fn avx2_block(a: &[f32], kp: usize, rows: usize, p0: &[u16], p1: &[u16], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(cpu().avx2() && a.len() >= BLOCK * kp && p0.len() >= kp * PANEL);
        assert!(p1.len() >= kp * PANEL && acc.len() >= BLOCK * BLOCK);
        for (half, panel) in [p0, p1].into_iter().enumerate() {
            let mut r0 = 0;
            while r0 < rows {
                let ap = a[r0 * kp..].as_ptr();
                let cp = acc[r0 * BLOCK + half * PANEL..].as_mut_ptr();
                // SAFETY: the CPU has AVX2 + FMA (asserted above, from `cpu()`); the kernel reads `mr` rows
                // of `kp` values from `ap` (r0 + mr <= BLOCK rows of `a`, asserted), `kp / 2` rows of 32
                // values from the panel (asserted), and writes `mr` rows of 16 to `cp` inside `acc`.
                unsafe {
                    match rows - r0 {
                        1 => x86::bf16_tile_avx2::<1>(ap, kp, panel.as_ptr(), cp),
                        2 => x86::bf16_tile_avx2::<2>(ap, kp, panel.as_ptr(), cp),
                        _ => x86::bf16_tile_avx2::<4>(ap, kp, panel.as_ptr(), cp),
                    }
                }
                r0 += 4;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, kp, rows, p0, p1, acc);
        unreachable!("the AVX2 level is only chosen on x86-64")
    }
}

/// The AVX-512 BF16 kernel for one block: `rows` rows in register tiles of up to 8 × 32.
fn avx512_block(a: &[u16], kp: usize, rows: usize, p0: &[u16], p1: &[u16], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(cpu().avx512_bf16 && a.len() >= BLOCK * kp && p0.len() >= kp * PANEL);
        assert!(p1.len() >= kp * PANEL && acc.len() >= BLOCK * BLOCK);
        let mut r0 = 0;
        while r0 < rows {
            let left = rows - r0;
            let ap = a[r0 * kp..].as_ptr();
            let cp = acc[r0 * BLOCK..].as_mut_ptr();
            // SAFETY: the CPU has AVX512F + AVX512_BF16 (asserted above, from `cpu()`); the kernel reads
            // `mr` rows of `kp` values from `ap` (r0 + mr <= BLOCK rows of `a`, asserted), `kp / 2` rows of
            // 32 values from each panel (asserted), and writes `mr` rows of 32 to `cp` inside `acc`.
            unsafe {
                match left {
                    1 => x86::bf16_tile::<1>(ap, kp, p0.as_ptr(), p1.as_ptr(), cp),
                    2 => x86::bf16_tile::<2>(ap, kp, p0.as_ptr(), p1.as_ptr(), cp),
                    3 | 4 => x86::bf16_tile::<4>(ap, kp, p0.as_ptr(), p1.as_ptr(), cp),
                    _ => x86::bf16_tile::<8>(ap, kp, p0.as_ptr(), p1.as_ptr(), cp),
                }
            }
            r0 += 8;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    portable_block(a, kp, rows, p0, p1, acc)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK, PANEL};
    use std::arch::x86_64::*;

    /// `MR` rows × the 16 columns of one panel, AVX2: `c[r][..] += a[r][2p + 1] · odd(p) + a[r][2p] · even(p)`
    /// for every k-pair `p`, the panel's bf16 pairs widened to f32 (even: the low half shifted up; odd: the
    /// high half masked).
    ///
    /// # Safety
    /// AVX2 and FMA available; `a` readable for `MR` rows of `kp` f32 (row stride `kp`), `b` for `kp * 16`
    /// u16, `c` writable for `MR` rows of 16 f32 with row stride [`BLOCK`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bf16_tile_avx2<const MR: usize>(
        a: *const f32,
        kp: usize,
        b: *const u16,
        c: *mut f32,
    ) {
        let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..kp / 2 {
            // SAFETY: row p < kp / 2 of the panel (32 u16: columns 0..8 then 8..16), inside the bounds.
            let (w0, w1) = unsafe {
                let row = b.add(p * 2 * PANEL);
                (
                    _mm256_loadu_si256(row as *const __m256i),
                    _mm256_loadu_si256(row.add(PANEL) as *const __m256i),
                )
            };
            let even = [
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w0)),
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w1)),
            ];
            let odd = [
                _mm256_castsi256_ps(_mm256_and_si256(w0, high)),
                _mm256_castsi256_ps(_mm256_and_si256(w1, high)),
            ];
            for (r, accr) in acc.iter_mut().enumerate() {
                // SAFETY: values 2p, 2p + 1 < kp of row r < MR, inside the caller's bounds.
                let (a0, a1) = unsafe {
                    let at = a.add(r * kp + 2 * p);
                    (_mm256_broadcast_ss(&*at), _mm256_broadcast_ss(&*at.add(1)))
                };
                for h in 0..2 {
                    accr[h] = _mm256_fmadd_ps(a1, odd[h], accr[h]);
                    accr[h] = _mm256_fmadd_ps(a0, even[h], accr[h]);
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            // SAFETY: row r < MR of `c`, 16 values, inside the caller's bounds.
            unsafe {
                _mm256_storeu_ps(c.add(r * BLOCK), accr[0]);
                _mm256_storeu_ps(c.add(r * BLOCK + 8), accr[1]);
            }
        }
    }

    /// `MR` rows × 32 columns: `c[r][..] = Σ_p dpbf16(a[r] pair p, panel0 / panel1 row p)`.
    ///
    /// # Safety
    /// AVX512F and AVX512_BF16 available; `a` readable for `MR` rows of `kp` u16 (row stride `kp`), `b0` and
    /// `b1` for `kp * 16` u16, `c` writable for `MR` rows of [`BLOCK`] f32.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn bf16_tile<const MR: usize>(
        a: *const u16,
        kp: usize,
        b0: *const u16,
        b1: *const u16,
        c: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kp / 2 {
            // SAFETY: row p < kp / 2 of panel 0, inside the caller's bounds; both types are 64 bytes.
            let w0: __m512bh = unsafe {
                std::mem::transmute(_mm512_loadu_si512(b0.add(p * 2 * PANEL) as *const _))
            };
            // SAFETY: as above, panel 1.
            let w1: __m512bh = unsafe {
                std::mem::transmute(_mm512_loadu_si512(b1.add(p * 2 * PANEL) as *const _))
            };
            for (r, accr) in acc.iter_mut().enumerate() {
                // SAFETY: values 2p, 2p + 1 < kp of row r < MR, inside the caller's bounds.
                let pair = unsafe { (a.add(r * kp + 2 * p) as *const i32).read_unaligned() };
                // SAFETY: a bit-cast between two 64-byte vector types.
                let av: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(pair)) };
                accr[0] = _mm512_dpbf16_ps(accr[0], av, w0);
                accr[1] = _mm512_dpbf16_ps(accr[1], av, w1);
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            // SAFETY: row r < MR of `c`, 32 values, inside the caller's bounds.
            unsafe {
                _mm512_storeu_ps(c.add(r * BLOCK), accr[0]);
                _mm512_storeu_ps(c.add(r * BLOCK + PANEL), accr[1]);
            }
        }
    }
}

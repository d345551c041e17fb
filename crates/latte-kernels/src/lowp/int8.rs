//! int8 linear layers: per-output-channel symmetric weight scales, per-row dynamic symmetric activation
//! scales, i32 accumulation, f32 dequantisation.

use rayon::prelude::*;

use super::{
    check_len, checked_len, for_each_block, round_up, Epilogue, LowpError, OutPtr, BLOCK, PANEL,
};
use crate::cpu::{cpu, Level};

/// k is padded to this (the depth of one AMX int8 tile row: 64 bytes).
pub(crate) const K_ALIGN: usize = 64;
/// Bytes of one k-group of one column (what `vpdpbusd` / `tdpbssd` sum per lane).
const GROUP: usize = 4;
/// The largest k whose unsigned × signed sums stay inside i32 (255 × 127 × k < 2³¹).
pub const MAX_K_I8: usize = 1 << 16;

/// Weights of a linear layer quantised to int8 per output channel and laid out for the int8 kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedI8 {
    n: usize,
    k: usize,
    /// k padded to [`K_ALIGN`].
    kp: usize,
    /// Panels of [`PANEL`] columns, `kp / 4` rows of `4 × PANEL` bytes each.
    data: Vec<i8>,
    /// Per output channel: `max |w| / 127` (0 for an all-zero channel).
    scales: Vec<f32>,
    /// Per (padded) output channel: the sum of its quantised weights.
    col_sums: Vec<i32>,
}

/// Symmetric quantisation of `v` with `inv = 127 / max |v|`: round half away from zero, clamp to ±127.
#[inline(always)]
fn quantise(v: f32, inv: f32) -> i8 {
    (v * inv).round().clamp(-127.0, 127.0) as i8
}

/// The scale and its inverse for a slice whose largest magnitude is `max_abs`.
fn scale_of(max_abs: f32) -> (f32, f32) {
    if max_abs > 0.0 && max_abs.is_finite() {
        (max_abs / 127.0, 127.0 / max_abs)
    } else {
        (0.0, 0.0)
    }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

impl PackedI8 {
    /// Quantises and packs `w`, `n` outputs × `k` inputs, row-major (PyTorch's `Linear.weight`); every
    /// weight must be finite and `k` at most [`MAX_K_I8`].
    pub fn pack(w: &[f32], n: usize, k: usize) -> Result<PackedI8, LowpError> {
        const WHAT: &str = "int8 weights";
        if n == 0 || k == 0 {
            return Err(LowpError::Empty { what: WHAT, n, k });
        }
        if k > MAX_K_I8 {
            return Err(LowpError::TooLarge {
                what: WHAT,
                rows: n,
                cols: k,
            });
        }
        check_len(WHAT, checked_len(WHAT, n, k)?, w.len())?;
        if let Some(at) = w.iter().position(|v| !v.is_finite()) {
            return Err(LowpError::NonFinite {
                channel: at / k,
                input: at % k,
                value: w[at],
            });
        }
        let kp = round_up(k, K_ALIGN);
        let np = round_up(n, BLOCK);
        let mut scales = vec![0f32; n];
        let mut inv = vec![0f32; n];
        for (j, row) in w.chunks(k).enumerate() {
            (scales[j], inv[j]) = scale_of(max_abs(row));
        }
        let mut data = vec![0i8; checked_len(WHAT, np, kp)?];
        let mut col_sums = vec![0i32; np];
        data.par_chunks_mut(kp * PANEL)
            .zip(col_sums.par_chunks_mut(PANEL))
            .enumerate()
            .for_each(|(jp, (panel, sums))| {
                for (c, sum) in sums.iter_mut().enumerate() {
                    let j = jp * PANEL + c;
                    if j >= n {
                        break;
                    }
                    for (kk, &v) in w[j * k..(j + 1) * k].iter().enumerate() {
                        let q = quantise(v, inv[j]);
                        panel[(kk / GROUP) * GROUP * PANEL + c * GROUP + kk % GROUP] = q;
                        *sum += i32::from(q);
                    }
                }
            });
        Ok(PackedI8 {
            n,
            k,
            kp,
            data,
            scales,
            col_sums,
        })
    }

    /// Outputs (rows of W).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs (columns of W).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The per-output-channel scales (`max |w| / 127`).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Panel `jp` (columns `16 jp .. 16 jp + 16`).
    pub(crate) fn panel(&self, jp: usize) -> &[i8] {
        let len = self.kp * PANEL;
        &self.data[jp * len..(jp + 1) * len]
    }

    /// The quantised value of `w[j][kk]` (tests).
    #[cfg(test)]
    pub(crate) fn get(&self, j: usize, kk: usize) -> i8 {
        self.panel(j / PANEL)[(kk / GROUP) * GROUP * PANEL + (j % PANEL) * GROUP + kk % GROUP]
    }
}

/// The level [`linear_i8`] runs at in this process: [`Level::Amx`] (with AMX-INT8), [`Level::Avx512`] (with
/// AVX512_VNNI), [`Level::Avx2`] (`vpmaddubsw` on |activation| and sign-adjusted weights, exact) or
/// [`Level::Portable`].
pub fn i8_level() -> Level {
    effective(cpu().level)
}

pub(crate) fn effective(level: Level) -> Level {
    let c = cpu();
    if level >= Level::Amx && c.amx_int8 && super::amx::i8_ok() {
        Level::Amx
    } else if level >= Level::Avx512 && c.avx512_vnni {
        Level::Avx512
    } else if level >= Level::Avx2 && c.avx2() {
        Level::Avx2
    } else {
        Level::Portable
    }
}

/// Quantises row `src` into `dst` (padded with zeros); returns the row's scale. With `shift` each byte is
/// stored plus 128, as an unsigned value (for `vpdpbusd`). A row holding a NaN or an infinity gets scale 0
/// (all its products 0). The same code compiled for the widest vector level here: the same results.
fn quantise_row(src: &[f32], dst: &mut [u8], shift: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        let c = cpu();
        if c.avx512() {
            // SAFETY: the CPU has AVX512F and AVX512BW (`Level::Avx512`, from `cpu()`).
            return unsafe { quantise_row_avx512(src, dst, shift) };
        }
        if c.avx2() {
            // SAFETY: the CPU has AVX2 and FMA (`Level::Avx2`, from `cpu()`).
            return unsafe { quantise_row_avx2(src, dst, shift) };
        }
    }
    quantise_row_plain(src, dst, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn quantise_row_avx512(src: &[f32], dst: &mut [u8], shift: bool) -> f32 {
    quantise_row_plain(src, dst, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantise_row_avx2(src: &[f32], dst: &mut [u8], shift: bool) -> f32 {
    quantise_row_plain(src, dst, shift)
}

#[inline(always)]
fn quantise_row_plain(src: &[f32], dst: &mut [u8], shift: bool) -> f32 {
    // The largest magnitude through the bits: for non-NaN values |a| < |b| exactly when the bits of |a|
    // are below those of |b|, and a NaN lands above infinity, so either makes the row non-finite.
    let top = src
        .iter()
        .fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    let (scale, inv) = scale_of(f32::from_bits(top));
    let flip = if shift { 0x80 } else { 0 };
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = (quantise(s, inv) as u8) ^ flip;
    }
    for d in &mut dst[src.len()..] {
        *d = flip;
    }
    scale
}

/// `out = act(x · Wᵀ + bias + residual)` with every row of `x` (`m × k`, row-major) quantised to int8 with
/// its own scale (`max |x_row| / 127`), i32 products and sums, and the result dequantised in f32
/// (`row scale × channel scale`); `bias` has `n` values, `residual` and `out` `m × n`; `gelu` applies the
/// exact GELU. Non-finite activations give meaningless (but no undefined) results.
pub fn linear_i8(
    x: &[f32],
    m: usize,
    w: &PackedI8,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    gelu: bool,
    out: &mut [f32],
) -> Result<(), LowpError> {
    linear_i8_at(cpu().level, x, m, w, bias, residual, gelu, out).map(|_| ())
}

/// [`linear_i8`] at `level` or the best level below it this CPU has; returns the level that ran.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_i8_at(
    level: Level,
    x: &[f32],
    m: usize,
    w: &PackedI8,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    gelu: bool,
    out: &mut [f32],
) -> Result<Level, LowpError> {
    let (n, k, kp) = (w.n, w.k, w.kp);
    check_len("int8 input x", checked_len("int8 input x", m, k)?, x.len())?;
    let mn = checked_len("int8 output", m, n)?;
    check_len("int8 output", mn, out.len())?;
    if let Some(b) = bias {
        check_len("int8 bias", n, b.len())?;
    }
    if let Some(r) = residual {
        check_len("int8 residual", mn, r.len())?;
    }
    let level = effective(level);
    if m == 0 {
        return Ok(level);
    }
    let shift = level == Level::Avx512;
    let mut a = vec![0u8; checked_len("int8 input x", round_up(m, BLOCK), kp)?];
    let mut row_scales = vec![0f32; m];
    a.par_chunks_mut(kp)
        .zip(x.par_chunks(k))
        .zip(row_scales.par_iter_mut())
        .for_each(|((dst, src), s)| *s = quantise_row(src, dst, shift));
    let epi = Epilogue {
        n,
        bias,
        residual,
        gelu,
    };
    let outp = OutPtr::new(out, n);
    for_each_block(m, n, k, kp, |i0, rows, j0, cols| {
        let mut acc = [0i32; BLOCK * BLOCK];
        let a_blk = &a[i0 * kp..(i0 + BLOCK) * kp];
        let (p0, p1) = (w.panel(j0 / PANEL), w.panel(j0 / PANEL + 1));
        outp.prefetch(i0, rows, j0, cols);
        match level {
            Level::Amx => super::amx::block_i8(a_blk, kp, p0, p1, &mut acc),
            Level::Avx512 => avx512_block(a_blk, kp, rows, p0, p1, &mut acc),
            Level::Avx2 => avx2_block(a_blk, kp, rows, p0, p1, &mut acc),
            _ => portable_block(a_blk, kp, rows, p0, p1, &mut acc),
        }
        let mut vals = [0f32; BLOCK * BLOCK];
        let (sums, scales) = (&w.col_sums[j0..j0 + cols], &w.scales[j0..j0 + cols]);
        for ((v, a), &rs) in vals
            .chunks_exact_mut(BLOCK)
            .zip(acc.chunks_exact(BLOCK))
            .zip(&row_scales[i0..i0 + rows])
        {
            // Slices zipped, no indexing: the loops vectorise (16 columns per instruction on AVX-512).
            if shift {
                // Undo the +128 on the activations: Σ (q + 128) w = Σ q w + 128 Σ w.
                for (((o, &s), &sc), &cs) in
                    v[..cols].iter_mut().zip(&a[..cols]).zip(scales).zip(sums)
                {
                    *o = (s - 128 * cs) as f32 * (rs * sc);
                }
            } else {
                for ((o, &s), &sc) in v[..cols].iter_mut().zip(&a[..cols]).zip(scales) {
                    *o = s as f32 * (rs * sc);
                }
            }
        }
        // SAFETY: this block (rows i0.., columns j0..j0 + cols) belongs to this call of the closure alone:
        // `for_each_block` hands out every block once.
        unsafe { epi.finish_block(&mut vals, rows, cols, i0, j0, &outp) };
    });
    Ok(level)
}

/// The portable kernel: exact i32 sums of signed bytes.
pub(super) fn portable_block(
    a: &[u8],
    kp: usize,
    rows: usize,
    p0: &[i8],
    p1: &[i8],
    acc: &mut [i32],
) {
    for r in 0..rows {
        let ar = &a[r * kp..(r + 1) * kp];
        let mut s = [0i32; BLOCK];
        for g in 0..kp / GROUP {
            let q: [i32; GROUP] = std::array::from_fn(|e| i32::from(ar[g * GROUP + e] as i8));
            if q == [0; GROUP] {
                continue;
            }
            for (half, panel) in [p0, p1].into_iter().enumerate() {
                let wrow = &panel[g * GROUP * PANEL..(g + 1) * GROUP * PANEL];
                for c in 0..PANEL {
                    let wc = &wrow[c * GROUP..(c + 1) * GROUP];
                    s[half * PANEL + c] += (0..GROUP).map(|e| q[e] * i32::from(wc[e])).sum::<i32>();
                }
            }
        }
        acc[r * BLOCK..(r + 1) * BLOCK].copy_from_slice(&s);
    }
}

/// The AVX2 kernel for one block (activations signed, unshifted): `vpmaddubsw` multiplies unsigned by signed
/// bytes, so it takes |a| and the weights with a's sign moved onto them (`vpsignb`); a pair of such
/// products is at most 2 · 127 · 127 < 2¹⁵, so its i16 sum never saturates, and `vpmaddwd` by 1 widens the
/// pairs to i32: exact sums, the portable kernel's bit for bit. Register tiles of up to 4 rows × 16 columns.
fn avx2_block(a: &[u8], kp: usize, rows: usize, p0: &[i8], p1: &[i8], acc: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(cpu().avx2() && a.len() >= BLOCK * kp && p0.len() >= kp * PANEL);
        assert!(p1.len() >= kp * PANEL && acc.len() >= BLOCK * BLOCK);
        for (half, panel) in [p0, p1].into_iter().enumerate() {
            let mut r0 = 0;
            while r0 < rows {
                let ap = a[r0 * kp..].as_ptr();
                let cp = acc[r0 * BLOCK + half * PANEL..].as_mut_ptr();
                // SAFETY: the CPU has AVX2 (asserted above, from `cpu()`); the kernel reads `mr` rows of
                // `kp` bytes from `ap` (r0 + mr <= BLOCK rows of `a`, asserted), `kp / 4` rows of 64 bytes
                // from the panel (asserted), and writes `mr` rows of 16 to `cp` inside `acc`.
                unsafe {
                    match rows - r0 {
                        1 => x86::i8_tile_avx2::<1>(ap, kp, panel.as_ptr(), cp),
                        2 => x86::i8_tile_avx2::<2>(ap, kp, panel.as_ptr(), cp),
                        _ => x86::i8_tile_avx2::<4>(ap, kp, panel.as_ptr(), cp),
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

/// The AVX-512 VNNI kernel for one block (activations stored +128, unsigned).
fn avx512_block(a: &[u8], kp: usize, rows: usize, p0: &[i8], p1: &[i8], acc: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(cpu().avx512_vnni && a.len() >= BLOCK * kp && p0.len() >= kp * PANEL);
        assert!(p1.len() >= kp * PANEL && acc.len() >= BLOCK * BLOCK);
        let mut r0 = 0;
        while r0 < rows {
            let left = rows - r0;
            let ap = a[r0 * kp..].as_ptr();
            let cp = acc[r0 * BLOCK..].as_mut_ptr();
            // SAFETY: the CPU has AVX512F + AVX512_VNNI (asserted above, from `cpu()`); the kernel reads
            // `mr` rows of `kp` bytes from `ap` (r0 + mr <= BLOCK rows of `a`, asserted), `kp / 4` rows of
            // 64 bytes from each panel (asserted), and writes `mr` rows of 32 to `cp` inside `acc`.
            unsafe {
                match left {
                    1 => x86::i8_tile::<1>(ap, kp, p0.as_ptr(), p1.as_ptr(), cp),
                    2 => x86::i8_tile::<2>(ap, kp, p0.as_ptr(), p1.as_ptr(), cp),
                    3 | 4 => x86::i8_tile::<4>(ap, kp, p0.as_ptr(), p1.as_ptr(), cp),
                    _ => x86::i8_tile::<8>(ap, kp, p0.as_ptr(), p1.as_ptr(), cp),
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
    use super::{BLOCK, GROUP, PANEL};
    use std::arch::x86_64::*;

    /// `MR` rows × the 16 columns of one panel, AVX2: `c[r][..] = Σ_g madd(maddubs(|a[r] group g|,
    /// sign(panel row g, a[r] group g)), 1)`.
    ///
    /// # Safety
    /// AVX2 available; `a` readable for `MR` rows of `kp` signed bytes (row stride `kp`), `b` for `kp * 16`
    /// bytes, `c` writable for `MR` rows of 16 i32 with row stride [`BLOCK`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn i8_tile_avx2<const MR: usize>(
        a: *const u8,
        kp: usize,
        b: *const i8,
        c: *mut i32,
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        for g in 0..kp / GROUP {
            // SAFETY: row g < kp / 4 of the panel (64 bytes: columns 0..8 then 8..16), inside the bounds.
            let w = unsafe {
                let row = b.add(g * GROUP * PANEL);
                [
                    _mm256_loadu_si256(row as *const __m256i),
                    _mm256_loadu_si256(row.add(32) as *const __m256i),
                ]
            };
            for (r, accr) in acc.iter_mut().enumerate() {
                // SAFETY: bytes 4g .. 4g + 4 <= kp of row r < MR, inside the caller's bounds.
                let quad = unsafe { (a.add(r * kp + GROUP * g) as *const i32).read_unaligned() };
                let av = _mm256_set1_epi32(quad);
                let magnitude = _mm256_abs_epi8(av);
                for h in 0..2 {
                    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w[h], av));
                    accr[h] = _mm256_add_epi32(accr[h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            // SAFETY: row r < MR of `c`, 16 values, inside the caller's bounds.
            unsafe {
                _mm256_storeu_si256(c.add(r * BLOCK) as *mut __m256i, accr[0]);
                _mm256_storeu_si256(c.add(r * BLOCK + 8) as *mut __m256i, accr[1]);
            }
        }
    }

    /// `MR` rows × 32 columns: `c[r][..] = Σ_g dpbusd(a[r] group g, panel0 / panel1 row g)`.
    ///
    /// # Safety
    /// AVX512F and AVX512_VNNI available; `a` readable for `MR` rows of `kp` bytes (row stride `kp`), `b0`
    /// and `b1` for `kp * 16` bytes, `c` writable for `MR` rows of [`BLOCK`] i32.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn i8_tile<const MR: usize>(
        a: *const u8,
        kp: usize,
        b0: *const i8,
        b1: *const i8,
        c: *mut i32,
    ) {
        let mut acc = [[_mm512_setzero_si512(); 2]; MR];
        for g in 0..kp / GROUP {
            // SAFETY: row g < kp / 4 of panel 0, inside the caller's bounds.
            let w0 = unsafe { _mm512_loadu_si512(b0.add(g * GROUP * PANEL) as *const _) };
            // SAFETY: as above, panel 1.
            let w1 = unsafe { _mm512_loadu_si512(b1.add(g * GROUP * PANEL) as *const _) };
            for (r, accr) in acc.iter_mut().enumerate() {
                // SAFETY: bytes 4g .. 4g + 4 <= kp of row r < MR, inside the caller's bounds.
                let quad = unsafe { (a.add(r * kp + GROUP * g) as *const i32).read_unaligned() };
                let av = _mm512_set1_epi32(quad);
                accr[0] = _mm512_dpbusd_epi32(accr[0], av, w0);
                accr[1] = _mm512_dpbusd_epi32(accr[1], av, w1);
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            // SAFETY: row r < MR of `c`, 32 values, inside the caller's bounds.
            unsafe {
                _mm512_storeu_si512(c.add(r * BLOCK) as *mut _, accr[0]);
                _mm512_storeu_si512(c.add(r * BLOCK + PANEL) as *mut _, accr[1]);
            }
        }
    }
}

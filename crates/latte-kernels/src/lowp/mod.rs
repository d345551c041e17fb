//! Reduced-precision linear layers: bf16 (bf16 products, f32 accumulation) and int8 (dynamically quantised
//! activations, per-channel quantised weights, i32 accumulation), for `--dtype bf16|int8` encoding.
//!
//! Both compute `out = act(x · Wᵀ + bias + residual)` for `x` of `m × k` (row-major f32), `W` of `n × k` as
//! PyTorch's `Linear` stores it, and `act` either the identity or the exact (erf) GELU, in f32.
//!
//! * [`PackedBf16::pack`] rounds the weights to bf16 (round to nearest even, NaN kept) and lays them out in
//!   panels of 16 output columns, each k-pair of a panel one 64-byte row: `(w[j][2p], w[j][2p + 1])` for the
//!   16 columns `j` of the panel. That is the "VNNI" layout both `vdpbf16ps` and AMX `tdpbf16ps` read. k is
//!   padded with zeros to a multiple of 32 (the AMX tile depth), n to a multiple of 32.
//! * [`PackedI8::pack`] quantises each output channel symmetrically (`scale = max |w| / 127`) and lays the
//!   bytes out the same way in groups of 4 along k (k padded to 64); it keeps each channel's sum of
//!   quantised weights for the unsigned × signed `vpdpbusd` path.
//!
//! Kernels, chosen at run time from [`crate::cpu()`]: AMX tiles (`tdpbf16ps`, `tdpbssd`; 2 × 2 accumulator
//! tiles of 16 × 16, k streamed, written with `asm!` since the AMX intrinsics are unstable), AVX-512
//! (`vdpbf16ps`, `vpdpbusd` with 8 × 32 register tiles), AVX2 for CPUs without bf16 or VNNI instructions
//! (bf16 widened to f32 in registers and FMA; int8 through `vpmaddubsw` on |activation| and sign-moved
//! weights, 4 × 16 register tiles), and a portable path doing the same arithmetic in plain Rust. The int8
//! levels agree bit for bit; the bf16 levels agree up to the order of f32 additions (the AVX2 kernel and, on
//! Zen 4, `vdpbf16ps` match the portable order exactly). The AMX kernels are
//! untested on hardware so far.
//! Work is split over rayon in blocks of 64 rows × up to 512 columns.

mod amx;
mod bf16;
mod int8;
#[cfg(test)]
mod tests;

pub use bf16::{bf16_level, linear_bf16, PackedBf16};
pub use int8::{i8_level, linear_i8, PackedI8, MAX_K_I8};

use rayon::prelude::*;

/// A bad argument to a reduced-precision kernel.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LowpError {
    /// A slice of the wrong length.
    #[error("{what}: expected {expected} values, got {got}")]
    Length {
        /// Which argument.
        what: &'static str,
        /// The length the shapes call for.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A weight matrix with no rows or no columns.
    #[error(
        "{what}: a weight matrix needs n >= 1 outputs and k >= 1 inputs, got n = {n}, k = {k}"
    )]
    Empty {
        /// Which argument.
        what: &'static str,
        /// Outputs.
        n: usize,
        /// Inputs.
        k: usize,
    },
    /// Shapes whose product does not fit in memory.
    #[error("{what}: the shape {rows} × {cols} is too large")]
    TooLarge {
        /// Which argument.
        what: &'static str,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// A weight that cannot be quantised to int8.
    #[error(
        "int8 weights: output channel {channel}, input {input} is {value}; expected a finite value"
    )]
    NonFinite {
        /// The output channel (row of W).
        channel: usize,
        /// The input (column of W).
        input: usize,
        /// The value found.
        value: f32,
    },
}

/// Rows and columns of the blocks one micro-kernel call produces.
pub(crate) const BLOCK: usize = 32;
/// Output columns of one weight panel (one 64-byte row per k-group).
pub(crate) const PANEL: usize = 16;
/// Rows of one parallel task, and the most columns.
const TASK_ROWS: usize = 64;
const MAX_TASK_COLS: usize = 512;

pub(crate) fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

pub(crate) fn checked_len(
    what: &'static str,
    rows: usize,
    cols: usize,
) -> Result<usize, LowpError> {
    rows.checked_mul(cols)
        .ok_or(LowpError::TooLarge { what, rows, cols })
}

pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), LowpError> {
    if expected == got {
        Ok(())
    } else {
        Err(LowpError::Length {
            what,
            expected,
            got,
        })
    }
}

/// What follows the product: bias, residual and activation, for an output of `n` columns.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub n: usize,
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub gelu: bool,
}

impl Epilogue<'_> {
    /// Finishes the block of output rows `i0 .. i0 + rows`, columns `j0 .. j0 + cols` from the products in
    /// `vals` (row `r` at `vals[r·BLOCK..]`, its first `cols` values used): adds the bias and the residual in
    /// place, applies the activation to the whole block at once (one long slice, so the GELU loop runs on
    /// full vectors rather than on a 32-value row and its scalar tail), then writes each row of `out` once.
    /// The arithmetic per value is the same as element by element, bit for bit.
    ///
    /// # Safety
    /// The block's rows and columns of `out` belong to the caller alone (see [`OutPtr::row`]).
    #[inline(always)]
    pub unsafe fn finish_block(
        &self,
        vals: &mut [f32],
        rows: usize,
        cols: usize,
        i0: usize,
        j0: usize,
        out: &OutPtr,
    ) {
        let vals = &mut vals[..rows * BLOCK];
        let bias = self.bias.map(|b| &b[j0..j0 + cols]);
        for (r, v) in vals.chunks_exact_mut(BLOCK).enumerate() {
            let v = &mut v[..cols];
            let start = (i0 + r) * self.n + j0;
            let residual = self.residual.map(|res| &res[start..start + cols]);
            match (bias, residual) {
                (None, None) => {}
                (Some(b), None) => v.iter_mut().zip(b).for_each(|(o, b)| *o += b),
                (None, Some(res)) => v.iter_mut().zip(res).for_each(|(o, x)| *o += x),
                (Some(b), Some(res)) => v
                    .iter_mut()
                    .zip(b)
                    .zip(res)
                    .for_each(|((o, b), x)| *o = *o + b + x),
            }
        }
        if self.gelu {
            // The values past `cols` of each row are products with the zero padding of the weights (or
            // zeros): finite, computed and then dropped.
            crate::math::gelu_in_place(vals);
        }
        for (r, v) in vals.chunks_exact(BLOCK).enumerate() {
            // SAFETY: the caller's contract: rows i0.., columns j0..j0 + cols are this block's alone.
            let row = unsafe { out.row(i0 + r, j0, cols) };
            if let (Ok(dst), Ok(src)) = (
                <&mut [f32; BLOCK]>::try_from(&mut *row),
                <&[f32; BLOCK]>::try_from(v),
            ) {
                // A whole row of the block: a copy of known length, inlined (not a `memmove` call).
                *dst = *src;
            } else {
                row.copy_from_slice(&v[..cols]);
            }
        }
    }
}

/// The output matrix, shared by the tasks of one call; each task writes a disjoint block of it.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    ptr: *mut f32,
    len: usize,
    n: usize,
}

// SAFETY: the pointer comes from a `&mut [f32]` that outlives the parallel section (`for_each_block` does
// not return before every task has finished), and the tasks write disjoint blocks of it (see `row`).
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`: shared between tasks that write disjoint blocks only.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub fn new(out: &mut [f32], n: usize) -> Self {
        OutPtr {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            n,
        }
    }

    /// Asks the cache for the output lines of rows `i0 .. i0 + rows`, columns `j0 .. j0 + cols`, so that
    /// the epilogue after the product does not wait on them (the output rarely fits in cache).
    pub fn prefetch(&self, i0: usize, rows: usize, j0: usize, cols: usize) {
        #[cfg(target_arch = "x86_64")]
        for i in i0..i0 + rows {
            for c in (0..cols).step_by(16) {
                let p = self.ptr.wrapping_add(i * self.n + j0 + c);
                // SAFETY: a prefetch is a hint: it never faults and changes no memory, whatever the address.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        p as *const i8,
                    )
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (i0, rows, j0, cols);
    }

    /// Columns `j0 .. j0 + cols` of row `i`.
    ///
    /// # Safety
    /// No other live reference may overlap the returned one: the callers are the tasks of
    /// [`for_each_block`], each of which owns the rows and columns of its own block.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn row(&self, i: usize, j0: usize, cols: usize) -> &mut [f32] {
        let start = i * self.n + j0;
        assert!(j0 + cols <= self.n && start + cols <= self.len);
        // SAFETY: in bounds (asserted above); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), cols) }
    }
}

/// Calls `block(i0, rows, j0, cols)` for every [`BLOCK`] × [`BLOCK`] block of an `m × n` output (`i0`, `j0`
/// multiples of [`BLOCK`]), grouped into tasks of [`TASK_ROWS`] rows × a strip of columns whose packed
/// weights (`k_bytes` per column) fit in about half of a 1 MB L2, run on rayon when the product is large
/// enough to pay for it. Tasks are ordered column strip by column strip, so consecutive tasks reuse one
/// strip of weights from L2 while the activation rows stream; within a task the blocks of one 32-column
/// strip run together, so its weight panels are reused across the task's rows.
pub(crate) fn for_each_block<F>(m: usize, n: usize, k: usize, k_bytes: usize, block: F)
where
    F: Fn(usize, usize, usize, usize) + Sync,
{
    let task_cols = ((512 << 10) / k_bytes.max(1) / BLOCK * BLOCK).clamp(BLOCK, MAX_TASK_COLS);
    let row_tasks = m.div_ceil(TASK_ROWS);
    let col_tasks = n.div_ceil(task_cols);
    let task = |t: usize| {
        let (ti, tj) = (t % row_tasks, t / row_tasks);
        let (r0, r1) = (ti * TASK_ROWS, ((ti + 1) * TASK_ROWS).min(m));
        let (c0, c1) = (tj * task_cols, ((tj + 1) * task_cols).min(n));
        for j0 in (c0..c1).step_by(BLOCK) {
            for i0 in (r0..r1).step_by(BLOCK) {
                block(i0, BLOCK.min(r1 - i0), j0, BLOCK.min(c1 - j0));
            }
        }
    };
    let tasks = row_tasks * col_tasks;
    let flops = 2.0 * m as f64 * n as f64 * k as f64;
    if tasks <= 1 || flops < 4.0e6 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

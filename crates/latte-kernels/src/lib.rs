//! latte's kernels: every SIMD and hand-vectorised routine of the workspace, and the one place that decides
//! which of them run.
//!
//! * [`cpu`]: the CPU level ([`Level`]), detected once per process and capped by one environment variable,
//!   `LATTE_SIMD` (`portable`, `avx2`, `avx512`, `amx`; the older `LATTE_NO_AVX512=1` still caps at `avx2`).
//! * The models' kernels: [`gemm`] (packed weights and the 8 × 32 register tile, the products of a training
//!   layer), [`attention`] (forward and backward per (sequence, head)), [`math`] (`exp`, erf, GELU and its
//!   derivative, the normal CDF, softmax). Each public kernel has an `*_at(level, …)` form that runs at the
//!   level given (never above the process's), and a plain form at [`level()`].
//!
//! Every kernel has a plain Rust reference it is tested against, on odd sizes, at every level the machine
//! has. This is the only crate of the workspace with `unsafe` in hot code; each `unsafe` block says why it is
//! sound.
#![warn(missing_docs)]

/// Defines `$name`, which runs the `#[inline(always)]` function `$body` compiled for the widest vector level
/// of this CPU (at most the process's level, [`cpu()`]). For loops written for the compiler to vectorise:
/// every branch a select, fixed-width inner loops. A closure would not do: it is compiled on its own, for the
/// baseline level.
macro_rules! widest {
    ($vis:vis $name:ident = $body:ident($($arg:ident: $ty:ty),*)) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw")]
                fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                let c = crate::cpu::cpu();
                if c.avx512() {
                    // SAFETY: the CPU has AVX512F and AVX512BW (`Level::Avx512`, from `cpu()`).
                    return unsafe { avx512($($arg),*) };
                }
                if c.avx2() {
                    // SAFETY: the CPU has AVX2 and FMA (`Level::Avx2`, from `cpu()`).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub mod adamw;
pub mod alloc;
pub mod attention;
pub mod cpu;
pub mod dot;
pub mod gemm;
pub mod half;
pub mod lowp;
pub mod math;
pub mod prefetch;
pub mod random;
pub mod search;
#[cfg(test)]
mod testing;

pub use cpu::{cpu, level, Cpu, Level};

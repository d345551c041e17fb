//! latte's kernels: every SIMD and hand-vectorised routine of the workspace, and the one place that decides
//! which of them run.
//!
//! * [`cpu`]: the CPU level ([`Level`]), detected once per process and capped by one environment variable,
//!   `LATTE_SIMD` (`portable`, `avx2`, `avx512`, `amx`; the older `LATTE_NO_AVX512=1` still caps at `avx2`).
//!
//! Every kernel has a plain Rust reference it is tested against, on odd sizes, at every level the machine
//! has. This is the only crate of the workspace with `unsafe` in hot code; each `unsafe` block says why it is
//! sound.
#![warn(missing_docs)]

pub mod cpu;
pub mod dot;
pub mod half;
pub mod lowp;
pub mod prefetch;
pub mod search;

pub use cpu::{cpu, level, Cpu, Level};

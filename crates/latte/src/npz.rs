//! Reading and writing numpy `.npy` / `.npz` files of 2-D float32 arrays: latte-core's [`latte_core::npz`],
//! re-exported under the facade's old path.
//!
//! `latte encode` writes one `(tokens, dim)` float32 array per text as `arr_0 … arr_{n-1}`, the layout
//! `numpy.savez` produces, so `numpy.load(path)["arr_0"]` reads it back. Reading accepts float32, float16
//! and float64 arrays in C or Fortran order and converts them to float32.

pub use latte_core::npz::{npy_bytes, read_npy, read_npz, write_npz, NpzArchive};
pub use latte_core::Matrix;

//! The ops the layers run: candle custom ops over the kernels of [`latte_kernels`].
//!
//! * [`infer`]: fused inference ops (no backward pass);
//! * [`train`]: fused training ops with hand-written backward passes, up to whole encoder layers;
//! * [`params`]: the parameter holders they read (linear layers, layer norms);
//! * [`dropout`]: the keyed generator every dropout site draws its mask from.
//!
//! Nothing here imports the layers or the model: arrows point from the model to the layers, to these ops,
//! to the kernels.

pub(crate) mod dropout;
pub(crate) mod infer;
pub(crate) mod params;
pub(crate) mod train;

use candle_core::{DType, Tensor};
use latte_kernels::Level;

pub(crate) use params::HiddenAct;

/// The packed-weight kernels apply to `x`: a float32 CPU tensor, and the process runs at AVX2 + FMA or
/// above (the register tiles of [`latte_kernels::gemm`]; below, candle's ops run).
pub(crate) fn fast(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && latte_kernels::level() >= Level::Avx2
}

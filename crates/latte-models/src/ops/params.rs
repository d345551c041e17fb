//! The parameter holders the ops read: a linear layer's weight, bias and packing cache, a layer norm's
//! weight, bias and epsilon; a backbone's feed-forward activation ([`HiddenAct`]). Their mode-dependent
//! forward passes are in `layers::nn`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::Result;

/// `y = x Wᵀ + b`, with the weight stored `[out, in]` as PyTorch does.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Tensor>,
    /// The weight packed for the inference kernel, made on first use.
    pub packed: std::sync::Arc<std::sync::OnceLock<latte_kernels::gemm::Packed>>,
    /// The weight (and bias) packed for the reduced-precision kernels, made on first use at that dtype.
    pub lowp: std::sync::Arc<LowpCache>,
}

/// A linear layer's weights packed for `--dtype bf16` and `--dtype int8`, with its bias in f32.
#[derive(Debug, Default)]
pub(crate) struct LowpCache {
    pub bf16: std::sync::OnceLock<latte_kernels::lowp::PackedBf16>,
    pub int8: std::sync::OnceLock<latte_kernels::lowp::PackedI8>,
    pub bias: std::sync::OnceLock<Option<Vec<f32>>>,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// A layer over these tensors.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            packed: Default::default(),
            lowp: Default::default(),
        }
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }
    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.t()?;
        let y = match x.dims() {
            [b, l, d] => x.reshape((b * l, *d))?.matmul(&w)?.reshape((*b, *l, ()))?,
            _ => x.matmul(&w)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Layer normalisation over the last dimension, with an optional bias.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    pub(crate) eps: f64,
}

impl LayerNorm {
    /// Loads `weight` (and `bias` when `bias`) under `vb`.
    pub fn load(vb: VarBuilder, dim: usize, eps: f64, bias: bool) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let bias = if bias {
            Some(vb.get(dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias, eps })
    }
}

/// A backbone's feed-forward activation, parsed once when its `config.json` is read (`hidden_act` /
/// `hidden_activation`); an unknown name is a load error that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum HiddenAct {
    /// Exact GELU with erf (`gelu`, `gelu_python`).
    Gelu,
    /// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`, `gelu_accurate`).
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
    /// `tanh`.
    Tanh,
}

impl std::str::FromStr for HiddenAct {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        Ok(match name {
            "gelu" | "gelu_python" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_accurate" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            "tanh" => Self::Tanh,
            other => {
                return Err(format!(
                    "unsupported hidden activation {other:?} (supported: gelu, gelu_new, gelu_pytorch_tanh, relu, silu, tanh)"
                ))
            }
        })
    }
}

impl TryFrom<String> for HiddenAct {
    type Error = String;

    fn try_from(name: String) -> std::result::Result<Self, String> {
        name.parse()
    }
}

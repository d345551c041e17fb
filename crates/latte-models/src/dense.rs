//! PyLate's `Dense` projection: `y = act(W x + b)`, plus an optional residual added after the activation.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::nn::Linear;
use crate::{Error, Result};

/// A parameter-free activation, named like the torch class PyLate stores in `1_Dense/config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `torch.nn.Identity`.
    Identity,
    /// `torch.nn.ReLU`.
    ReLU,
    /// `torch.nn.ReLU6`.
    ReLU6,
    /// `torch.nn.LeakyReLU` (slope 0.01).
    LeakyReLU,
    /// `torch.nn.ELU` (alpha 1).
    ELU,
    /// `torch.nn.CELU` (alpha 1).
    CELU,
    /// `torch.nn.SELU`.
    SELU,
    /// `torch.nn.GELU` (exact, erf).
    GELU,
    /// `torch.nn.SiLU`.
    SiLU,
    /// `torch.nn.Mish`.
    Mish,
    /// `torch.nn.Sigmoid`.
    Sigmoid,
    /// `torch.nn.LogSigmoid`.
    LogSigmoid,
    /// `torch.nn.Tanh`.
    Tanh,
    /// `torch.nn.Tanhshrink`.
    Tanhshrink,
    /// `torch.nn.Softplus` (beta 1, threshold 20).
    Softplus,
    /// `torch.nn.Softsign`.
    Softsign,
    /// `torch.nn.Hardtanh` (−1, 1).
    Hardtanh,
    /// `torch.nn.Hardsigmoid`.
    Hardsigmoid,
    /// `torch.nn.Hardswish`.
    Hardswish,
    /// `torch.nn.Hardshrink` (lambda 0.5).
    Hardshrink,
    /// `torch.nn.Softshrink` (lambda 0.5).
    Softshrink,
}

const ACTIVATIONS: &[(Activation, &str, &str)] = &[
    (
        Activation::Identity,
        "Identity",
        "torch.nn.modules.linear.Identity",
    ),
    (Activation::ReLU, "ReLU", "torch.nn.modules.activation.ReLU"),
    (
        Activation::ReLU6,
        "ReLU6",
        "torch.nn.modules.activation.ReLU6",
    ),
    (
        Activation::LeakyReLU,
        "LeakyReLU",
        "torch.nn.modules.activation.LeakyReLU",
    ),
    (Activation::ELU, "ELU", "torch.nn.modules.activation.ELU"),
    (Activation::CELU, "CELU", "torch.nn.modules.activation.CELU"),
    (Activation::SELU, "SELU", "torch.nn.modules.activation.SELU"),
    (Activation::GELU, "GELU", "torch.nn.modules.activation.GELU"),
    (Activation::SiLU, "SiLU", "torch.nn.modules.activation.SiLU"),
    (Activation::Mish, "Mish", "torch.nn.modules.activation.Mish"),
    (
        Activation::Sigmoid,
        "Sigmoid",
        "torch.nn.modules.activation.Sigmoid",
    ),
    (
        Activation::LogSigmoid,
        "LogSigmoid",
        "torch.nn.modules.activation.LogSigmoid",
    ),
    (Activation::Tanh, "Tanh", "torch.nn.modules.activation.Tanh"),
    (
        Activation::Tanhshrink,
        "Tanhshrink",
        "torch.nn.modules.activation.Tanhshrink",
    ),
    (
        Activation::Softplus,
        "Softplus",
        "torch.nn.modules.activation.Softplus",
    ),
    (
        Activation::Softsign,
        "Softsign",
        "torch.nn.modules.activation.Softsign",
    ),
    (
        Activation::Hardtanh,
        "Hardtanh",
        "torch.nn.modules.activation.Hardtanh",
    ),
    (
        Activation::Hardsigmoid,
        "Hardsigmoid",
        "torch.nn.modules.activation.Hardsigmoid",
    ),
    (
        Activation::Hardswish,
        "Hardswish",
        "torch.nn.modules.activation.Hardswish",
    ),
    (
        Activation::Hardshrink,
        "Hardshrink",
        "torch.nn.modules.activation.Hardshrink",
    ),
    (
        Activation::Softshrink,
        "Softshrink",
        "torch.nn.modules.activation.Softshrink",
    ),
];

impl Activation {
    /// Parses a torch class name: `torch.nn.modules.activation.Tanh`, `torch.nn.Tanh` or `Tanh`.
    pub fn from_torch_name(name: &str) -> Result<Self> {
        let short = name.rsplit('.').next().unwrap_or(name);
        ACTIVATIONS
            .iter()
            .find(|(_, s, _)| *s == short)
            .map(|(a, _, _)| *a)
            .ok_or_else(|| {
                Error::UnknownActivation(
                    name.to_string(),
                    ACTIVATIONS
                        .iter()
                        .map(|(_, s, _)| *s)
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })
    }

    /// The fully qualified torch class name PyLate writes.
    pub fn torch_name(self) -> &'static str {
        ACTIVATIONS.iter().find(|(a, _, _)| *a == self).unwrap().2
    }

    /// Applies the activation with differentiable ops.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        let relu = |t: &Tensor| t.relu();
        Ok(match self {
            Activation::Identity => x.clone(),
            Activation::ReLU => x.relu()?,
            Activation::ReLU6 => x.clamp(0f32, 6f32)?,
            Activation::LeakyReLU => (relu(x)? - (relu(&x.neg()?)? * 0.01)?)?,
            Activation::ELU | Activation::CELU => {
                // max(0, x) + min(0, exp(x) − 1)
                let neg = (x.minimum(0f32)?.exp()? - 1.0)?;
                (relu(x)? + neg)?
            }
            Activation::SELU => {
                let alpha = 1.673_263_242_354_377_3;
                let scale = 1.050_700_987_355_480_5;
                let neg = ((x.minimum(0f32)?.exp()? - 1.0)? * alpha)?;
                ((relu(x)? + neg)? * scale)?
            }
            Activation::GELU => x.gelu_erf()?,
            Activation::SiLU => x.silu()?,
            Activation::Mish => (x * softplus(x)?.tanh()?)?,
            Activation::Sigmoid => sigmoid(x)?,
            Activation::LogSigmoid => softplus(&x.neg()?)?.neg()?,
            Activation::Tanh => x.tanh()?,
            Activation::Tanhshrink => (x - x.tanh()?)?,
            Activation::Softplus => softplus(x)?,
            Activation::Softsign => (x / (x.abs()? + 1.0)?)?,
            Activation::Hardtanh => x.clamp(-1f32, 1f32)?,
            Activation::Hardsigmoid => ((x + 3.0)?.clamp(0f32, 6f32)? / 6.0)?,
            Activation::Hardswish => (x * ((x + 3.0)?.clamp(0f32, 6f32)? / 6.0)?)?,
            Activation::Hardshrink => {
                let keep = x.abs()?.gt(0.5f64)?.to_dtype(x.dtype())?;
                (x * keep)?
            }
            Activation::Softshrink => (relu(&(x - 0.5)?)? - relu(&(x.neg()? - 0.5)?)?)?,
        })
    }
}

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// torch's Softplus with beta 1 and threshold 20: `x` where `x > 20`, else `log(1 + exp(x))`.
fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    // log(1 + exp(x)) = max(x, 0) + log(1 + exp(−|x|)) is stable and equals x (to f32) above 20.
    let stable = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let big = x.gt(20f64)?;
    big.where_cond(x, &stable)
}

/// The `config.json` of a Dense module folder, as PyLate writes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DenseConfig {
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether the linear layer has a bias.
    #[serde(default = "yes")]
    pub bias: bool,
    /// The torch activation class name.
    #[serde(default = "identity")]
    pub activation_function: String,
    /// Whether a residual connection is added after the activation.
    #[serde(default)]
    pub use_residual: bool,
}

fn yes() -> bool {
    true
}
fn identity() -> String {
    Activation::Identity.torch_name().to_string()
}

/// PyLate's `Dense` module, applied to every token embedding.
#[derive(Debug, Clone)]
pub struct Dense {
    /// The main projection.
    pub(crate) linear: Linear,
    /// The activation after the projection.
    pub activation: Activation,
    /// Whether the input is added back after the activation.
    pub use_residual: bool,
    /// The bias-free projection of the residual when `in != out`.
    pub(crate) residual: Option<Linear>,
}

impl Dense {
    /// Loads a Dense from weights named `linear.weight`, `linear.bias`, `residual.weight` under `vb`.
    pub fn load(vb: VarBuilder, config: &DenseConfig) -> Result<Self> {
        let activation = Activation::from_torch_name(&config.activation_function)?;
        let linear = Linear::load(
            vb.pp("linear"),
            config.in_features,
            config.out_features,
            config.bias,
        )?;
        let residual = if config.use_residual && config.in_features != config.out_features {
            Some(Linear::load(
                vb.pp("residual"),
                config.in_features,
                config.out_features,
                false,
            )?)
        } else {
            None
        };
        Ok(Self {
            linear,
            activation,
            use_residual: config.use_residual,
            residual,
        })
    }

    /// A new Dense with weights drawn like `torch.nn.Linear`'s default init (uniform ±1/√in), seeded.
    pub fn random(config: &DenseConfig, seed: u64, device: &Device) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let bound = 1.0 / (config.in_features as f32).sqrt();
        let mut uniform =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        let (i, o) = (config.in_features, config.out_features);
        let mut map = HashMap::new();
        map.insert(
            "linear.weight".to_string(),
            Tensor::from_vec(uniform(i * o), (o, i), device)?,
        );
        if config.bias {
            map.insert(
                "linear.bias".to_string(),
                Tensor::from_vec(uniform(o), o, device)?,
            );
        }
        if config.use_residual && i != o {
            map.insert(
                "residual.weight".to_string(),
                Tensor::from_vec(uniform(i * o), (o, i), device)?,
            );
        }
        let vb = VarBuilder::from_tensors(map, candle_core::DType::F32, device);
        Self::load(vb, config)
    }

    /// The configuration that describes this module.
    pub fn config(&self) -> DenseConfig {
        DenseConfig {
            in_features: self.linear.in_dim(),
            out_features: self.linear.out_dim(),
            bias: self.linear.bias.is_some(),
            activation_function: self.activation.torch_name().to_string(),
            use_residual: self.use_residual,
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.linear.in_dim()
    }
    /// Output features.
    pub fn out_features(&self) -> usize {
        self.linear.out_dim()
    }

    /// `act(linear(x)) (+ x or residual(x))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.activation.apply(&self.linear.forward(x)?)?;
        if !self.use_residual {
            return Ok(y);
        }
        Ok(match &self.residual {
            Some(r) => (y + r.forward(x)?)?,
            None => (y + x)?,
        })
    }

    /// The named tensors PyLate stores in `model.safetensors`.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("linear.weight".to_string(), self.linear.weight.clone())];
        if let Some(b) = &self.linear.bias {
            out.push(("linear.bias".to_string(), b.clone()));
        }
        if let Some(r) = &self.residual {
            out.push(("residual.weight".to_string(), r.weight.clone()));
        }
        out
    }

    /// Reads a Dense module folder (`config.json` + `model.safetensors` or `pytorch_model.bin`).
    pub fn from_folder(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config: DenseConfig =
            crate::io::read_json(&cfg_path, "the Dense module configuration")?;
        let tensors = crate::io::load_weights(dir, device)?;
        let vb = VarBuilder::from_tensors(tensors, candle_core::DType::F32, device);
        Self::load(vb, &config).map_err(|e| match e {
            Error::Candle(c) => {
                Error::bad(dir, format!("Dense weights do not match config.json: {c}"))
            }
            e => e,
        })
    }
}

impl fmt::Display for Dense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.config();
        write!(
            f,
            "Dense({{'in_features': {}, 'out_features': {}, 'bias': {}, 'activation_function': '{}', 'use_residual': {}}})",
            c.in_features,
            c.out_features,
            if c.bias { "True" } else { "False" },
            c.activation_function,
            if c.use_residual { "True" } else { "False" },
        )
    }
}

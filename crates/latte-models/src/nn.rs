//! Building blocks shared by the backbones: linear layers, layer norm, softmax and attention masks.
//!
//! Every op here has two paths. In inference ([`Mode::Infer`]) fused kernels are used where they exist
//! (candle's `layer_norm`; [`crate::fused`]'s linear layers with their residual and GELU, attention and
//! softmax); in training ([`Mode::Train`]) the same maths is written with elementary, differentiable ops,
//! because the fused kernels have no backward pass.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::Result;

/// Whether a forward pass must be differentiable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Frozen weights, fused kernels.
    #[default]
    Infer,
    /// Trainable weights: only ops with a backward pass.
    Train,
}

/// `y = x Wᵀ + b`, with the weight stored `[out, in]` as PyTorch does.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Tensor>,
    /// The weight packed for the AVX-512 inference kernel, made on first use.
    pub packed: std::sync::Arc<std::sync::OnceLock<crate::fused::Packed>>,
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
pub struct LayerNorm {
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

    /// Normalises `x`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Infer && x.dtype() == DType::F32 {
            let zeros;
            let bias = match &self.bias {
                Some(b) => b,
                None => {
                    zeros = self.weight.zeros_like()?;
                    &zeros
                }
            };
            return Ok(candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                bias,
                self.eps as f32,
            )?);
        }
        if mode == Mode::Train {
            if let Some(y) =
                crate::train_ops::layer_norm(x, &self.weight, self.bias.as_ref(), self.eps)?
            {
                return Ok(y);
            }
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = y.broadcast_mul(&self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Infer => crate::fused::softmax_last(x)?,
        Mode::Train if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 2 => {
            let mut dims = vec![1usize; x.rank()];
            dims[0] = x.dim(0)?;
            dims[x.rank() - 1] = x.dim(D::Minus1)?;
            let zeros = Tensor::zeros(dims, DType::F32, x.device())?;
            crate::train_ops::scaled_masked_softmax(x, 1.0, &zeros)?
        }
        Mode::Train => {
            let max = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        }
    })
}

/// Additive key mask `[batch, 1, 1, len]`: 0 where attended, a large negative number elsewhere.
pub fn key_mask_bias(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, l) = attention_mask.dims2()?;
    let m = attention_mask.to_dtype(dtype)?;
    let bias = ((m - 1.0)? * f32::MAX as f64)?;
    Ok(bias.reshape((b, 1, 1, l))?)
}

/// Scaled dot-product attention: `softmax(q kᵀ · scale + bias) v` for `[b, h, l, d]` inputs (in
/// inference, a fused kernel where one applies: then `q`, `k`, `v` may have any strides, and the result
/// is a transposed view of a `[b, l, h, d]` tensor).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: &Tensor,
    mode: Mode,
) -> Result<Tensor> {
    attention_dropout(q, k, v, scale, bias, mode, 0.0)
}

/// [`attention`] with dropout of probability `p` on the attention probabilities (training only, see
/// [`dropout`]).
pub fn attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: &Tensor,
    mode: Mode,
    p: f64,
) -> Result<Tensor> {
    if mode == Mode::Infer {
        if let Some(out) = crate::fused::attention(q, k, v, scale, bias)? {
            return Ok(out);
        }
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let probs = if mode == Mode::Train {
        crate::train_ops::scaled_masked_softmax(&q.matmul(&k.t()?)?, scale, bias)?
    } else {
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = scores.broadcast_add(bias)?;
        softmax_last(&scores, mode)?
    };
    let probs = dropout(&probs, p, mode)?;
    Ok(probs.matmul(&v)?)
}

impl Linear {
    /// `x Wᵀ + b`: a fused CPU kernel in inference, differentiable ops in training.
    pub fn run(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Infer => crate::fused::linear(self, x),
            Mode::Train => match crate::train_ops::linear(x, &self.weight, self.bias.as_ref())? {
                Some(y) => Ok(y),
                None => Ok(self.forward(x)?),
            },
        }
    }

    /// `x Wᵀ + b + residual`, the addition fused into the kernel in inference.
    pub fn run_add(&self, x: &Tensor, residual: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Infer => crate::fused::linear_ex(self, x, Some(residual), false),
            Mode::Train => Ok((self.run(x, mode)? + residual)?),
        }
    }

    /// `act(x Wᵀ + b)` for a `hidden_act` name, exact GELU fused into the kernel in inference.
    pub fn run_act(&self, x: &Tensor, act: &str, mode: Mode) -> Result<Tensor> {
        match (mode, act) {
            (Mode::Infer, "gelu" | "gelu_python") => crate::fused::linear_ex(self, x, None, true),
            _ => hidden_act(act, &self.run(x, mode)?, mode),
        }
    }
}

/// Separate query, key and value projections of `[b, l, h]` hidden states, split into `[b, heads, l, d]`
/// tensors. In inference the three run as one packed layer (cached in `cache`) where the fused kernel
/// applies, and the results are strided views of its output.
pub fn qkv_heads(
    layers: [&Linear; 3],
    cache: &std::sync::OnceLock<crate::fused::Packed>,
    x: &Tensor,
    heads: usize,
    mode: Mode,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, _) = x.dims3()?;
    if mode == Mode::Infer {
        if let Some(qkv) = crate::fused::linear_cat(&layers, cache, x)? {
            let n = layers[0].out_dim();
            if layers.iter().all(|t| t.out_dim() == n) {
                let qkv = qkv.reshape((b, l, 3, heads, n / heads))?;
                let take = |i: usize| -> Result<Tensor> {
                    Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?)
                };
                return Ok((take(0)?, take(1)?, take(2)?));
            }
        }
    }
    let split = |t: Tensor| -> Result<Tensor> {
        let d = t.dim(2)? / heads;
        Ok(t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()?)
    };
    Ok((
        split(layers[0].run(x, mode)?)?,
        split(layers[1].run(x, mode)?)?,
        split(layers[2].run(x, mode)?)?,
    ))
}

/// The activations backbones name in `config.json` (`hidden_act`).
pub fn hidden_act(name: &str, x: &Tensor, mode: Mode) -> Result<Tensor> {
    Ok(match name {
        "gelu" | "gelu_python" if mode == Mode::Infer => crate::fused::gelu_erf(x)?,
        "gelu" | "gelu_python" => crate::train_ops::gelu_erf(x)?,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_accurate" => x.gelu()?,
        "relu" => x.relu()?,
        "silu" | "swish" => x.silu()?,
        "tanh" => x.tanh()?,
        other => {
            return Err(crate::Error::Invalid(format!(
                "unsupported hidden activation {other:?} (supported: gelu, gelu_new, gelu_pytorch_tanh, relu, silu, tanh)"
            )))
        }
    })
}

/// Rotary tables `(cos, sin)`, each `[len, dim]`, for positions `0..len`: inverse frequencies
/// `1 / (base^(2i/dim) · scale)` (`scale` is the linear position-interpolation factor, 1 for none),
/// repeated over both halves as GPT-NeoX-style rotary uses them.
pub fn rope_tables(
    base: f64,
    scale: f64,
    dim: usize,
    len: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..dim / 2)
        .map(|i| (1.0 / base.powf((2 * i) as f64 / dim as f64) / scale) as f32)
        .collect();
    let inv = Tensor::from_vec(inv, (1, dim / 2), device)?;
    let pos = Tensor::arange(0u32, len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((len, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    let emb = Tensor::cat(&[&freqs, &freqs], 1)?;
    Ok((emb.cos()?, emb.sin()?))
}

/// `x·cos + rotate_half(x)·sin` on the first `cos.dim(-1)` features of `[b, h, l, d]` (the rest pass
/// through unchanged, for partial rotary), with `[l, rotary_dim]` tables from [`rope_tables`].
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let dim = cos.dim(D::Minus1)?;
    let r = if dim == d {
        x.clone()
    } else {
        x.narrow(D::Minus1, 0, dim)?
    };
    let x1 = r.narrow(D::Minus1, 0, dim / 2)?;
    let x2 = r.narrow(D::Minus1, dim / 2, dim / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let out = (r.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?;
    if dim == d {
        Ok(out)
    } else {
        Ok(Tensor::cat(
            &[&out, &x.narrow(D::Minus1, dim, d - dim)?],
            D::Minus1,
        )?)
    }
}

thread_local! {
    static DROPOUT: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with dropout switched on (for [`Mode::Train`] forward passes on this thread), masks drawn
/// deterministically from `seed`: the same seed and the same sequence of ops give the same masks, which
/// is what gradient caching needs to replay a forward pass. `None` runs `f` with dropout off.
pub fn with_dropout<R>(seed: Option<u64>, f: impl FnOnce() -> R) -> R {
    let prev = DROPOUT.with(|d| d.replace(seed.map(|s| (s, 0))));
    let out = f();
    DROPOUT.with(|d| d.set(prev));
    out
}

/// The seed of the enclosing [`with_dropout`], if dropout is on.
pub fn dropout_seed() -> Option<u64> {
    DROPOUT.with(|d| d.get().map(|(s, _)| s))
}

pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of the next dropout site of the enclosing [`with_dropout`] (advancing its counter as
/// [`dropout`] does), or `None` when dropout is off. Fused ops draw their masks from it.
pub(crate) fn next_dropout_key() -> Option<u64> {
    DROPOUT.with(|d| {
        let (seed, counter) = d.get()?;
        d.set(Some((seed, counter + 1)));
        Some(splitmix(seed ^ splitmix(counter)))
    })
}

/// Inverted dropout as `torch.nn.Dropout` in training: each element is zeroed with probability `p` and
/// the rest scaled by `1 / (1 − p)`. Only in [`Mode::Train`] inside [`with_dropout`]; the identity
/// otherwise (inference, or training with dropout off).
pub fn dropout(x: &Tensor, p: f64, mode: Mode) -> Result<Tensor> {
    if mode != Mode::Train || p <= 0.0 {
        return Ok(x.clone());
    }
    let Some((seed, counter)) = DROPOUT.with(|d| d.get()) else {
        return Ok(x.clone());
    };
    DROPOUT.with(|d| d.set(Some((seed, counter + 1))));
    if p >= 1.0 {
        return Ok(x.zeros_like()?);
    }
    use rayon::prelude::*;
    let n = x.elem_count();
    let keep = 1.0 / (1.0 - p) as f32;
    let threshold = (p * (1u64 << 32) as f64) as u64;
    let base = splitmix(seed ^ splitmix(counter));
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(4096).enumerate().for_each(|(c, m)| {
        let mut state = splitmix(base ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        for pair in m.chunks_mut(2) {
            state = splitmix(state);
            for (i, v) in pair.iter_mut().enumerate() {
                let r = (state >> (32 * i)) & 0xFFFF_FFFF;
                *v = if r >= threshold { keep } else { 0.0 };
            }
        }
    });
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

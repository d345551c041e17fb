//! Building blocks shared by the backbones: linear layers, layer norm, softmax and attention masks.
//!
//! Every op here has two paths. In inference ([`Mode::Infer`]) fused kernels are used where they exist
//! (candle's `layer_norm`; [`crate::ops::infer`]'s linear layers with their residual and GELU, attention and
//! softmax); in training ([`Mode::Train`]) the same maths is written with elementary, differentiable ops,
//! because the fused kernels have no backward pass.

use candle_core::{DType, Module, Tensor, D};

pub(crate) use crate::ops::dropout::next_dropout_key;
#[cfg(doc)]
use crate::ops::dropout::with_dropout;
pub(crate) use crate::ops::params::{HiddenAct, LayerNorm, Linear};
use crate::ops::{infer, train};
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

impl LayerNorm {
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
            if let Some(y) = train::layer_norm(x, &self.weight, self.bias.as_ref(), self.eps)? {
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
        Mode::Infer => infer::softmax_last(x)?,
        Mode::Train if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 2 => {
            let mut dims = vec![1usize; x.rank()];
            dims[0] = x.dim(0)?;
            dims[x.rank() - 1] = x.dim(D::Minus1)?;
            let zeros = Tensor::zeros(dims, DType::F32, x.device())?;
            train::scaled_masked_softmax(x, 1.0, &zeros)?
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
        if let Some(out) = infer::attention(q, k, v, scale, bias)? {
            return Ok(out);
        }
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let probs = if mode == Mode::Train {
        train::scaled_masked_softmax(&q.matmul(&k.t()?)?, scale, bias)?
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
            Mode::Infer => infer::linear(self, x),
            Mode::Train => match train::linear(x, &self.weight, self.bias.as_ref())? {
                Some(y) => Ok(y),
                None => Ok(self.forward(x)?),
            },
        }
    }

    /// `x Wᵀ + b + residual`, the addition fused into the kernel in inference.
    pub fn run_add(&self, x: &Tensor, residual: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Infer => infer::linear_ex(self, x, Some(residual), false),
            Mode::Train => Ok((self.run(x, mode)? + residual)?),
        }
    }

    /// `act(x Wᵀ + b)`, exact GELU fused into the kernel in inference.
    pub fn run_act(&self, x: &Tensor, act: HiddenAct, mode: Mode) -> Result<Tensor> {
        match (mode, act) {
            (Mode::Infer, HiddenAct::Gelu) => infer::linear_ex(self, x, None, true),
            _ => act.apply(&self.run(x, mode)?, mode),
        }
    }
}

/// Separate query, key and value projections of `[b, l, h]` hidden states, split into `[b, heads, l, d]`
/// tensors. In inference the three run as one packed layer (cached in `cache`) where the fused kernel
/// applies, and the results are strided views of its output.
pub fn qkv_heads(
    layers: [&Linear; 3],
    cache: &std::sync::OnceLock<latte_kernels::gemm::Packed>,
    x: &Tensor,
    heads: usize,
    mode: Mode,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, _) = x.dims3()?;
    if mode == Mode::Infer {
        if let Some(qkv) = infer::linear_cat(&layers, cache, x)? {
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

impl HiddenAct {
    /// Applies the activation (exact GELU through the fused ops on float32 CPU tensors).
    pub fn apply(self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(match self {
            Self::Gelu if mode == Mode::Infer => infer::gelu_erf(x)?,
            Self::Gelu => train::gelu_erf(x)?,
            Self::GeluTanh => x.gelu()?,
            Self::Relu => x.relu()?,
            Self::Silu => x.silu()?,
            Self::Tanh => x.tanh()?,
        })
    }
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

/// Inverted dropout as `torch.nn.Dropout` in training: each element is zeroed with probability `p` and
/// the rest scaled by `1 / (1 − p)`. Only in [`Mode::Train`] inside [`with_dropout`]; the identity
/// otherwise (inference, or training with dropout off).
pub fn dropout(x: &Tensor, p: f64, mode: Mode) -> Result<Tensor> {
    if mode != Mode::Train || p <= 0.0 {
        return Ok(x.clone());
    }
    let Some(base) = next_dropout_key() else {
        return Ok(x.clone());
    };
    if p >= 1.0 {
        return Ok(x.zeros_like()?);
    }
    use rayon::prelude::*;
    let n = x.elem_count();
    let keep = 1.0 / (1.0 - p) as f32;
    let threshold = (p * (1u64 << 32) as f64) as u64;
    let mut mask = vec![0f32; n];
    mask.par_chunks_mut(4096).enumerate().for_each(|(c, m)| {
        crate::ops::dropout::mask(base, c as u64, threshold, keep, m);
    });
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::sync::OnceLock;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_attention_matches_differentiable_attention() {
        let dev = Device::Cpu;
        for (b, l, heads, d, masked) in [(1, 1, 1, 4, 0), (2, 9, 3, 8, 2), (3, 37, 2, 33, 5)] {
            let h = heads * d;
            let x = Tensor::randn(0f32, 1.0, (b, l, h), &dev).unwrap();
            let lin = || {
                Linear::new(
                    Tensor::randn(0f32, 0.3, (h, h), &dev).unwrap(),
                    Some(Tensor::randn(0f32, 1.0, h, &dev).unwrap()),
                )
            };
            let (wq, wk, wv) = (lin(), lin(), lin());
            let cache = OnceLock::new();
            let mut mask = vec![1u32; b * l];
            for row in mask.chunks_mut(l).skip(1) {
                row[l - masked.min(l - 1)..].iter_mut().for_each(|m| *m = 0);
            }
            let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
            let bias = key_mask_bias(&mask, DType::F32).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let run = |mode| {
                let (q, k, v) = qkv_heads([&wq, &wk, &wv], &cache, &x, heads, mode).unwrap();
                attention(&q, &k, &v, scale, &bias, mode)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, l, h))
                    .unwrap()
            };
            let want = run(Mode::Train);
            let size = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_diff(&run(Mode::Infer), &want);
            assert!(d < 1e-5 * size.max(1.0), "{d} (values up to {size})");
            // A bias per query (sliding windows) as well.
            let window = Tensor::randn(0f32, 1.0, (1, 1, l, l), &dev).unwrap();
            let bias2 = bias.broadcast_add(&window).unwrap();
            let (q, k, v) = qkv_heads([&wq, &wk, &wv], &cache, &x, heads, Mode::Infer).unwrap();
            let a = attention(&q, &k, &v, scale, &bias2, Mode::Infer).unwrap();
            let (q, k, v) = qkv_heads([&wq, &wk, &wv], &cache, &x, heads, Mode::Train).unwrap();
            let want = attention(&q, &k, &v, scale, &bias2, Mode::Train).unwrap();
            assert!(max_diff(&a, &want) < 1e-5 * size.max(1.0));
        }
    }
}

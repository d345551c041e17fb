//! Fused CPU ops with backward passes, for training ([`Mode::Train`](crate::Mode)).
//!
//! Written with candle's elementary ops, a softmax over attention scores or a layer norm allocates and
//! walks half a dozen full-size temporaries forward and again backward; these do each in one parallel
//! pass and give candle the gradient directly. They are used on float32 CPU tensors; elsewhere the
//! elementary (differentiable) ops run.
//!
//! The whole encoder layers of BERT (also XLM-R / RoBERTa and jina's flash XLM-R) and ModernBERT as single
//! ops with hand-written backward passes are in [`bert`] and [`modernbert`], on the pieces of [`shared`].

mod bert;
mod modernbert;
mod shared;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use latte_kernels::{gemm, math, Level};
use rayon::prelude::*;

use crate::Result;

pub(crate) use bert::{bert_layer, bert_layer_unpadded, BertLayerParams, LayerDropout, QkvParams};
pub(crate) use modernbert::{modernbert_layer, ModernBertAttention, ModernBertLayerParams};
pub use shared::with_fused_layers;
#[cfg(test)]
pub(crate) use {
    bert::bert_layer_on,
    shared::{Kernels, FORCE_PORTABLE},
};

/// The float32 elements of a contiguous CPU storage (the op `what` names it in errors).
pub(crate) fn slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: float32 only");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: input must be contiguous");
    };
    Ok(&v[a..b])
}

/// Rows handed to one rayon task, so that small rows are not scheduled one by one.
fn chunk_rows(row: usize) -> usize {
    (16384 / row.max(1)).max(1)
}

/// `softmax(x · scale + key_bias)` over the last dimension, where `key_bias` (`[b, n]`) is added to every
/// row of batch item `b` (rows are grouped by batch item in order).
struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "latte-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let bias = slice(s2, l2, self.name())?;
        let n = *l1.dims().last().unwrap_or(&1);
        let (b, bn) = l2.shape().dims2()?;
        if bn != n || x.len() % (b * n) != 0 {
            candle_core::bail!(
                "latte-masked-softmax: bias {:?} does not fit scores {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let rows_per_item = x.len() / (b * n);
        let mut out = vec![0f32; x.len()];
        let cr = chunk_rows(n);
        out.par_chunks_mut(n * cr)
            .zip(x.par_chunks(n * cr))
            .enumerate()
            .for_each(|(c, (o, xi))| {
                for (r, (orow, xrow)) in o.chunks_mut(n).zip(xi.chunks(n)).enumerate() {
                    let item = (c * cr + r) / rows_per_item;
                    let brow = &bias[item * n..(item + 1) * n];
                    orow.copy_from_slice(xrow);
                    math::softmax_row(orow, self.scale, Some(brow));
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = res
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

/// `scale · y ⊙ (dy − Σ dy ⊙ y)` row by row.
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "latte-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, self.name())?;
        let dy = slice(s2, l2, self.name())?;
        let n = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; y.len()];
        let cr = chunk_rows(n);
        out.par_chunks_mut(n * cr)
            .zip(y.par_chunks(n * cr).zip(dy.par_chunks(n * cr)))
            .for_each(|(o, (yc, dc))| {
                for ((orow, yrow), drow) in o.chunks_mut(n).zip(yc.chunks(n)).zip(dc.chunks(n)) {
                    let dot: f32 = yrow.iter().zip(drow).map(|(a, b)| a * b).sum();
                    for ((ov, &yv), &dv) in orow.iter_mut().zip(yrow).zip(drow) {
                        *ov = self.scale * yv * (dv - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax of `x · scale + bias` over the last dimension, differentiable with respect to `x`. `bias`
/// broadcasts against `x` and is a constant (an attention mask). On float32 CPU tensors with a
/// `[b, 1, …, 1, n]` key bias this is one fused pass forward and one backward.
pub fn scaled_masked_softmax(x: &Tensor, scale: f64, bias: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    let b = x.dim(0)?;
    let key_bias = bias.dims().first() == Some(&b)
        && bias.dims().last() == Some(&n)
        && bias.dims()[1..bias.rank() - 1].iter().all(|&d| d == 1)
        && bias.rank() == x.rank();
    if x.device().is_cpu() && x.dtype() == DType::F32 && bias.dtype() == DType::F32 && key_bias {
        let bias = bias.reshape((b, n))?.detach();
        return Ok(x.contiguous()?.apply_op2(
            &bias.contiguous()?,
            MaskedSoftmax {
                scale: scale as f32,
            },
        )?);
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let y = (x * scale)?.broadcast_add(&bias.detach())?;
        let zero = Tensor::zeros((b, n), DType::F32, x.device())?;
        // Rows of the zero bias are all 0: grouping by batch item is irrelevant.
        return Ok(y
            .contiguous()?
            .apply_op2(&zero, MaskedSoftmax { scale: 1.0 })?);
    }
    let y = (x * scale)?.broadcast_add(bias)?;
    let max = y.max_keepdim(D::Minus1)?.detach();
    let e = y.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Layer norm over the last dimension with weight and bias (a zero tensor when the layer has none).
struct LayerNormOp {
    eps: f32,
}

fn ln_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "latte-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let b = slice(s3, l3, self.name())?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        let cr = chunk_rows(n);
        out.par_chunks_mut(n * cr)
            .zip(x.par_chunks(n * cr))
            .for_each(|(o, xc)| {
                for (orow, xrow) in o.chunks_mut(n).zip(xc.chunks(n)) {
                    let (mean, rstd) = ln_stats(xrow, self.eps);
                    for i in 0..n {
                        orow[i] = (xrow[i] - mean) * rstd * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.dim(0)?;
        let x = x.contiguous()?;
        let g = grad.contiguous()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let gs = g.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.to_vec1::<f32>()?;
        let rows = xs.len() / n;
        let cr = chunk_rows(n);
        let mut dx = vec![0f32; xs.len()];
        // Per chunk of rows: dx, and partial sums of dw and db.
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(n * cr)
            .zip(xs.par_chunks(n * cr).zip(gs.par_chunks(n * cr)))
            .map(|(dxc, (xc, gc))| {
                let mut dw = vec![0f32; n];
                let mut db = vec![0f32; n];
                let mut xhat = vec![0f32; n];
                for ((dxr, xr), gr) in dxc.chunks_mut(n).zip(xc.chunks(n)).zip(gc.chunks(n)) {
                    let (mean, rstd) = ln_stats(xr, self.eps);
                    let mut s1 = 0f32;
                    let mut s2 = 0f32;
                    for i in 0..n {
                        xhat[i] = (xr[i] - mean) * rstd;
                        let gw = gr[i] * ws[i];
                        s1 += gw;
                        s2 += gw * xhat[i];
                        dw[i] += gr[i] * xhat[i];
                        db[i] += gr[i];
                    }
                    let (m1, m2) = (s1 / n as f32, s2 / n as f32);
                    for i in 0..n {
                        dxr[i] = rstd * (gr[i] * ws[i] - m1 - xhat[i] * m2);
                    }
                }
                (dw, db)
            })
            .collect();
        let mut dw = vec![0f32; n];
        let mut db = vec![0f32; n];
        for (pw, pb) in partial {
            for i in 0..n {
                dw[i] += pw[i];
                db[i] += pb[i];
            }
        }
        let _ = rows;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, n, dev)?),
            Some(Tensor::from_vec(db, n, dev)?),
        ))
    }
}

/// Layer norm over the last dimension, differentiable in `x`, `weight` and `bias`; one fused pass each
/// way on float32 CPU tensors. `None` when it does not apply (other devices or dtypes).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32) {
        return Ok(None);
    }
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = weight.zeros_like()?;
            &zeros
        }
    };
    Ok(Some(x.contiguous()?.apply_op3(
        weight,
        bias,
        LayerNormOp { eps: eps as f32 },
    )?))
}

/// GELU with the exact erf, `x · Φ(x)`, with its derivative `Φ(x) + x · φ(x)`; parallel over elements.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "latte-gelu-erf-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let mut out = vec![0f32; x.len()];
        math::gelu_slice(x, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &GeluErfBackward)?,
        ))
    }
}

struct GeluErfBackward;

impl CustomOp2 for GeluErfBackward {
    fn name(&self) -> &'static str {
        "latte-gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        if x.len() != g.len() {
            candle_core::bail!("{}: {} inputs, {} gradients", self.name(), x.len(), g.len());
        }
        let mut out = g.to_vec();
        math::gelu_backward(x, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Exact-erf GELU, differentiable; fused and parallel on float32 CPU tensors.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1(GeluErf)?);
    }
    Ok(x.gelu_erf()?)
}

/// `y[m, n] = x[m, k] · Wᵀ + b` on the AVX-512 kernel, with a backward pass on the same kernel:
/// `dx = dy · W`, `dW = dyᵀ · x`, `db = Σ dy`. Weights change every step, so they are packed per call
/// (`O(n·k)` against the `O(m·n·k)` product). With `bf16` (inside `latte train --dtype bf16`) the three
/// products round their operands to bf16 and accumulate in f32.
struct TrainLinear {
    bf16: bool,
}

impl TrainLinear {
    fn product(
        &self,
        a: &[f32],
        m: usize,
        b_rows: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        // a[m, k] · b_rowsᵀ where b_rows is [n, k].
        let kern = shared::Kernels {
            level: Level::Avx512,
            bf16: self.bf16,
        };
        shared::linear_rows(kern, a, m, b_rows, bias, n, k)
    }
}

impl CustomOp3 for TrainLinear {
    fn name(&self) -> &'static str {
        "latte-train-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let b = slice(s3, l3, self.name())?;
        let (n, k) = l2.shape().dims2()?;
        let m = x.len() / k.max(1);
        let y = self.product(x, m, w, n, k, Some(b));
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (n, _) = w.dims2()?;
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let gs = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // dx[m, k] = g[m, n] · W[n, k] = g · (Wᵀ)ᵀ, Wᵀ as rows [k, n].
        let dx = self.product(&gs, m, &gemm::transpose(&ws, n, k), k, n, None);
        // dW[n, k] = gᵀ[n, m] · x[m, k] = gᵀ · (xᵀ)ᵀ, xᵀ as rows [k, m].
        let gt = gemm::transpose(&gs, m, n);
        let dw = self.product(&gt, n, &gemm::transpose(&xs, m, k), k, m, None);
        let db: Vec<f32> = gt.par_chunks(m.max(1)).map(|r| r.iter().sum()).collect();
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, k), dev)?),
            Some(Tensor::from_vec(dw, (n, k), dev)?),
            Some(Tensor::from_vec(db, n, dev)?),
        ))
    }
}

/// `x Wᵀ + b` for training on the AVX-512 kernel (forward and backward), for float32 CPU tensors on a
/// CPU with AVX-512F; `None` where it does not apply (the caller uses candle's matmul).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    {
        if super::fast(x) && weight.dtype() == DType::F32 && weight.rank() == 2 {
            let (n, k) = weight.dims2()?;
            let dims = x.dims().to_vec();
            if dims.last() != Some(&k) {
                return Ok(None);
            }
            let m: usize = dims[..dims.len() - 1].iter().product();
            let zeros;
            let b = match bias {
                Some(b) => b,
                None => {
                    zeros = Tensor::zeros(n, DType::F32, x.device())?;
                    &zeros
                }
            };
            let y = x.reshape((m, k))?.contiguous()?.apply_op3(
                &weight.contiguous()?,
                b,
                TrainLinear {
                    bf16: crate::dtype::current() == crate::Dtype::Bf16,
                },
            )?;
            let mut out = dims;
            *out.last_mut().expect("rank ≥ 1") = n;
            return Ok(Some(y.reshape(out)?));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod gradient_tests {
    //! Every custom backward pass of this module against central differences of `Σ up ⊙ f(inputs)`.

    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic values in [-2, 2).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// `Σ up ⊙ y`, summed in f64.
    fn weighted(y: &Tensor, up: &[f32]) -> f64 {
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        y.iter().zip(up).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    /// Checks candle's gradients of `Σ up ⊙ f(inputs)` (through the custom backward passes inside `f`)
    /// against central differences, element by element, for every input.
    fn check(inputs: &[(Vec<f32>, Vec<usize>)], f: impl Fn(&[Tensor]) -> Tensor, what: &str) {
        let dev = Device::Cpu;
        let vars: Vec<Var> = inputs
            .iter()
            .map(|(v, s)| Var::from_vec(v.clone(), s.as_slice(), &dev).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let up = values(y.elem_count(), 99);
        let upt = Tensor::from_vec(up.clone(), y.shape(), &dev).unwrap();
        let grads = (y * upt).unwrap().sum_all().unwrap().backward().unwrap();
        let eps = 1e-2f32;
        for (i, (v, s)) in inputs.iter().enumerate() {
            let g: Vec<f32> = grads
                .get(&vars[i])
                .unwrap_or_else(|| panic!("{what}: no gradient for input {i}"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for j in 0..v.len() {
                let at = |delta: f32| {
                    let mut w = v.clone();
                    w[j] += delta;
                    let mut moved = ts.clone();
                    moved[i] = Tensor::from_vec(w, s.as_slice(), &dev).unwrap();
                    weighted(&f(&moved), &up)
                };
                let num = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                assert!(
                    (g[j] as f64 - num).abs() <= 3e-3 * (1.0 + num.abs()),
                    "{what}: input {i} element {j}: backward {} vs central difference {num}",
                    g[j]
                );
            }
        }
    }

    #[test]
    fn masked_scaled_softmax_backward_matches_central_differences() {
        let (b, h, l, n) = (2, 2, 3, 7);
        let mut bias = values(b * n, 5);
        bias[3] = -1e9; // a masked key
        let bias = Tensor::from_vec(bias, (b, 1, 1, n), &Device::Cpu).unwrap();
        check(
            &[(values(b * h * l * n, 1), vec![b, h, l, n])],
            |t| scaled_masked_softmax(&t[0], 0.7, &bias).unwrap(),
            "masked softmax (key bias)",
        );
        // A bias per query (the broadcast path through the same op).
        let full = Tensor::from_vec(values(l * n, 6), (1, 1, l, n), &Device::Cpu).unwrap();
        check(
            &[(values(b * h * l * n, 2), vec![b, h, l, n])],
            |t| scaled_masked_softmax(&t[0], 1.3, &full).unwrap(),
            "masked softmax (broadcast bias)",
        );
    }

    #[test]
    fn layer_norm_backward_matches_central_differences_for_x_weight_and_bias() {
        let (rows, n) = (5, 9);
        check(
            &[
                (values(rows * n, 3), vec![rows, n]),
                (values(n, 4), vec![n]),
                (values(n, 5), vec![n]),
            ],
            |t| {
                layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5)
                    .unwrap()
                    .expect("float32 CPU tensors take the fused op")
            },
            "layer norm",
        );
        check(
            &[
                (values(rows * n, 6), vec![rows, n]),
                (values(n, 7), vec![n]),
            ],
            |t| {
                layer_norm(&t[0], &t[1], None, 1e-5)
                    .unwrap()
                    .expect("fused")
            },
            "layer norm without bias",
        );
    }

    #[test]
    fn gelu_backward_matches_central_differences() {
        check(
            &[(values(37, 8), vec![37])],
            |t| gelu_erf(&t[0]).unwrap(),
            "gelu",
        );
    }

    #[test]
    fn train_linear_backward_matches_central_differences() {
        let (m, n, k) = (5, 6, 4);
        let inputs = [
            (values(m * k, 9), vec![m, k]),
            (values(n * k, 10), vec![n, k]),
            (values(n, 11), vec![n]),
        ];
        let dev = Device::Cpu;
        let probe = Tensor::zeros((m, k), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((n, k), DType::F32, &dev).unwrap();
        if linear(&probe, &w, None).unwrap().is_none() {
            eprintln!(
                "train linear: below AVX-512 the elementary ops run; nothing custom to check"
            );
            return;
        }
        check(
            &inputs,
            |t| linear(&t[0], &t[1], Some(&t[2])).unwrap().expect("fused"),
            "train linear",
        );
    }
}

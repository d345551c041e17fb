//! Fused CPU ops for inference, on float32 CPU tensors in [`Mode::Infer`](crate::Mode) only, as candle
//! custom ops (no backward pass) over the kernels of [`latte_kernels`]; everywhere else (training,
//! accelerators, other dtypes) the plain candle ops are used, which have backward passes.
//!
//! From AVX2 up ([`super::fast`]): linear layers as `act(x Wᵀ + b + residual)` in one pass over weights
//! packed once per layer ([`Packed`]; q, k and v can share one), attention fused per (sequence, head),
//! softmax. Below: one `gemm` call per linear layer with the bias as the initial output, candle's attention
//! and softmax. GELU runs on [`latte_kernels::math`] at every level.

use std::sync::OnceLock;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Shape, Tensor,
};
use latte_kernels::attention::{AttnDims, Bias, Rows, Strided};
use latte_kernels::gemm::{self, Packed};
use latte_kernels::lowp::{self, PackedBf16, PackedI8};
use latte_kernels::{math, Level};

use super::fast;
use crate::dtype::Dtype;
use crate::ops::params::Linear;
use crate::Result;

/// Packs these layers (same input width) as one with their outputs concatenated.
pub(crate) fn pack(layers: &[&Linear]) -> Result<Packed> {
    let k = layers.first().map_or(0, |l| l.in_dim());
    let mut owned = Vec::with_capacity(layers.len());
    for l in layers {
        if l.in_dim() != k {
            return Err(crate::Error::Invalid(format!(
                "cannot pack layers of input widths {k} and {}",
                l.in_dim()
            )));
        }
        let w: Vec<f32> = l.weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let b: Option<Vec<f32>> = match &l.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1()?),
            None => None,
        };
        owned.push((w, l.out_dim(), b));
    }
    let rows: Vec<gemm::LayerRows> = owned
        .iter()
        .map(|(w, n, b)| (&w[..], *n, b.as_deref()))
        .collect();
    Ok(Packed::stacked(k, &rows))
}

/// The cached packing of `layers`, made on first use.
pub(crate) fn cached<'a>(cache: &'a OnceLock<Packed>, layers: &[&Linear]) -> Result<&'a Packed> {
    if let Some(p) = cache.get() {
        return Ok(p);
    }
    let p = pack(layers)?;
    let _ = cache.set(p);
    Ok(cache.get().expect("set above"))
}

/// `x Wᵀ + b` through the `gemm` crate (below AVX-512).
struct LinearOp {
    has_bias: bool,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "latte-linear"
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
        let (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) = (s1, s2, s3) else {
            candle_core::bail!("latte-linear: float32 only");
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("latte-linear: inner dimensions {k} and {k2} differ");
        }
        let (Some((xo, _)), Some((wo, _))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("latte-linear: inputs must be contiguous");
        };
        let x = &x[xo..xo + m * k];
        let w = &w[wo..wo + n * k];
        let bias = if self.has_bias {
            let bo = l3.start_offset();
            Some(&b[bo..bo + n])
        } else {
            None
        };
        let mut dst = vec![0f32; m * n];
        gemm::linear_rows_at(Level::Portable, x, m, w, bias, n, k, &mut dst);
        Ok((CpuStorage::F32(dst), Shape::from((m, n))))
    }
}

/// `[.., k]` → `([m, k] contiguous, m, leading dims)`.
fn rows(x: &Tensor) -> Result<(Tensor, usize, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    Ok((x.contiguous()?.reshape((m, k))?, m, dims))
}

/// `act(x Wᵀ + b + residual)` through the register tile: a unary op on `x` or a binary one on
/// `(x, residual)`.
struct PackedLinearOp<'a> {
    packed: Weights<'a>,
    gelu: bool,
}

/// The packed weights one [`PackedLinearOp`] multiplies by: f32 (bias inside), or reduced precision with
/// the bias apart.
#[derive(Clone, Copy)]
enum Weights<'a> {
    F32(&'a Packed),
    Bf16(&'a PackedBf16, Option<&'a [f32]>),
    Int8(&'a PackedI8, Option<&'a [f32]>),
}

impl Weights<'_> {
    fn n(&self) -> usize {
        match self {
            Weights::F32(p) => p.n(),
            Weights::Bf16(p, _) => p.n(),
            Weights::Int8(p, _) => p.n(),
        }
    }

    fn k(&self) -> usize {
        match self {
            Weights::F32(p) => p.k(),
            Weights::Bf16(p, _) => p.k(),
            Weights::Int8(p, _) => p.k(),
        }
    }
}

impl PackedLinearOp<'_> {
    fn run(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = x else {
            candle_core::bail!("latte-linear: float32 only");
        };
        let (m, k) = lx.shape().dims2()?;
        let p = self.packed;
        if k != p.k() {
            candle_core::bail!("latte-linear: input width {k}, weights take {}", p.k());
        }
        let Some((xo, _)) = lx.contiguous_offsets() else {
            candle_core::bail!("latte-linear: input must be contiguous");
        };
        let n = p.n();
        let res = match residual {
            None => None,
            Some((CpuStorage::F32(r), lr)) => {
                if lr.shape().dims() != [m, n] {
                    candle_core::bail!("latte-linear: residual shape {:?}", lr.shape());
                }
                let Some((ro, _)) = lr.contiguous_offsets() else {
                    candle_core::bail!("latte-linear: residual must be contiguous");
                };
                Some(&r[ro..ro + m * n])
            }
            Some(_) => candle_core::bail!("latte-linear: float32 only"),
        };
        let x = &x[xo..xo + m * k];
        let mut dst = vec![0f32; m * n];
        match p {
            Weights::F32(p) => gemm::linear(x, m, p, res, self.gelu, &mut dst),
            Weights::Bf16(w, bias) => lowp::linear_bf16(x, m, w, bias, res, self.gelu, &mut dst)
                .map_err(|e| candle_core::Error::Msg(format!("latte-linear (bf16): {e}")))?,
            Weights::Int8(w, bias) => lowp::linear_i8(x, m, w, bias, res, self.gelu, &mut dst)
                .map_err(|e| candle_core::Error::Msg(format!("latte-linear (int8): {e}")))?,
        }
        Ok((CpuStorage::F32(dst), Shape::from((m, n))))
    }
}

impl CustomOp1 for PackedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "latte-linear-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(s, l, None)
    }
}

impl CustomOp2 for PackedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "latte-linear-residual-packed"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(s1, l1, Some((s2, l2)))
    }
}

/// `act(x Wᵀ + b + residual)` with the packed weights `p`, for `x` of any leading shape.
fn packed_linear(p: &Packed, x: &Tensor, residual: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
    weights_linear(Weights::F32(p), x, residual, gelu)
}

/// `act(x Wᵀ + b + residual)` with the weights `p`, for `x` of any leading shape.
fn weights_linear(
    p: Weights<'_>,
    x: &Tensor,
    residual: Option<&Tensor>,
    gelu: bool,
) -> Result<Tensor> {
    let (x2, m, mut dims) = rows(x)?;
    *dims.last_mut().expect("rank ≥ 1") = p.n();
    let op = PackedLinearOp { packed: p, gelu };
    let y = match residual {
        Some(r) => x2.apply_op2_no_bwd(&r.contiguous()?.reshape((m, p.n()))?, &op)?,
        None => x2.apply_op1_no_bwd(&op)?,
    };
    Ok(y.reshape(dims)?)
}

/// `x Wᵀ + b` through the `gemm` crate, for float32 CPU tensors; candle's matmul otherwise.
fn gemm_linear(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let usable = x.device().is_cpu()
        && x.dtype() == DType::F32
        && layer.weight.dtype() == DType::F32
        && layer.weight.is_contiguous();
    if !usable {
        return Ok(layer.forward(x)?);
    }
    let (x2, _, mut dims) = rows(x)?;
    let bias = match &layer.bias {
        Some(b) => b.clone(),
        None => layer.weight.narrow(1, 0, 1)?.squeeze(1)?, // unused placeholder
    };
    let y = x2.apply_op3_no_bwd(
        &layer.weight,
        &bias,
        &LinearOp {
            has_bias: layer.bias.is_some(),
        },
    )?;
    *dims.last_mut().expect("rank ≥ 1") = layer.out_dim();
    Ok(y.reshape(dims)?)
}

/// `x Wᵀ + b` for a tensor of any leading shape, in one pass.
pub(crate) fn linear(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    linear_ex(layer, x, None, false)
}

/// `act(x Wᵀ + b + residual)`, where `act` is exact GELU when `gelu` (else the identity): fused into the
/// kernel from AVX2 up, separate ops otherwise.
pub(crate) fn linear_ex(
    layer: &Linear,
    x: &Tensor,
    residual: Option<&Tensor>,
    gelu: bool,
) -> Result<Tensor> {
    let dtype = crate::dtype::current();
    if dtype != Dtype::F32 && lowp_applies(layer, x) {
        let w = lowp_weights(layer, dtype)?;
        return weights_linear(w, x, residual, gelu);
    }
    if fast(x) {
        let fresh;
        let p = if trainable(&[layer]) {
            fresh = pack(&[layer])?;
            &fresh
        } else {
            cached(&layer.packed, &[layer])?
        };
        return packed_linear(p, x, residual, gelu);
    }
    let mut y = gemm_linear(layer, x)?;
    if let Some(r) = residual {
        y = (y + r)?;
    }
    if gelu {
        y = gelu_erf(&y)?;
    }
    Ok(y)
}

/// Whether `layer` can run at reduced precision on `x`: float32 CPU tensors and frozen weights.
fn lowp_applies(layer: &Linear, x: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && layer.weight.device().is_cpu()
        && layer.weight.dtype() == DType::F32
        && !trainable(&[layer])
}

/// The weights of `layer` packed at `dtype` (not f32), made once per layer on first use.
fn lowp_weights(layer: &Linear, dtype: Dtype) -> Result<Weights<'_>> {
    let cache = &layer.lowp;
    let bias = match cache.bias.get() {
        Some(b) => b,
        None => {
            let b = match &layer.bias {
                Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                None => None,
            };
            let _ = cache.bias.set(b);
            cache.bias.get().expect("set above")
        }
    };
    let bias = bias.as_deref();
    let (n, k) = (layer.out_dim(), layer.in_dim());
    let weight = || -> Result<Vec<f32>> { Ok(layer.weight.flatten_all()?.to_vec1::<f32>()?) };
    let lowp_err = |e: lowp::LowpError| crate::Error::Invalid(format!("{dtype} weights: {e}"));
    Ok(match dtype {
        Dtype::Bf16 => {
            if cache.bf16.get().is_none() {
                let p = PackedBf16::pack(&weight()?, n, k).map_err(lowp_err)?;
                let _ = cache.bf16.set(p);
            }
            Weights::Bf16(cache.bf16.get().expect("set above"), bias)
        }
        Dtype::Int8 => {
            if cache.int8.get().is_none() {
                let p = PackedI8::pack(&weight()?, n, k).map_err(lowp_err)?;
                let _ = cache.int8.set(p);
            }
            Weights::Int8(cache.int8.get().expect("set above"), bias)
        }
        Dtype::F32 => {
            return Err(crate::Error::Invalid(
                "f32 weights have no reduced-precision packing".into(),
            ))
        }
    })
}

/// The outputs of several layers on the same input, concatenated on the last dimension, through one
/// packed weight (cached in `cache`); `None` when the packed kernel does not apply.
pub(crate) fn linear_cat(
    layers: &[&Linear],
    cache: &OnceLock<Packed>,
    x: &Tensor,
) -> Result<Option<Tensor>> {
    // At reduced precision each layer runs on its own packing (see `linear_ex`).
    if !fast(x) || crate::dtype::current() != Dtype::F32 {
        return Ok(None);
    }
    let fresh;
    let p = if trainable(layers) {
        fresh = pack(layers)?;
        &fresh
    } else {
        cached(cache, layers)?
    };
    Ok(Some(packed_linear(p, x, None, false)?))
}

/// Weights that are trainable variables change between calls: they are packed on every call instead
/// of once (a cached packing would go stale after an optimiser step).
fn trainable(layers: &[&Linear]) -> bool {
    layers
        .iter()
        .any(|l| l.weight.is_variable() || l.bias.as_ref().is_some_and(|b| b.is_variable()))
}

/// Attention through the fused kernel: `q`, `k`, `v` with unit last strides, the bias copied in.
struct AttentionOp {
    scale: f32,
    bias: Vec<f32>,
    bias_strides: [usize; 3],
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "latte-attention"
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
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("latte-attention: float32 only");
        };
        fn view<'a>(data: &'a [f32], l: &Layout) -> candle_core::Result<(Strided<'a>, [usize; 4])> {
            let (b, h, n, d) = l.shape().dims4()?;
            let s = l.stride();
            if s[3] != 1 && d > 1 {
                candle_core::bail!("latte-attention: last dimension must be contiguous");
            }
            let view = Strided {
                data: &data[l.start_offset()..],
                s: [s[0], s[1], s[2]],
            };
            Ok((view, [b, h, n, d]))
        }
        let (qv, [b, h, lq, d]) = view(q, l1)?;
        let (kv, [kb, kh, lk, kd]) = view(k, l2)?;
        let (vv, [vb, vh, vl, dv]) = view(v, l3)?;
        if (kb, kh, kd, vb, vh, vl) != (b, h, d, b, h, lk) {
            candle_core::bail!(
                "latte-attention: shapes {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let dims = AttnDims {
            b,
            h,
            lq,
            lk,
            d,
            dv,
        };
        let bias = Bias {
            data: &self.bias,
            s: self.bias_strides,
            window: None,
        };
        let mut out = vec![0f32; b * lq * h * dv];
        latte_kernels::attention::forward(qv, kv, vv, dims, self.scale, bias, None, None, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((b, lq, h, dv))))
    }
}

/// `softmax(q kᵀ · scale + bias) v` for `[b, h, l, d]` float32 CPU tensors (any strides) and a bias
/// broadcastable from `[b | 1, h | 1, lq | 1, lk]`, fused per (sequence, head); `None` when the fused
/// kernel does not apply.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: &Tensor,
) -> Result<Option<Tensor>> {
    if !(fast(q) && fast(k) && fast(v)) || bias.rank() != 4 || q.rank() != 4 {
        return Ok(None);
    }
    let (b, h, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let (bb, bh, bq, bk) = bias.dims4()?;
    let fits = |n: usize, full: usize| n == 1 || n == full;
    if lk == 0 || bk != lk || !fits(bb, b) || !fits(bh, h) || !fits(bq, lq) {
        return Ok(None);
    }
    let unit_last = |t: &Tensor| -> Result<Tensor> {
        Ok(if t.stride()[3] == 1 {
            t.clone()
        } else {
            t.contiguous()?
        })
    };
    let bias_strides = [
        if bb == 1 { 0 } else { bh * bq * bk },
        if bh == 1 { 0 } else { bq * bk },
        if bq == 1 { 0 } else { bk },
    ];
    let op = AttentionOp {
        scale: scale as f32,
        bias: bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        bias_strides,
    };
    let out = unit_last(q)?.apply_op3_no_bwd(&unit_last(k)?, &unit_last(v)?, &op)?;
    Ok(Some(out.transpose(1, 2)?))
}

/// Attention over unpadded sequences through [`latte_kernels::attention::forward_varlen`]: q, k, v are
/// `[tokens, heads·d]` views (any row stride, unit last stride), sequence `s` is tokens
/// `starts[s]..starts[s + 1]`.
struct VarlenAttentionOp {
    starts: Vec<usize>,
    heads: usize,
    scale: f32,
    window: Option<usize>,
}

impl CustomOp3 for VarlenAttentionOp {
    fn name(&self) -> &'static str {
        "latte-varlen-attention"
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
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("latte-varlen-attention: float32 only");
        };
        let tokens = *self.starts.last().unwrap_or(&0);
        let rows = |l: &Layout| -> candle_core::Result<(usize, usize)> {
            let (t, w) = l.shape().dims2()?;
            let s = l.stride();
            if t != tokens || (s[1] != 1 && w > 1) {
                candle_core::bail!(
                    "latte-varlen-attention: expected [{tokens}, width] rows with a unit last stride, got {:?} (strides {s:?})",
                    l.dims()
                );
            }
            Ok((w, s[0]))
        };
        let (w, qs) = rows(l1)?;
        let (kw, ks) = rows(l2)?;
        let (vw, vs) = rows(l3)?;
        if kw != w || vw != w || !w.is_multiple_of(self.heads) {
            candle_core::bail!(
                "latte-varlen-attention: widths {w}, {kw}, {vw} for {} heads",
                self.heads
            );
        }
        // A single token's row stride may be anything: the kernel reads only its first `w` values.
        fn rows_of<'a>(data: &'a [f32], l: &Layout, stride: usize, w: usize) -> Rows<'a> {
            Rows {
                data: &data[l.start_offset()..],
                stride: stride.max(w),
            }
        }
        let mut out = vec![0f32; tokens * w];
        latte_kernels::attention::forward_varlen(
            rows_of(q, l1, qs, w),
            rows_of(k, l2, ks, w),
            rows_of(v, l3, vs, w),
            &self.starts,
            self.heads,
            w / self.heads,
            self.scale,
            self.window,
            &mut out,
        );
        Ok((CpuStorage::F32(out), Shape::from((tokens, w))))
    }
}

/// `softmax(q kᵀ · scale) v` per head and per sequence for unpadded `[tokens, heads·d]` float32 CPU rows
/// (sequence `s` is tokens `starts[s]..starts[s + 1]` and attends to all of its own tokens, or with a
/// `window` to those at most `window` positions away): `[tokens, heads·d]`, heads side by side as in
/// `[b, l, h]` hidden states. `None` off the CPU or for other dtypes.
pub(crate) fn attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    starts: &[usize],
    heads: usize,
    scale: f64,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v)) {
        return Ok(None);
    }
    let op = VarlenAttentionOp {
        starts: starts.to_vec(),
        heads,
        scale: scale as f32,
        window,
    };
    Ok(Some(q.apply_op3_no_bwd(k, v, &op)?))
}

/// Softmax over the last dimension through the fused kernel.
struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "latte-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("latte-softmax: float32 only");
        };
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("latte-softmax: input must be contiguous");
        };
        let n = *l.dims().last().unwrap_or(&1);
        let x = &x[o1..o2];
        let mut out = vec![0f32; x.len()];
        math::softmax_rows(x, n, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Softmax over the last dimension (inference only: no backward pass).
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fast(x) && x.elem_count() > 0 && x.dims().last().is_some_and(|&n| n > 0) {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&SoftmaxOp)?);
    }
    Ok(candle_nn::ops::softmax_last_dim(x)?)
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "latte-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("latte-gelu-erf: float32 only");
        };
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("latte-gelu-erf: input must be contiguous");
        };
        let x = &x[o1..o2];
        let mut out = vec![0f32; x.len()];
        math::gelu_slice(x, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Exact-form GELU, `0.5·x·(1 + erf(x/√2))`, on float32 CPU tensors.
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(x.gelu_erf()?);
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&GeluOp)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_linear_matches_matmul_plus_bias() {
        let dev = Device::Cpu;
        // Shapes with remainders in every dimension of the tiling (8 rows, 32 columns, 64-row blocks).
        for (b, l, k, n, bias) in [
            (2, 5, 7, 3, true),
            (2, 5, 7, 3, false),
            (3, 47, 33, 70, true),
            (1, 130, 64, 32, false),
            (2, 700, 24, 40, true),
            (1, 2000, 16, 33, true),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, l, k), &dev).unwrap();
            let layer = Linear::new(
                Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap(),
                bias.then(|| Tensor::randn(0f32, 1.0, n, &dev).unwrap()),
            );
            let a = linear(&layer, &x).unwrap();
            let want = layer.forward(&x).unwrap();
            assert_eq!(a.dims(), &[b, l, n]);
            let b = want;
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn fast_gelu_matches_erf_gelu() {
        let x = Tensor::arange(-800i64, 800, &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let x = (x / 100.0).unwrap();
        let a = gelu_erf(&x).unwrap();
        let b = x.gelu_erf().unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 2e-6, "{d}");
    }

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
    fn fused_linear_with_residual_and_gelu_matches_separate_ops() {
        let dev = Device::Cpu;
        for (b, l, k, n) in [(1, 1, 1, 1), (2, 9, 33, 65), (3, 20, 16, 31)] {
            let x = Tensor::randn(0f32, 1.0, (b, l, k), &dev).unwrap();
            let r = Tensor::randn(0f32, 1.0, (b, l, n), &dev).unwrap();
            let layer = Linear::new(
                Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap(),
                Some(Tensor::randn(0f32, 1.0, n, &dev).unwrap()),
            );
            let plain = layer.forward(&x).unwrap();
            let got = linear_ex(&layer, &x, Some(&r), false).unwrap();
            assert!(max_diff(&got, &(&plain + &r).unwrap()) < 1e-5);
            let got = linear_ex(&layer, &x, None, true).unwrap();
            assert!(max_diff(&got, &plain.gelu_erf().unwrap()) < 1e-5);
            let got = linear_ex(&layer, &x, Some(&r), true).unwrap();
            assert!(max_diff(&got, &(&plain + &r).unwrap().gelu_erf().unwrap()) < 1e-5);
        }
    }

    #[test]
    fn fused_softmax_matches_candle() {
        let dev = Device::Cpu;
        for dims in [vec![1usize], vec![3, 17], vec![2, 4, 100]] {
            let x = (Tensor::randn(0f32, 1.0, dims.as_slice(), &dev).unwrap() * 5.0).unwrap();
            let got = softmax_last(&x).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
            assert!(max_diff(&got, &want) < 1e-6);
        }
    }
}

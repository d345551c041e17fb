//! One ModernBERT encoder layer in training (pre-norm, rotary q/k, global or sliding-window attention with
//! the zeroing of window-less queries, GeGLU MLP, optional biases) as a single op with a hand-written
//! backward pass, on the kernels of [`super::shared`].

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::shared::{
    apply_drop, col_sums, cpu_slice, detect, fused_on, gelu_grad_row, gelu_row, grad_input,
    grad_weight, linear_fwd, ln_backward, norm_rows, rotary_qk, segments, Attn, Dims, DropSite,
    Kernels,
};
use crate::ops::params::{LayerNorm, Linear};
use crate::ops::HiddenAct;
use crate::Result;

/// Which of a ModernBERT layer's optional parameters exist.
#[derive(Clone, Copy, Debug)]
struct MbLayout {
    /// The attention layer norm (layer 0 has none).
    attn_norm: bool,
    norm_bias: bool,
    attn_bias: bool,
    mlp_bias: bool,
}

impl MbLayout {
    /// Segment offsets in the flat tensor: attention norm weight / bias, Wqkv, bqkv, Wo, bo, MLP norm
    /// weight / bias, Wi, bi, Wo (MLP), bo (MLP); absent ones are empty.
    fn offsets(&self, d: &Dims) -> ([usize; 12], usize) {
        let (h, f) = (d.h, d.f);
        let on = |b: bool, n: usize| if b { n } else { 0 };
        segments([
            on(self.attn_norm, h),
            on(self.attn_norm && self.norm_bias, h),
            3 * h * h,
            on(self.attn_bias, 3 * h),
            h * h,
            on(self.attn_bias, h),
            h,
            on(self.norm_bias, h),
            2 * f * h,
            on(self.mlp_bias, 2 * f),
            h * f,
            on(self.mlp_bias, h),
        ])
    }

    fn split<'a>(&self, flat: &'a [f32], d: &Dims) -> [&'a [f32]; 12] {
        let (off, len) = self.offsets(d);
        std::array::from_fn(|i| {
            let end = if i + 1 < 12 { off[i + 1] } else { len };
            &flat[off[i]..end]
        })
    }
}

/// What the ModernBERT layer's forward pass keeps.
struct MbSaved {
    /// Attention-norm output (`None`: the layer has no attention norm and reads `x`), `x̂`, `1 / σ`.
    y1: Option<Vec<f32>>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    /// q/k (rotated) and v.
    qkv: Vec<f32>,
    probs: Vec<f32>,
    /// Attention output after the masking of window-less rows.
    ctx: Vec<f32>,
    /// MLP-norm output, `x̂`, `1 / σ`.
    y2: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    /// `[T, 2f]`: GLU input and gate.
    gi: Vec<f32>,
    /// `[T, f]`: `gelu(input) ⊙ gate` after dropout.
    inner: Vec<f32>,
}

/// One pre-norm ModernBERT layer as a candle op: `(x [b, l, h], flat weights, aux) → [b, l, h]`, where
/// `aux` holds the key bias `[b, l]`, the rotary `cos` and `sin` `[l, d]` and the row mask `[b, l]` (1
/// where a query has an attended key in its window).
struct ModernBertLayerOp {
    kern: Kernels,
    dims: Dims,
    layout: MbLayout,
    attn: Attn,
    eps: f32,
    mask_rows: bool,
    drop_attn: Option<DropSite>,
    drop_mlp: Option<DropSite>,
    saved: Mutex<Option<MbSaved>>,
}

impl ModernBertLayerOp {
    fn aux<'a>(&self, aux: &'a [f32]) -> (&'a [f32], &'a [f32], &'a [f32], &'a [f32]) {
        let Dims { b, l, .. } = self.dims;
        let d = self.dims.d();
        let (kb, rest) = aux.split_at(b * l);
        let (cos, rest) = rest.split_at(l * d);
        let (sin, rows) = rest.split_at(l * d);
        (kb, cos, sin, rows)
    }

    fn aux_len(&self) -> usize {
        let Dims { b, l, .. } = self.dims;
        2 * b * l + 2 * l * self.dims.d()
    }
}

/// Scales row `t` of `[T, n]` by `rows[t]`.
fn scale_rows(a: &mut [f32], n: usize, rows: &[f32]) {
    a.par_chunks_mut(n)
        .zip(rows.par_iter())
        .for_each(|(r, &s)| r.iter_mut().for_each(|v| *v *= s));
}

/// `a += b` element by element.
fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

impl CustomOp3 for ModernBertLayerOp {
    fn name(&self) -> &'static str {
        "latte-modernbert-layer-train"
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
        let x = super::slice(s1, l1, self.name())?;
        let flat = super::slice(s2, l2, self.name())?;
        let aux = super::slice(s3, l3, self.name())?;
        let dims = self.dims;
        let Dims { l, h, heads, f, .. } = dims;
        let t = dims.tokens();
        if x.len() != t * h
            || flat.len() != self.layout.offsets(&dims).1
            || aux.len() != self.aux_len()
        {
            candle_core::bail!(
                "{}: inputs {:?}, {:?}, {:?} do not fit the layer {dims:?}",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let k = self.kern;
        let [n1w, n1b, wqkv, bqkv, wo, bo, n2w, n2b, wi, bi, wout, bout] =
            self.layout.split(flat, &dims);
        let (kb, cos, sin, rows) = self.aux(aux);
        let zeros = vec![0f32; 3 * h.max(f)];
        let bias_or = |b: &'_ [f32], n: usize| -> Vec<f32> {
            if b.is_empty() {
                zeros[..n].to_vec()
            } else {
                b.to_vec()
            }
        };
        let (y1, xhat1, rstd1) = if self.layout.attn_norm {
            let mut y1 = vec![0f32; t * h];
            let mut xhat1 = vec![0f32; t * h];
            let mut rstd1 = vec![0f32; t];
            norm_rows(x, n1w, n1b, self.eps, &mut y1, &mut xhat1, &mut rstd1);
            (Some(y1), xhat1, rstd1)
        } else {
            (None, Vec::new(), Vec::new())
        };
        let input = y1.as_deref().unwrap_or(x);
        let mut qkv = linear_fwd(k, input, t, wqkv, &bias_or(bqkv, 3 * h), 3 * h, h);
        rotary_qk(&mut qkv, l, h, heads, cos, sin, false);
        let mut probs = vec![0f32; dims.b * heads * l * l];
        let mut ctx = vec![0f32; t * h];
        self.attn.forward(&qkv, kb, &mut probs, &mut ctx);
        if self.mask_rows {
            scale_rows(&mut ctx, h, rows);
        }
        let mut x1 = linear_fwd(k, &ctx, t, wo, &bias_or(bo, h), h, h);
        apply_drop(&mut x1, h, self.drop_attn);
        add_into(&mut x1, x);
        let mut y2 = vec![0f32; t * h];
        let mut xhat2 = vec![0f32; t * h];
        let mut rstd2 = vec![0f32; t];
        norm_rows(&x1, n2w, n2b, self.eps, &mut y2, &mut xhat2, &mut rstd2);
        let gi = linear_fwd(k, &y2, t, wi, &bias_or(bi, 2 * f), 2 * f, h);
        let mut inner = vec![0f32; t * f];
        inner
            .par_chunks_mut(f)
            .zip(gi.par_chunks(2 * f))
            .for_each(|(o, g)| {
                gelu_row(k, &g[..f], o);
                o.iter_mut().zip(&g[f..]).for_each(|(o, gate)| *o *= gate);
            });
        apply_drop(&mut inner, f, self.drop_mlp);
        let mut y = linear_fwd(k, &inner, t, wout, &bias_or(bout, h), h, f);
        add_into(&mut y, &x1);
        *self.saved.lock().expect("not poisoned") = Some(MbSaved {
            y1,
            xhat1,
            rstd1,
            qkv,
            probs,
            ctx,
            y2,
            xhat2,
            rstd2,
            gi,
            inner,
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        aux: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().expect("not poisoned");
        let Some(s) = guard.as_ref() else {
            candle_core::bail!("{}: backward pass before the forward pass", self.name());
        };
        let dims = self.dims;
        let Dims { l, h, heads, f, .. } = dims;
        let t = dims.tokens();
        let (xc, fc, ac, gc) = (
            x.contiguous()?,
            flat.contiguous()?,
            aux.contiguous()?,
            grad.contiguous()?,
        );
        let (xg, xl) = xc.storage_and_layout();
        let (fg, fl) = fc.storage_and_layout();
        let (ag, al) = ac.storage_and_layout();
        let (gg, gl) = gc.storage_and_layout();
        let xs = cpu_slice(&xg, xl, self.name())?;
        let flat_v = cpu_slice(&fg, fl, self.name())?;
        let aux_v = cpu_slice(&ag, al, self.name())?;
        let dy = cpu_slice(&gg, gl, self.name())?;
        let (off, len) = self.layout.offsets(&dims);
        if xs.len() != t * h
            || dy.len() != t * h
            || flat_v.len() != len
            || aux_v.len() != self.aux_len()
        {
            candle_core::bail!(
                "{}: backward inputs {:?}, {:?}, {:?} do not fit the layer {dims:?}",
                self.name(),
                x.dims(),
                flat.dims(),
                grad.dims()
            );
        }
        let k = self.kern;
        let [n1w, _, wqkv, _, wo, _, n2w, _, wi, _, wout, _] = self.layout.split(flat_v, &dims);
        let (_, cos, sin, rows) = self.aux(aux_v);
        let mut dflat = vec![0f32; len];
        let mut parts: Vec<&mut [f32]> = Vec::with_capacity(12);
        let mut rest = &mut dflat[..];
        for i in 0..12 {
            let end = if i + 1 < 12 { off[i + 1] } else { len };
            let (a, r) = rest.split_at_mut(end - off[i]);
            parts.push(a);
            rest = r;
        }
        let [dn1w, dn1b, dwqkv, dbqkv, dwo, dbo, dn2w, dn2b, dwi, dbi, dwout, dbout]: [&mut [f32];
            12] = parts.try_into().expect("twelve segments");
        let fill_bias = |dst: &mut [f32], g: &[f32], n: usize| {
            if !dst.is_empty() {
                dst.copy_from_slice(&col_sums(g, n));
            }
        };

        // MLP: y = x1 + inner · Woutᵀ.
        let mut dx1 = dy.to_vec();
        fill_bias(dbout, dy, h);
        grad_weight(k, dy, t, h, &s.inner, f, dwout);
        let mut dinner = vec![0f32; t * f];
        grad_input(k, dy, t, h, wout, f, &mut dinner, false);
        apply_drop(&mut dinner, f, self.drop_mlp);
        let mut dgi = vec![0f32; t * 2 * f];
        dgi.par_chunks_mut(2 * f)
            .zip(s.gi.par_chunks(2 * f).zip(dinner.par_chunks(f)))
            .for_each(|(dg, (g, di))| {
                let (d_in, d_gate) = dg.split_at_mut(f);
                // d_gate = di ⊙ gelu(input); d_input = di ⊙ gate ⊙ gelu′(input).
                gelu_row(k, &g[..f], d_gate);
                d_gate.iter_mut().zip(di).for_each(|(a, d)| *a *= d);
                d_in.iter_mut()
                    .zip(di.iter().zip(&g[f..]))
                    .for_each(|(o, (d, gate))| *o = d * gate);
                gelu_grad_row(k, &g[..f], d_in);
            });
        drop(dinner);
        fill_bias(dbi, &dgi, 2 * f);
        grad_weight(k, &dgi, t, 2 * f, &s.y2, h, dwi);
        let mut dy2 = vec![0f32; t * h];
        grad_input(k, &dgi, t, 2 * f, wi, h, &mut dy2, false);
        drop(dgi);
        let mut tmp = vec![0f32; t * h];
        let (gw, gb) = ln_backward(&dy2, &s.xhat2, &s.rstd2, n2w, &mut tmp);
        dn2w.copy_from_slice(&gw);
        if !dn2b.is_empty() {
            dn2b.copy_from_slice(&gb);
        }
        add_into(&mut dx1, &tmp);
        drop(dy2);
        // Attention: x1 = x + dropout(ctx · Woᵀ).
        let mut dao = dx1.clone();
        apply_drop(&mut dao, h, self.drop_attn);
        fill_bias(dbo, &dao, h);
        grad_weight(k, &dao, t, h, &s.ctx, h, dwo);
        let mut dctx = vec![0f32; t * h];
        grad_input(k, &dao, t, h, wo, h, &mut dctx, false);
        drop(dao);
        if self.mask_rows {
            scale_rows(&mut dctx, h, rows);
        }
        let mut dqkv = vec![0f32; t * 3 * h];
        self.attn.backward(&s.qkv, &s.probs, &dctx, &mut dqkv);
        drop(dctx);
        rotary_qk(&mut dqkv, l, h, heads, cos, sin, true);
        fill_bias(dbqkv, &dqkv, 3 * h);
        let input = s.y1.as_deref().unwrap_or(xs);
        grad_weight(k, &dqkv, t, 3 * h, input, h, dwqkv);
        let mut dy1 = vec![0f32; t * h];
        grad_input(k, &dqkv, t, 3 * h, wqkv, h, &mut dy1, false);
        drop(dqkv);
        if self.layout.attn_norm {
            let (gw, gb) = ln_backward(&dy1, &s.xhat1, &s.rstd1, n1w, &mut tmp);
            dn1w.copy_from_slice(&gw);
            if !dn1b.is_empty() {
                dn1b.copy_from_slice(&gb);
            }
            add_into(&mut dx1, &tmp);
        } else {
            add_into(&mut dx1, &dy1);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx1, x.shape(), dev)?),
            Some(Tensor::from_vec(dflat, len, dev)?),
            None,
        ))
    }
}

/// The parameters of one ModernBERT layer.
pub struct ModernBertLayerParams<'a> {
    /// Layer norm before attention (layer 0 has none).
    pub attn_norm: Option<&'a LayerNorm>,
    /// Packed q, k, v projection `[3h, h]`.
    pub wqkv: &'a Linear,
    /// Attention output projection.
    pub wo: &'a Linear,
    /// Layer norm before the MLP.
    pub mlp_norm: &'a LayerNorm,
    /// GLU input and gate `[2f, h]`.
    pub wi: &'a Linear,
    /// MLP output projection `[h, f]`.
    pub mlp_wo: &'a Linear,
}

/// What a ModernBERT layer's attention sees.
pub struct ModernBertAttention<'a> {
    /// Heads.
    pub heads: usize,
    /// Rotary tables `[l, d]` of this layer type.
    pub cos: &'a Tensor,
    /// See `cos`.
    pub sin: &'a Tensor,
    /// Sliding window half-width for local layers, `None` for global ones.
    pub window: Option<usize>,
    /// `[b, l]`, 1 where a query has an attended key in its window: queries without one get a zero
    /// output. `None` when every query has one (or the layer is global).
    pub row_mask: Option<&'a Tensor>,
    /// Dropout on the attention probabilities and the attention output.
    pub dropout: f64,
}

/// One ModernBERT encoder layer in training, as [`bert_layer`] does for BERT: `x [b, l, h]`, `key_bias
/// [b, l]`; `mlp_dropout` inside the MLP. `None` where the fused op does not apply (not float32 on the
/// CPU, another activation than exact GELU, partial rotary, shapes it does not know); the caller runs
/// the elementary ops.
pub fn modernbert_layer(
    x: &Tensor,
    key_bias: &Tensor,
    p: &ModernBertLayerParams,
    attn: &ModernBertAttention,
    act: HiddenAct,
    eps: f64,
    mlp_dropout: f64,
) -> Result<Option<Tensor>> {
    let kern = detect();
    let applies = fused_on()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && key_bias.dtype() == DType::F32
        && act == HiddenAct::Gelu;
    if !applies {
        return Ok(None);
    }
    let (b, l, h) = x.dims3()?;
    let heads = attn.heads;
    if heads == 0 || !h.is_multiple_of(heads) || !(h / heads).is_multiple_of(2) {
        return Ok(None);
    }
    let d = h / heads;
    let f2 = p.wi.out_dim();
    let f = f2 / 2;
    let all_f32 = [p.wqkv, p.wo, p.wi, p.mlp_wo]
        .iter()
        .all(|l| l.weight.dtype() == DType::F32);
    let norm_bias = p.mlp_norm.bias.is_some();
    let attn_bias = p.wqkv.bias.is_some();
    let mlp_bias = p.wi.bias.is_some();
    if !all_f32
        || !f2.is_multiple_of(2)
        || p.wqkv.weight.dims() != [3 * h, h]
        || p.wo.weight.dims() != [h, h]
        || p.wi.weight.dims() != [f2, h]
        || p.mlp_wo.weight.dims() != [h, f]
        || p.wo.bias.is_some() != attn_bias
        || p.mlp_wo.bias.is_some() != mlp_bias
        || p.attn_norm.is_some_and(|n| n.bias.is_some() != norm_bias)
        || key_bias.dims() != [b, l]
        || attn.cos.dims() != [l, d]
        || attn.sin.dims() != [l, d]
        || attn.row_mask.is_some_and(|m| m.dims() != [b, l])
    {
        return Ok(None);
    }
    let mut parts: Vec<Tensor> = Vec::with_capacity(12);
    if let Some(n) = p.attn_norm {
        parts.push(n.weight.clone());
        if let Some(b) = &n.bias {
            parts.push(b.clone());
        }
    }
    parts.push(p.wqkv.weight.flatten_all()?);
    parts.extend(p.wqkv.bias.clone());
    parts.push(p.wo.weight.flatten_all()?);
    parts.extend(p.wo.bias.clone());
    parts.push(p.mlp_norm.weight.clone());
    parts.extend(p.mlp_norm.bias.clone());
    parts.push(p.wi.weight.flatten_all()?);
    parts.extend(p.wi.bias.clone());
    parts.push(p.mlp_wo.weight.flatten_all()?);
    parts.extend(p.mlp_wo.bias.clone());
    let flat = Tensor::cat(&parts, 0)?;
    let ones;
    let rows = match attn.row_mask {
        Some(m) => m,
        None => {
            ones = Tensor::ones((b, l), DType::F32, x.device())?;
            &ones
        }
    };
    let aux = Tensor::cat(
        &[
            key_bias.flatten_all()?,
            attn.cos.to_dtype(DType::F32)?.flatten_all()?,
            attn.sin.to_dtype(DType::F32)?.flatten_all()?,
            rows.to_dtype(DType::F32)?.flatten_all()?,
        ],
        0,
    )?
    .detach();
    // The dropout sites in the order the elementary path draws them.
    let drop_probs = DropSite::next(attn.dropout);
    let drop_attn = DropSite::next(attn.dropout);
    let drop_mlp = DropSite::next(mlp_dropout);
    let dims = Dims { b, l, h, heads, f };
    let op = ModernBertLayerOp {
        kern,
        dims,
        layout: MbLayout {
            attn_norm: p.attn_norm.is_some(),
            norm_bias,
            attn_bias,
            mlp_bias,
        },
        attn: Attn {
            kern,
            dims,
            scale: 1.0 / (d as f32).sqrt(),
            drop_probs,
            window: attn.window,
            starts: None,
        },
        eps: eps as f32,
        mask_rows: attn.row_mask.is_some(),
        drop_attn,
        drop_mlp,
        saved: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op3(&flat, &aux, op)?))
}

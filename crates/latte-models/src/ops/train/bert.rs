//! One post-norm encoder layer (BERT's: self-attention, residual, layer norm, GELU feed-forward, residual,
//! layer norm, with dropout after the embeddings' sub-layers and on the attention probabilities) as a
//! single training op with a hand-written backward pass, on the AVX-512 register tile.
//!
//! Written as candle ops, one layer is some thirty graph nodes forward and as many backward, each with its
//! own full-size temporaries, and candle's backward pass zero-fills and re-adds an accumulator for every
//! gradient. Here the forward pass keeps only what the backward pass reads (the packed q/k/v, attention
//! probabilities, the normalised activations and their inverse deviations, the feed-forward input), and the
//! backward pass writes every gradient once. The weights enter as one flat tensor (the concatenation of the
//! layer's parameters, see [`bert_layer`]), so candle hands their gradients back to each `Var` through the
//! concatenation's own backward pass. Dropout masks come from the same keyed generator as
//! [`crate::dropout`] (one key per dropout site), and are regenerated row by row in the backward pass
//! instead of being stored.
//!
//! Used for float32 CPU tensors on CPUs with AVX-512F in [`Mode::Train`](crate::Mode); the elementary
//! differentiable ops run everywhere else.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::shared::{
    apply_drop, col_sums, cpu_slice, detect, fused_on, gelu_bwd, gelu_fwd, grad_input, grad_weight,
    linear_fwd, ln_backward, residual_norm, rotary_qk, Attn, Dims, DropSite, Kernels,
};
use crate::ops::params::{LayerNorm, Linear};
use crate::ops::HiddenAct;
use crate::Result;

/// Views of the flat weights.
struct Weights<'a> {
    wqkv: &'a [f32],
    bqkv: &'a [f32],
    wo: &'a [f32],
    bo: &'a [f32],
    g1: &'a [f32],
    b1: &'a [f32],
    wi: &'a [f32],
    bi: &'a [f32],
    wout: &'a [f32],
    bout: &'a [f32],
    g2: &'a [f32],
    b2: &'a [f32],
}

impl<'a> Weights<'a> {
    fn new(flat: &'a [f32], dims: &Dims) -> Self {
        let (off, len) = dims.offsets();
        let end = |i: usize| if i + 1 < off.len() { off[i + 1] } else { len };
        let s = |i: usize| &flat[off[i]..end(i)];
        Self {
            wqkv: s(0),
            bqkv: s(1),
            wo: s(2),
            bo: s(3),
            g1: s(4),
            b1: s(5),
            wi: s(6),
            bi: s(7),
            wout: s(8),
            bout: s(9),
            g2: s(10),
            b2: s(11),
        }
    }
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// `[T, 3h]`: q, k and v of every token.
    qkv: Vec<f32>,
    /// `[b, heads, l, l]`: attention probabilities before dropout.
    probs: Vec<f32>,
    /// `[T, h]`: attention output (heads concatenated).
    ctx: Vec<f32>,
    /// `[T, h]`: output of the first layer norm, its `x̂` and `1 / σ`.
    a: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    /// `[T, f]`: feed-forward input to GELU and its output.
    inter: Vec<f32>,
    gelu: Vec<f32>,
    /// `x̂` and `1 / σ` of the second layer norm.
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
}

/// The layer as a candle op: `(x [b, l, h], flat weights, key bias [b, l]) → [b, l, h]`.
struct BertLayerOp {
    kern: Kernels,
    dims: Dims,
    attn: Attn,
    eps1: f32,
    eps2: f32,
    /// The third input holds rotary `cos` and `sin` (`[l, d]` each) after the key bias.
    rotary: bool,
    drop_attn: Option<DropSite>,
    drop_out: Option<DropSite>,
    saved: Mutex<Option<Saved>>,
}

impl CustomOp3 for BertLayerOp {
    fn name(&self) -> &'static str {
        "latte-bert-layer-train"
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
        let Dims { b, l, h, heads, f } = dims;
        let t = dims.tokens();
        let rot_len = if self.rotary { 2 * l * dims.d() } else { 0 };
        if x.len() != t * h || aux.len() != b * l + rot_len || flat.len() != dims.offsets().1 {
            candle_core::bail!(
                "{}: inputs {:?}, {:?}, {:?} do not fit the layer {dims:?}",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let w = Weights::new(flat, &dims);
        let (bias, rot) = aux.split_at(b * l);
        let mut qkv = linear_fwd(self.kern, x, t, w.wqkv, w.bqkv, 3 * h, h);
        if self.rotary {
            let (cos, sin) = rot.split_at(l * dims.d());
            rotary_qk(&mut qkv, l, h, heads, cos, sin, false);
        }
        let mut probs = vec![0f32; self.attn.probs_len()];
        let mut ctx = vec![0f32; t * h];
        self.attn.forward(&qkv, bias, &mut probs, &mut ctx);
        let ao = linear_fwd(self.kern, &ctx, t, w.wo, w.bo, h, h);
        let mut a = vec![0f32; t * h];
        let mut xhat1 = vec![0f32; t * h];
        let mut rstd1 = vec![0f32; t];
        residual_norm(
            &ao,
            x,
            self.drop_attn,
            w.g1,
            w.b1,
            self.eps1,
            &mut a,
            &mut xhat1,
            &mut rstd1,
        );
        drop(ao);
        let inter = linear_fwd(self.kern, &a, t, w.wi, w.bi, f, h);
        let gelu = gelu_fwd(self.kern, &inter);
        let o = linear_fwd(self.kern, &gelu, t, w.wout, w.bout, h, f);
        let mut y = vec![0f32; t * h];
        let mut xhat2 = vec![0f32; t * h];
        let mut rstd2 = vec![0f32; t];
        residual_norm(
            &o,
            &a,
            self.drop_out,
            w.g2,
            w.b2,
            self.eps2,
            &mut y,
            &mut xhat2,
            &mut rstd2,
        );
        *self.saved.lock().expect("not poisoned") = Some(Saved {
            qkv,
            probs,
            ctx,
            a,
            xhat1,
            rstd1,
            inter,
            gelu,
            xhat2,
            rstd2,
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
        let Dims { h, f, .. } = dims;
        let t = dims.tokens();
        let (xc, fc, gc) = (x.contiguous()?, flat.contiguous()?, grad.contiguous()?);
        let (xg, xl) = xc.storage_and_layout();
        let (fg, fl) = fc.storage_and_layout();
        let (gg, gl) = gc.storage_and_layout();
        let xs = cpu_slice(&xg, xl, self.name())?;
        let flat_v = cpu_slice(&fg, fl, self.name())?;
        let dy = cpu_slice(&gg, gl, self.name())?;
        let (off, len) = dims.offsets();
        if xs.len() != t * h || dy.len() != t * h || flat_v.len() != len {
            candle_core::bail!(
                "{}: backward inputs {:?}, {:?}, {:?} do not fit the layer {dims:?}",
                self.name(),
                x.dims(),
                flat.dims(),
                grad.dims()
            );
        }
        let w = Weights::new(flat_v, &dims);
        let mut dflat = vec![0f32; len];
        let (dwqkv, rest) = dflat.split_at_mut(off[1]);
        let (dbqkv, rest) = rest.split_at_mut(off[2] - off[1]);
        let (dwo, rest) = rest.split_at_mut(off[3] - off[2]);
        let (dbo, rest) = rest.split_at_mut(off[4] - off[3]);
        let (dg1, rest) = rest.split_at_mut(off[5] - off[4]);
        let (db1, rest) = rest.split_at_mut(off[6] - off[5]);
        let (dwi, rest) = rest.split_at_mut(off[7] - off[6]);
        let (dbi, rest) = rest.split_at_mut(off[8] - off[7]);
        let (dwout, rest) = rest.split_at_mut(off[9] - off[8]);
        let (dbout, rest) = rest.split_at_mut(off[10] - off[9]);
        let (dg2, db2) = rest.split_at_mut(off[11] - off[10]);

        // Second layer norm, then the output dropout.
        let mut dr2 = vec![0f32; t * h];
        let (gw, gb) = ln_backward(dy, &s.xhat2, &s.rstd2, w.g2, &mut dr2);
        dg2.copy_from_slice(&gw);
        db2.copy_from_slice(&gb);
        let mut d_o = dr2.clone();
        apply_drop(&mut d_o, h, self.drop_out);
        dbout.copy_from_slice(&col_sums(&d_o, h));
        let k = self.kern;
        // dWout [h, f] = d_oᵀ · gelu.
        grad_weight(k, &d_o, t, h, &s.gelu, f, dwout);
        // d(gelu) = d_o · Wout, then through GELU.
        let mut di = vec![0f32; t * f];
        grad_input(k, &d_o, t, h, w.wout, f, &mut di, false);
        drop(d_o);
        gelu_bwd(k, &s.inter, &mut di);
        dbi.copy_from_slice(&col_sums(&di, f));
        // dWi [f, h] = diᵀ · a.
        grad_weight(k, &di, t, f, &s.a, h, dwi);
        // da = dr2 + di · Wi.
        let mut da = dr2;
        grad_input(k, &di, t, f, w.wi, h, &mut da, true);
        drop(di);
        // First layer norm, then the attention-output dropout.
        let mut dr1 = vec![0f32; t * h];
        let (gw, gb) = ln_backward(&da, &s.xhat1, &s.rstd1, w.g1, &mut dr1);
        dg1.copy_from_slice(&gw);
        db1.copy_from_slice(&gb);
        drop(da);
        let mut dao = dr1.clone();
        apply_drop(&mut dao, h, self.drop_attn);
        dbo.copy_from_slice(&col_sums(&dao, h));
        grad_weight(k, &dao, t, h, &s.ctx, h, dwo);
        let mut dctx = vec![0f32; t * h];
        grad_input(k, &dao, t, h, w.wo, h, &mut dctx, false);
        drop(dao);
        // Attention.
        let mut dqkv = vec![0f32; t * 3 * h];
        self.attn.backward(&s.qkv, &s.probs, &dctx, &mut dqkv);
        drop(dctx);
        if self.rotary {
            let ac = aux.contiguous()?;
            let (ag, al) = ac.storage_and_layout();
            let av = cpu_slice(&ag, al, self.name())?;
            let Dims { b, l, heads, .. } = dims;
            let d = dims.d();
            if av.len() != b * l + 2 * l * d {
                candle_core::bail!("{}: rotary tables do not fit {dims:?}", self.name());
            }
            let (cos, sin) = av[b * l..].split_at(l * d);
            rotary_qk(&mut dqkv, l, h, heads, cos, sin, true);
        }
        dbqkv.copy_from_slice(&col_sums(&dqkv, 3 * h));
        grad_weight(k, &dqkv, t, 3 * h, xs, h, dwqkv);
        // dx = dr1 + dqkv · Wqkv.
        let mut dx = dr1;
        grad_input(k, &dqkv, t, 3 * h, w.wqkv, h, &mut dx, true);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dflat, len, dev)?),
            None,
        ))
    }
}

/// The q, k and v projections of a BERT layer.
#[derive(Clone, Copy)]
pub enum QkvParams<'a> {
    /// Three `[h, h]` layers.
    Separate {
        /// Query projection.
        query: &'a Linear,
        /// Key projection.
        key: &'a Linear,
        /// Value projection.
        value: &'a Linear,
    },
    /// One `[3h, h]` layer, q then k then v (jina's flash XLM-RoBERTa).
    Packed(&'a Linear),
}

/// The parameters of one BERT layer, in the order [`bert_layer`] flattens them.
pub struct BertLayerParams<'a> {
    /// Self-attention projections.
    pub qkv: QkvParams<'a>,
    /// Attention output projection.
    pub attn_out: &'a Linear,
    /// Layer norm after attention.
    pub attn_norm: &'a LayerNorm,
    /// Feed-forward input layer.
    pub inter: &'a Linear,
    /// Feed-forward output layer.
    pub out: &'a Linear,
    /// Layer norm after the feed-forward block.
    pub out_norm: &'a LayerNorm,
    /// Rotary tables (`cos`, `sin`, each `[l, d]`) applied to q and k, for encoders with rotary positions.
    pub rotary: Option<(&'a Tensor, &'a Tensor)>,
}

/// Probabilities of a layer's dropout sites.
#[derive(Clone, Copy, Debug)]
pub struct LayerDropout {
    /// On the attention probabilities.
    pub attention: f64,
    /// After the attention output and after the feed-forward output.
    pub hidden: f64,
}

/// One BERT encoder layer in training, forward here and backward by hand (see the module docs):
/// `x [b, l, h]`, `key_bias [b, l]` (0 where attended, a large negative number elsewhere). On the
/// AVX-512 kernels where the CPU has AVX-512F, else on the `gemm` crate. `None` where the fused op does
/// not apply (not float32 on the CPU, a layer without biases, another activation than exact GELU); the
/// caller runs the elementary ops.
pub fn bert_layer(
    x: &Tensor,
    key_bias: &Tensor,
    p: &BertLayerParams,
    heads: usize,
    act: HiddenAct,
    dropout: LayerDropout,
) -> Result<Option<Tensor>> {
    bert_layer_on(detect(), x, key_bias, p, heads, act, dropout)
}

pub(crate) fn bert_layer_on(
    kern: Kernels,
    x: &Tensor,
    key_bias: &Tensor,
    p: &BertLayerParams,
    heads: usize,
    act: HiddenAct,
    dropout: LayerDropout,
) -> Result<Option<Tensor>> {
    layer_with(kern, x, key_bias, None, p, heads, act, dropout)
}

/// [`bert_layer`] over unpadded sequences: `x [tokens, h]` holds sequence `s` in rows
/// `starts[s]..starts[s + 1]`, each attending to all of its own tokens, so padding costs nothing. `None`
/// where the fused op does not apply (as [`bert_layer`]; also for rotary positions, which need each token's
/// position in its sequence).
pub fn bert_layer_unpadded(
    x: &Tensor,
    starts: &[usize],
    p: &BertLayerParams,
    heads: usize,
    act: HiddenAct,
    dropout: LayerDropout,
) -> Result<Option<Tensor>> {
    let (t, h) = x.dims2()?;
    if p.rotary.is_some() || starts.last() != Some(&t) {
        return Ok(None);
    }
    let x = x.reshape((1, t, h))?;
    let zeros = Tensor::zeros((1, t), DType::F32, x.device())?;
    Ok(
        match layer_with(detect(), &x, &zeros, Some(starts), p, heads, act, dropout)? {
            Some(y) => Some(y.reshape((t, h))?),
            None => None,
        },
    )
}

#[allow(clippy::too_many_arguments)]
fn layer_with(
    kern: Kernels,
    x: &Tensor,
    key_bias: &Tensor,
    starts: Option<&[usize]>,
    p: &BertLayerParams,
    heads: usize,
    act: HiddenAct,
    dropout: LayerDropout,
) -> Result<Option<Tensor>> {
    {
        let applies = fused_on()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && key_bias.dtype() == DType::F32
            && act == HiddenAct::Gelu;
        if !applies {
            return Ok(None);
        }
        let (b, l, h) = x.dims3()?;
        let qkv_layers: Vec<&Linear> = match p.qkv {
            QkvParams::Separate { query, key, value } => vec![query, key, value],
            QkvParams::Packed(w) => vec![w],
        };
        let mut linears = qkv_layers.clone();
        linears.extend([p.attn_out, p.inter, p.out]);
        if linears
            .iter()
            .any(|l| l.bias.is_none() || l.weight.dtype() != DType::F32)
            || p.attn_norm.bias.is_none()
            || p.out_norm.bias.is_none()
            || heads == 0
        {
            return Ok(None);
        }
        let f = p.inter.out_dim();
        let qkv_ok = match p.qkv {
            QkvParams::Separate { .. } => qkv_layers.iter().all(|w| w.weight.dims() == [h, h]),
            QkvParams::Packed(w) => w.weight.dims() == [3 * h, h],
        };
        let d = h / heads;
        let rotary_ok = p
            .rotary
            .is_none_or(|(c, s)| d.is_multiple_of(2) && c.dims() == [l, d] && s.dims() == [l, d]);
        if !h.is_multiple_of(heads)
            || !qkv_ok
            || !rotary_ok
            || p.attn_out.weight.dims() != [h, h]
            || p.inter.weight.dims() != [f, h]
            || p.out.weight.dims() != [h, f]
            || key_bias.dims() != [b, l]
        {
            return Ok(None);
        }
        let bias = |l: &Linear| l.bias.clone().expect("checked above");
        let nb = |n: &LayerNorm| n.bias.clone().expect("checked above");
        let mut parts = Vec::with_capacity(16);
        for w in &qkv_layers {
            parts.push(w.weight.flatten_all()?);
        }
        for w in &qkv_layers {
            parts.push(bias(w));
        }
        parts.extend([
            p.attn_out.weight.flatten_all()?,
            bias(p.attn_out),
            p.attn_norm.weight.clone(),
            nb(p.attn_norm),
            p.inter.weight.flatten_all()?,
            bias(p.inter),
            p.out.weight.flatten_all()?,
            bias(p.out),
            p.out_norm.weight.clone(),
            nb(p.out_norm),
        ]);
        let flat = Tensor::cat(&parts, 0)?;
        // The dropout sites in the order the elementary path draws them.
        let drop_probs = DropSite::next(dropout.attention);
        let drop_attn = DropSite::next(dropout.hidden);
        let drop_out = DropSite::next(dropout.hidden);
        let dims = Dims { b, l, h, heads, f };
        let op = BertLayerOp {
            kern,
            dims,
            attn: Attn {
                kern,
                dims,
                scale: 1.0 / (d as f32).sqrt(),
                drop_probs,
                window: None,
                starts: starts.map(<[usize]>::to_vec),
            },
            eps1: p.attn_norm.eps as f32,
            eps2: p.out_norm.eps as f32,
            rotary: p.rotary.is_some(),
            drop_attn,
            drop_out,
            saved: Mutex::new(None),
        };
        let aux = match p.rotary {
            Some((c, sn)) => Tensor::cat(
                &[
                    key_bias.flatten_all()?,
                    c.to_dtype(DType::F32)?.flatten_all()?,
                    sn.to_dtype(DType::F32)?.flatten_all()?,
                ],
                0,
            )?,
            None => key_bias.flatten_all()?,
        };
        let y = x
            .contiguous()?
            .apply_op3(&flat, &aux.detach().contiguous()?, op)?;
        Ok(Some(y))
    }
}

//! ModernBERT as `transformers.ModernBertModel` computes it: pre-norm layers, rotary positions with
//! separate global and local bases, alternating global and sliding-window attention, GeGLU feed-forward.
//!
//! Padding tokens are masked out as keys (the eager / SDPA path of transformers), so their own outputs
//! are computed but never influence real tokens. Covers GTE-ModernColBERT, LateOn, ettin encoders.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::nn::{
    apply_rotary, attention_dropout, dropout, key_mask_bias, rope_tables, HiddenAct, LayerNorm,
    Linear, Mode,
};
use crate::{Error, Result};

/// The fields of a ModernBERT `config.json` that the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct ModernBertConfig {
    /// Rows of the token-embedding matrix.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of each GLU half.
    pub intermediate_size: usize,
    /// GLU activation.
    #[serde(default = "gelu")]
    pub hidden_activation: HiddenAct,
    /// Longest supported sequence.
    #[serde(default = "p8192")]
    pub max_position_embeddings: usize,
    /// Layer-norm epsilon.
    #[serde(default = "eps")]
    pub norm_eps: f64,
    /// Whether layer norms have a bias.
    #[serde(default)]
    pub norm_bias: bool,
    /// Whether the attention projections have a bias.
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether the GLU projections have a bias.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Total width of the sliding window (each token sees `local_attention / 2` on each side).
    #[serde(default = "p128")]
    pub local_attention: usize,
    /// Every n-th layer (from layer 0) is global when `layer_types` is absent.
    #[serde(default = "three")]
    pub global_attn_every_n_layers: usize,
    /// Explicit `full_attention` / `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Rotary base of global layers (older configs).
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    /// Rotary base of local layers (older configs).
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    /// Rotary parameters per layer type (newer configs).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Dropout after the embeddings (training only).
    #[serde(default)]
    pub embedding_dropout: f64,
    /// Dropout on the attention probabilities and the attention output (training only).
    #[serde(default)]
    pub attention_dropout: f64,
    /// Dropout inside the MLP, before its output projection (training only).
    #[serde(default)]
    pub mlp_dropout: f64,
}

fn gelu() -> HiddenAct {
    HiddenAct::Gelu
}
fn p8192() -> usize {
    8192
}
fn p128() -> usize {
    128
}
fn three() -> usize {
    3
}
fn eps() -> f64 {
    1e-5
}

impl ModernBertConfig {
    fn is_global(&self, layer: usize) -> bool {
        match &self.layer_types {
            Some(t) => t.get(layer).is_some_and(|s| s == "full_attention"),
            None => layer.is_multiple_of(self.global_attn_every_n_layers.max(1)),
        }
    }

    fn theta(&self, global: bool) -> Result<f64> {
        let key = if global {
            "full_attention"
        } else {
            "sliding_attention"
        };
        if let Some(p) = self.rope_parameters.as_ref().and_then(|p| p.get(key)) {
            if let Some(t) = p.get("rope_type").and_then(|t| t.as_str()) {
                if t != "default" {
                    return Err(Error::Invalid(format!(
                        "ModernBERT rope_type {t:?} is not supported (only \"default\")"
                    )));
                }
            }
            if let Some(theta) = p.get("rope_theta").and_then(|t| t.as_f64()) {
                return Ok(theta);
            }
        }
        Ok(if global {
            self.global_rope_theta.unwrap_or(160_000.0)
        } else {
            self.local_rope_theta.unwrap_or(10_000.0)
        })
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Option<LayerNorm>,
    wqkv: Linear,
    wo: Linear,
    mlp_norm: LayerNorm,
    wi: Linear,
    mlp_wo: Linear,
    global: bool,
}

/// A ModernBERT encoder.
#[derive(Debug, Clone)]
pub struct ModernBert {
    config: ModernBertConfig,
    tok: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    theta_global: f64,
    theta_local: f64,
}

impl ModernBert {
    /// Loads the weights under `vb` (names as `ModernBertModel.state_dict()`, no `model.` prefix).
    pub fn load(vb: VarBuilder, config: &ModernBertConfig) -> Result<Self> {
        let h = config.hidden_size;
        if !h.is_multiple_of(config.num_attention_heads) {
            return Err(Error::Invalid(format!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                config.num_attention_heads
            )));
        }
        let eps = config.norm_eps;
        let tok = vb.get((config.vocab_size, h), "embeddings.tok_embeddings.weight")?;
        let emb_norm = LayerNorm::load(vb.pp("embeddings.norm"), h, eps, config.norm_bias)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("layers.{i}"));
            let attn_norm = if i == 0 {
                None
            } else {
                Some(LayerNorm::load(
                    l.pp("attn_norm"),
                    h,
                    eps,
                    config.norm_bias,
                )?)
            };
            layers.push(Layer {
                attn_norm,
                wqkv: Linear::load(l.pp("attn.Wqkv"), h, 3 * h, config.attention_bias)?,
                wo: Linear::load(l.pp("attn.Wo"), h, h, config.attention_bias)?,
                mlp_norm: LayerNorm::load(l.pp("mlp_norm"), h, eps, config.norm_bias)?,
                wi: Linear::load(
                    l.pp("mlp.Wi"),
                    h,
                    2 * config.intermediate_size,
                    config.mlp_bias,
                )?,
                mlp_wo: Linear::load(l.pp("mlp.Wo"), config.intermediate_size, h, config.mlp_bias)?,
                global: config.is_global(i),
            });
        }
        let final_norm = LayerNorm::load(vb.pp("final_norm"), h, eps, config.norm_bias)?;
        Ok(Self {
            theta_global: config.theta(true)?,
            theta_local: config.theta(false)?,
            config: config.clone(),
            tok,
            emb_norm,
            layers,
            final_norm,
        })
    }

    /// Hidden width.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Longest sequence the model supports.
    pub fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// `[batch, len]` ids and mask → `[batch, len, hidden]` last hidden states.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let dev = input_ids.device();
        let x = self
            .tok
            .embedding(&input_ids.flatten_all()?)?
            .reshape((b, l, h))?;
        let mut x = dropout(
            &self.emb_norm.forward(&x, mode)?,
            self.config.embedding_dropout,
            mode,
        )?;
        let key_bias = key_mask_bias(attention_mask, x.dtype())?;
        let half = (self.config.local_attention / 2) as i64;
        let window: Vec<f32> = (0..l as i64)
            .flat_map(|i| {
                (0..l as i64).map(move |j| if (i - j).abs() <= half { 0.0 } else { -1e30 })
            })
            .collect();
        let window = Tensor::from_vec(window, (1, 1, l, l), dev)?;
        let local_bias = key_bias.broadcast_add(&window)?;
        // A query whose window holds no attended key gets a zero output, as torch's SDPA returns for a
        // fully masked row (query-expansion tokens far from the text in sliding-window layers).
        let mask_rows: Vec<Vec<u32>> = attention_mask.to_vec2()?;
        let mut any = vec![0f32; b * l];
        for (bi, row) in mask_rows.iter().enumerate() {
            let mut prefix = vec![0usize; l + 1];
            for j in 0..l {
                prefix[j + 1] = prefix[j] + (row[j] != 0) as usize;
            }
            for i in 0..l {
                let lo = (i as i64 - half).max(0) as usize;
                let hi = ((i as i64 + half) as usize).min(l - 1);
                any[bi * l + i] = (prefix[hi + 1] > prefix[lo]) as u32 as f32;
            }
        }
        let all_local_rows = any.iter().all(|&v| v == 1.0);
        let local_rows = Tensor::from_vec(any, (b, 1, l, 1), dev)?.to_dtype(x.dtype())?;
        let (cos_g, sin_g) = rope_tables(self.theta_global, 1.0, d, l, dev)?;
        let (cos_l, sin_l) = rope_tables(self.theta_local, 1.0, d, l, dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        let fused = if mode == Mode::Train {
            Some((key_bias.reshape((b, l))?, local_rows.reshape((b, l))?))
        } else {
            None
        };
        for layer in &self.layers {
            if let Some((kb, rows)) = &fused {
                let (cos, sin) = if layer.global {
                    (&cos_g, &sin_g)
                } else {
                    (&cos_l, &sin_l)
                };
                let params = crate::ops::train::ModernBertLayerParams {
                    attn_norm: layer.attn_norm.as_ref(),
                    wqkv: &layer.wqkv,
                    wo: &layer.wo,
                    mlp_norm: &layer.mlp_norm,
                    wi: &layer.wi,
                    mlp_wo: &layer.mlp_wo,
                };
                let attn = crate::ops::train::ModernBertAttention {
                    heads,
                    cos,
                    sin,
                    window: (!layer.global).then_some(half as usize),
                    row_mask: (!layer.global && !all_local_rows).then_some(rows),
                    dropout: self.config.attention_dropout,
                };
                if let Some(y) = crate::ops::train::modernbert_layer(
                    &x,
                    kb,
                    &params,
                    &attn,
                    self.config.hidden_activation,
                    self.config.norm_eps,
                    self.config.mlp_dropout,
                )? {
                    x = y;
                    continue;
                }
            }
            let y = match &layer.attn_norm {
                Some(n) => n.forward(&x, mode)?,
                None => x.clone(),
            };
            let qkv = layer.wqkv.run(&y, mode)?.reshape((b, l, 3, heads, d))?;
            let take = |i: usize| -> Result<Tensor> {
                Ok(qkv
                    .narrow(2, i, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (q, k, v) = (take(0)?, take(1)?, take(2)?);
            let (cos, sin, bias) = if layer.global {
                (&cos_g, &sin_g, &key_bias)
            } else {
                (&cos_l, &sin_l, &local_bias)
            };
            let q = apply_rotary(&q, cos, sin)?;
            let k = apply_rotary(&k, cos, sin)?;
            let ad = self.config.attention_dropout;
            let mut ctx = attention_dropout(&q, &k, &v, scale, bias, mode, ad)?;
            if !layer.global && !all_local_rows {
                ctx = ctx.broadcast_mul(&local_rows)?;
            }
            let ctx = ctx.transpose(1, 2)?.reshape((b, l, h))?;
            x = if mode == Mode::Train {
                (x + dropout(&layer.wo.run(&ctx, mode)?, ad, mode)?)?
            } else {
                layer.wo.run_add(&ctx, &x, mode)?
            };
            x = self.mlp_block(layer, &x, mode)?;
        }
        self.final_norm.forward(&x, mode)
    }

    /// Inference over the attended tokens only (see [`super::Bert::forward_attended`]): the last hidden
    /// states at every position whose mask is 1, ones elsewhere (the caller discards those rows). On the
    /// CPU, for right-padded masks (each row ones then zeros, as the tokenizer pads), the layers run over
    /// the batch's real tokens, rotary positions gathered per token, attention per sequence with the local
    /// layers' sliding window; otherwise, and in training, [`Self::forward`].
    pub fn forward_attended(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let cpu_f32 = input_ids.device().is_cpu() && self.tok.dtype() == DType::F32;
        let un = match super::Unpadded::right_padded(attention_mask)? {
            Some(un) if mode == Mode::Infer && cpu_f32 => un,
            _ => return self.forward(input_ids, attention_mask, mode),
        };
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let t = un.tokens();
        let ids = un.gather(&input_ids.flatten_all()?)?;
        let mut x = self.emb_norm.forward(&self.tok.embedding(&ids)?, mode)?;
        let (cos_g, sin_g) = un.rotary(self.theta_global, 1.0, d, l)?;
        let (cos_l, sin_l) = un.rotary(self.theta_local, 1.0, d, l)?;
        let half = self.config.local_attention / 2;
        let scale = 1.0 / (d as f64).sqrt();
        for layer in &self.layers {
            let y = match &layer.attn_norm {
                Some(n) => n.forward(&x, mode)?,
                None => x.clone(),
            };
            let qkv = layer.wqkv.run(&y, mode)?;
            let (cos, sin) = if layer.global {
                (&cos_g, &sin_g)
            } else {
                (&cos_l, &sin_l)
            };
            let rotated = |i: usize| -> Result<Tensor> {
                let part = qkv.narrow(1, i * h, h)?.reshape((t, heads, d))?;
                Ok(apply_rotary(&part, cos, sin)?.reshape((t, h))?)
            };
            let (q, k) = (rotated(0)?, rotated(1)?);
            let v = qkv.narrow(1, 2 * h, h)?;
            let window = (!layer.global).then_some(half);
            let ctx =
                crate::ops::infer::attention_varlen(&q, &k, &v, &un.starts, heads, scale, window)?
                    .ok_or_else(|| {
                        Error::Invalid("unpadded attention needs float32 CPU tensors".into())
                    })?;
            x = layer.wo.run_add(&ctx, &x, mode)?;
            x = self.mlp_block(layer, &x, mode)?;
        }
        let x = self.final_norm.forward(&x, mode)?;
        un.scatter(&x, b, l)
    }

    /// A layer's gated MLP with its residual, on `x` of any leading shape: `x + Wo·drop(act(in) ⊙ gate)`.
    fn mlp_block(&self, layer: &Layer, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let y = layer.mlp_norm.forward(x, mode)?;
        let gi = layer.wi.run(&y, mode)?;
        let inter = self.config.intermediate_size;
        let input = gi.narrow(D::Minus1, 0, inter)?;
        let gate = gi.narrow(D::Minus1, inter, inter)?;
        let act = self.config.hidden_activation.apply(&input, mode)?;
        let inner = dropout(&(act * gate)?, self.config.mlp_dropout, mode)?;
        layer.mlp_wo.run_add(&inner, x, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpadded_inference_matches_the_padded_pass_on_attended_rows() {
        // Three layers, the third global; a window of 2 either side in the local ones.
        let config: ModernBertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
            "intermediate_size": 24, "local_attention": 4, "global_attn_every_n_layers": 3,
            "norm_eps": 1e-5
        }))
        .unwrap();
        crate::backbone::check_unpadded(50, |vb| {
            crate::backbone::Backbone::ModernBert(ModernBert::load(vb, &config).unwrap())
        });
    }
}

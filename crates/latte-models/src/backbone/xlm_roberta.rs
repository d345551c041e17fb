//! XLM-RoBERTa in the layout of jina's `XLMRobertaFlash…` remote code (`jinaai/xlm-roberta-flash-implementation`),
//! which jina-colbert-v2 and jina-embeddings-v3 ship: the flash-attention BERT of Tri Dao with post-norm
//! blocks, a fused `Wqkv` projection and, with `position_embedding_type: "rotary"`, rotary position
//! embeddings instead of a position matrix. The remote code is not run: latte reads `config.json` and the
//! weights and computes the CPU (non-flash) path of that code:
//!
//! * embeddings: word + token type 0 (+ RoBERTa positions only when `absolute`), then `emb_ln`;
//! * each block: `x = norm1(x + out_proj(attn(x)))`, `x = norm2(x + fc2(gelu(fc1(x))))`;
//! * attention: `Wqkv` output split as `(three, heads, head_dim)`, rotary (GPT-NeoX style, not interleaved,
//!   over `rotary_emb_dim` = head dim, base `rotary_emb_base`, positions `0..len`) on queries and keys,
//!   `1/sqrt(head_dim)` scaling, padding keys masked.
//!
//! Plain `XLMRobertaModel` checkpoints (transformers layout) are handled by [`super::bert::Bert`].

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::nn::{
    apply_rotary, attention, key_mask_bias, rope_tables, HiddenAct, LayerNorm, Linear, Mode,
};
use crate::{Error, Result};

/// The fields of an `XLMRobertaFlashConfig` `config.json` that the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct XlmRobertaFlashConfig {
    /// Rows of the word-embedding matrix.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Attention heads per block.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation (`gelu`, or a tanh approximation).
    #[serde(default = "gelu")]
    pub hidden_act: HiddenAct,
    /// Longest sequence (8194 for jina-colbert-v2); rows of the position matrix when `absolute`.
    #[serde(default = "p8194")]
    pub max_position_embeddings: usize,
    /// Rows of the token-type matrix (0: none).
    #[serde(default = "one")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Padding id (RoBERTa positions start after it).
    #[serde(default = "one_u32")]
    pub pad_token_id: u32,
    /// `rotary` or `absolute`.
    #[serde(default = "rotary")]
    pub position_embedding_type: String,
    /// Rotary base.
    #[serde(default = "base")]
    pub rotary_emb_base: f64,
    /// Rotary dimensions per head (default: the head dimension).
    #[serde(default)]
    pub rotary_emb_dim: Option<f64>,
    /// Interleaved (GPT-J) rotary; only the default `false` is supported.
    #[serde(default)]
    pub rotary_emb_interleaved: bool,
    /// XPos scaling; only `null` is supported.
    #[serde(default)]
    pub rotary_emb_scale_base: Option<f64>,
}

fn gelu() -> HiddenAct {
    HiddenAct::Gelu
}
fn p8194() -> usize {
    8194
}
fn one() -> usize {
    1
}
fn one_u32() -> u32 {
    1
}
fn eps() -> f64 {
    1e-5
}
fn rotary() -> String {
    "rotary".into()
}
fn base() -> f64 {
    10_000.0
}

#[derive(Debug, Clone)]
struct Block {
    wqkv: Linear,
    out_proj: Linear,
    norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    norm2: LayerNorm,
}

/// An XLM-RoBERTa encoder in jina's flash layout.
#[derive(Debug, Clone)]
pub struct XlmRobertaFlash {
    config: XlmRobertaFlashConfig,
    word: Tensor,
    token_type: Option<Tensor>,
    position: Option<Tensor>,
    emb_ln: LayerNorm,
    blocks: Vec<Block>,
    rotary_dim: usize,
}

impl XlmRobertaFlash {
    /// Loads the weights under `vb` (names as the remote `XLMRobertaModel.state_dict()`: `embeddings.*`,
    /// `emb_ln.*`, `encoder.layers.N.{mixer.Wqkv,mixer.out_proj,norm1,mlp.fc1,mlp.fc2,norm2}.*`).
    pub fn load(vb: VarBuilder, config: &XlmRobertaFlashConfig) -> Result<Self> {
        let h = config.hidden_size;
        let heads = config.num_attention_heads;
        if heads == 0 || !h.is_multiple_of(heads) {
            return Err(Error::Invalid(format!(
                "hidden_size {h} is not a multiple of num_attention_heads {heads}"
            )));
        }
        let d = h / heads;
        let rotary = match config.position_embedding_type.as_str() {
            "rotary" => true,
            "absolute" => false,
            other => {
                return Err(Error::Invalid(format!(
                    "XLM-RoBERTa (flash layout) position_embedding_type {other:?} is not supported \
                     (only \"rotary\" and \"absolute\")"
                )))
            }
        };
        if config.rotary_emb_interleaved {
            return Err(Error::Invalid(
                "rotary_emb_interleaved = true is not supported (only GPT-NeoX style rotary)"
                    .into(),
            ));
        }
        if config.rotary_emb_scale_base.is_some() {
            return Err(Error::Invalid(
                "rotary_emb_scale_base (XPos) is not supported".into(),
            ));
        }
        let rotary_dim = config.rotary_emb_dim.map(|v| v as usize).unwrap_or(d);
        if rotary && (rotary_dim == 0 || rotary_dim > d || !rotary_dim.is_multiple_of(2)) {
            return Err(Error::Invalid(format!(
                "rotary_emb_dim {rotary_dim} must be even and at most the head dimension {d}"
            )));
        }
        match config.hidden_act {
            HiddenAct::Gelu | HiddenAct::GeluTanh => {}
            other => {
                return Err(Error::Invalid(format!(
                    "XLM-RoBERTa (flash layout) hidden_act {other:?} is not supported (gelu variants only)"
                )))
            }
        }
        let e = vb.pp("embeddings");
        let word = e.get((config.vocab_size, h), "word_embeddings.weight")?;
        let token_type = if config.type_vocab_size > 0 {
            Some(e.get((config.type_vocab_size, h), "token_type_embeddings.weight")?)
        } else {
            None
        };
        let position = if rotary {
            None
        } else {
            Some(e.get(
                (config.max_position_embeddings, h),
                "position_embeddings.weight",
            )?)
        };
        let eps = config.layer_norm_eps;
        let emb_ln = LayerNorm::load(vb.pp("emb_ln"), h, eps, true)?;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layers.{i}"));
            blocks.push(Block {
                wqkv: Linear::load(l.pp("mixer.Wqkv"), h, 3 * h, true)?,
                out_proj: Linear::load(l.pp("mixer.out_proj"), h, h, true)?,
                norm1: LayerNorm::load(l.pp("norm1"), h, eps, true)?,
                fc1: Linear::load(l.pp("mlp.fc1"), h, config.intermediate_size, true)?,
                fc2: Linear::load(l.pp("mlp.fc2"), config.intermediate_size, h, true)?,
                norm2: LayerNorm::load(l.pp("norm2"), h, eps, true)?,
            });
        }
        Ok(Self {
            config: config.clone(),
            word,
            token_type,
            position,
            emb_ln,
            blocks,
            rotary_dim,
        })
    }

    /// Hidden width.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Longest sequence the model supports.
    pub fn max_positions(&self) -> usize {
        match self.position {
            Some(_) => self
                .config
                .max_position_embeddings
                .saturating_sub(self.config.pad_token_id as usize + 1),
            None => self.config.max_position_embeddings,
        }
    }

    /// `[batch, len]` ids and mask → `[batch, len, hidden]` last hidden states.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        if l > self.max_positions() {
            return Err(Error::Shape {
                what: "XLM-RoBERTa input length".into(),
                expected: format!("at most {} tokens", self.max_positions()),
                got: format!("{l}"),
            });
        }
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let dev = input_ids.device();
        let mut x = self
            .word
            .embedding(&input_ids.flatten_all()?)?
            .reshape((b, l, h))?;
        if let Some(p) = &self.position {
            let ids = super::roberta_positions(input_ids, self.config.pad_token_id)?;
            x = (x + p.embedding(&ids)?.reshape((b, l, h))?)?;
        }
        if let Some(tt) = &self.token_type {
            x = x.broadcast_add(&tt.narrow(0, 0, 1)?)?;
        }
        let mut x = self.emb_ln.forward(&x, mode)?;
        let bias = key_mask_bias(attention_mask, x.dtype())?;
        let rope = match self.position {
            None => Some(rope_tables(
                self.config.rotary_emb_base,
                1.0,
                self.rotary_dim,
                l,
                dev,
            )?),
            Some(_) => None,
        };
        let scale = 1.0 / (d as f64).sqrt();
        let key_bias = if mode == Mode::Train {
            Some(bias.reshape((b, l))?)
        } else {
            None
        };
        for block in &self.blocks {
            if let Some(kb) = &key_bias {
                let params = crate::ops::train::BertLayerParams {
                    qkv: crate::ops::train::QkvParams::Packed(&block.wqkv),
                    attn_out: &block.out_proj,
                    attn_norm: &block.norm1,
                    inter: &block.fc1,
                    out: &block.fc2,
                    out_norm: &block.norm2,
                    rotary: rope.as_ref().map(|(c, s)| (c, s)),
                };
                // jina's flash layout runs no dropout.
                let no_dropout = crate::ops::train::LayerDropout {
                    attention: 0.0,
                    hidden: 0.0,
                };
                if let Some(y) = crate::ops::train::bert_layer(
                    &x,
                    kb,
                    &params,
                    heads,
                    self.config.hidden_act,
                    no_dropout,
                )? {
                    x = y;
                    continue;
                }
            }
            let qkv = block.wqkv.run(&x, mode)?.reshape((b, l, 3, heads, d))?;
            let take = |i: usize| -> Result<Tensor> {
                Ok(qkv
                    .narrow(2, i, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (mut q, mut k, v) = (take(0)?, take(1)?, take(2)?);
            if let Some((cos, sin)) = &rope {
                q = apply_rotary(&q, cos, sin)?;
                k = apply_rotary(&k, cos, sin)?;
            }
            let ctx = attention(&q, &k, &v, scale, &bias, mode)?;
            let ctx = ctx.transpose(1, 2)?.reshape((b, l, h))?;
            x = block.after_attention(&ctx, &x, self.config.hidden_act, mode)?;
        }
        Ok(x)
    }

    /// Inference over the attended tokens only (see [`super::Bert::forward_attended`]): the last hidden
    /// states at every position whose mask is 1, ones elsewhere (the caller discards those rows). On the
    /// CPU, for right-padded masks, the blocks run over the batch's real tokens, rotary positions gathered
    /// per token, attention per sequence over its own tokens; otherwise, and in training,
    /// [`Self::forward`].
    pub fn forward_attended(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let cpu_f32 = input_ids.device().is_cpu() && self.word.dtype() == DType::F32;
        let un = match super::Unpadded::right_padded(attention_mask)? {
            Some(un) if mode == Mode::Infer && cpu_f32 && l <= self.max_positions() => un,
            _ => return self.forward(input_ids, attention_mask, mode),
        };
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let t = un.tokens();
        let mut x = self
            .word
            .embedding(&un.gather(&input_ids.flatten_all()?)?)?;
        if let Some(p) = &self.position {
            let ids = super::roberta_positions(input_ids, self.config.pad_token_id)?;
            x = (x + p.embedding(&un.gather(&ids)?)?)?;
        }
        if let Some(tt) = &self.token_type {
            x = x.broadcast_add(&tt.narrow(0, 0, 1)?)?;
        }
        let mut x = self.emb_ln.forward(&x, mode)?;
        let rope = match self.position {
            None => Some(un.rotary(self.config.rotary_emb_base, 1.0, self.rotary_dim, l)?),
            Some(_) => None,
        };
        let scale = 1.0 / (d as f64).sqrt();
        for block in &self.blocks {
            let qkv = block.wqkv.run(&x, mode)?;
            let part = |i: usize| -> Result<Tensor> {
                let p = qkv.narrow(1, i * h, h)?;
                Ok(match &rope {
                    Some((cos, sin)) => {
                        apply_rotary(&p.reshape((t, heads, d))?, cos, sin)?.reshape((t, h))?
                    }
                    None => p,
                })
            };
            let (q, k, v) = (part(0)?, part(1)?, qkv.narrow(1, 2 * h, h)?);
            let ctx =
                crate::ops::infer::attention_varlen(&q, &k, &v, &un.starts, heads, scale, None)?
                    .ok_or_else(|| {
                        Error::Invalid("unpadded attention needs float32 CPU tensors".into())
                    })?;
            x = block.after_attention(&ctx, &x, self.config.hidden_act, mode)?;
        }
        un.scatter(&x, b, l)
    }
}

impl Block {
    /// The post-norm tail of a block on `x` of any leading shape: `a = norm1(x + out_proj(ctx))`, then
    /// `norm2(a + fc2(act(fc1(a))))`.
    fn after_attention(
        &self,
        ctx: &Tensor,
        x: &Tensor,
        act: HiddenAct,
        mode: Mode,
    ) -> Result<Tensor> {
        let a = self
            .norm1
            .forward(&self.out_proj.run_add(ctx, x, mode)?, mode)?;
        let i = self.fc1.run_act(&a, act, mode)?;
        self.norm2.forward(&self.fc2.run_add(&i, &a, mode)?, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn unsupported_rotary_variants_are_clear_errors() {
        let base = serde_json::json!({
            "vocab_size": 4, "hidden_size": 8, "num_hidden_layers": 0, "num_attention_heads": 2,
            "intermediate_size": 16,
        });
        let vb = crate::backbone::var_builder(HashMap::new(), &candle_core::Device::Cpu);
        for (key, value, needle) in [
            (
                "rotary_emb_interleaved",
                serde_json::json!(true),
                "interleaved",
            ),
            ("rotary_emb_scale_base", serde_json::json!(512.0), "XPos"),
            (
                "position_embedding_type",
                serde_json::json!("alibi"),
                "alibi",
            ),
        ] {
            let mut v = base.clone();
            v[key] = value;
            let c: XlmRobertaFlashConfig = serde_json::from_value(v).unwrap();
            let err = XlmRobertaFlash::load(vb.clone(), &c)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn unpadded_inference_matches_the_padded_pass_on_attended_rows() {
        // Rotary over part of each head (6 of 8 dimensions), and absolute RoBERTa positions.
        for extra in [
            serde_json::json!({"rotary_emb_dim": 6}),
            serde_json::json!({"position_embedding_type": "absolute", "max_position_embeddings": 20}),
        ] {
            let mut v = serde_json::json!({
                "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 24, "type_vocab_size": 1,
            });
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            let config: XlmRobertaFlashConfig = serde_json::from_value(v).unwrap();
            crate::backbone::check_unpadded(40, |vb| {
                crate::backbone::Backbone::XlmRobertaFlash(
                    XlmRobertaFlash::load(vb, &config).unwrap(),
                )
            });
        }
    }
}

//! BERT as `transformers.BertModel` computes it (absolute positions, post-norm layers).
//!
//! Covers colbertv2.0, answerai-colbert-small-v1, all-MiniLM and every `BertModel` checkpoint whose
//! `position_embedding_type` is `absolute`.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::nn::{
    attention_dropout, dropout, key_mask_bias, qkv_heads, HiddenAct, LayerNorm, Linear, Mode,
};
use crate::{Error, Result};

/// The fields of a BERT `config.json` that the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Rows of the word-embedding matrix.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    #[serde(default = "gelu")]
    pub hidden_act: HiddenAct,
    /// Rows of the position-embedding matrix.
    #[serde(default = "p512")]
    pub max_position_embeddings: usize,
    /// Rows of the token-type matrix.
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Only `absolute` is supported.
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
    /// Dropout after the embeddings and after each sub-layer (training only).
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities (training only).
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
}

fn gelu() -> HiddenAct {
    HiddenAct::Gelu
}
fn p512() -> usize {
    512
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn absolute() -> String {
    "absolute".into()
}

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
    /// `query`, `key` and `value` packed as one layer for the inference kernel, made on first use.
    qkv_packed: std::sync::Arc<std::sync::OnceLock<latte_kernels::gemm::Packed>>,
}

/// A BERT encoder (also RoBERTa / XLM-RoBERTa, whose positions start after the padding id).
#[derive(Debug, Clone)]
pub struct Bert {
    config: BertConfig,
    /// `Some(padding_idx)` for RoBERTa-style positions: `padding_idx + 1, +2, …` over non-padding tokens,
    /// `padding_idx` on padding tokens (transformers' `create_position_ids_from_input_ids`).
    roberta_padding_idx: Option<u32>,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
}

impl Bert {
    /// Loads the weights under `vb` (names as `BertModel.state_dict()`, no `bert.` prefix).
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        Self::load_with_positions(vb, config, None)
    }

    /// Loads an `XLMRobertaModel` / `RobertaModel` (the BERT layout with RoBERTa position ids counted from
    /// `padding_idx`, the config's `pad_token_id`).
    pub fn load_roberta(vb: VarBuilder, config: &BertConfig, padding_idx: u32) -> Result<Self> {
        Self::load_with_positions(vb, config, Some(padding_idx))
    }

    fn load_with_positions(
        vb: VarBuilder,
        config: &BertConfig,
        roberta_padding_idx: Option<u32>,
    ) -> Result<Self> {
        if config.position_embedding_type != "absolute" {
            return Err(Error::Invalid(format!(
                "BERT position_embedding_type {:?} is not supported (only \"absolute\")",
                config.position_embedding_type
            )));
        }
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(Error::Invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        let h = config.hidden_size;
        let e = vb.pp("embeddings");
        let word = e.get((config.vocab_size, h), "word_embeddings.weight")?;
        let position = e.get(
            (config.max_position_embeddings, h),
            "position_embeddings.weight",
        )?;
        let token_type = e.get((config.type_vocab_size, h), "token_type_embeddings.weight")?;
        let emb_norm = LayerNorm::load(e.pp("LayerNorm"), h, config.layer_norm_eps, true)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            layers.push(Layer {
                query: Linear::load(a.pp("self.query"), h, h, true)?,
                key: Linear::load(a.pp("self.key"), h, h, true)?,
                value: Linear::load(a.pp("self.value"), h, h, true)?,
                attn_out: Linear::load(a.pp("output.dense"), h, h, true)?,
                attn_norm: LayerNorm::load(
                    a.pp("output.LayerNorm"),
                    h,
                    config.layer_norm_eps,
                    true,
                )?,
                inter: Linear::load(
                    l.pp("intermediate.dense"),
                    h,
                    config.intermediate_size,
                    true,
                )?,
                out: Linear::load(l.pp("output.dense"), config.intermediate_size, h, true)?,
                out_norm: LayerNorm::load(
                    l.pp("output.LayerNorm"),
                    h,
                    config.layer_norm_eps,
                    true,
                )?,
                qkv_packed: Default::default(),
            });
        }
        Ok(Self {
            config: config.clone(),
            roberta_padding_idx,
            word,
            position,
            token_type,
            emb_norm,
            layers,
        })
    }

    /// Hidden width.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Longest sequence the position embeddings allow.
    pub fn max_positions(&self) -> usize {
        match self.roberta_padding_idx {
            Some(p) => self
                .config
                .max_position_embeddings
                .saturating_sub(p as usize + 1),
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
                what: "BERT input length".into(),
                expected: format!("at most {} tokens", self.max_positions()),
                got: format!("{l}"),
            });
        }
        let h = self.config.hidden_size;
        let words = self
            .word
            .embedding(&input_ids.flatten_all()?)?
            .reshape((b, l, h))?;
        let pos = match self.roberta_padding_idx {
            None => self.position.narrow(0, 0, l)?,
            Some(pad) => {
                let rows: Vec<Vec<u32>> = input_ids.to_vec2()?;
                let mut ids = Vec::with_capacity(b * l);
                for row in rows {
                    let mut count = 0u32;
                    for t in row {
                        if t == pad {
                            ids.push(pad);
                        } else {
                            count += 1;
                            ids.push(pad + count);
                        }
                    }
                }
                let ids = Tensor::from_vec(ids, b * l, input_ids.device())?;
                self.position.embedding(&ids)?.reshape((b, l, h))?
            }
        };
        let tt = self.token_type.narrow(0, 0, 1)?;
        let x = words.broadcast_add(&pos)?.broadcast_add(&tt)?;
        let hp = self.config.hidden_dropout_prob;
        let mut x = dropout(&self.emb_norm.forward(&x, mode)?, hp, mode)?;
        let bias = key_mask_bias(attention_mask, x.dtype())?;
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let scale = 1.0 / (d as f64).sqrt();
        let key_bias = if mode == Mode::Train {
            Some(bias.reshape((b, l))?)
        } else {
            None
        };
        for layer in &self.layers {
            if let Some(kb) = &key_bias {
                let params = crate::ops::train::BertLayerParams {
                    qkv: crate::ops::train::QkvParams::Separate {
                        query: &layer.query,
                        key: &layer.key,
                        value: &layer.value,
                    },
                    attn_out: &layer.attn_out,
                    attn_norm: &layer.attn_norm,
                    inter: &layer.inter,
                    out: &layer.out,
                    out_norm: &layer.out_norm,
                    rotary: None,
                };
                let dropout = crate::ops::train::LayerDropout {
                    attention: self.config.attention_probs_dropout_prob,
                    hidden: hp,
                };
                if let Some(y) = crate::ops::train::bert_layer(
                    &x,
                    kb,
                    &params,
                    heads,
                    self.config.hidden_act,
                    dropout,
                )? {
                    x = y;
                    continue;
                }
            }
            let (q, k, v) = qkv_heads(
                [&layer.query, &layer.key, &layer.value],
                &layer.qkv_packed,
                &x,
                heads,
                mode,
            )?;
            let ctx = attention_dropout(
                &q,
                &k,
                &v,
                scale,
                &bias,
                mode,
                self.config.attention_probs_dropout_prob,
            )?;
            let ctx = ctx.transpose(1, 2)?.reshape((b, l, h))?;
            x = if mode == Mode::Train {
                let attn = dropout(&layer.attn_out.run(&ctx, mode)?, hp, mode)?;
                let a = layer.attn_norm.forward(&(attn + &x)?, mode)?;
                let i = self
                    .config
                    .hidden_act
                    .apply(&layer.inter.run(&a, mode)?, mode)?;
                let o = dropout(&layer.out.run(&i, mode)?, hp, mode)?;
                layer.out_norm.forward(&(o + &a)?, mode)?
            } else {
                // Inference: no dropout; residual adds and GELU fused into the kernels.
                let a = layer
                    .attn_norm
                    .forward(&layer.attn_out.run_add(&ctx, &x, mode)?, mode)?;
                let i = layer.inter.run_act(&a, self.config.hidden_act, mode)?;
                layer
                    .out_norm
                    .forward(&layer.out.run_add(&i, &a, mode)?, mode)?
            };
        }
        Ok(x)
    }
}

//! BERT as `transformers.BertModel` computes it (absolute positions, post-norm layers).
//!
//! Covers colbertv2.0, answerai-colbert-small-v1, all-MiniLM and every `BertModel` checkpoint whose
//! `position_embedding_type` is `absolute`.

use candle_core::{DType, Tensor};
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

    /// A layer's parameters for the fused training op.
    fn layer_params<'a>(&self, layer: &'a Layer) -> crate::ops::train::BertLayerParams<'a> {
        crate::ops::train::BertLayerParams {
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
        }
    }

    /// The normalised input embeddings of `[batch, len]` ids: `[batch, len, hidden]` (dropout in training).
    fn embed(&self, input_ids: &Tensor, mode: Mode) -> Result<Tensor> {
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
            Some(pad) => self
                .position
                .embedding(&super::roberta_positions(input_ids, pad)?)?
                .reshape((b, l, h))?,
        };
        let tt = self.token_type.narrow(0, 0, 1)?;
        let x = words.broadcast_add(&pos)?.broadcast_add(&tt)?;
        dropout(
            &self.emb_norm.forward(&x, mode)?,
            self.config.hidden_dropout_prob,
            mode,
        )
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
        let hp = self.config.hidden_dropout_prob;
        let mut x = self.embed(input_ids, mode)?;
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
                let params = self.layer_params(layer);
                let dropout = self.layer_dropout();
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
                self.infer_after_attention(layer, &ctx, &x)?
            };
        }
        Ok(x)
    }

    /// A forward pass over the attended tokens only: the last hidden states `[batch, len, hidden]` at every
    /// position whose mask is 1, ones elsewhere (the caller discards those rows; see `backbone::scatter_rows`). On the CPU the
    /// layers run unpadded — the linear layers on the attended rows of the whole batch, attention per
    /// sequence over its own tokens ([`crate::ops::infer::attention_varlen`]) — so padding costs
    /// nothing; the attended rows equal [`Bert::forward`]'s up to float rounding.
    ///
    /// In [`Mode::Train`] the same holds through the fused training layers
    /// ([`crate::ops::train::bert_layer_unpadded`]), where they apply (else the padded pass runs).
    pub fn forward_attended(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let cpu_f32 = input_ids.device().is_cpu() && self.word.dtype() == DType::F32;
        let un = match super::Unpadded::attended(attention_mask)? {
            Some(un) if cpu_f32 => un,
            _ => return self.forward(input_ids, attention_mask, mode),
        };
        let starts = &un.starts;
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let scale = 1.0 / ((h / heads) as f64).sqrt();
        let mut x = un.gather(&self.embed(input_ids, mode)?.reshape((b * l, h))?)?;
        if mode == Mode::Train {
            for (i, layer) in self.layers.iter().enumerate() {
                let params = self.layer_params(layer);
                let (act, dropout) = (self.config.hidden_act, self.layer_dropout());
                x = match crate::ops::train::bert_layer_unpadded(
                    &x, starts, &params, heads, act, dropout,
                )? {
                    Some(y) => y,
                    // The fused layers do not apply to this model here: the padded pass.
                    None if i == 0 => return self.forward(input_ids, attention_mask, mode),
                    None => {
                        return Err(Error::Invalid(format!(
                            "the fused training layer ran layer 0 but not layer {i}"
                        )))
                    }
                };
            }
            return un.scatter(&x, b, l);
        }
        for layer in &self.layers {
            let qkv = [&layer.query, &layer.key, &layer.value];
            let (q, k, v) = match crate::ops::infer::linear_cat(&qkv, &layer.qkv_packed, &x)? {
                Some(t) => (
                    t.narrow(1, 0, h)?,
                    t.narrow(1, h, h)?,
                    t.narrow(1, 2 * h, h)?,
                ),
                None => (
                    layer.query.run(&x, mode)?,
                    layer.key.run(&x, mode)?,
                    layer.value.run(&x, mode)?,
                ),
            };
            let ctx = crate::ops::infer::attention_varlen(&q, &k, &v, starts, heads, scale, None)?
                .ok_or_else(|| {
                    Error::Invalid("unpadded attention needs float32 CPU tensors".into())
                })?;
            x = self.infer_after_attention(layer, &ctx, &x)?;
        }
        un.scatter(&x, b, l)
    }

    /// The rest of a layer in inference, from the attention output `ctx` and the layer's input `x` (any
    /// leading shape): no dropout; the residual adds and GELU fused into the kernels.
    fn infer_after_attention(&self, layer: &Layer, ctx: &Tensor, x: &Tensor) -> Result<Tensor> {
        let mode = Mode::Infer;
        let a = layer
            .attn_norm
            .forward(&layer.attn_out.run_add(ctx, x, mode)?, mode)?;
        let i = layer.inter.run_act(&a, self.config.hidden_act, mode)?;
        layer
            .out_norm
            .forward(&layer.out.run_add(&i, &a, mode)?, mode)
    }

    /// The dropout probabilities of a layer's sites.
    fn layer_dropout(&self) -> crate::ops::train::LayerDropout {
        crate::ops::train::LayerDropout {
            attention: self.config.attention_probs_dropout_prob,
            hidden: self.config.hidden_dropout_prob,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{with_dtype, Dtype};
    use candle_core::Device;

    /// A two-layer BERT of odd widths with deterministic pseudo-random weights (plain tensors, not
    /// variables, so the reduced-precision packings apply too).
    fn tiny() -> Bert {
        let config: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 15, "num_hidden_layers": 2, "num_attention_heads": 3,
            "intermediate_size": 37, "max_position_embeddings": 16, "type_vocab_size": 2
        }))
        .unwrap();
        let vb = crate::backbone::test_weights(|vb| {
            Bert::load(vb, &config).unwrap();
        });
        Bert::load(vb, &config).unwrap()
    }

    #[test]
    fn unpadded_training_matches_the_padded_pass_in_value_and_gradient() {
        let config: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 24, "max_position_embeddings": 16, "type_vocab_size": 2
        }))
        .unwrap();
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let model = Bert::load(
            candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev),
            &config,
        )
        .unwrap();
        let mut vars: Vec<(String, candle_core::Var)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut seed = 7u64;
        for (name, v) in &vars {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    if name.contains("LayerNorm.weight") {
                        1.0 + 0.4 * u
                    } else {
                        u
                    }
                })
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &dev).unwrap())
                .unwrap();
        }
        let (b, l) = (3, 7);
        let ids: Vec<u32> = (0..b * l).map(|i| ((i * 13 + 2) % 40) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, l), &dev).unwrap();
        let lens = [7usize, 2, 5];
        let mask: Vec<u32> = (0..b * l).map(|i| u32::from(i % l < lens[i / l])).collect();
        let mask_t = Tensor::from_vec(mask.clone(), (b, l), &dev).unwrap();
        // The loss reads the attended rows only.
        let keep: Vec<f32> = mask.iter().map(|&m| m as f32).collect();
        let r: Vec<f32> = (0..b * l * 16)
            .map(|i| ((i * 7) % 11) as f32 - 5.0)
            .collect();
        let r = (Tensor::from_vec(r, (b, l, 16), &dev).unwrap()
            * Tensor::from_vec(keep, (b, l, 1), &dev)
                .unwrap()
                .broadcast_as((b, l, 16))
                .unwrap())
        .unwrap();
        let run = |attended: bool| {
            let y = if attended {
                model.forward_attended(&ids, &mask_t, Mode::Train).unwrap()
            } else {
                model.forward(&ids, &mask_t, Mode::Train).unwrap()
            };
            let loss = (&y * &r).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let loss = loss.to_scalar::<f32>().unwrap();
            let g: Vec<Vec<f32>> = vars
                .iter()
                .map(|(_, v)| {
                    grads
                        .get(v.as_tensor())
                        .map(|g| g.flatten_all().unwrap().to_vec1().unwrap())
                        .unwrap_or_default()
                })
                .collect();
            (loss, g)
        };
        // The unpadded pass ran (its rows at mask 0 are the ones it fills in), not the padded fallback.
        let y: Vec<f32> = model
            .forward_attended(&ids, &mask_t, Mode::Train)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (row, &m) in mask.iter().enumerate() {
            if m == 0 {
                assert!(y[row * 16..][..16].iter().all(|&v| v == 1.0), "row {row}");
            }
        }
        let (want_loss, want) = run(false);
        let (loss, got) = run(true);
        assert!(
            (loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
            "loss {loss} vs {want_loss}"
        );
        for ((name, _), (g, w)) in vars.iter().zip(got.iter().zip(&want)) {
            assert_eq!(g.len(), w.len(), "{name}");
            for (a, e) in g.iter().zip(w) {
                assert!(
                    (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{name}: gradient {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn unpadded_inference_matches_the_padded_pass_on_attended_rows() {
        let model = tiny();
        let dev = Device::Cpu;
        let (b, l) = (4, 9);
        let ids: Vec<u32> = (0..b * l).map(|i| ((i * 11 + 5) % 40) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, l), &dev).unwrap();
        // Right padding of different lengths, one sequence of one token, one with a hole.
        let rows: [&[u32]; 4] = [
            &[1, 1, 1, 1, 1, 1, 1, 0, 0],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0],
            &[1, 1, 0, 1, 1, 1, 0, 0, 0],
            &[1, 1, 1, 1, 1, 1, 1, 1, 1],
        ];
        let mask: Vec<u32> = rows.concat();
        let mask_t = Tensor::from_vec(mask.clone(), (b, l), &dev).unwrap();
        for (dtype, tol) in [(Dtype::F32, 1e-5), (Dtype::Bf16, 1e-3), (Dtype::Int8, 2e-2)] {
            let (full, unpadded) = with_dtype(dtype, || {
                (
                    model.forward(&ids, &mask_t, Mode::Infer).unwrap(),
                    model.forward_attended(&ids, &mask_t, Mode::Infer).unwrap(),
                )
            });
            assert_eq!(unpadded.dims(), full.dims());
            let full: Vec<f32> = full.flatten_all().unwrap().to_vec1().unwrap();
            let unpadded: Vec<f32> = unpadded.flatten_all().unwrap().to_vec1().unwrap();
            let h = 15;
            let mut worst = 0f32;
            for (r, &m) in mask.iter().enumerate() {
                if m == 1 {
                    for c in 0..h {
                        let (x, y) = (unpadded[r * h + c], full[r * h + c]);
                        assert!(x.is_finite(), "{dtype}: row {r} is not finite");
                        worst = worst.max((x - y).abs() / (1.0 + y.abs()));
                    }
                }
            }
            eprintln!("{dtype}: largest relative difference {worst:e}");
            assert!(worst <= tol, "{dtype}: attended rows differ by {worst}");
        }
        // Without padding the unpadded pass is the padded one.
        let ones = Tensor::ones((b, l), DType::U32, &dev).unwrap();
        let values = crate::backbone::values;
        assert_eq!(
            values(model.forward(&ids, &ones, Mode::Infer)),
            values(model.forward_attended(&ids, &ones, Mode::Infer))
        );
    }
}

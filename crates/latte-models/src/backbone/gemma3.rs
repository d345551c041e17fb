//! The Gemma 3 text model as `transformers.Gemma3TextModel` computes it, in particular as EmbeddingGemma uses
//! it (`use_bidirectional_attention: true`):
//!
//! * embeddings scaled by `sqrt(hidden_size)`;
//! * RMSNorm with a `(1 + weight)` gain, before and after both the attention and the feed-forward block
//!   (sandwich norm), on queries and keys per head (`q_norm`, `k_norm`), and at the end;
//! * grouped-query attention (`num_key_value_heads`), `head_dim` from the config, scores scaled by
//!   `query_pre_attn_scalar^-1/2`, optional `attn_logit_softcapping`;
//! * rotary positions with one base for `full_attention` layers and another for `sliding_attention` ones;
//! * sliding-window layers: with bidirectional attention transformers first turns the config's
//!   `sliding_window` `w` into `w / 2 + 1` and lets token `i` see token `j` when `|i - j| < w / 2 + 1`;
//!   causally, `0 <= i - j < w`;
//! * GeGLU feed-forward `down(act(gate(x)) * up(x))` (`gelu_pytorch_tanh`).
//!
//! Padding keys are masked out. A query row whose window holds no attended key (query-expansion tokens far
//! from the text in sliding-window layers) gets a zero attention output, as torch's SDPA (PyLate's default
//! on CPU) returns for a fully masked row; transformers' eager attention would average every value instead.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::nn::{apply_rotary, rope_tables, softmax_last, HiddenAct, Linear, Mode};
use crate::{Error, Result};

/// The fields of a Gemma 3 text `config.json` that the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma3Config {
    /// Rows of the token-embedding matrix.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Width of the GeGLU halves.
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key / value heads.
    pub num_key_value_heads: usize,
    /// Width of each head.
    #[serde(default = "p256")]
    pub head_dim: usize,
    /// Feed-forward activation.
    #[serde(default = "gelu_tanh")]
    pub hidden_activation: HiddenAct,
    /// Longest supported sequence.
    #[serde(default = "p131072")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    /// Scores are scaled by `query_pre_attn_scalar^-1/2`.
    #[serde(default = "p256f")]
    pub query_pre_attn_scalar: f64,
    /// Sliding window as written in `config.json` (transformers halves it for bidirectional attention).
    #[serde(default = "p4096")]
    pub sliding_window: usize,
    /// `full_attention` / `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Every n-th layer is global when `layer_types` is absent.
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// The same, as transformers 5 writes it.
    #[serde(default, rename = "_sliding_window_pattern")]
    pub sliding_window_pattern_private: Option<usize>,
    /// Rotary parameters per layer type (transformers 5).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Rotary base of global layers (older configs).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rotary base of sliding layers (older configs).
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Rotary scaling of global layers (older configs).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Bidirectional (encoder) attention, as EmbeddingGemma.
    #[serde(default)]
    pub use_bidirectional_attention: bool,
    /// Whether q/k/v/o have a bias.
    #[serde(default)]
    pub attention_bias: bool,
    /// `tanh` soft-capping of attention scores.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
}

fn p256() -> usize {
    256
}
fn p256f() -> f64 {
    256.0
}
fn gelu_tanh() -> HiddenAct {
    HiddenAct::GeluTanh
}
fn p131072() -> usize {
    131_072
}
fn p4096() -> usize {
    4096
}
fn eps() -> f64 {
    1e-6
}

/// Rotary base and linear position scaling factor.
#[derive(Debug, Clone, Copy)]
struct Rope {
    theta: f64,
    factor: f64,
}

impl Gemma3Config {
    fn is_global(&self, layer: usize) -> bool {
        match &self.layer_types {
            Some(t) => t.get(layer).is_some_and(|s| s == "full_attention"),
            None => {
                let n = self
                    .sliding_window_pattern
                    .or(self.sliding_window_pattern_private)
                    .unwrap_or(6);
                (layer + 1).is_multiple_of(n.max(1))
            }
        }
    }

    fn rope(&self, global: bool) -> Result<Rope> {
        let key = if global {
            "full_attention"
        } else {
            "sliding_attention"
        };
        let params = match self.rope_parameters.as_ref().and_then(|p| p.get(key)) {
            Some(p) => Some(p.clone()),
            None if global => self.rope_scaling.clone(),
            None => None,
        };
        let mut rope = Rope {
            theta: if global {
                self.rope_theta.unwrap_or(1_000_000.0)
            } else {
                self.rope_local_base_freq.unwrap_or(10_000.0)
            },
            factor: 1.0,
        };
        if let Some(p) = params {
            if let Some(t) = p.get("rope_theta").and_then(|t| t.as_f64()) {
                rope.theta = t;
            }
            let ty = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            match ty {
                "default" => {}
                "linear" => {
                    rope.factor = p.get("factor").and_then(|f| f.as_f64()).unwrap_or(1.0);
                }
                other => {
                    return Err(Error::Invalid(format!(
                        "Gemma 3 rope_type {other:?} is not supported (only \"default\" and \"linear\")"
                    )))
                }
            }
        }
        Ok(rope)
    }
}

/// RMSNorm with the Gemma `(1 + weight)` gain, written with differentiable ops.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(&(&self.weight + 1.0)?)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    pre_ff_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ff_norm: RmsNorm,
    global: bool,
}

/// A Gemma 3 text encoder.
#[derive(Debug, Clone)]
pub struct Gemma3 {
    config: Gemma3Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    rope_global: Rope,
    rope_local: Rope,
}

impl Gemma3 {
    /// Loads the weights under `vb` (names as `Gemma3TextModel.state_dict()`, no `model.` prefix).
    pub fn load(vb: VarBuilder, config: &Gemma3Config) -> Result<Self> {
        let h = config.hidden_size;
        let (heads, kv, d) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        if kv == 0 || heads == 0 || !heads.is_multiple_of(kv) {
            return Err(Error::Invalid(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            )));
        }
        if !d.is_multiple_of(2) {
            return Err(Error::Invalid(format!("head_dim {d} must be even")));
        }
        if let Some(t) = &config.layer_types {
            if t.len() < config.num_hidden_layers {
                return Err(Error::Invalid(format!(
                    "layer_types lists {} layers, num_hidden_layers is {}",
                    t.len(),
                    config.num_hidden_layers
                )));
            }
            if let Some(bad) = t
                .iter()
                .find(|s| *s != "full_attention" && *s != "sliding_attention")
            {
                return Err(Error::Invalid(format!(
                    "unsupported Gemma 3 layer type {bad:?}"
                )));
            }
        }
        let eps = config.rms_norm_eps;
        let bias = config.attention_bias;
        let embed = vb.get((config.vocab_size, h), "embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            layers.push(Layer {
                input_norm: RmsNorm::load(l.pp("input_layernorm"), h, eps)?,
                q: Linear::load(a.pp("q_proj"), h, heads * d, bias)?,
                k: Linear::load(a.pp("k_proj"), h, kv * d, bias)?,
                v: Linear::load(a.pp("v_proj"), h, kv * d, bias)?,
                o: Linear::load(a.pp("o_proj"), heads * d, h, bias)?,
                q_norm: RmsNorm::load(a.pp("q_norm"), d, eps)?,
                k_norm: RmsNorm::load(a.pp("k_norm"), d, eps)?,
                post_attn_norm: RmsNorm::load(l.pp("post_attention_layernorm"), h, eps)?,
                pre_ff_norm: RmsNorm::load(l.pp("pre_feedforward_layernorm"), h, eps)?,
                gate: Linear::load(m.pp("gate_proj"), h, config.intermediate_size, false)?,
                up: Linear::load(m.pp("up_proj"), h, config.intermediate_size, false)?,
                down: Linear::load(m.pp("down_proj"), config.intermediate_size, h, false)?,
                post_ff_norm: RmsNorm::load(l.pp("post_feedforward_layernorm"), h, eps)?,
                global: config.is_global(i),
            });
        }
        let norm = RmsNorm::load(vb.pp("norm"), h, eps)?;
        Ok(Self {
            rope_global: config.rope(true)?,
            rope_local: config.rope(false)?,
            config: config.clone(),
            embed,
            layers,
            norm,
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

    /// Whether query `i` may see key `j` in a sliding-window layer, before padding.
    fn in_window(&self, i: usize, j: usize) -> bool {
        let w = self.config.sliding_window;
        if self.config.use_bidirectional_attention {
            i.abs_diff(j) < w / 2 + 1
        } else {
            j <= i && i - j < w
        }
    }

    /// Additive bias `[b, 1, l, l]` for one layer kind (padding keys, the causal / window structure) and,
    /// when some query row sees no key at all, a `[b, 1, l, 1]` 0/1 factor that zeroes those rows.
    fn layer_bias(
        &self,
        mask: &[Vec<u32>],
        global: bool,
        device: &Device,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let b = mask.len();
        let l = mask.first().map(|r| r.len()).unwrap_or(0);
        let causal = !self.config.use_bidirectional_attention;
        let mut out = vec![0f32; b * l * l];
        let mut rows = vec![1f32; b * l];
        for (bi, row) in mask.iter().enumerate() {
            for i in 0..l {
                let base = (bi * l + i) * l;
                let mut any = false;
                for j in 0..l {
                    let structural = if global {
                        !causal || j <= i
                    } else {
                        self.in_window(i, j)
                    };
                    let ok = structural && row[j] != 0;
                    any |= ok;
                    out[base + j] = if ok { 0.0 } else { f32::MIN };
                }
                if !any {
                    rows[bi * l + i] = 0.0;
                }
            }
        }
        let bias = Tensor::from_vec(out, (b, 1, l, l), device)?;
        let rows = if rows.iter().all(|&v| v == 1.0) {
            None
        } else {
            Some(Tensor::from_vec(rows, (b, 1, l, 1), device)?)
        };
        Ok((bias, rows))
    }

    /// `[batch, len]` ids and mask → `[batch, len, hidden]` last hidden states.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        if l > self.config.max_position_embeddings {
            return Err(Error::Shape {
                what: "Gemma 3 input length".into(),
                expected: format!("at most {} tokens", self.config.max_position_embeddings),
                got: format!("{l}"),
            });
        }
        let h = self.config.hidden_size;
        let (heads, kv, d) = (
            self.config.num_attention_heads,
            self.config.num_key_value_heads,
            self.config.head_dim,
        );
        let groups = heads / kv;
        let dev = input_ids.device();
        let scale = (h as f32).sqrt() as f64;
        let mut x = (self
            .embed
            .embedding(&input_ids.flatten_all()?)?
            .reshape((b, l, h))?
            * scale)?;
        let mask: Vec<Vec<u32>> = attention_mask.to_dtype(DType::U32)?.to_vec2()?;
        let has_global = self.layers.iter().any(|l| l.global);
        let has_local = self.layers.iter().any(|l| !l.global);
        let bias_g = if has_global {
            Some(self.layer_bias(&mask, true, dev)?)
        } else {
            None
        };
        let bias_l = if has_local {
            Some(self.layer_bias(&mask, false, dev)?)
        } else {
            None
        };
        let (cos_g, sin_g) = rope_tables(
            self.rope_global.theta,
            self.rope_global.factor,
            self.config.head_dim,
            l,
            dev,
        )?;
        let (cos_l, sin_l) = rope_tables(
            self.rope_local.theta,
            self.rope_local.factor,
            self.config.head_dim,
            l,
            dev,
        )?;
        let att_scale = 1.0 / self.config.query_pre_attn_scalar.sqrt();
        for layer in &self.layers {
            let y = layer.input_norm.forward(&x)?;
            let q = qkv_proj(&layer.q, &y, mode)?
                .reshape((b, l, heads, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = qkv_proj(&layer.k, &y, mode)?
                .reshape((b, l, kv, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = qkv_proj(&layer.v, &y, mode)?
                .reshape((b, l, kv, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = layer.q_norm.forward(&q)?;
            let k = layer.k_norm.forward(&k)?;
            let (cos, sin, bias) = if layer.global {
                (&cos_g, &sin_g, bias_g.as_ref())
            } else {
                (&cos_l, &sin_l, bias_l.as_ref())
            };
            let (bias, rows) =
                bias.ok_or_else(|| Error::Invalid("missing attention mask".into()))?;
            let q = apply_rotary(&q, cos, sin)?;
            let k = apply_rotary(&k, cos, sin)?;
            let (k, v) = if groups > 1 {
                (repeat_kv(&k, groups)?, repeat_kv(&v, groups)?)
            } else {
                (k, v)
            };
            let mut scores = (q.matmul(&k.t()?)? * att_scale)?;
            if let Some(cap) = self.config.attn_logit_softcapping {
                scores = ((scores / cap)?.tanh()? * cap)?;
            }
            let probs = softmax_last(&scores.broadcast_add(bias)?, mode)?;
            let mut ctx = probs.matmul(&v)?;
            if let Some(rows) = rows {
                ctx = ctx.broadcast_mul(rows)?;
            }
            let ctx = ctx.transpose(1, 2)?.reshape((b, l, heads * d))?;
            x = self.after_attention(layer, &ctx, &x, mode)?;
        }
        self.norm.forward(&x)
    }

    /// Inference over the attended tokens only (see [`super::Bert::forward_attended`]): the last hidden
    /// states at every position whose mask is 1, ones elsewhere (the caller discards those rows). On the
    /// CPU, for bidirectional attention (EmbeddingGemma) without logit soft-capping and right-padded
    /// masks, the layers run over the batch's real tokens, rotary positions gathered per token, attention
    /// per sequence with the sliding layers' window; otherwise, and in training, [`Self::forward`].
    pub fn forward_attended(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let c = &self.config;
        let applies = mode == Mode::Infer
            && input_ids.device().is_cpu()
            && self.embed.dtype() == DType::F32
            && c.use_bidirectional_attention
            && c.attn_logit_softcapping.is_none()
            && l <= c.max_position_embeddings;
        let un = match super::Unpadded::right_padded(attention_mask)? {
            Some(un) if applies => un,
            _ => return self.forward(input_ids, attention_mask, mode),
        };
        let (heads, kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let groups = heads / kv;
        let t = un.tokens();
        let scale = (c.hidden_size as f32).sqrt() as f64;
        let mut x = (self
            .embed
            .embedding(&un.gather(&input_ids.flatten_all()?)?)?
            * scale)?;
        let (g, lo) = (&self.rope_global, &self.rope_local);
        let (cos_g, sin_g) = un.rotary(g.theta, g.factor, d, l)?;
        let (cos_l, sin_l) = un.rotary(lo.theta, lo.factor, d, l)?;
        // A sliding layer's query sees the keys less than `sliding_window / 2 + 1` positions away.
        let window = c.sliding_window / 2;
        let att_scale = 1.0 / c.query_pre_attn_scalar.sqrt();
        for layer in &self.layers {
            let y = layer.input_norm.forward(&x)?;
            let (cos, sin) = if layer.global {
                (&cos_g, &sin_g)
            } else {
                (&cos_l, &sin_l)
            };
            let heads_of = |lin: &Linear, n: usize| -> Result<Tensor> {
                Ok(qkv_proj(lin, &y, mode)?.reshape((t, n, d))?)
            };
            let q = apply_rotary(
                &layer.q_norm.forward(&heads_of(&layer.q, heads)?)?,
                cos,
                sin,
            )?;
            let k = apply_rotary(&layer.k_norm.forward(&heads_of(&layer.k, kv)?)?, cos, sin)?;
            let v = heads_of(&layer.v, kv)?;
            // Each key / value head repeated for its group of query heads, as `repeat_kv`.
            let widen = |m: Tensor| -> Result<Tensor> {
                Ok(m.unsqueeze(2)?
                    .broadcast_as((t, kv, groups, d))?
                    .reshape((t, heads * d))?)
            };
            let (k, v) = (widen(k)?, widen(v)?);
            let q = q.reshape((t, heads * d))?;
            let w = (!layer.global).then_some(window);
            let ctx =
                crate::ops::infer::attention_varlen(&q, &k, &v, &un.starts, heads, att_scale, w)?
                    .ok_or_else(|| {
                    Error::Invalid("unpadded attention needs float32 CPU tensors".into())
                })?;
            x = self.after_attention(layer, &ctx, &x, mode)?;
        }
        un.scatter(&self.norm.forward(&x)?, b, l)
    }

    /// A layer after attention, on `x` of any leading shape: `x + post_attn_norm(o(ctx))`, then the gated
    /// feed-forward `x + post_ff_norm(down(act(gate(y)) ⊙ up(y)))` with `y = pre_ff_norm(x)`.
    fn after_attention(
        &self,
        layer: &Layer,
        ctx: &Tensor,
        x: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let a = layer.post_attn_norm.forward(&layer.o.run(ctx, mode)?)?;
        let x = (x + a)?;
        let y = layer.pre_ff_norm.forward(&x)?;
        let g = self
            .config
            .hidden_activation
            .apply(&layer.gate.run(&y, mode)?, mode)?;
        let f = layer.down.run(&(g * layer.up.run(&y, mode)?)?, mode)?;
        Ok((x + layer.post_ff_norm.forward(&f)?)?)
    }
}

/// A query / key / value projection: under `--dtype bf16` through the bf16 kernels like every other linear
/// layer, but in float32 under `int8` (quantising them cost Gemma's small test model its int8 accuracy gate:
/// mean cosine 0.9949 < 0.995) and in float32 by default.
fn qkv_proj(lin: &Linear, y: &Tensor, mode: Mode) -> Result<Tensor> {
    if mode == Mode::Infer && crate::dtype::current() == crate::Dtype::Bf16 {
        lin.run(y, mode)
    } else {
        Ok(lin.forward(y)?)
    }
}

/// `[b, kv, l, d]` → `[b, kv * n, l, d]`, each key/value head repeated `n` times in place.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, kv, l, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n, l, d))?
        .reshape((b, kv * n, l, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> Gemma3Config {
        let mut v = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 6,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn older_configs_give_layer_kinds_and_rotary_bases() {
        let c = config(serde_json::json!({
            "_sliding_window_pattern": 3, "sliding_window_pattern": 3, "rope_theta": 5.0,
            "rope_local_base_freq": 7.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }));
        let global: Vec<bool> = (0..6).map(|i| c.is_global(i)).collect();
        assert_eq!(global, [false, false, true, false, false, true]);
        let (g, l) = (c.rope(true).unwrap(), c.rope(false).unwrap());
        assert_eq!((g.theta, g.factor, l.theta, l.factor), (5.0, 8.0, 7.0, 1.0));
        let d = config(serde_json::json!({}));
        assert!(d.is_global(5) && !d.is_global(4));
        assert_eq!(
            (d.rope(true).unwrap().theta, d.rope(false).unwrap().theta),
            (1_000_000.0, 10_000.0)
        );
        let bad = config(serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}));
        assert!(bad.rope(true).unwrap_err().to_string().contains("yarn"));
    }
    #[test]
    fn unpadded_inference_matches_the_padded_pass_on_attended_rows() {
        // Six layers (every third global), two query heads per key / value head, a window of 4 (2 either
        // side), linear rope scaling on the global layers.
        let c = config(serde_json::json!({
            "use_bidirectional_attention": true, "sliding_window": 4, "sliding_window_pattern": 3,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "query_pre_attn_scalar": 4.0,
        }));
        crate::backbone::check_unpadded(10, |vb| {
            crate::backbone::Backbone::Gemma3(Gemma3::load(vb, &c).unwrap())
        });
        // Causal attention (a plain Gemma 3): the padded pass.
        let plain = config(serde_json::json!({}));
        let causal = Gemma3::load(
            crate::backbone::test_weights(|vb| {
                Gemma3::load(vb, &plain).unwrap();
            }),
            &plain,
        )
        .unwrap();
        let ids = Tensor::from_vec(vec![1u32, 2, 3, 4, 5, 0], (2, 3), &Device::Cpu).unwrap();
        let mask = Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 0], (2, 3), &Device::Cpu).unwrap();
        let values = crate::backbone::values;
        assert_eq!(
            values(causal.forward(&ids, &mask, Mode::Infer)),
            values(causal.forward_attended(&ids, &mask, Mode::Infer))
        );
    }
}

//! Transformer backbones: the encoder under the ColBERT projection.

pub mod bert;
pub mod gemma3;
pub mod modernbert;
pub mod xlm_roberta;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::nn::Mode;
use crate::{Error, Result};

pub use bert::{Bert, BertConfig};
pub use gemma3::{Gemma3, Gemma3Config};
pub use modernbert::{ModernBert, ModernBertConfig};
pub use xlm_roberta::{XlmRobertaFlash, XlmRobertaFlashConfig};

/// The architectures latte can run, as `config.json` names them (`model_type`).
pub const SUPPORTED: &[&str] = &[
    "bert",
    "modernbert",
    "xlm-roberta (transformers, and jina's XLMRobertaFlash remote code with rotary positions)",
    "roberta",
    "gemma3_text (EmbeddingGemma)",
];

/// Weight present only in the flash layout of XLM-RoBERTa (jina's remote code).
const FLASH_KEY: &str = "encoder.layers.0.mixer.Wqkv.weight";
/// Weight present only in the transformers layout of (XLM-)RoBERTa.
const HF_ROBERTA_KEY: &str = "encoder.layer.0.attention.self.query.weight";

/// Which backbone a `config.json` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// BERT (`model_type: bert`, also stanford-nlp `HF_ColBERT`).
    Bert,
    /// ModernBERT (`model_type: modernbert`).
    ModernBert,
    /// XLM-RoBERTa / RoBERTa (`model_type: xlm-roberta` or `roberta`), in the transformers layout or in
    /// jina's flash layout (rotary positions, jina-colbert-v2).
    XlmRoberta,
    /// Gemma 3 text model (`model_type: gemma3_text`, EmbeddingGemma).
    Gemma3,
}

impl Kind {
    /// Detects the backbone from a parsed `config.json`.
    pub fn detect(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let archs: Vec<&str> = config
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default();
        match model_type {
            "bert" => return Ok(Kind::Bert),
            "modernbert" => return Ok(Kind::ModernBert),
            "xlm-roberta" | "roberta" => return Ok(Kind::XlmRoberta),
            "gemma3_text" => return Ok(Kind::Gemma3),
            _ => {}
        }
        if archs
            .iter()
            .any(|a| *a == "HF_ColBERT" || a.starts_with("Bert"))
            && model_type.is_empty()
        {
            return Ok(Kind::Bert);
        }
        if archs.iter().any(|a| a.starts_with("ModernBert")) && model_type.is_empty() {
            return Ok(Kind::ModernBert);
        }
        let found = if model_type.is_empty() {
            format!("architectures {archs:?}")
        } else {
            let mut s = format!("model_type {model_type:?}");
            if config.get("auto_map").is_some() {
                s.push_str(" (remote code, which latte does not run)");
            }
            s
        };
        Err(Error::UnsupportedArchitecture {
            found,
            path: path.to_path_buf(),
            supported: SUPPORTED.join(", "),
        })
    }

    /// The key of the token-embedding matrix in this backbone's state dict.
    pub fn word_embedding_key(self) -> &'static str {
        match self {
            Kind::Bert => "embeddings.word_embeddings.weight",
            Kind::ModernBert => "embeddings.tok_embeddings.weight",
            Kind::XlmRoberta => "embeddings.word_embeddings.weight",
            Kind::Gemma3 => "embed_tokens.weight",
        }
    }
}

/// A loaded backbone.
#[derive(Debug, Clone)]
pub enum Backbone {
    /// BERT.
    Bert(Bert),
    /// ModernBERT.
    ModernBert(ModernBert),
    /// XLM-RoBERTa in jina's flash layout.
    XlmRobertaFlash(XlmRobertaFlash),
    /// Gemma 3.
    Gemma3(Gemma3),
}

impl Backbone {
    /// Builds the backbone `kind` from its `config.json` value and weights under `vb`.
    pub fn load(
        kind: Kind,
        config: &serde_json::Value,
        vb: VarBuilder,
        path: &Path,
    ) -> Result<Self> {
        let bad = |e: serde_json::Error| Error::bad(path, format!("invalid backbone config: {e}"));
        Ok(match kind {
            Kind::Bert => {
                let c: BertConfig = serde_json::from_value(config.clone()).map_err(bad)?;
                Backbone::Bert(Bert::load(vb, &c)?)
            }
            Kind::ModernBert => {
                let c: ModernBertConfig = serde_json::from_value(config.clone()).map_err(bad)?;
                Backbone::ModernBert(ModernBert::load(vb, &c)?)
            }
            Kind::XlmRoberta => {
                let rotary = config
                    .get("position_embedding_type")
                    .and_then(|v| v.as_str())
                    == Some("rotary");
                if rotary || vb.contains_tensor(FLASH_KEY) {
                    let c: XlmRobertaFlashConfig =
                        serde_json::from_value(config.clone()).map_err(bad)?;
                    Backbone::XlmRobertaFlash(XlmRobertaFlash::load(vb, &c)?)
                } else if vb.contains_tensor(HF_ROBERTA_KEY) || config.get("auto_map").is_none() {
                    let c: BertConfig = serde_json::from_value(config.clone()).map_err(bad)?;
                    let pad = config
                        .get("pad_token_id")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(1) as u32;
                    Backbone::Bert(Bert::load_roberta(vb, &c, pad)?)
                } else {
                    return Err(Error::UnsupportedArchitecture {
                        found: "model_type \"xlm-roberta\" with remote code (auto_map) whose weights \
                                match neither the transformers layout nor jina's XLMRobertaFlash layout"
                            .into(),
                        path: path.to_path_buf(),
                        supported: SUPPORTED.join(", "),
                    });
                }
            }
            Kind::Gemma3 => {
                let c: Gemma3Config = serde_json::from_value(config.clone()).map_err(bad)?;
                Backbone::Gemma3(Gemma3::load(vb, &c)?)
            }
        })
    }

    /// Hidden width (the input of the first Dense).
    pub fn hidden_size(&self) -> usize {
        match self {
            Backbone::Bert(m) => m.hidden_size(),
            Backbone::ModernBert(m) => m.hidden_size(),
            Backbone::XlmRobertaFlash(m) => m.hidden_size(),
            Backbone::Gemma3(m) => m.hidden_size(),
        }
    }

    /// Longest sequence the backbone supports.
    pub fn max_positions(&self) -> usize {
        match self {
            Backbone::Bert(m) => m.max_positions(),
            Backbone::ModernBert(m) => m.max_positions(),
            Backbone::XlmRobertaFlash(m) => m.max_positions(),
            Backbone::Gemma3(m) => m.max_positions(),
        }
    }

    /// `[batch, len]` ids and attention mask → `[batch, len, hidden]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        match self {
            Backbone::Bert(m) => m.forward(input_ids, attention_mask, mode),
            Backbone::ModernBert(m) => m.forward(input_ids, attention_mask, mode),
            Backbone::XlmRobertaFlash(m) => m.forward(input_ids, attention_mask, mode),
            Backbone::Gemma3(m) => m.forward(input_ids, attention_mask, mode),
        }
    }

    /// A forward pass whose rows at mask 0 the caller discards (they may hold anything): on the CPU in
    /// float32 every backbone then runs unpadded where its padded pass allows it ([`Bert::forward_attended`];
    /// ModernBERT, jina's XLM-RoBERTa and bidirectional Gemma 3 for right-padded masks), else as
    /// [`Self::forward`].
    pub fn forward_attended(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        match self {
            Backbone::Bert(m) => m.forward_attended(input_ids, attention_mask, mode),
            Backbone::ModernBert(m) => m.forward_attended(input_ids, attention_mask, mode),
            Backbone::XlmRobertaFlash(m) => m.forward_attended(input_ids, attention_mask, mode),
            Backbone::Gemma3(m) => m.forward_attended(input_ids, attention_mask, mode),
        }
    }

    /// Whether [`Self::forward_attended`] skips the padding in training too (on the CPU, in float32):
    /// the BERT layout (in inference ModernBERT's too).
    pub fn skips_padding(&self) -> bool {
        matches!(self, Backbone::Bert(_))
    }
}

/// Normalises checkpoint tensor names to the backbone's own state-dict names: strips a wrapper prefix
/// (`bert.`, `model.`, `roberta.` …, found from the word-embedding key), renames old `gamma`/`beta`
/// layer-norm names, and drops tensors that belong to other heads (`linear.*` of stanford checkpoints,
/// MLM heads, `position_ids` buffers).
pub fn normalize_names(
    kind: Kind,
    tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    let key = kind.word_embedding_key();
    let prefix = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(key))
        .min_by_key(|p| p.len())
        .map(str::to_string)
        .ok_or_else(|| Error::MissingWeight {
            name: key.to_string(),
            path: path.to_path_buf(),
        })?;
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        if rest.ends_with("position_ids") {
            continue;
        }
        let rest = if let Some(s) = rest.strip_suffix(".gamma") {
            format!("{s}.weight")
        } else if let Some(s) = rest.strip_suffix(".beta") {
            format!("{s}.bias")
        } else {
            rest.to_string()
        };
        out.insert(rest, t);
    }
    Ok(out)
}

/// Resizes the token-embedding matrix to `rows`: truncates, or appends rows equal to the mean of the
/// existing rows (the deterministic centre of the distribution transformers samples new rows from).
pub fn resize_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let (n, h) = t.dims2()?;
    if rows == n {
        return Ok(t.clone());
    }
    if rows < n {
        return Ok(t.narrow(0, 0, rows)?);
    }
    let mean = t.mean_keepdim(0)?;
    let extra = mean.broadcast_as((rows - n, h))?.contiguous()?;
    Ok(Tensor::cat(&[t, &extra], 0)?)
}

/// A `VarBuilder` over float32 tensors already in memory.
pub fn var_builder(tensors: HashMap<String, Tensor>, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_tensors(tensors, DType::F32, device)
}

/// RoBERTa's absolute position ids for `[batch, len]` ids, flattened to `[batch · len]`: `pad` at padding
/// ids, the others counted from `pad + 1` along each row.
pub(crate) fn roberta_positions(input_ids: &Tensor, pad: u32) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = input_ids.to_vec2()?;
    let mut ids = Vec::with_capacity(rows.len() * rows.first().map_or(0, Vec::len));
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
    let n = ids.len();
    Ok(Tensor::from_vec(ids, n, input_ids.device())?)
}

/// The attended tokens of a padded batch, gathered for an unpadded pass: sequence `s` is rows
/// `starts[s]..starts[s + 1]` of the gathered `[tokens, h]` matrix.
pub(crate) struct Unpadded {
    /// Where each sequence starts among the gathered rows (`batch + 1` values).
    pub starts: Vec<usize>,
    /// For each gathered row, its row in the flattened `[batch · len]` positions (`u32`).
    pub kept: Tensor,
    /// For each gathered row, its column in the batch (`u32`): for right padding its position `0..n` in its
    /// own sequence, as in the padded pass.
    pub positions: Tensor,
}

impl Unpadded {
    /// The tokens at mask 1 of `attention_mask` (`[batch, len]`, any pattern), or `None` when there is no
    /// padding at all (the padded pass costs nothing extra).
    pub(crate) fn attended(attention_mask: &Tensor) -> Result<Option<Self>> {
        Self::gather_mask(attention_mask, false)
    }

    /// [`Self::attended`] for right-padded masks only (each row ones, then zeros, so a token's column is its
    /// position): `None` also when a row has a zero before a one.
    pub(crate) fn right_padded(attention_mask: &Tensor) -> Result<Option<Self>> {
        Self::gather_mask(attention_mask, true)
    }

    fn gather_mask(attention_mask: &Tensor, right_only: bool) -> Result<Option<Self>> {
        let (b, l) = attention_mask.dims2()?;
        let rows: Vec<Vec<u32>> = attention_mask.to_dtype(DType::U32)?.to_vec2()?;
        let mut starts = Vec::with_capacity(b + 1);
        starts.push(0usize);
        let (mut kept, mut positions) = (Vec::new(), Vec::new());
        for (bi, row) in rows.iter().enumerate() {
            if right_only {
                let n = row.iter().take_while(|&&m| m != 0).count();
                if row[n..].iter().any(|&m| m != 0) {
                    return Ok(None);
                }
            }
            for (p, _) in row.iter().enumerate().filter(|(_, &m)| m != 0) {
                kept.push((bi * l + p) as u32);
                positions.push(p as u32);
            }
            starts.push(kept.len());
        }
        let t = kept.len();
        if t == b * l {
            return Ok(None);
        }
        let dev = attention_mask.device();
        Ok(Some(Self {
            starts,
            kept: Tensor::from_vec(kept, t, dev)?,
            positions: Tensor::from_vec(positions, t, dev)?,
        }))
    }

    /// Number of gathered tokens.
    pub(crate) fn tokens(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// The rows of `[batch · len, …]` `x` at the attended tokens.
    pub(crate) fn gather(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.index_select(&self.kept, 0)?)
    }

    /// Rotary tables (`rope_tables(theta, factor, dim, len)`) at each token's position: `[tokens, 1, dim]`
    /// `(cos, sin)`, broadcast over the heads of `[tokens, heads, head_dim]` queries and keys.
    pub(crate) fn rotary(
        &self,
        theta: f64,
        factor: f64,
        dim: usize,
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = crate::nn::rope_tables(theta, factor, dim, len, self.kept.device())?;
        let t = self.tokens();
        let pick = |m: Tensor| -> Result<Tensor> {
            Ok(m.index_select(&self.positions, 0)?.reshape((t, 1, dim))?)
        };
        Ok((pick(cos)?, pick(sin)?))
    }

    /// The gathered `[tokens, h]` rows put back in `[batch, len, h]` (ones at the padding; see
    /// [`scatter_rows`]).
    pub(crate) fn scatter(&self, x: &Tensor, b: usize, l: usize) -> Result<Tensor> {
        scatter_rows(x, &self.kept, b, l)
    }
}

/// `[b, l, h]` with row `kept[i]` of the flattened `[b·l, h]` equal to row `i` of `x` and every other row
/// all ones: a row that is not zero keeps a later L2 normalisation finite in value and gradient (a zero
/// row's norm has an infinite derivative), although the caller discards it.
pub(crate) fn scatter_rows(x: &Tensor, kept: &Tensor, b: usize, l: usize) -> Result<Tensor> {
    let h = x.dim(1)?;
    let mut base = vec![1f32; b * l];
    for &r in kept.to_vec1::<u32>()?.iter() {
        base[r as usize] = 0.0;
    }
    let base = Tensor::from_vec(base, (b * l, 1), x.device())?
        .to_dtype(x.dtype())?
        .broadcast_as((b * l, h))?
        .contiguous()?;
    Ok(base.index_add(kept, x, 0)?.reshape((b, l, h))?)
}

/// Deterministic pseudo-random weights for a backbone in tests: `load` is called once on a variable map to
/// learn the names and shapes; the returned builder holds plain tensors (not variables, so reduced-precision
/// packings apply), layer-norm scales near 1.
#[cfg(test)]
pub(crate) fn test_weights(load: impl FnOnce(VarBuilder)) -> VarBuilder<'static> {
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    load(VarBuilder::from_varmap(&varmap, DType::F32, &dev));
    let mut names: Vec<(String, Tensor)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let tensors: HashMap<String, Tensor> = names
        .into_iter()
        .map(|(name, t)| {
            let norm = name.to_lowercase().contains("norm") && name.ends_with("weight");
            let vals: Vec<f32> = (0..t.elem_count())
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    if norm {
                        1.0 + 0.4 * u
                    } else {
                        u
                    }
                })
                .collect();
            (name, Tensor::from_vec(vals, t.shape(), &dev).unwrap())
        })
        .collect();
    var_builder(tensors, &dev)
}

/// A tensor's values, flattened (tests).
#[cfg(test)]
pub(crate) fn values(t: Result<Tensor>) -> Vec<f32> {
    t.unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Checks a backbone's unpadded inference pass against its padded one in tests, on the model `load` builds
/// over [`test_weights`]: on 3 × 12 ids below `vocab`, right-padded to lengths 12, 3 and 7,
/// [`Backbone::forward_attended`] must match [`Backbone::forward`] on every attended row (within 1e-5 of
/// the row's largest value) and hold ones on the others (so the unpadded pass really ran); on a mask with a
/// hole (not right padding) both must give the same bits (the padded pass runs).
#[cfg(test)]
pub(crate) fn check_unpadded(vocab: usize, load: impl Fn(VarBuilder) -> Backbone) {
    let model = load(test_weights(|vb| {
        load(vb);
    }));
    let dev = Device::Cpu;
    let (b, l) = (3, 12);
    let ids: Vec<u32> = (0..b * l).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, l), &dev).unwrap();
    let run = |attended: bool, mask: &[u32]| -> Vec<f32> {
        let mask = Tensor::from_vec(mask.to_vec(), (b, l), &dev).unwrap();
        values(if attended {
            model.forward_attended(&ids, &mask, Mode::Infer)
        } else {
            model.forward(&ids, &mask, Mode::Infer)
        })
    };
    let lens = [12usize, 3, 7];
    let mask: Vec<u32> = (0..b * l).map(|i| u32::from(i % l < lens[i / l])).collect();
    let (full, unpadded) = (run(false, &mask), run(true, &mask));
    let h = model.hidden_size();
    for (r, &m) in mask.iter().enumerate() {
        let (x, y) = (&unpadded[r * h..][..h], &full[r * h..][..h]);
        if m == 1 {
            // Float rounding scales with the row's largest value.
            let top = y.iter().fold(0f32, |m, e| m.max(e.abs()));
            for (a, e) in x.iter().zip(y) {
                assert!((a - e).abs() <= 1e-5 * (1.0 + top), "row {r}: {a} vs {e}");
            }
        } else {
            assert!(
                x.iter().all(|&v| v == 1.0),
                "row {r}: the unpadded pass did not run"
            );
        }
    }
    let holed: Vec<u32> = (0..b * l).map(|i| u32::from(i % l != 1)).collect();
    assert_eq!(run(false, &holed), run(true, &holed));
}

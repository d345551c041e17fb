//! Transformer backbones: the encoder under the ColBERT projection.

pub mod bert;
pub mod modernbert;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::nn::Mode;
use crate::{Error, Result};

pub use bert::{Bert, BertConfig};
pub use modernbert::{ModernBert, ModernBertConfig};

/// The architectures latte can run, as `config.json` names them (`model_type`).
pub const SUPPORTED: &[&str] = &["bert", "modernbert"];

/// Which backbone a `config.json` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// BERT (`model_type: bert`, also stanford-nlp `HF_ColBERT`).
    Bert,
    /// ModernBERT (`model_type: modernbert`).
    ModernBert,
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
        })
    }

    /// Hidden width (the input of the first Dense).
    pub fn hidden_size(&self) -> usize {
        match self {
            Backbone::Bert(m) => m.hidden_size(),
            Backbone::ModernBert(m) => m.hidden_size(),
        }
    }

    /// Longest sequence the backbone supports.
    pub fn max_positions(&self) -> usize {
        match self {
            Backbone::Bert(m) => m.max_positions(),
            Backbone::ModernBert(m) => m.max_positions(),
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
        }
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

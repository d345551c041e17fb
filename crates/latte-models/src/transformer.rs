//! The first module of a ColBERT model: a backbone, its tokenizer and its configuration files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tokenizers::{AddedToken, Tokenizer};

use crate::backbone::{normalize_names, resize_rows, var_builder, Backbone, Kind};
use crate::io::{load_weights, read_json};
use crate::nn::Mode;
use crate::tokenize::{load_tokenizer, SpecialTokens};
use crate::{Error, Result};

/// A backbone with its tokenizer, as sentence-transformers' `Transformer` module holds them.
#[derive(Debug, Clone)]
pub struct Transformer {
    /// The encoder.
    pub backbone: Backbone,
    /// Which encoder.
    pub kind: Kind,
    /// The backbone's `config.json`, kept to write it back.
    pub config: serde_json::Value,
    /// The backbone weights by state-dict name (no wrapper prefix).
    pub weights: HashMap<String, Tensor>,
    /// The Hugging Face tokenizer.
    pub tokenizer: Tokenizer,
    /// Special tokens of the tokenizer.
    pub special: SpecialTokens,
    /// `do_lower_case` of `sentence_bert_config.json`.
    pub do_lower_case: bool,
    /// `max_seq_length` of `sentence_bert_config.json` (or the tokenizer's limit).
    pub max_seq_length: Option<usize>,
    /// The folder the module was read from (tokenizer side files are copied from there on save).
    pub source: PathBuf,
    device: Device,
}

impl Transformer {
    /// Reads a backbone folder: `config.json`, weights, tokenizer, optional `sentence_bert_config.json`.
    /// `weights_dir` is where the weights are (the same folder except for odd layouts).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config: serde_json::Value =
            read_json(&cfg_path, "the transformer configuration (config.json)")?;
        let kind = Kind::detect(&config, &cfg_path)?;
        let raw = load_weights(dir, device)?;
        let weights = normalize_names(kind, raw, dir)?;
        let tokenizer = load_tokenizer(dir)?;
        let special = SpecialTokens::read(dir);
        let sbert: serde_json::Value = read_json(&dir.join("sentence_bert_config.json"), "")
            .unwrap_or(serde_json::Value::Null);
        let do_lower_case = sbert
            .get("do_lower_case")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let max_seq_length = sbert
            .get("max_seq_length")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize);
        Self::build(
            kind,
            config,
            weights,
            tokenizer,
            special,
            do_lower_case,
            max_seq_length,
            dir,
            device,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        kind: Kind,
        config: serde_json::Value,
        weights: HashMap<String, Tensor>,
        tokenizer: Tokenizer,
        special: SpecialTokens,
        do_lower_case: bool,
        max_seq_length: Option<usize>,
        source: &Path,
        device: &Device,
    ) -> Result<Self> {
        let backbone = Backbone::load(kind, &config, var_builder(weights.clone(), device), source)
            .map_err(|e| match e {
                Error::Candle(c) => {
                    Error::bad(source, format!("weights do not match config.json: {c}"))
                }
                e => e,
            })?;
        Ok(Self {
            backbone,
            kind,
            config,
            weights,
            tokenizer,
            special,
            do_lower_case,
            max_seq_length,
            source: source.to_path_buf(),
            device: device.clone(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Rows of the token-embedding matrix.
    pub fn embedding_rows(&self) -> usize {
        self.weights
            .get(self.kind.word_embedding_key())
            .map(|t| t.dims()[0])
            .unwrap_or(0)
    }

    /// `len(tokenizer)` in transformers: the vocabulary with added tokens.
    pub fn tokenizer_len(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Adds `tokens` to the tokenizer (as normal, non-special tokens) and resizes the embedding matrix as
    /// PyLate does: first to the tokenizer's length (which may shrink a padded matrix), then to the new
    /// length. New rows are the mean of the existing ones.
    pub fn add_tokens(&mut self, tokens: &[String]) -> Result<()> {
        let before = self.tokenizer_len();
        let added: Vec<AddedToken> = tokens
            .iter()
            .map(|t| AddedToken::from(t.clone(), false))
            .collect();
        self.tokenizer
            .add_tokens(added)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let after = self.tokenizer_len();
        let key = self.kind.word_embedding_key();
        let emb = self.weights.get(key).ok_or_else(|| Error::MissingWeight {
            name: key.into(),
            path: self.source.clone(),
        })?;
        let resized = resize_rows(&resize_rows(emb, before)?, after)?;
        if resized.dims()[0] != emb.dims()[0] {
            self.weights.insert(key.to_string(), resized);
            if let Some(obj) = self.config.as_object_mut() {
                obj.insert("vocab_size".into(), serde_json::json!(after));
            }
            self.rebuild()?;
        }
        Ok(())
    }

    /// Rebuilds the backbone from `self.weights` (after they changed).
    pub fn rebuild(&mut self) -> Result<()> {
        self.backbone = Backbone::load(
            self.kind,
            &self.config,
            var_builder(self.weights.clone(), &self.device),
            &self.source,
        )?;
        Ok(())
    }

    /// Rebuilds the backbone over trainable variables registered in `varmap` under `prefix`, so that
    /// the same forward code trains. Returns the module now reading those variables.
    pub fn to_trainable(&self, varmap: &VarMap, prefix: &str) -> Result<Self> {
        let mut out = self.clone();
        {
            let mut data = varmap.data().lock().unwrap();
            for (name, t) in &self.weights {
                let var = candle_core::Var::from_tensor(t)?;
                data.insert(format!("{prefix}{name}"), var);
            }
        }
        let vb = VarBuilder::from_varmap(varmap, candle_core::DType::F32, &self.device);
        let vb = if prefix.is_empty() {
            vb
        } else {
            vb.pp(prefix.trim_end_matches('.'))
        };
        out.backbone = Backbone::load(self.kind, &self.config, vb.clone(), &self.source)?;
        let data = varmap.data().lock().unwrap();
        out.weights = self
            .weights
            .keys()
            .map(|k| (k.clone(), data[&format!("{prefix}{k}")].as_tensor().clone()))
            .collect();
        Ok(out)
    }

    /// `[batch, len]` ids and mask → `[batch, len, hidden]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        self.backbone.forward(input_ids, attention_mask, mode)
    }

    /// A forward pass whose rows at mask 0 the caller discards: padding costs nothing where the backbone
    /// runs unpadded (see [`Backbone::forward_attended`]); those rows may hold anything.
    pub fn forward_attended(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        self.backbone
            .forward_attended(input_ids, attention_mask, mode)
    }

    /// Whether [`Self::forward_attended`] skips the padding on the CPU in float32.
    pub fn skips_padding(&self) -> bool {
        self.backbone.skips_padding()
    }

    /// The transformers class name of the bare encoder.
    pub fn architecture(&self) -> &'static str {
        match self.kind {
            Kind::Bert => "BertModel",
            Kind::ModernBert => "ModernBertModel",
            Kind::XlmRoberta => {
                if self.config.get("model_type").and_then(|v| v.as_str()) == Some("roberta") {
                    "RobertaModel"
                } else {
                    "XLMRobertaModel"
                }
            }
            Kind::Gemma3 => "Gemma3TextModel",
        }
    }
}

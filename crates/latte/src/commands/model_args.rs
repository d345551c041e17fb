//! Flags shared by every command that loads a model (encode, convert, index, search, evaluate, mine, train),
//! as clap groups flattened into each command: [`SettingsArgs`] (what changes the embeddings), [`HubArgs`]
//! (where the files come from), and the model itself — required ([`ModelArgs`]) or, for `latte index` and
//! `latte search`, optional with the index remembering it ([`IndexModelArgs`], [`ModelOptions`]).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use latte_models::{ColBERT, Dtype, HubOptions, LoadOptions, PartialSettings};
use serde::{Deserialize, Serialize};

/// ColBERT settings and output shape: the load options that change the embeddings.
#[derive(Debug, Clone, Default, Args)]
pub struct SettingsArgs {
    /// Query prefix token (overrides the model's config; "" for none).
    #[arg(long)]
    pub query_prefix: Option<String>,
    /// Document prefix token (overrides the model's config; "" for none).
    #[arg(long)]
    pub document_prefix: Option<String>,
    /// Query length in tokens.
    #[arg(long)]
    pub query_length: Option<usize>,
    /// Maximum document length in tokens.
    #[arg(long)]
    pub document_length: Option<usize>,
    /// Turn query expansion on or off.
    #[arg(long)]
    pub query_expansion: Option<bool>,
    /// Attend to query expansion tokens.
    #[arg(long)]
    pub attend_to_expansion_tokens: Option<bool>,
    /// Output dimension (adds a projection when the model has another size).
    #[arg(long)]
    pub embedding_size: Option<usize>,
    /// When encoding, keep only the first N dimensions of every token embedding, re-normalised (Matryoshka
    /// models such as jina-colbert-v2: 128, 96, 64). Not saved by `convert`. PyLate ignores its own
    /// `truncate_dim` for ColBERT models.
    #[arg(long)]
    pub truncate_dim: Option<usize>,
    /// Precision of the encoder's linear layers: f32 (default), bf16 (bf16 weights and activations, f32
    /// accumulation) or int8 (dynamically quantised). Normalisation, attention and the final projection
    /// stay f32. CPU inference only; recorded in an index, which `latte search` reuses.
    #[arg(long, value_name = "f32|bf16|int8")]
    pub dtype: Option<Dtype>,
}

/// Where a Hub model's files come from.
#[derive(Debug, Clone, Default, Args)]
pub struct HubArgs {
    /// Hugging Face Hub cache folder (default: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Never use the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

impl HubArgs {
    fn options(&self) -> HubOptions {
        HubOptions {
            cache_dir: self.cache_dir.clone(),
            revision: self.revision.clone(),
            offline: self.offline.then_some(true),
            token: None,
        }
    }
}

/// Which model to load and how, for commands that always load one.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model folder or Hugging Face Hub id (PyLate, sentence-transformers, stanford-nlp or base encoder).
    #[arg(long, short = 'm')]
    pub model: String,
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// Seed of any projection latte adds to a base model.
    #[arg(
        id = "model_seed",
        long = "model-seed",
        visible_alias = "seed",
        default_value_t = 0
    )]
    pub seed: u64,
    #[command(flatten)]
    pub hub: HubArgs,
}

impl ModelArgs {
    /// The options that change the embeddings (what an index records).
    pub fn model_options(&self) -> ModelOptions {
        // Seed 0 is the default: recorded as absent.
        ModelOptions::from_flags(&self.settings, (self.seed != 0).then_some(self.seed))
    }

    /// The load options these flags describe.
    pub fn options(&self) -> LoadOptions {
        self.model_options().load_options(&self.hub)
    }

    /// Loads the model.
    pub fn load(&self) -> Result<ColBERT> {
        load(&self.model, &self.options())
    }
}

/// The model of `latte index` / `latte search`: optional, since the index records the model and the options
/// it was built with (`--model-seed` here, as `--seed` seeds k-means).
#[derive(Debug, Clone, Default, Args)]
pub struct IndexModelArgs {
    /// Model folder or Hugging Face Hub id (default: the model recorded in the index).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// Seed of any projection latte adds to a base model (default: the index's, else 0).
    #[arg(id = "model_seed", long = "model-seed")]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub hub: HubArgs,
}

impl IndexModelArgs {
    /// The options given on the command line (unset fields are `None`).
    pub fn given(&self) -> ModelOptions {
        ModelOptions::from_flags(&self.settings, self.seed)
    }
}

/// The load options that change the embeddings, as an index records them (`model_options` in its metadata;
/// unset fields mean the model's own setting). Also the token pooling `latte index` applied to documents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelOptions {
    /// `--query-prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_prefix: Option<String>,
    /// `--document-prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_prefix: Option<String>,
    /// `--query-length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_length: Option<usize>,
    /// `--document-length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_length: Option<usize>,
    /// `--query-expansion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_expansion: Option<bool>,
    /// `--attend-to-expansion-tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attend_to_expansion_tokens: Option<bool>,
    /// `--embedding-size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_size: Option<usize>,
    /// `--truncate-dim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate_dim: Option<usize>,
    /// `--dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// `--model-seed` (0 when recorded without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `latte index --pool-factor`: documents were pooled to `tokens / pool_factor` before indexing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_factor: Option<usize>,
}

impl ModelOptions {
    fn from_flags(s: &SettingsArgs, seed: Option<u64>) -> Self {
        Self {
            query_prefix: s.query_prefix.clone(),
            document_prefix: s.document_prefix.clone(),
            query_length: s.query_length,
            document_length: s.document_length,
            query_expansion: s.query_expansion,
            attend_to_expansion_tokens: s.attend_to_expansion_tokens,
            embedding_size: s.embedding_size,
            truncate_dim: s.truncate_dim,
            dtype: s.dtype,
            seed,
            pool_factor: None,
        }
    }

    /// The options recorded in an index (`None`: an index written before they were recorded, or without a
    /// model: defaults).
    pub fn from_index(index: &latte_index::PlaidIndex) -> Result<Self> {
        match index.model_options() {
            None => Ok(Self::default()),
            Some(v) => serde_json::from_value(v.clone())
                .context("the index's model_options are not the JSON object latte writes"),
        }
    }

    /// As JSON for the index's metadata.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("plain fields serialise")
    }

    /// The load options (with `hub` for where the files come from).
    pub fn load_options(&self, hub: &HubArgs) -> LoadOptions {
        LoadOptions {
            settings: PartialSettings {
                query_prefix: self.query_prefix.clone(),
                document_prefix: self.document_prefix.clone(),
                query_length: self.query_length,
                document_length: self.document_length,
                do_query_expansion: self.query_expansion,
                attend_to_expansion_tokens: self.attend_to_expansion_tokens,
                skiplist_words: None,
            },
            embedding_size: self.embedding_size,
            bias: false,
            seed: self.seed.unwrap_or(0),
            hub: hub.options(),
            device: None,
            truncate_dim: self.truncate_dim,
            dtype: self.dtype.unwrap_or_default(),
        }
    }

    /// `self` (recorded) with every option set in `given` replacing it.
    pub fn overridden_by(&self, given: &ModelOptions) -> ModelOptions {
        ModelOptions {
            query_prefix: given
                .query_prefix
                .clone()
                .or_else(|| self.query_prefix.clone()),
            document_prefix: given
                .document_prefix
                .clone()
                .or_else(|| self.document_prefix.clone()),
            query_length: given.query_length.or(self.query_length),
            document_length: given.document_length.or(self.document_length),
            query_expansion: given.query_expansion.or(self.query_expansion),
            attend_to_expansion_tokens: given
                .attend_to_expansion_tokens
                .or(self.attend_to_expansion_tokens),
            embedding_size: given.embedding_size.or(self.embedding_size),
            truncate_dim: given.truncate_dim.or(self.truncate_dim),
            dtype: given.dtype.or(self.dtype),
            seed: given.seed.or(self.seed),
            pool_factor: given.pool_factor.or(self.pool_factor),
        }
    }

    /// Fails when an option set in `given` differs from the recorded one (`self`): documents added to an
    /// index must be encoded as the ones already in it.
    pub fn check_same(&self, given: &ModelOptions, index: &str) -> Result<()> {
        let recorded = serde_json::to_value(self)?;
        let given = serde_json::to_value(given)?;
        let (Some(recorded), Some(given)) = (recorded.as_object(), given.as_object()) else {
            return Ok(());
        };
        for (key, got) in given {
            let expected = recorded.get(key).unwrap_or(&serde_json::Value::Null);
            if expected != got {
                let flag = format!("--{}", key.replace('_', "-"));
                let flag = if key == "seed" { "--model-seed" } else { &flag };
                let expected = if expected.is_null() {
                    "unset (the model's own setting)".to_string()
                } else {
                    expected.to_string()
                };
                bail!(
                    "{flag}: the index {index} was built with {flag} {expected}; got {got} (documents added \
                     to an index are encoded as the ones in it: leave the flag out to use the recorded value)"
                );
            }
        }
        Ok(())
    }
}

/// Loads `model` with `opts`, saying how long it took at `LATTE_LOG=info`.
pub fn load(model: &str, opts: &LoadOptions) -> Result<ColBERT> {
    let t = std::time::Instant::now();
    let m = ColBERT::load(model, opts).with_context(|| format!("loading model {model}"))?;
    tracing::info!("loaded {model} in {:.2?}", t.elapsed());
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_options_round_trip_and_override() {
        let recorded = ModelOptions {
            truncate_dim: Some(64),
            query_length: Some(16),
            seed: Some(3),
            ..Default::default()
        };
        let json = recorded.to_json();
        assert_eq!(
            json,
            serde_json::json!({"truncate_dim": 64, "query_length": 16, "seed": 3})
        );
        assert_eq!(
            serde_json::from_value::<ModelOptions>(json).unwrap(),
            recorded
        );
        let given = ModelOptions {
            query_length: Some(8),
            ..Default::default()
        };
        let merged = recorded.overridden_by(&given);
        assert_eq!(merged.query_length, Some(8));
        assert_eq!(merged.dtype, None);
        assert_eq!(merged.load_options(&HubArgs::default()).dtype, Dtype::F32);
        assert_eq!(merged.truncate_dim, Some(64));
        assert_eq!(merged.seed, Some(3));
        assert!(recorded.check_same(&Default::default(), "i").is_ok());
        let err = recorded
            .check_same(
                &ModelOptions {
                    truncate_dim: Some(32),
                    ..Default::default()
                },
                "i",
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("--truncate-dim") && err.contains("64") && err.contains("32"));
    }

    #[test]
    fn dtype_is_recorded_and_overridden() {
        let recorded = ModelOptions {
            dtype: Some(Dtype::Bf16),
            ..Default::default()
        };
        let json = recorded.to_json();
        assert_eq!(json, serde_json::json!({"dtype": "bf16"}));
        assert_eq!(
            serde_json::from_value::<ModelOptions>(json).unwrap(),
            recorded
        );
        assert_eq!(
            recorded.load_options(&HubArgs::default()).dtype,
            Dtype::Bf16
        );
        let int8 = ModelOptions {
            dtype: Some(Dtype::Int8),
            ..Default::default()
        };
        assert_eq!(recorded.overridden_by(&int8).dtype, Some(Dtype::Int8));
        assert_eq!(
            recorded.overridden_by(&Default::default()).dtype,
            Some(Dtype::Bf16)
        );
        let err = recorded.check_same(&int8, "i").unwrap_err().to_string();
        assert!(
            err.contains("--dtype") && err.contains("bf16") && err.contains("int8"),
            "{err}"
        );
        let bad = serde_json::from_value::<ModelOptions>(serde_json::json!({"dtype": "fp8"}));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("expected one of f32, bf16, int8"));
    }
}

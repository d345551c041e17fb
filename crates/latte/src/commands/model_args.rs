//! Flags shared by every command that loads a model (encode, convert, index, search, evaluate, mine, train),
//! as clap groups flattened into each command: [`SettingsArgs`] (what changes the embeddings), [`HubArgs`]
//! (where the files come from), and the model itself — required ([`ModelArgs`]) or, for `latte index` and
//! `latte search`, optional with the index remembering it ([`IndexModelArgs`], [`ModelOptions`]).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use latte_models::{ColBERT, Dtype, HubOptions, LoadOptions};

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
    /// stay f32. CPU only; recorded in an index, which `latte search` reuses. `latte train` takes f32 or
    /// bf16 (bf16 products forward and backward with f32 accumulation; f32 weights and optimiser).
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
    /// The Hub options these flags describe.
    pub fn options(&self) -> HubOptions {
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
        options_from_flags(&self.settings, (self.seed != 0).then_some(self.seed))
    }

    /// The load options these flags describe.
    pub fn options(&self) -> LoadOptions {
        self.model_options().load_options(&self.hub.options())
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
        options_from_flags(&self.settings, self.seed)
    }
}

pub use latte_models::ModelOptions;

/// The options set by these flags (unset fields are `None`).
fn options_from_flags(s: &SettingsArgs, seed: Option<u64>) -> ModelOptions {
    ModelOptions {
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

/// The options recorded in an index (defaults when it records none).
pub fn options_from_index(index: &latte_index::PlaidIndex) -> Result<ModelOptions> {
    Ok(ModelOptions::from_json(index.model_options())?)
}

/// Fails when an option set in `given` differs from the recorded one: documents added to an index must be
/// encoded as the ones already in it. The error names the flag.
pub fn check_same(recorded: &ModelOptions, given: &ModelOptions, index: &str) -> Result<()> {
    if let Some((key, expected, got)) = recorded.differences(given).into_iter().next() {
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
    Ok(())
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
    use latte_models::Dtype;

    #[test]
    fn a_changed_recorded_option_names_the_flag() {
        let recorded = ModelOptions {
            truncate_dim: Some(64),
            ..Default::default()
        };
        assert!(check_same(&recorded, &Default::default(), "i").is_ok());
        let err = check_same(
            &recorded,
            &ModelOptions {
                truncate_dim: Some(32),
                ..Default::default()
            },
            "i",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--truncate-dim") && err.contains("64") && err.contains("32"));
        let err = check_same(
            &Default::default(),
            &ModelOptions {
                seed: Some(5),
                ..Default::default()
            },
            "i",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--model-seed") && err.contains("unset"),
            "{err}"
        );
    }

    #[test]
    fn dtype_is_recorded_and_overridden() {
        let recorded = ModelOptions {
            dtype: Some(Dtype::Bf16),
            ..Default::default()
        };
        let json = recorded.to_json();
        assert_eq!(json, serde_json::json!({"dtype": "bf16"}));
        assert_eq!(ModelOptions::from_json(Some(&json)).unwrap(), recorded);
        assert_eq!(
            recorded.load_options(&HubArgs::default().options()).dtype,
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
        let err = check_same(&recorded, &int8, "i").unwrap_err().to_string();
        assert!(
            err.contains("--dtype") && err.contains("bf16") && err.contains("int8"),
            "{err}"
        );
        let bad = ModelOptions::from_json(Some(&serde_json::json!({"dtype": "fp8"})));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("expected one of f32, bf16, int8"));
    }
}

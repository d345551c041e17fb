//! Flags shared by every command that loads a model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use latte_models::{ColBERT, HubOptions, LoadOptions, PartialSettings};

/// Which model to load and how.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model folder or Hugging Face Hub id (PyLate, sentence-transformers, stanford-nlp or base encoder).
    #[arg(long, short = 'm')]
    pub model: String,
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
    /// Seed of any projection latte adds to a base model.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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

impl ModelArgs {
    /// The load options these flags describe.
    pub fn options(&self) -> LoadOptions {
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
            seed: self.seed,
            hub: HubOptions {
                cache_dir: self.cache_dir.clone(),
                revision: self.revision.clone(),
                offline: self.offline.then_some(true),
                token: None,
            },
            device: None,
            truncate_dim: self.truncate_dim,
        }
    }

    /// Loads the model.
    pub fn load(&self) -> Result<ColBERT> {
        let t = std::time::Instant::now();
        let model = ColBERT::load(&self.model, &self.options())
            .with_context(|| format!("loading model {}", self.model))?;
        tracing::info!("loaded {} in {:.2?}", self.model, t.elapsed());
        Ok(model)
    }
}

//! `latte index`: build a PLAID index, or add to an existing one.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use latte_index::{IndexConfig, PlaidIndex, VecSource};

use super::encoder::{self, IndexModel};
use super::index_io::{embeddings_source, read_ids, read_jsonl};
use super::model_args::{IndexModelArgs, ModelOptions};

/// Index a corpus (encoding it with a model) or precomputed embeddings. On an existing index, adds documents.
#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Index directory (created if missing; an existing index gets the documents added).
    #[arg(long)]
    pub index: PathBuf,
    /// The model that encodes `--corpus` (remembered by the index with the options that change embeddings)
    /// and its flags; on an existing index, flags that are given must match the recorded ones.
    #[command(flatten)]
    pub model: IndexModelArgs,
    /// Corpus JSONL (`{"_id", "title"?, "text"}` per line), encoded with `--model`.
    #[arg(long, conflicts_with = "embeddings", requires = "model")]
    pub corpus: Option<PathBuf>,
    /// Precomputed document embeddings (`.npz` as written by `latte encode`: one array per document).
    #[arg(long, requires = "ids")]
    pub embeddings: Option<PathBuf>,
    /// Document ids, one per line, in the order of `--embeddings`.
    #[arg(long)]
    pub ids: Option<PathBuf>,
    /// Residual bits per dimension: 1, 2 or 4 (new index only).
    #[arg(long, default_value_t = 2)]
    pub nbits: usize,
    /// Token pooling factor (default 1 = no pooling; new index only, later adds use the index's): each
    /// document is pooled once, before indexing.
    #[arg(long)]
    pub pool_factor: Option<usize>,
    /// Number of centroids (default 2^floor(log2(16·sqrt(tokens)))).
    #[arg(long)]
    pub centroids: Option<usize>,
    /// k-means iterations.
    #[arg(long, default_value_t = 4)]
    pub kmeans_iters: usize,
    /// Random seed for sampling and k-means.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Do not keep the half-precision copy used for the exact final rerank (smaller index, lower recall).
    #[arg(long)]
    pub no_full: bool,
    /// Encoding batch size.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

pub fn run(args: IndexArgs) -> Result<()> {
    let exists = args.index.join("meta.lt").exists();
    let current = if exists {
        Some(PlaidIndex::open(&args.index)?)
    } else {
        None
    };
    let where_ = args.index.display().to_string();
    // Pooling happens here, once per document; the index itself is given pool_factor 1.
    let pool_factor = match &current {
        None => args.pool_factor.unwrap_or(1),
        Some(index) => {
            let recorded = ModelOptions::from_index(index)?.pool_factor;
            let effective = recorded.unwrap_or(index.info().config.pool_factor);
            if let Some(p) = args.pool_factor {
                if p != effective {
                    bail!(
                        "--pool-factor: the index {where_} was built with --pool-factor {effective}; got {p} \
                         (leave it out when adding)"
                    );
                }
            }
            recorded.unwrap_or(1)
        }
    };
    if pool_factor == 0 {
        bail!("--pool-factor must be at least 1, got 0");
    }
    let (source, model, options): (Box<dyn latte_index::DocumentSource>, Option<String>, _) =
        match (&args.embeddings, &args.corpus) {
            (Some(npz), None) => {
                let ids = read_ids(args.ids.as_ref().expect("clap requires --ids"))?;
                let options = args.model.model.as_ref().map(|_| args.model.given());
                (
                    embeddings_source(npz, ids)?,
                    args.model.model.clone(),
                    options,
                )
            }
            (None, Some(corpus)) => {
                let name = args.model.model.clone().expect("clap requires --model");
                let m = IndexModel::for_documents(&args.model, name, current.as_ref(), &where_)?;
                let (ids, texts) = read_jsonl(corpus)?;
                eprintln!("encoding {} documents with {}", texts.len(), m.name);
                let encoded = m.encode(&texts, false, args.batch_size)?;
                let dim = encoded.first().map_or(0, |e| e.cols);
                let mut src = VecSource::new(dim);
                if encoded.len() != ids.len() {
                    bail!(
                        "the model returned {} embeddings for {} documents",
                        encoded.len(),
                        ids.len()
                    );
                }
                for (id, e) in ids.into_iter().zip(encoded) {
                    if e.cols != dim || e.data.len() != e.rows * e.cols {
                        bail!("the model returned a malformed embedding for document {id:?}");
                    }
                    src.push(id, e.data)?;
                }
                (Box::new(src), Some(m.name), Some(m.options))
            }
            _ => bail!("give either --embeddings with --ids, or --corpus with --model"),
        };
    drop(current);
    let source = encoder::pool_documents(source, pool_factor)?;
    let started = std::time::Instant::now();
    let report = if exists {
        PlaidIndex::add(&args.index, source.as_ref())
            .with_context(|| format!("adding to the index at {}", args.index.display()))?
    } else {
        let config = IndexConfig {
            nbits: args.nbits,
            num_centroids: args.centroids,
            kmeans_iters: args.kmeans_iters,
            seed: args.seed,
            pool_factor: 1,
            store_full: !args.no_full,
            model_options: recorded_options(options, pool_factor),
            model,
            ..IndexConfig::default()
        };
        PlaidIndex::create(&args.index, source.as_ref(), &config)
            .with_context(|| format!("building the index at {}", args.index.display()))?
    };
    eprintln!(
        "{} {} documents ({} tokens, {} centroids) in {:.1}s",
        if exists { "added" } else { "indexed" },
        report.documents,
        report.tokens,
        report.num_centroids,
        started.elapsed().as_secs_f64()
    );
    if exists && report.outlier_fraction > 0.5 {
        eprintln!(
            "warning: {:.0}% of the new tokens are far from every centroid (25% is typical): the corpus has drifted \
             from the one the index was built on; rebuilding would improve search quality",
            report.outlier_fraction * 100.0
        );
    }
    Ok(())
}

/// What the index records in `model_options`: the model's options, and the pooling applied here.
fn recorded_options(
    options: Option<ModelOptions>,
    pool_factor: usize,
) -> Option<serde_json::Value> {
    if options.is_none() && pool_factor == 1 {
        return None;
    }
    let mut options = options.unwrap_or_default();
    options.pool_factor = (pool_factor > 1).then_some(pool_factor);
    Some(options.to_json())
}

//! `latte index`: build a PLAID index, or add to an existing one.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use latte_index::{IndexConfig, PlaidIndex, VecSource};

use super::encoder;
use super::index_io::{embeddings_source, read_ids, read_jsonl};

/// Index a corpus (encoding it with a model) or precomputed embeddings. On an existing index, adds documents.
#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Index directory (created if missing; an existing index gets the documents added).
    #[arg(long)]
    pub index: PathBuf,
    /// ColBERT model (hub id or local path) to encode `--corpus` with; remembered by the index.
    #[arg(long)]
    pub model: Option<String>,
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
    /// Token pooling factor (1 = no pooling; new index only).
    #[arg(long, default_value_t = 1)]
    pub pool_factor: usize,
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
    let (source, model): (Box<dyn latte_index::DocumentSource>, Option<String>) =
        match (&args.embeddings, &args.corpus) {
            (Some(npz), None) => {
                let ids = read_ids(args.ids.as_ref().expect("clap requires --ids"))?;
                (embeddings_source(npz, ids)?, args.model.clone())
            }
            (None, Some(corpus)) => {
                let model = args.model.clone().expect("clap requires --model");
                if exists {
                    let current = PlaidIndex::open(&args.index)?;
                    if let Some(m) = current.model() {
                        if m != model {
                            bail!("the index was built with model {m:?}, not {model:?}");
                        }
                    }
                }
                let (ids, texts) = read_jsonl(corpus)?;
                eprintln!("encoding {} documents with {model}", texts.len());
                let encoded = encoder::encode_texts(&model, &texts, false, args.batch_size)?;
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
                (Box::new(src), Some(model))
            }
            _ => bail!("give either --embeddings with --ids, or --corpus with --model"),
        };
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
            pool_factor: args.pool_factor,
            store_full: !args.no_full,
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

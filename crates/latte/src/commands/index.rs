//! `latte index`: build a PLAID index, or add to an existing one.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use latte::core::beir::{self, Kind};
use latte_index::{AddReport, Doc, DocumentSource, IndexConfig, PlaidIndex, VecSource};

use super::encoder::{self, Encoded, IndexModel};
use super::index_io::{doc_from_fields, embeddings_source, read_ids, read_metadata};
use super::model_args::{IndexModelArgs, ModelOptions};

/// Index a corpus (encoding it with a model) or precomputed embeddings. On an existing index, adds documents.
#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Index directory (created if missing; an existing index gets the documents added, and a document whose
    /// id the index already holds is replaced: its vectors, text and metadata).
    #[arg(long)]
    pub index: PathBuf,
    /// The model that encodes `--corpus` (remembered by the index with the options that change embeddings)
    /// and its flags; on an existing index, flags that are given must match the recorded ones.
    #[command(flatten)]
    pub model: IndexModelArgs,
    /// Corpus JSONL (`{"_id" (or "id"), "title"?, "text"}` per line) or `.txt` (one document per line, ids 0,
    /// 1, …), encoded with `--model`. The file is checked whole first, then read, encoded and added in chunks of
    /// `--chunk-docs` documents, so memory does not grow with the corpus.
    /// Each chunk is committed as it is added: a failure part-way leaves the chunks before it in the index.
    /// The index stores each document's `title` and `text` (unless `--no-store-text`) and every other field
    /// of its line except the id as metadata (for `latte search --filter`, `latte get`).
    #[arg(long, conflicts_with = "embeddings", requires = "model")]
    pub corpus: Option<PathBuf>,
    /// Metadata of `--embeddings` documents: JSONL, one `{"_id": ..., ...}` per line. `title` and `text`
    /// are stored as the document's title and text (unless `--no-store-text`), every other field but the
    /// id as metadata. Each id must be one of `--ids`; documents without a line are stored with their id.
    #[arg(long, requires = "embeddings")]
    pub metadata: Option<PathBuf>,
    /// Do not store titles and texts (other fields are still stored as metadata); BM25 and hybrid search
    /// then have nothing to search.
    #[arg(long)]
    pub no_store_text: bool,
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
    /// Documents read, encoded and added at a time with `--corpus` (the first chunk of a new index is larger
    /// when the k-means training sample needs it).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk_docs: u64,
}

/// The new index's configuration. Documents are pooled by the CLI before they reach the index (once each),
/// so the index itself is given `pool_factor: 1` and the factor is recorded in `model_options`.
fn config(
    args: &IndexArgs,
    model: Option<String>,
    options: Option<ModelOptions>,
    pool_factor: usize,
) -> IndexConfig {
    IndexConfig {
        nbits: args.nbits,
        num_centroids: args.centroids,
        kmeans_iters: args.kmeans_iters,
        seed: args.seed,
        pool_factor: 1,
        store_full: !args.no_full,
        model_options: recorded_options(options, pool_factor),
        model,
        ..IndexConfig::default()
    }
}

/// The pooling factor documents get: the flag (default 1) for a new index, the recorded one when adding
/// (a different flag is an error).
fn pool_factor(args: &IndexArgs, current: Option<&PlaidIndex>, where_: &str) -> Result<usize> {
    let p = match current {
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
    if p == 0 {
        bail!("--pool-factor must be at least 1, got 0");
    }
    Ok(p)
}

pub fn run(args: IndexArgs) -> Result<()> {
    let exists = args.index.join("meta.lt").exists();
    let current = if exists {
        Some(PlaidIndex::open(&args.index)?)
    } else {
        None
    };
    let where_ = args.index.display().to_string();
    let pool_factor = pool_factor(&args, current.as_ref(), &where_)?;
    let started = std::time::Instant::now();
    let report = match (&args.embeddings, &args.corpus) {
        (Some(npz), None) => {
            drop(current);
            let ids = read_ids(args.ids.as_ref().expect("clap requires --ids"))?;
            let source = encoder::pool_documents(embeddings_source(npz, ids)?, pool_factor)?;
            let options = args.model.model.as_ref().map(|_| args.model.given());
            let cfg = config(&args, args.model.model.clone(), options, pool_factor);
            let docs = match &args.metadata {
                Some(path) => read_metadata(path, source.as_ref(), !args.no_store_text)?,
                None => Vec::new(),
            };
            add_or_create(&args, exists, source.as_ref(), &docs, cfg)?
        }
        (None, Some(corpus)) => {
            let name = args.model.model.clone().expect("clap requires --model");
            let m = IndexModel::for_documents(&args.model, name, current.as_ref(), &where_)?;
            drop(current);
            index_corpus(&args, exists, corpus, &m, pool_factor)?
        }
        _ => bail!("give either --embeddings with --ids, or --corpus with --model"),
    };
    eprintln!(
        "{} {} documents ({} tokens, {} centroids) in {:.1}s",
        if exists { "added" } else { "indexed" },
        report.documents,
        report.tokens,
        report.num_centroids,
        started.elapsed().as_secs_f64()
    );
    if !report.replaced.is_empty() {
        let shown: Vec<String> = report
            .replaced
            .iter()
            .take(10)
            .map(|id| latte::core::short_id(id))
            .collect();
        let more = match report.replaced.len() {
            n if n > 10 => format!(" and {} more", n - 10),
            _ => String::new(),
        };
        eprintln!(
            "replaced {} documents the index already held (their vectors, text and metadata): {}{more}",
            report.replaced.len(),
            shown.join(", ")
        );
    }
    if exists && report.outlier_fraction > 0.5 {
        eprintln!(
            "warning: {:.0}% of the new tokens are far from every centroid (25% is typical): the corpus has drifted \
             from the one the index was built on; rebuilding would improve search quality",
            report.outlier_fraction * 100.0
        );
    }
    Ok(())
}

/// Adds `source` (with the text and metadata of `docs`) to the index at `--index` and commits, or creates
/// the index from it.
fn add_or_create(
    args: &IndexArgs,
    exists: bool,
    source: &dyn DocumentSource,
    docs: &[Doc],
    config: IndexConfig,
) -> Result<AddReport> {
    if exists {
        (|| {
            let mut w = PlaidIndex::writer(&args.index)?;
            let report = w.add_documents(source, docs)?;
            w.commit()?;
            Ok::<_, latte_index::Error>(report)
        })()
        .with_context(|| format!("adding to the index at {}", args.index.display()))
    } else {
        PlaidIndex::create_with_documents(&args.index, source, docs, &config)
            .with_context(|| format!("building the index at {}", args.index.display()))
    }
}

/// How many documents the index build samples for k-means out of `n` (the rule of `PlaidIndex::create`).
fn training_sample(n: usize) -> usize {
    ((1.0 + 16.0 * (120.0 * n as f64).sqrt()) as usize).min(n)
}

/// Token vectors a document of `rows` tokens keeps after pooling by `pool_factor` (the first token is
/// protected), as `latte_index::pool` counts them.
fn pooled_rows(rows: usize, pool_factor: usize) -> usize {
    let p = rows.min(1);
    let n = rows - p;
    let k = (n / pool_factor.max(1)).max(1);
    if k >= n {
        rows
    } else {
        p + k
    }
}

/// Streams `corpus` into the index: the file is first read through once to check every line (ids, JSON,
/// duplicates) and count the documents, so bad input fails before anything is encoded. Then documents are
/// read, encoded and added in chunks of `--chunk-docs`, so only one chunk's texts and embeddings are in
/// memory at a time.
///
/// The first chunk of a new index creates it, and is what k-means trains on: it holds at least as many
/// documents as the build samples from the whole corpus today (`1 + 16·√(120·n)`, capped at `n`), and when
/// the corpus spans more chunks, the default number of centroids is set from the whole corpus (the first
/// chunk's average tokens per document × the number of documents), as a build over the whole corpus would
/// choose it. A corpus that fits in the first chunk is indexed exactly as by a single build. Later chunks
/// are added with `PlaidIndex::add`.
fn index_corpus(
    args: &IndexArgs,
    exists: bool,
    corpus: &std::path::Path,
    model: &IndexModel,
    pool_factor: usize,
) -> Result<AddReport> {
    let mut n = 0usize;
    for r in beir::open(corpus, Kind::Documents)? {
        r?;
        n += 1;
    }
    let chunk = usize::try_from(args.chunk_docs).unwrap_or(usize::MAX);
    let first = if exists {
        chunk
    } else {
        chunk.max(training_sample(n))
    };
    eprintln!("encoding {n} documents with {}", model.name);
    let mut records = beir::open(corpus, Kind::Documents)?.keep_fields();
    let mut total = AddReport {
        documents: 0,
        tokens: 0,
        trained: false,
        num_centroids: 0,
        outlier_fraction: 0.0,
        replaced: Vec::new(),
    };
    let mut outliers = 0.0f64;
    let mut created = exists;
    let mut chunks = 0usize;
    loop {
        let want = if created { chunk } else { first };
        let batch: Vec<beir::Record> = records.by_ref().take(want).collect::<Result<_, _>>()?;
        if batch.is_empty() {
            break;
        }
        let store_text = !args.no_store_text;
        let docs: Vec<Doc> = batch
            .iter()
            .map(|r| match &r.fields {
                Some(fields) => doc_from_fields(&r.id, fields.clone(), store_text)
                    .with_context(|| format!("{}: line {}", corpus.display(), r.line)),
                None if store_text => Ok(Doc::new(r.id.clone()).with_text(r.text.clone())),
                None => Ok(Doc::new(r.id.clone())),
            })
            .collect::<Result<_>>()?;
        let (ids, texts): (Vec<String>, Vec<String>) =
            batch.into_iter().map(|r| (r.id, r.text)).unzip();
        let encoded = model.encode(&texts, false, args.batch_size)?;
        drop(texts);
        let raw = to_source(ids, encoded)?;
        let in_chunk = raw.len();
        // Pooled here, once per document (the index is given pool_factor 1).
        let source = encoder::pool_documents(Box::new(raw), pool_factor)?;
        let report = if created {
            add_or_create(args, true, source.as_ref(), &docs, IndexConfig::default())?
        } else {
            let mut cfg = config(
                args,
                Some(model.name.clone()),
                Some(model.options.clone()),
                pool_factor,
            );
            if cfg.num_centroids.is_none() && in_chunk < n {
                cfg.num_centroids = Some(default_centroids(source.as_ref(), n, 1)?);
            }
            created = true;
            add_or_create(args, false, source.as_ref(), &docs, cfg)?
        };
        chunks += 1;
        if chunks > 1 || total.documents + report.documents < n {
            eprintln!(
                "chunk {chunks}: {} documents ({} of {n})",
                report.documents,
                total.documents + report.documents
            );
        }
        total.documents += report.documents;
        total.tokens += report.tokens;
        total.trained |= report.trained;
        total.num_centroids = report.num_centroids;
        total.replaced.extend(report.replaced);
        outliers += report.outlier_fraction * report.tokens as f64;
    }
    total.outlier_fraction = outliers / total.tokens.max(1) as f64;
    Ok(total)
}

/// The number of centroids a build over all `n` documents would choose by default, estimated from the
/// first chunk: `2^floor(log2(16·√tokens))` with tokens = average (pooled) tokens per document × `n`.
fn default_centroids(first: &dyn DocumentSource, n: usize, pool_factor: usize) -> Result<usize> {
    let dim = first.dim();
    let mut tokens = 0usize;
    for i in 0..first.len() {
        tokens += pooled_rows(first.embeddings(i)?.len() / dim, pool_factor);
    }
    let est = tokens as f64 / first.len().max(1) as f64 * n as f64;
    Ok(1usize << ((16.0 * est.sqrt()).log2().floor().max(0.0) as u32))
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

/// Checks the model's output for one chunk and wraps it as a document source.
fn to_source(ids: Vec<String>, encoded: Vec<Encoded>) -> Result<VecSource> {
    if encoded.len() != ids.len() {
        bail!(
            "the model returned {} embeddings for {} documents",
            encoded.len(),
            ids.len()
        );
    }
    let dim = encoded.first().map_or(0, |e| e.cols);
    let mut src = VecSource::new(dim);
    for (id, e) in ids.into_iter().zip(encoded) {
        if e.cols != dim || e.data.len() != e.rows * e.cols {
            bail!("the model returned a malformed embedding for document {id:?}");
        }
        src.push(id, e.data)?;
    }
    Ok(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_sample_and_pooling_follow_the_index_rules() {
        assert_eq!(training_sample(10), 10);
        assert_eq!(training_sample(1_000_000), 175_272);
        assert_eq!(pooled_rows(0, 2), 0);
        assert_eq!(pooled_rows(1, 2), 1);
        assert_eq!(pooled_rows(3, 2), 2);
        assert_eq!(pooled_rows(11, 2), 6);
        assert_eq!(pooled_rows(11, 1), 11);
    }

    #[test]
    fn default_centroids_are_estimated_for_the_whole_corpus() {
        let mut first = VecSource::new(8);
        for i in 0..4 {
            first.push(format!("d{i}"), vec![0.5; 10 * 8]).unwrap();
        }
        // 10 tokens × 100 documents: 2^floor(log2(16·√1000)) = 256.
        assert_eq!(default_centroids(&first, 100, 1).unwrap(), 256);
        // The first chunk alone would give 2^floor(log2(16·√40)) = 64.
        assert_eq!(default_centroids(&first, 4, 1).unwrap(), 64);
        // Pooling by 2 keeps 1 + 4 = 5 tokens of 10: 2^floor(log2(16·√500)) = 256.
        assert_eq!(default_centroids(&first, 100, 2).unwrap(), 256);
    }
}

//! `latte index`: build a PLAID index, or add to an existing one.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use latte::core::beir::{self, Kind};
use latte_index::{
    AddReport, Doc, DocumentSource, IndexCodec, IndexConfig, PlaidIndex, SpoolWriter, VecSource,
};

use super::encoder::{self, Encoded, IndexModel};
use super::index_io::{doc_from_fields, embeddings_source, read_ids, read_metadata};
use super::model_args::{self, IndexModelArgs, ModelOptions};

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
    /// 1, …), encoded with `--model`. The file is checked whole first, then read and encoded in chunks of
    /// `--chunk-docs` documents, so the embeddings in memory do not grow with the corpus. A new index is
    /// built from the encoded chunks spooled to a temporary file in the index folder (the k-means sample is
    /// drawn from the whole corpus); on an existing index each chunk is added and committed in turn, so a
    /// failure part-way leaves the chunks before it in the index.
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
    /// Residual bits per dimension: 1, 2 or 4 (new index only; default 2, or the codec's with
    /// `--codec-from`).
    #[arg(long)]
    pub nbits: Option<usize>,
    /// Build the new index with the centroids and residual codec of another index (its folder) or of a
    /// codec file, instead of training them: indexes built with one codec (the shards of a collection)
    /// encode every token the same way, so their merged results equal one index's. New index only.
    #[arg(long, value_name = "INDEX", conflicts_with = "centroids")]
    pub codec_from: Option<PathBuf>,
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
    /// Documents read and encoded (and, on an existing index, added) at a time with `--corpus`.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk_docs: u64,
}

/// The new index's configuration. Documents are pooled by the CLI before they reach the index (once each),
/// so the index itself is given `pool_factor: 1` and the factor is recorded in `model_options`.
fn config(
    args: &IndexArgs,
    codec: Option<&IndexCodec>,
    model: Option<String>,
    options: Option<ModelOptions>,
    pool_factor: usize,
) -> IndexConfig {
    IndexConfig {
        nbits: args.nbits.or(codec.map(IndexCodec::nbits)).unwrap_or(2),
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
            let recorded = model_args::options_from_index(index)?.pool_factor;
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
    let codec = match &args.codec_from {
        None => None,
        Some(_) if exists => bail!(
            "--codec-from: the index at {where_} exists already (a codec is chosen when an index is \
             created; adds use the index's own)"
        ),
        Some(from) => Some(read_codec(from)?),
    };
    let started = std::time::Instant::now();
    let report = match (&args.embeddings, &args.corpus) {
        (Some(npz), None) => {
            drop(current);
            let ids = read_ids(args.ids.as_ref().expect("clap requires --ids"))?;
            let source = embeddings_source(npz, ids)?;
            let options = args.model.model.as_ref().map(|_| args.model.given());
            let cfg = config(
                &args,
                codec.as_ref(),
                args.model.model.clone(),
                options,
                pool_factor,
            );
            let docs = match &args.metadata {
                Some(path) => read_metadata(path, source.as_ref(), !args.no_store_text)?,
                None => Vec::new(),
            };
            in_index_folder(&args.index, || {
                if pool_factor > 1 {
                    // Pooled once, into a temporary file in the index folder rather than memory.
                    let pooled =
                        latte_index::pool::pool_to_spool(source.as_ref(), pool_factor, &args.index)
                            .with_context(|| {
                                format!("pooling the documents (--pool-factor {pool_factor})")
                            })?;
                    add_or_create(&args, exists, &pooled, &docs, codec.as_ref(), cfg)
                } else {
                    add_or_create(&args, exists, source.as_ref(), &docs, codec.as_ref(), cfg)
                }
            })?
        }
        (None, Some(corpus)) => {
            let name = args.model.model.clone().expect("clap requires --model");
            let m = IndexModel::for_documents(&args.model, name, current.as_ref(), &where_)?;
            drop(current);
            if let Some(c) = &codec {
                let dim = m.model.output_dim();
                if dim != c.dim() {
                    bail!(
                        "--codec-from {}: the codec is for dimension {}, the model's embeddings have \
                         dimension {dim}",
                        args.codec_from.as_ref().expect("codec given").display(),
                        c.dim()
                    );
                }
            }
            index_corpus(&args, exists, corpus, &m, codec.as_ref(), pool_factor)?
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

/// The codec of `--codec-from`: an index folder's, or a codec file's.
fn read_codec(from: &std::path::Path) -> Result<IndexCodec> {
    let codec = if from.is_dir() {
        IndexCodec::from_index(from)
    } else {
        IndexCodec::load(from)
    };
    codec.with_context(|| {
        format!(
            "--codec-from {}: expected an index folder or a codec file",
            from.display()
        )
    })
}

/// Adds `source` (with the text and metadata of `docs`) to the index at `--index` and commits, or creates
/// the index from it (with `codec` when given).
fn add_or_create(
    args: &IndexArgs,
    exists: bool,
    source: &dyn DocumentSource,
    docs: &[Doc],
    codec: Option<&IndexCodec>,
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
        match codec {
            Some(c) => PlaidIndex::create_with_codec(&args.index, source, docs, c, &config),
            None => PlaidIndex::create_with_documents(&args.index, source, docs, &config),
        }
        .with_context(|| format!("building the index at {}", args.index.display()))
    }
}

/// One chunk of `--corpus`: its store rows, and its embeddings encoded and pooled.
type Chunk = (Vec<Doc>, Box<dyn DocumentSource>);

/// Streams `corpus` into the index: the file is first read through once to check every line (ids, JSON,
/// duplicates) and count the documents, so bad input fails before anything is encoded. Then documents are
/// read, encoded and pooled in chunks of `--chunk-docs`, so only one chunk's embeddings are in memory at a
/// time.
///
/// An existing index gets each chunk added and committed by one writer. A new index needs its centroids
/// before any document can be stored, and they are trained on a sample drawn from the whole corpus: the
/// encoded chunks are spooled to a temporary file in the index folder (removed when done; 4 bytes per value)
/// and the index is built from it in one streaming pass, exactly as a build over the whole corpus in memory
/// would be. The documents' store rows (text, metadata) are kept until then. Peak memory is one chunk, the
/// bounded k-means training set and the rows, whatever the number of embeddings.
fn index_corpus(
    args: &IndexArgs,
    exists: bool,
    corpus: &std::path::Path,
    model: &IndexModel,
    codec: Option<&IndexCodec>,
    pool_factor: usize,
) -> Result<AddReport> {
    let mut n = 0usize;
    for r in beir::open(corpus, Kind::Documents)? {
        r?;
        n += 1;
    }
    let chunk = usize::try_from(args.chunk_docs).unwrap_or(usize::MAX);
    eprintln!("encoding {n} documents with {}", model.name);
    let mut records = beir::open(corpus, Kind::Documents)?.keep_fields();
    let store_text = !args.no_store_text;
    // One chunk at a time: its store rows, and its embeddings encoded and pooled.
    let mut next_chunk = || -> Result<Option<Chunk>> {
        let batch: Vec<beir::Record> = records.by_ref().take(chunk).collect::<Result<_, _>>()?;
        if batch.is_empty() {
            return Ok(None);
        }
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
        // Pooled here, once per document (the index is given pool_factor 1).
        let source = encoder::pool_documents(Box::new(to_source(ids, encoded)?), pool_factor)?;
        Ok(Some((docs, source)))
    };
    let several = n > chunk;
    let mut done = 0usize;
    let mut chunks = 0usize;
    if exists {
        let mut writer = PlaidIndex::writer(&args.index)
            .with_context(|| format!("adding to the index at {}", args.index.display()))?;
        let mut total = AddReport {
            documents: 0,
            tokens: 0,
            trained: false,
            num_centroids: 0,
            outlier_fraction: 0.0,
            replaced: Vec::new(),
        };
        let mut outliers = 0.0f64;
        while let Some((docs, source)) = next_chunk()? {
            let report = writer
                .add_documents(source.as_ref(), &docs)
                .and_then(|r| writer.commit().map(|()| r))
                .with_context(|| format!("adding to the index at {}", args.index.display()))?;
            chunks += 1;
            done += report.documents;
            if several {
                eprintln!(
                    "chunk {chunks}: {} documents ({done} of {n})",
                    report.documents
                );
            }
            total.documents += report.documents;
            total.tokens += report.tokens;
            total.num_centroids = report.num_centroids;
            total.replaced.extend(report.replaced);
            outliers += report.outlier_fraction * report.tokens as f64;
        }
        total.outlier_fraction = outliers / total.tokens.max(1) as f64;
        return Ok(total);
    }
    in_index_folder(&args.index, || {
        let mut spool: Option<SpoolWriter> = None;
        let mut rows: Vec<Doc> = Vec::new();
        while let Some((docs, source)) = next_chunk()? {
            let w = match spool.as_mut() {
                Some(w) => w,
                None => spool.insert(SpoolWriter::new_in(&args.index, source.dim()).with_context(
                    || format!("spooling the embeddings in {}", args.index.display()),
                )?),
            };
            w.push_all(source.as_ref())
                .with_context(|| format!("spooling the embeddings in {}", args.index.display()))?;
            rows.extend(docs);
            chunks += 1;
            done += source.len();
            if several {
                eprintln!(
                    "chunk {chunks}: {} documents encoded ({done} of {n})",
                    source.len()
                );
            }
        }
        let spooled = match spool {
            Some(w) => w.finish()?,
            None => bail!("{}: no documents to index", corpus.display()),
        };
        let cfg = config(
            args,
            codec,
            Some(model.name.clone()),
            Some(model.options.clone()),
            pool_factor,
        );
        add_or_create(args, false, &spooled, &rows, codec, cfg)
    })
}

/// Runs `f` with the index folder created; when `f` fails and the folder was created for it and is still
/// empty, it is removed again (a folder holding anything is left as it is).
fn in_index_folder<T>(dir: &std::path::Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let created = !dir.exists();
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the index folder {}", dir.display()))?;
    let result = f();
    if result.is_err() && created {
        let _ = std::fs::remove_dir(dir);
    }
    result
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

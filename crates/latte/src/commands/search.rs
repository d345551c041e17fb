//! `latte search`: query an index, write a TREC run.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use latte_index::{search_bm25, EmbRef, Fusion, Hit, PlaidIndex, SearchParams};

use latte::core::beir::{self, Kind};

use super::encoder::IndexModel;
use super::index_io::{embeddings_source, read_filter, read_ids, require_unique};
use super::model_args::IndexModelArgs;

/// Search an index; writes `qid Q0 docid rank score latte` lines.
#[derive(Args, Debug)]
pub struct SearchArgs {
    /// Index directory.
    #[arg(long)]
    pub index: PathBuf,
    /// Queries JSONL (`{"_id" (or "id"), "text"}`) or `.txt` (one query per line, ids 0, 1, …), encoded with
    /// the index's model (or `--model`).
    #[arg(long, conflicts_with = "query_embeddings")]
    pub queries: Option<PathBuf>,
    /// Precomputed query embeddings (`.npz`, one array per query).
    #[arg(long, requires = "query_ids")]
    pub query_embeddings: Option<PathBuf>,
    /// Query ids, one per line, in the order of `--query-embeddings`.
    #[arg(long)]
    pub query_ids: Option<PathBuf>,
    /// Model for `--queries` and its flags (default: the model and options the index was built with; flags
    /// given override them, and must give the index's dimension).
    #[command(flatten)]
    pub model: IndexModelArgs,
    /// Results per query.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub k: u64,
    /// TREC run output (default: standard output).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Exhaustive exact MaxSim over every document instead of PLAID.
    #[arg(long)]
    pub exact: bool,
    /// Inverted lists probed per query token (default depends on k).
    #[arg(long)]
    pub n_ivf_probe: Option<usize>,
    /// Candidates kept after the centroid pass (default depends on k).
    #[arg(long)]
    pub ndocs: Option<usize>,
    /// Restrict results to these document ids (one per line; ids not in the index are ignored).
    #[arg(long)]
    pub subset: Option<PathBuf>,
    /// Skip the final exact rerank from the half-precision copy.
    #[arg(long)]
    pub no_rerank: bool,
    /// Encoding batch size for `--queries`.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Only documents whose stored metadata matches this filter: JSON in the MongoDB/Pinecone convention,
    /// e.g. `{"lang": "rust"}`, `{"year": {"$gte": 2020}}`; operators `$eq $ne $gt $gte $lt $lte $in $nin
    /// $exists $and $or $not`, nested keys with dots. Applies to the MaxSim and the BM25 lists alike.
    #[arg(long, conflicts_with = "filter_file")]
    pub filter: Option<String>,
    /// The `--filter` read from a file.
    #[arg(long)]
    pub filter_file: Option<PathBuf>,
    /// Hybrid search: BM25 over the stored titles and texts beside MaxSim, the two lists fused (see
    /// `--fusion`). Needs the query text (`--queries`) and an index that stores text.
    #[arg(long, conflicts_with_all = ["bm25_only", "exact", "subset"])]
    pub hybrid: bool,
    /// BM25 alone over the stored titles and texts (no model is loaded). Needs `--queries` and stored text.
    #[arg(long, conflicts_with_all = ["exact", "subset", "no_rerank", "n_ivf_probe", "ndocs"])]
    pub bm25_only: bool,
    /// How `--hybrid` fuses the lists: `rrf` (reciprocal rank fusion, k = 60; the default) or `linear`
    /// (`alpha · MaxSim + (1 − alpha) · BM25` over min-max normalised scores).
    #[arg(long, value_enum, requires = "hybrid")]
    pub fusion: Option<FusionKind>,
    /// The MaxSim weight of `--fusion linear`, in [0, 1] (default 0.5).
    #[arg(long, requires = "hybrid")]
    pub alpha: Option<f64>,
}

/// A query's embeddings and their dimension.
type Query = (Vec<f32>, usize);

/// `--fusion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FusionKind {
    /// Reciprocal rank fusion, k = 60.
    Rrf,
    /// Convex combination of min-max normalised scores.
    Linear,
}

fn fusion(args: &SearchArgs) -> Result<Fusion> {
    match (args.fusion.unwrap_or(FusionKind::Rrf), args.alpha) {
        (FusionKind::Rrf, Some(_)) => bail!("--alpha applies to --fusion linear only"),
        (FusionKind::Rrf, None) => Ok(Fusion::Rrf {
            k: latte_index::RRF_K,
        }),
        (FusionKind::Linear, alpha) => {
            let alpha = alpha.unwrap_or(0.5);
            if !(0.0..=1.0).contains(&alpha) {
                bail!("--alpha must be in [0, 1], got {alpha}");
            }
            Ok(Fusion::Linear { alpha })
        }
    }
}

pub fn run(args: SearchArgs) -> Result<()> {
    let index = PlaidIndex::open(&args.index)
        .with_context(|| format!("opening {}", args.index.display()))?;
    let k = args.k as usize;
    let filter = read_filter(args.filter.as_deref(), args.filter_file.as_deref())?;
    let keyword = if args.bm25_only {
        Some("--bm25-only")
    } else if args.hybrid {
        Some("--hybrid")
    } else {
        None
    };
    let fusion = fusion(&args)?;
    if let Some(flag) = keyword {
        if args.queries.is_none() {
            bail!(
                "{flag} needs the query text: give --queries (JSONL or .txt); --query-embeddings carry no text"
            );
        }
    }
    // The document store, at this index's generation, when a filter or BM25 needs it.
    let store = if filter.is_some() || keyword.is_some() {
        Some(
            index
                .open_store()
                .with_context(|| format!("opening the documents of {}", args.index.display()))?,
        )
    } else {
        None
    };
    if let (Some(flag), Some(store)) = (keyword, &store) {
        if store.count_with_text()? == 0 {
            bail!(
                "{flag}: the index at {} stores no text to search (it was indexed from embeddings without \
                 text in --metadata, or with --no-store-text)",
                args.index.display()
            );
        }
    }
    if args.bm25_only {
        let path = args.queries.as_ref().expect("checked above");
        let store = store.as_ref().expect("opened above");
        let records = beir::read_all(path, Kind::Queries)?;
        let results = records
            .iter()
            .map(|r| search_bm25(store, &r.text, k, filter.as_ref()))
            .collect::<latte_index::Result<Vec<_>>>()?;
        let qids: Vec<String> = records.into_iter().map(|r| r.id).collect();
        return write_run(&args, &qids, &results);
    }
    let (qids, texts, queries): (Vec<String>, Vec<String>, Vec<Query>) =
        match (&args.queries, &args.query_embeddings) {
            (None, Some(npz)) => {
                let ids_path = args.query_ids.as_ref().expect("clap requires --query-ids");
                let ids = read_ids(ids_path)?;
                require_unique(ids_path, &ids)?;
                let src = embeddings_source(npz, ids.clone())?;
                let qs = (0..src.len())
                    .map(|i| Ok((src.embeddings(i)?.into_owned(), src.dim())))
                    .collect::<Result<_>>()?;
                (ids, Vec::new(), qs)
            }
            (Some(path), None) => {
                let model = IndexModel::for_queries(&args.model, &index)?;
                let (ids, texts): (Vec<String>, Vec<String>) = beir::read_all(path, Kind::Queries)?
                    .into_iter()
                    .map(|r| (r.id, r.text))
                    .unzip();
                let enc = model.encode(&texts, true, args.batch_size)?;
                if enc.len() != ids.len() || enc.iter().any(|e| e.data.len() != e.rows * e.cols) {
                    bail!("the model returned malformed embeddings for the queries");
                }
                (
                    ids,
                    texts,
                    enc.into_iter().map(|e| (e.data, e.cols)).collect(),
                )
            }
            _ => bail!("give either --queries, or --query-embeddings with --query-ids"),
        };
    let mut subset = args.subset.as_deref().map(read_ids).transpose()?;
    let refs: Vec<EmbRef> = queries
        .iter()
        .map(|(q, d)| EmbRef::new(q, *d))
        .collect::<latte::core::Result<_>>()?;
    let mut p = SearchParams::for_k(k);
    if let Some(v) = args.n_ivf_probe {
        p.n_ivf_probe = v;
    }
    if let Some(v) = args.ndocs {
        p.ndocs = v;
    }
    if args.no_rerank {
        p.full_precision_rerank = false;
    }
    p.validate()?;
    if args.hybrid {
        let store = store.as_ref().expect("opened above");
        let results = refs
            .iter()
            .zip(&texts)
            .map(|(q, text)| index.search_hybrid(store, *q, text, &p, filter.as_ref(), fusion))
            .collect::<latte_index::Result<Vec<_>>>()?;
        return write_run(&args, &qids, &results);
    }
    if let (Some(filter), Some(store)) = (&filter, &store) {
        // The matching ids (within --subset, when both are given), then a search restricted to them.
        let mut matching = store.ids_matching(filter)?;
        if let Some(sub) = &subset {
            let sub: std::collections::HashSet<&String> = sub.iter().collect();
            matching.retain(|id| sub.contains(id));
        }
        if !args.exact {
            let results = refs
                .iter()
                .map(|q| index.search_subset(*q, &p, &matching))
                .collect::<latte_index::Result<Vec<_>>>()?;
            return write_run(&args, &qids, &results);
        }
        subset = Some(matching);
    }
    let subset = subset.as_deref();
    let results = if args.exact {
        // Each exhaustive search is already parallel inside.
        refs.iter()
            .map(|q| index.search_exact(*q, k, subset))
            .collect::<latte_index::Result<Vec<_>>>()?
    } else {
        index.search_batch(&refs, &p, subset)?
    };
    write_run(&args, &qids, &results)
}

/// Writes `qid Q0 docid rank score latte` lines to `--output` or standard output.
fn write_run(args: &SearchArgs, qids: &[String], results: &[Vec<Hit>]) -> Result<()> {
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    for (qid, hits) in qids.iter().zip(results) {
        for (rank, h) in hits.iter().enumerate() {
            writeln!(out, "{qid} Q0 {} {} {} latte", h.id, rank + 1, h.score)?;
        }
    }
    out.flush()?;
    Ok(())
}

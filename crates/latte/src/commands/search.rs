//! `latte search`: query an index, write a TREC run.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use latte_index::{EmbRef, PlaidIndex, SearchParams};

use latte::core::beir::{self, Kind};

use super::encoder::IndexModel;
use super::index_io::{embeddings_source, read_ids, require_unique};
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
}

pub fn run(args: SearchArgs) -> Result<()> {
    let index = PlaidIndex::open(&args.index)
        .with_context(|| format!("opening {}", args.index.display()))?;
    let k = args.k as usize;
    let (qids, queries): (Vec<String>, Vec<(Vec<f32>, usize)>) =
        match (&args.queries, &args.query_embeddings) {
            (None, Some(npz)) => {
                let ids_path = args.query_ids.as_ref().expect("clap requires --query-ids");
                let ids = read_ids(ids_path)?;
                require_unique(ids_path, &ids)?;
                let src = embeddings_source(npz, ids.clone())?;
                let qs = (0..src.len())
                    .map(|i| Ok((src.embeddings(i)?.into_owned(), src.dim())))
                    .collect::<Result<_>>()?;
                (ids, qs)
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
                (ids, enc.into_iter().map(|e| (e.data, e.cols)).collect())
            }
            _ => bail!("give either --queries, or --query-embeddings with --query-ids"),
        };
    let subset = args.subset.as_deref().map(read_ids).transpose()?;
    let subset = subset.as_deref();
    let refs: Vec<EmbRef> = queries
        .iter()
        .map(|(q, d)| EmbRef::new(q, *d))
        .collect::<latte::core::Result<_>>()?;
    let results = if args.exact {
        // Each exhaustive search is already parallel inside.
        refs.iter()
            .map(|q| index.search_exact(*q, k, subset))
            .collect::<latte_index::Result<Vec<_>>>()?
    } else {
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
        index.search_batch(&refs, &p, subset)?
    };
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    for (qid, hits) in qids.iter().zip(&results) {
        for (rank, h) in hits.iter().enumerate() {
            writeln!(out, "{qid} Q0 {} {} {} latte", h.id, rank + 1, h.score)?;
        }
    }
    out.flush()?;
    Ok(())
}

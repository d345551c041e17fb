//! `latte mine`: training triplets with hard negatives from a BEIR folder, mined with latte's own
//! exact MaxSim search.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use latte_eval::BeirDataset;
use latte_index::{EmbRef, ExactIndex};
use latte_models::EncodeOptions;

use super::model_args::ModelArgs;
use latte::npz::read_npz;

/// Write (query, positive, negative_1..N) rows for every judged (query, relevant document) pair.
#[derive(Debug, Args)]
pub struct MineArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// BEIR folder: corpus.jsonl, queries.jsonl, qrels/{split}.tsv.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Qrels split whose queries and positives are used.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Hard negatives per row.
    #[arg(long, default_value_t = 1)]
    pub negatives: usize,
    /// Skip this many of the best-ranked non-relevant documents (they may be unjudged positives).
    #[arg(long, default_value_t = 0)]
    pub skip_top: usize,
    /// Precomputed document embeddings (`latte encode` npz, corpus order) instead of encoding the corpus.
    #[arg(long, requires = "ids")]
    pub embeddings: Option<PathBuf>,
    /// Ids of --embeddings, one per line.
    #[arg(long, requires = "embeddings")]
    pub ids: Option<PathBuf>,
    /// Output JSONL (query, positive, negative or negative_1..N).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

pub fn run(args: MineArgs) -> Result<()> {
    if args.negatives == 0 {
        bail!("--negatives must be at least 1");
    }
    let data = BeirDataset::load(&args.dataset, &args.split)
        .with_context(|| format!("loading {}", args.dataset.display()))?;
    let model = args.model.load()?;
    let opts = EncodeOptions {
        batch_size: args.batch_size,
        ..Default::default()
    };
    let text_of: std::collections::HashMap<&str, &str> = data
        .corpus
        .iter()
        .map(|d| (d.id.as_str(), d.text.as_str()))
        .collect();
    let mut index = ExactIndex::new(model.output_dim())?;
    match (&args.embeddings, &args.ids) {
        (Some(e), Some(i)) => {
            let mats = read_npz(e)?;
            let ids: Vec<String> = std::fs::read_to_string(i)
                .with_context(|| format!("cannot read {}", i.display()))?
                .lines()
                .map(str::to_string)
                .collect();
            if ids.len() != mats.len() {
                bail!("{} ids for {} embeddings", ids.len(), mats.len());
            }
            for (id, (_, m)) in ids.into_iter().zip(mats) {
                index.add(id, EmbRef::new(&m.data, m.cols)?)?;
            }
        }
        _ => {
            let texts: Vec<String> = data.corpus.iter().map(|d| d.text.clone()).collect();
            let embs = model.encode(&texts, false, &opts)?;
            for (d, e) in data.corpus.iter().zip(&embs) {
                index.add(d.id.clone(), EmbRef::new(&e.data, e.cols)?)?;
            }
        }
    }
    let qtexts: Vec<String> = data.queries.iter().map(|q| q.text.clone()).collect();
    let qembs = model.encode(&qtexts, true, &opts)?;
    let qrefs: Vec<EmbRef<'_>> = qembs
        .iter()
        .map(|e| EmbRef::new(&e.data, e.cols))
        .collect::<Result<_, _>>()?;
    let depth = args.skip_top + args.negatives + 50;
    let hits = index.search_batch(&qrefs, depth.min(index.len()))?;

    let tmp = args.output.with_extension("jsonl.partial");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    let (mut rows, mut short) = (0usize, 0usize);
    for (q, hs) in data.queries.iter().zip(&hits) {
        let judged = data.qrels.judgments(&q.id);
        let relevant = |id: &str| judged.and_then(|j| j.get(id)).is_some_and(|&r| r > 0);
        let negatives: Vec<&str> = hs
            .iter()
            .filter(|h| !judged.is_some_and(|j| j.contains_key(&h.id)))
            .skip(args.skip_top)
            .take(args.negatives)
            .filter_map(|h| text_of.get(h.id.as_str()).copied())
            .collect();
        if negatives.len() < args.negatives {
            short += 1;
            continue;
        }
        for (doc, _) in judged.into_iter().flatten().filter(|(d, _)| relevant(d)) {
            let Some(pos) = text_of.get(doc.as_str()) else {
                continue;
            };
            // Columns in training order (a JSON map would sort the keys).
            let mut cells: Vec<(String, &str)> =
                vec![("query".into(), q.text.as_str()), ("positive".into(), pos)];
            for (i, n) in negatives.iter().enumerate() {
                let name = if args.negatives == 1 {
                    "negative".to_string()
                } else {
                    format!("negative_{}", i + 1)
                };
                cells.push((name, n));
            }
            let fields: Vec<String> = cells
                .iter()
                .map(|(k, v)| {
                    Ok(format!(
                        "{}: {}",
                        serde_json::to_string(k)?,
                        serde_json::to_string(v)?
                    ))
                })
                .collect::<Result<_, serde_json::Error>>()?;
            let line = format!("{{{}}}", fields.join(", "));
            writeln!(out, "{line}")?;
            rows += 1;
        }
    }
    out.flush()?;
    out.get_ref().sync_all()?;
    drop(out);
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!(
        "{rows} rows written to {} ({} queries; {short} skipped for lack of negatives)",
        args.output.display(),
        data.queries.len()
    );
    Ok(())
}

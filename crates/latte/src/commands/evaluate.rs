//! `latte evaluate`: model + BEIR folder → encoded corpus and queries, index, search, run file, metrics,
//! with the time each stage took. A second run with the same index folder skips encoding the corpus.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use latte_eval::{evaluate, BeirDataset, Metric, Run, TieBreak};
use latte_index::{EmbRef, ExactIndex, IndexConfig, PlaidIndex, SearchParams, VecSource};
use latte_models::EncodeOptions;

use super::model_args::{self, ModelArgs};
use latte::npz::{read_npz, write_npz, Matrix};

/// Which index answers the queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IndexKind {
    /// Compressed PLAID index (approximate search, exact final rerank).
    Plaid,
    /// Brute-force MaxSim over every document.
    Exact,
}

/// Evaluate a model on a BEIR-layout dataset end to end.
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// BEIR folder: corpus.jsonl, queries.jsonl, qrels/{split}.tsv.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Qrels split.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Index kind.
    #[arg(long, value_enum, default_value_t = IndexKind::Plaid)]
    pub index: IndexKind,
    /// Documents retrieved per query.
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// Metrics (ranx names).
    #[arg(long, default_value = "ndcg@10,mrr@10,recall@10,recall@100,map@100")]
    pub metrics: String,
    /// Where the index (or, for --index exact, the document embeddings) is kept and reused while the
    /// model's files are unchanged (`model_fingerprint.json` records them: changed weights re-encode exact
    /// embeddings and refuse a PLAID index); default `latte-eval/<dataset>-<model>-<index>` in the current folder.
    #[arg(long)]
    pub index_dir: Option<PathBuf>,
    /// TREC run file to write; default `<index-dir>/run.<split>.trec`.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// PLAID residual bits (1, 2 or 4).
    #[arg(long, default_value_t = 2)]
    pub nbits: usize,
    /// Print the metrics as JSON.
    #[arg(long)]
    pub json: bool,
}

fn slug(s: &str) -> String {
    s.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(s)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    if args.k == 0 {
        bail!("--k must be at least 1");
    }
    let metrics = Metric::parse_list(&args.metrics)?;
    let t = Instant::now();
    let model = args.model.load()?;
    let load_model = t.elapsed().as_secs_f64();
    if args.dataset.join("corpus.jsonl").is_file() {
        let t = Instant::now();
        let data = BeirDataset::load(&args.dataset, &args.split)
            .with_context(|| format!("loading BEIR dataset {}", args.dataset.display()))?;
        let load_data = t.elapsed().as_secs_f64();
        let name = slug(&args.dataset.to_string_lossy());
        let (report, mut stages, out) =
            evaluate_one(&args, &model, &metrics, &data, &name, args.output.clone())?;
        stages.insert(0, ("load model", load_model));
        stages.insert(0, ("load data", load_data));
        print_one(&args, &data, &report, &stages, &out);
        return Ok(());
    }
    // A parent folder of BEIR folders: each one evaluated, then the mean over datasets (as NanoBEIR).
    let sets = latte_eval::load_collection(&args.dataset, &args.split, &Default::default())
        .with_context(|| {
            format!(
                "{} is neither a BEIR folder nor a folder of them",
                args.dataset.display()
            )
        })?;
    let mut reports = Vec::new();
    for set in &sets {
        let (report, stages, out) =
            evaluate_one(&args, &model, &metrics, &set.dataset, &set.name, None)?;
        print_one(&args, &set.dataset, &report, &stages, &out);
        reports.push((set.name.clone(), report));
    }
    let all = latte_eval::CollectionReport::new(reports)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all.to_json(false))?);
    } else {
        println!("mean over {} datasets", sets.len());
        print!("{}", all.to_table());
    }
    Ok(())
}

type Stages = Vec<(&'static str, f64)>;

fn print_one(
    args: &EvaluateArgs,
    data: &BeirDataset,
    report: &latte_eval::Report,
    stages: &Stages,
    out: &Path,
) {
    let secs: f64 = stages.iter().map(|(_, s)| s).sum();
    if args.json {
        let mut v = report.to_json(false);
        v["stages_s"] = serde_json::json!(stages
            .iter()
            .map(|(n, s)| (n.to_string(), *s))
            .collect::<std::collections::BTreeMap<_, _>>());
        v["total_s"] = serde_json::json!(secs);
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "{} ({} documents, {} queries, split {}), model {}, index {:?}",
            args.dataset.display(),
            data.corpus.len(),
            data.queries.len(),
            args.split,
            args.model.model,
            args.index
        );
        print!("{}", report.to_table());
        for (name, s) in stages {
            println!("  {name:<17} {s:8.2} s");
        }
        println!("  {:<17} {secs:8.2} s", "total");
        println!("run written to {}", out.display());
    }
}

fn evaluate_one(
    args: &EvaluateArgs,
    model: &latte_models::ColBERT,
    metrics: &[Metric],
    data: &BeirDataset,
    name: &str,
    output: Option<PathBuf>,
) -> Result<(latte_eval::Report, Stages, PathBuf)> {
    let mut stages: Stages = Vec::new();
    let kind = match args.index {
        IndexKind::Plaid => "plaid",
        IndexKind::Exact => "exact",
    };
    let dir = match &args.index_dir {
        Some(d) if args.dataset.join("corpus.jsonl").is_file() => d.clone(),
        Some(d) => d.join(name),
        None => {
            PathBuf::from("latte-eval").join(format!("{name}-{}-{kind}", slug(&args.model.model)))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let opts = EncodeOptions {
        batch_size: args.batch_size,
        ..Default::default()
    };
    let doc_ids: Vec<String> = data.corpus.iter().map(|d| d.id.clone()).collect();
    let print = model_fingerprint(model.source(), args)?;
    let print_path = dir.join(FINGERPRINT);
    let recorded: Option<serde_json::Value> = std::fs::read(&print_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let same_model = recorded.as_ref() == Some(&print);
    let reuse = match args.index {
        IndexKind::Plaid => PlaidIndex::open(&dir).is_ok(),
        // Cached embeddings are used only when they were made by these very model files and options.
        IndexKind::Exact => {
            let cached = dir.join("docs.npz").is_file() && dir.join("docs_ids.txt").is_file();
            if cached && !same_model {
                eprintln!(
                    "the document embeddings in {} were made by other model files or options: encoding again",
                    dir.display()
                );
            }
            cached && same_model
        }
    };
    let mut doc_embs: Option<Vec<Matrix>> = None;
    if reuse && args.index == IndexKind::Plaid {
        // The reused index must hold what this model, with these options, gives.
        let index = PlaidIndex::open(&dir)?;
        if let Some(m) = index.model() {
            if m != args.model.model {
                bail!(
                    "the index in {} was built with model {m:?}, not {:?}: delete it or pass another --index-dir",
                    dir.display(),
                    args.model.model
                );
            }
        }
        if index.model_options().is_some() {
            model_args::check_same(
                &model_args::options_from_index(&index)?,
                &args.model.model_options(),
                &dir.display().to_string(),
            )
            .context("delete the index or pass another --index-dir to rebuild it")?;
        }
        if index.dim() != model.output_dim() {
            bail!(
                "the index in {} holds {}-dimensional embeddings, the model gives {} (expected {}, got {}): \
                 delete it or pass another --index-dir",
                dir.display(),
                index.dim(),
                model.output_dim(),
                index.dim(),
                model.output_dim()
            );
        }
    }
    // A PLAID index's model name and options were checked above; its files are checked here.
    let same_files =
        |r: &serde_json::Value| r["model"] == print["model"] && r["files"] == print["files"];
    if reuse && args.index == IndexKind::Plaid && recorded.as_ref().is_some_and(|r| !same_files(r))
    {
        bail!(
            "the index in {} was built from other files of model {:?} (its weights changed since): \
             delete it or pass another --index-dir",
            dir.display(),
            args.model.model
        );
    }
    if reuse {
        eprintln!(
            "reusing the index in {} (corpus not re-encoded)",
            dir.display()
        );
    } else {
        let t = Instant::now();
        let texts: Vec<String> = data.corpus.iter().map(|d| d.text.clone()).collect();
        let embs = model.encode(&texts, false, &opts)?;
        stages.push(("encode corpus", t.elapsed().as_secs_f64()));
        let t = Instant::now();
        match args.index {
            IndexKind::Plaid => {
                let mut src = VecSource::new(model.output_dim());
                for (id, e) in doc_ids.iter().zip(embs) {
                    src.push(id.clone(), e.data)?;
                }
                let config = IndexConfig {
                    nbits: args.nbits,
                    model: Some(args.model.model.clone()),
                    model_options: Some(args.model.model_options().to_json()),
                    ..Default::default()
                };
                PlaidIndex::create(&dir, &src, &config)?;
                stages.push(("build index", t.elapsed().as_secs_f64()));
            }
            IndexKind::Exact => {
                let mats: Vec<Matrix> = embs
                    .into_iter()
                    .map(|e| Matrix {
                        rows: e.rows,
                        cols: e.cols,
                        data: e.data,
                    })
                    .collect();
                write_npz(&dir.join("docs.npz"), &mats)?;
                let ids: String = doc_ids.iter().map(|i| format!("{i}\n")).collect();
                std::fs::write(dir.join("docs_ids.txt"), ids)?;
                stages.push(("store embeddings", t.elapsed().as_secs_f64()));
                doc_embs = Some(mats);
            }
        }
        latte_models::atomic_write(&print_path, &serde_json::to_vec_pretty(&print)?)?;
    }

    let t = Instant::now();
    let qtexts: Vec<String> = data.queries.iter().map(|q| q.text.clone()).collect();
    let qembs = model.encode(&qtexts, true, &opts)?;
    stages.push(("encode queries", t.elapsed().as_secs_f64()));
    let qrefs: Vec<EmbRef<'_>> = qembs
        .iter()
        .map(|e| EmbRef::new(&e.data, e.cols))
        .collect::<Result<_, _>>()?;

    let t = Instant::now();
    let hits = match args.index {
        IndexKind::Plaid => {
            let index = PlaidIndex::open(&dir)?;
            index.search_batch(&qrefs, &SearchParams::for_k(args.k), None)?
        }
        IndexKind::Exact => {
            let (mats, ids) = match doc_embs {
                Some(m) => (m, doc_ids),
                None => load_exact(&dir)?,
            };
            let dim = mats.first().map(|m| m.cols).unwrap_or(model.output_dim());
            let mut index = ExactIndex::new(dim)?;
            for (id, m) in ids.iter().zip(&mats) {
                index.add(id.clone(), EmbRef::new(&m.data, m.cols)?)?;
            }
            index.search_batch(&qrefs, args.k)?
        }
    };
    stages.push(("search", t.elapsed().as_secs_f64()));

    let mut run = Run::new();
    for (q, hs) in data.queries.iter().zip(&hits) {
        for h in hs {
            run.insert(&q.id, &h.id, h.score as f64)?;
        }
    }
    let out = output.unwrap_or_else(|| dir.join(format!("run.{}.trec", args.split)));
    run.write_trec(&out, TieBreak::InputOrder, Some("latte"))?;
    let report = evaluate(&run, &data.qrels, metrics);
    Ok((report, stages, out))
}

fn load_exact(dir: &Path) -> Result<(Vec<Matrix>, Vec<String>)> {
    let mats: Vec<Matrix> = read_npz(&dir.join("docs.npz"))?
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    let ids: Vec<String> = std::fs::read_to_string(dir.join("docs_ids.txt"))?
        .lines()
        .map(str::to_string)
        .collect();
    if ids.len() != mats.len() {
        bail!(
            "{}: {} ids for {} embeddings; delete the folder to rebuild",
            dir.display(),
            ids.len(),
            mats.len()
        );
    }
    Ok((mats, ids))
}

/// The file beside a kept index or document embeddings that records which model files made them.
const FINGERPRINT: &str = "model_fingerprint.json";

/// What identifies the model behind kept embeddings: its name, the options that change embeddings, and
/// the size and modification time of every file of its folder and of the folders one level down (weights,
/// configs, Dense layers), so that a model retrained in place is not mistaken for the one that made them.
fn model_fingerprint(source: &Path, args: &EvaluateArgs) -> Result<serde_json::Value> {
    let mut files = Vec::new();
    let mut dirs = vec![(source.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if depth == 0 {
                    dirs.push((path, 1));
                }
                continue;
            }
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let name = path
                .strip_prefix(source)
                .unwrap_or(&path)
                .display()
                .to_string();
            files.push(serde_json::json!([name, meta.len(), modified.to_string()]));
        }
    }
    files.sort_by_key(|f| f[0].as_str().unwrap_or_default().to_string());
    Ok(serde_json::json!({
        "model": args.model.model,
        "options": args.model.model_options().to_json(),
        "files": files,
    }))
}

//! `latte encode`: texts → per-token embeddings in an `.npz` archive.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use latte_models::EncodeOptions;

use super::model_args::ModelArgs;
use latte::core::beir::{self, Kind};
use latte::npz::{write_npz, Matrix};

/// Encode queries or documents with a ColBERT model.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `.jsonl` (BEIR corpus or queries: `_id` or `id`, `text`, for documents an optional `title`) or `.txt`
    /// (one text per line).
    #[arg(long, short = 'i')]
    pub input: PathBuf,
    /// Output `.npz`: `arr_0 … arr_{n-1}`, float32 (tokens × dim), in input order.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Encode as queries (default: documents).
    #[arg(long)]
    pub queries: bool,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Name of a prompt from the model's config (`prompts` in config_sentence_transformers.json).
    #[arg(long)]
    pub prompt_name: Option<String>,
    /// Write the ids of the inputs (one per line, in order) to this file.
    #[arg(long)]
    pub ids_output: Option<PathBuf>,
}

pub fn run(args: EncodeArgs) -> Result<()> {
    let kind = if args.queries {
        Kind::Queries
    } else {
        Kind::Documents
    };
    let records = beir::read_all(&args.input, kind)?;
    let load_start = std::time::Instant::now();
    let model = args.model.load()?;
    let load_secs = load_start.elapsed().as_secs_f64();
    let texts: Vec<String> = records.iter().map(|r| r.text.clone()).collect();
    let opts = EncodeOptions {
        batch_size: args.batch_size,
        prompt_name: args.prompt_name.clone(),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let embs = model.encode(&texts, args.queries, &opts)?;
    let secs = start.elapsed().as_secs_f64();
    let tokens: usize = embs.iter().map(|e| e.rows).sum();
    let arrays: Vec<Matrix> = embs
        .into_iter()
        .map(|e| Matrix {
            rows: e.rows,
            cols: e.cols,
            data: e.data,
        })
        .collect();
    write_npz(&args.output, &arrays)?;
    if let Some(p) = &args.ids_output {
        let ids: String = records.iter().map(|r| format!("{}\n", r.id)).collect();
        std::fs::write(p, ids).with_context(|| format!("cannot write {}", p.display()))?;
    }
    eprintln!(
        "encoded {} {} ({tokens} token vectors) in {secs:.2}s ({:.1} texts/s, {:.0} tokens/s; model loaded in {load_secs:.2}s) -> {}",
        texts.len(),
        if args.queries { "queries" } else { "documents" },
        texts.len() as f64 / secs.max(1e-9),
        tokens as f64 / secs.max(1e-9),
        args.output.display()
    );
    Ok(())
}

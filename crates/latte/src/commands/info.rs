//! `latte info`: what an index holds.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use latte_index::PlaidIndex;
use serde_json::{json, Value};

/// Print an index's model, dimension, nbits, document and token counts, bytes on disk, format version and
/// document store summary.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Index directory.
    #[arg(long)]
    pub index: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let index = PlaidIndex::open(&args.index)
        .with_context(|| format!("opening {}", args.index.display()))?;
    let info = index.info();
    let options = index.model_options().cloned();
    let dtype = options
        .as_ref()
        .and_then(|o| o.get("dtype"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let (stored, with_text) = if index.has_store() {
        let store = index
            .open_store()
            .with_context(|| format!("opening the documents of {}", args.index.display()))?;
        (Some(store.count()?), Some(store.count_with_text()?))
    } else {
        (None, None)
    };
    let value = json!({
        "index": args.index.display().to_string(),
        "model": index.model(),
        "model_options": options,
        "dtype": dtype,
        "dim": info.dim,
        "nbits": info.nbits,
        "num_centroids": info.num_centroids,
        "documents": info.documents,
        "deleted_documents": info.deleted,
        "tokens": info.tokens,
        "store_full_precision": info.config.store_full,
        "vector_bytes": info.disk_bytes,
        "store_bytes": info.store_bytes,
        "disk_bytes": info.disk_bytes + info.store_bytes,
        "format_version": info.format_version,
        "generation": info.generation,
        "stored_documents": stored,
        "documents_with_text": with_text,
    });
    if args.json {
        println!("{value}");
        return Ok(());
    }
    let or_none = |v: &Value| match v {
        Value::Null => "none".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let rows = [
        ("index", "index"),
        ("model", "model"),
        ("model options", "model_options"),
        ("dtype", "dtype"),
        ("dimension", "dim"),
        ("nbits", "nbits"),
        ("centroids", "num_centroids"),
        ("documents", "documents"),
        ("deleted documents", "deleted_documents"),
        ("tokens", "tokens"),
        ("half-precision copy", "store_full_precision"),
        ("bytes on disk", "disk_bytes"),
        ("  vectors", "vector_bytes"),
        ("  document store", "store_bytes"),
        ("format version", "format_version"),
        ("generation", "generation"),
        ("stored documents", "stored_documents"),
        ("  with text", "documents_with_text"),
    ];
    for (label, key) in rows {
        if key == "dtype" && value[key].is_null() {
            continue;
        }
        println!("{:<20} {}", format!("{label}:"), or_none(&value[key]));
    }
    Ok(())
}

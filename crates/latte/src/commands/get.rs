//! `latte get`: print stored documents.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use latte_index::PlaidIndex;
use serde_json::{Map, Value};

use super::index_io::read_ids;

/// Print the stored documents with these ids as JSONL: `{"_id", "title"?, "text"?, "metadata"?}` per line,
/// in the order of the ids file (absent fields were not stored). Ids the index does not hold are listed on
/// standard error and make the exit status 2, after the others are printed.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// Index directory.
    #[arg(long)]
    pub index: PathBuf,
    /// Ids, one per line.
    #[arg(long)]
    pub ids: PathBuf,
    /// Output file (default: standard output).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn run(args: GetArgs) -> Result<()> {
    let index = PlaidIndex::open(&args.index)
        .with_context(|| format!("opening {}", args.index.display()))?;
    let ids = read_ids(&args.ids)?;
    let docs = index
        .get_documents(&ids)
        .with_context(|| format!("reading the documents of {}", args.index.display()))?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut unknown = Vec::new();
    for (id, doc) in ids.iter().zip(docs) {
        let Some(doc) = doc else {
            unknown.push(id.as_str());
            continue;
        };
        let mut line = Map::new();
        line.insert("_id".into(), Value::String(doc.id));
        if let Some(t) = doc.title {
            line.insert("title".into(), Value::String(t));
        }
        if let Some(t) = doc.text {
            line.insert("text".into(), Value::String(t));
        }
        if let Some(m) = doc.metadata {
            line.insert("metadata".into(), Value::Object(m));
        }
        serde_json::to_writer(&mut out, &Value::Object(line))?;
        writeln!(out)?;
    }
    out.flush()?;
    if !unknown.is_empty() {
        let shown: Vec<String> = unknown
            .iter()
            .take(20)
            .map(|id| latte::core::short_id(id))
            .collect();
        let more = match unknown.len() {
            n if n > 20 => format!(" and {} more", n - 20),
            _ => String::new(),
        };
        bail!(
            "{} of {} ids are not in the index at {}: {}{more}",
            unknown.len(),
            ids.len(),
            args.index.display(),
            shown.join(", ")
        );
    }
    Ok(())
}

//! Input helpers shared by `latte index`, `latte search` and `latte delete`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use latte_index::{DocumentSource, NpzSource, VecSource};

/// Reads ids, one per line (a trailing `\r` is dropped). Empty lines are an error, except at the very end.
pub fn read_ids(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read ids from {}", path.display()))?;
    let mut ids: Vec<String> = text
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    while ids.last().is_some_and(|l| l.is_empty()) {
        ids.pop();
    }
    if let Some(i) = ids.iter().position(|l| l.is_empty()) {
        bail!(
            "{}: line {} is empty; ids must be one per line",
            path.display(),
            i + 1
        );
    }
    Ok(ids)
}

/// Opens embeddings from an `.npz` with the given ids: lazily when the archive is uncompressed float32 (what
/// `latte encode` and `numpy.savez` write), otherwise by reading it whole.
pub fn embeddings_source(npz: &Path, ids: Vec<String>) -> Result<Box<dyn DocumentSource>> {
    match NpzSource::open(npz) {
        Ok(src) => {
            let n = src.len();
            if ids.len() != n {
                bail!(
                    "{} holds {n} arrays but {} ids were given; they must match one to one",
                    npz.display(),
                    ids.len()
                );
            }
            Ok(Box::new(src.with_ids(ids)?))
        }
        Err(lazy_err) => {
            let arrays = crate_npz_read(npz).with_context(|| format!("{lazy_err}"))?;
            if ids.len() != arrays.len() {
                bail!(
                    "{} holds {} arrays but {} ids were given; they must match one to one",
                    npz.display(),
                    arrays.len(),
                    ids.len()
                );
            }
            let dim = arrays.first().map_or(0, |m| m.cols);
            let mut src = VecSource::new(dim);
            for (id, m) in ids.into_iter().zip(arrays) {
                if m.cols != dim {
                    bail!(
                        "{}: array for {id:?} has dimension {}, the first has {dim}",
                        npz.display(),
                        m.cols
                    );
                }
                src.push(id, m.data)?;
            }
            Ok(Box::new(src))
        }
    }
}

fn crate_npz_read(path: &Path) -> Result<Vec<latte::npz::Matrix>> {
    Ok(latte::npz::read_npz(path)?
        .into_iter()
        .map(|(_, m)| m)
        .collect())
}

/// A BEIR-style JSONL record: `_id` and `text` (and an optional `title`, prepended to the text).
pub fn read_jsonl(path: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut ids = Vec::new();
    let mut texts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        let id = match &v["_id"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => bail!("{}:{}: missing \"_id\"", path.display(), i + 1),
        };
        let body = v["text"]
            .as_str()
            .with_context(|| format!("{}:{}: missing \"text\"", path.display(), i + 1))?;
        let title = v["title"].as_str().unwrap_or("");
        texts.push(if title.is_empty() {
            body.to_string()
        } else {
            format!("{title} {body}")
        });
        ids.push(id);
    }
    Ok((ids, texts))
}

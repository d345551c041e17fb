//! Input helpers shared by `latte index`, `latte search` and `latte delete`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use latte_core::beir::type_name;
use latte_index::{Doc, DocumentSource, Filter, NpzSource, VecSource};
use serde_json::{Map, Value};

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

/// Fails when an id repeats in the ids file `path`, naming both lines (ids are shortened in the message).
pub fn require_unique(path: &Path, ids: &[String]) -> Result<()> {
    let mut seen = std::collections::HashMap::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        if let Some(first) = seen.insert(id.as_str(), i + 1) {
            bail!(
                "{}:{}: duplicate id {} (first on line {first})",
                path.display(),
                i + 1,
                latte::core::short_id(id)
            );
        }
    }
    Ok(())
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

/// The stored document of one JSONL line (`fields`, its whole object): `title` and `text` as the title and
/// text (dropped when `store_text` is false; empty ones are not stored), every other field except the id
/// (`_id`, or `id` when there is no `_id`) as metadata.
pub fn doc_from_fields(id: &str, mut fields: Map<String, Value>, store_text: bool) -> Result<Doc> {
    if fields.remove("_id").is_none() {
        fields.remove("id");
    }
    let mut take = |key: &str| -> Result<Option<String>> {
        match fields.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => bail!("\"{key}\" must be a string, got {}", type_name(&other)),
        }
    };
    let title = take("title")?;
    let text = take("text")?;
    let mut doc = Doc::new(id);
    if store_text {
        doc.title = title;
        doc.text = text;
    }
    if !fields.is_empty() {
        doc.metadata = Some(fields);
    }
    Ok(doc)
}

/// Reads `--metadata`: JSONL, one `{"_id": ..., ...}` per line (blank lines skipped), every id one of
/// `source`'s and at most once. Errors name the file and line.
pub fn read_metadata(
    path: &Path,
    source: &dyn DocumentSource,
    store_text: bool,
) -> Result<Vec<Doc>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read metadata from {}", path.display()))?;
    let known: std::collections::HashSet<String> =
        (0..source.len()).map(|i| source.id(i)).collect();
    let mut seen = std::collections::HashMap::new();
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}: line {n}", path.display());
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{}: invalid JSON", at()))?;
        let Value::Object(fields) = value else {
            bail!(
                "{}: expected a JSON object, got {}",
                at(),
                type_name(&value)
            );
        };
        let id = match fields.get("_id").or_else(|| fields.get("id")) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(x)) => x.to_string(),
            other => bail!(
                "{}: expected an id: \"_id\" as a non-empty string or a number, got {}",
                at(),
                other.map_or("none", type_name)
            ),
        };
        if !known.contains(&id) {
            bail!(
                "{}: id {} is not among the --ids of the embeddings",
                at(),
                latte::core::short_id(&id)
            );
        }
        if let Some(first) = seen.insert(id.clone(), n) {
            bail!(
                "{}: duplicate id {} (first on line {first})",
                at(),
                latte::core::short_id(&id)
            );
        }
        docs.push(doc_from_fields(&id, fields, store_text).with_context(at)?);
    }
    Ok(docs)
}

/// The filter of `--filter TEXT` or `--filter-file FILE` (at most one is given), parsed; errors name the
/// option or the file and the position.
pub fn read_filter(text: Option<&str>, file: Option<&Path>) -> Result<Option<Filter>> {
    if let Some(text) = text {
        return Ok(Some(
            text.parse::<Filter>()
                .with_context(|| "--filter is not a valid filter")?,
        ));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the filter from {}", path.display()))?;
        return Ok(Some(text.parse::<Filter>().with_context(|| {
            format!("{} is not a valid filter", path.display())
        })?));
    }
    Ok(None)
}

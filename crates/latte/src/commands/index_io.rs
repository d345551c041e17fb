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

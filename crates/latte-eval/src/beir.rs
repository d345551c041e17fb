//! BEIR dataset folders: `corpus.jsonl`, `queries.jsonl`, `qrels/{split}.tsv`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use latte_core::beir::Kind;

use crate::error::{EvalError, Result};
use crate::qrels::Qrels;

/// How many unknown ids an error message lists.
const EXAMPLES: usize = 5;

/// A corpus document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The `_id` (or `id`).
    pub id: String,
    /// `"{title} {text}"`, stripped (PyLate's BEIR loader does the same).
    pub text: String,
}

/// A query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The `_id` (or `id`).
    pub id: String,
    /// The query text.
    pub text: String,
}

/// What to do with qrels that name documents missing from the corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnknownDocuments {
    /// Fail with [`EvalError::UnknownIds`] (default).
    #[default]
    Error,
    /// Keep the judgments: those documents can never be retrieved, so they lower recall,
    /// as in BEIR's own evaluation.
    Keep,
}

/// Options for [`BeirDataset::load_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Policy for qrels naming documents absent from the corpus.
    pub unknown_documents: UnknownDocuments,
}

/// One split of a BEIR dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct BeirDataset {
    /// All documents of `corpus.jsonl`, in file order.
    pub corpus: Vec<Document>,
    /// The queries that have judgments in the split, in the order the qrels first name them
    /// (as BEIR's `GenericDataLoader`, which drops queries without qrels for the split).
    pub queries: Vec<Query>,
    /// The split's judgments.
    pub qrels: Qrels,
}

/// Reads a whole corpus or queries file with latte-core's one reader; `what` describes the file for I/O
/// errors.
fn read_records(path: &Path, kind: Kind, what: &str) -> Result<Vec<latte_core::beir::Record>> {
    latte_core::beir::read_all(path, kind).map_err(|e| match e {
        latte_core::Error::Io { path, source, .. } => EvalError::io(path, what, source),
        other => EvalError::Input(other),
    })
}

/// Reads a BEIR `corpus.jsonl`: one JSON object per line with `_id` (or `id`; a string or a number),
/// `text` and optionally `title`. Document text is `"{title} {text}"` stripped. Missing ids, duplicate ids
/// and an empty file are errors (latte-core's [`latte_core::beir`] reader).
pub fn read_corpus(path: impl AsRef<Path>) -> Result<Vec<Document>> {
    let records = read_records(
        path.as_ref(),
        Kind::Documents,
        "BEIR corpus (corpus.jsonl: one JSON object per line with _id, title, text)",
    )?;
    Ok(records
        .into_iter()
        .map(|r| Document {
            id: r.id,
            text: r.text,
        })
        .collect())
}

/// Reads a BEIR `queries.jsonl`: one JSON object per line with `_id` (or `id`; a string or a number)
/// and `text`; other fields are ignored.
pub fn read_queries(path: impl AsRef<Path>) -> Result<Vec<Query>> {
    let records = read_records(
        path.as_ref(),
        Kind::Queries,
        "BEIR queries (queries.jsonl: one JSON object per line with _id, text)",
    )?;
    Ok(records
        .into_iter()
        .map(|r| Query {
            id: r.id,
            text: r.text,
        })
        .collect())
}

/// The splits of a BEIR folder: stems of `qrels/*.tsv`, sorted. Empty when there is no
/// `qrels` folder.
pub fn available_splits(dir: impl AsRef<Path>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.as_ref().join("qrels")) else {
        return Vec::new();
    };
    let mut splits: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "tsv"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    splits.sort();
    splits
}

/// Whether `dir` looks like a BEIR folder (holds `corpus.jsonl`).
pub fn is_beir_dir(dir: impl AsRef<Path>) -> bool {
    dir.as_ref().join("corpus.jsonl").is_file()
}

/// Distinct ids not in `known`, in order of first appearance.
fn unknown_ids<'a>(ids: impl Iterator<Item = &'a str>, known: &HashSet<&str>) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.filter(|id| !known.contains(id) && seen.insert(*id))
        .map(str::to_string)
        .collect()
}

fn unknown_error(path: &Path, kind: &'static str, unknown: Vec<String>) -> EvalError {
    EvalError::UnknownIds {
        path: path.to_path_buf(),
        kind,
        count: unknown.len(),
        examples: unknown.into_iter().take(EXAMPLES).collect(),
    }
}

impl BeirDataset {
    /// Loads one split of a BEIR folder strictly: every query and document the qrels name
    /// must exist. Only queries with judgments in the split are kept.
    pub fn load(dir: impl AsRef<Path>, split: &str) -> Result<Self> {
        Self::load_with(dir, split, &LoadOptions::default())
    }

    /// Loads one split of a BEIR folder with options.
    pub fn load_with(dir: impl AsRef<Path>, split: &str, options: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let qrels_path = dir.join("qrels").join(format!("{split}.tsv"));
        if !qrels_path.is_file() {
            return Err(EvalError::MissingSplit {
                split: split.to_string(),
                path: qrels_path,
                available: available_splits(dir),
            });
        }
        let qrels = Qrels::read(&qrels_path)?;
        let corpus = read_corpus(dir.join("corpus.jsonl"))?;
        let all_queries = read_queries(dir.join("queries.jsonl"))?;

        let query_ids: HashSet<&str> = all_queries.iter().map(|q| q.id.as_str()).collect();
        let unknown = unknown_ids(qrels.query_ids(), &query_ids);
        if !unknown.is_empty() {
            return Err(unknown_error(&qrels_path, "query", unknown));
        }
        if options.unknown_documents == UnknownDocuments::Error {
            let doc_ids: HashSet<&str> = corpus.iter().map(|d| d.id.as_str()).collect();
            let unknown = unknown_ids(
                qrels
                    .iter()
                    .flat_map(|(_, docs)| docs.keys().map(String::as_str)),
                &doc_ids,
            );
            if !unknown.is_empty() {
                return Err(unknown_error(&qrels_path, "document", unknown));
            }
        }

        let mut by_id: HashMap<String, Query> =
            all_queries.into_iter().map(|q| (q.id.clone(), q)).collect();
        let queries = qrels
            .query_ids()
            .filter_map(|id| by_id.remove(id))
            .collect();
        Ok(BeirDataset {
            corpus,
            queries,
            qrels,
        })
    }
}

/// A dataset of a collection, named after its folder.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedDataset {
    /// The subfolder's name.
    pub name: String,
    /// The subfolder.
    pub path: PathBuf,
    /// Its loaded split.
    pub dataset: BeirDataset,
}

/// Loads the same split of every BEIR folder directly under `parent` (a subfolder holding
/// `corpus.jsonl`), sorted by name, e.g. a NanoBEIR download. Other entries are skipped. Fails
/// when there is no such subfolder or when any dataset fails to load.
pub fn load_collection(
    parent: impl AsRef<Path>,
    split: &str,
    options: &LoadOptions,
) -> Result<Vec<NamedDataset>> {
    let parent = parent.as_ref();
    let entries = std::fs::read_dir(parent).map_err(|e| {
        EvalError::io(
            parent,
            "folder of BEIR datasets (one subfolder per dataset)",
            e,
        )
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir() && is_beir_dir(p))
        .collect();
    if dirs.is_empty() {
        return Err(EvalError::NoDatasets {
            path: parent.to_path_buf(),
        });
    }
    dirs.sort();
    dirs.into_iter()
        .map(|path| {
            let dataset = BeirDataset::load_with(&path, split, options)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(NamedDataset {
                name,
                path,
                dataset,
            })
        })
        .collect()
}

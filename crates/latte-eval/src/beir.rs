//! BEIR dataset folders: `corpus.jsonl`, `queries.jsonl`, `qrels/{split}.tsv`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{EvalError, Result};
use crate::io_util::read_text;
use crate::qrels::Qrels;

/// How many unknown ids an error message lists.
const EXAMPLES: usize = 5;

/// A corpus document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The `_id`.
    pub id: String,
    /// `"{title} {text}"`, trimmed (PyLate's BEIR loader does the same).
    pub text: String,
}

/// A query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The `_id`.
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

#[derive(Deserialize)]
#[serde(untagged)]
enum RawId {
    Str(String),
    Num(serde_json::Number),
}

/// Deserialises an `_id` given as a JSON string or number into a string.
fn id_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(match RawId::deserialize(d)? {
        RawId::Str(s) => s,
        RawId::Num(n) => n.to_string(),
    })
}

#[derive(Deserialize)]
struct RawDoc {
    #[serde(rename = "_id", deserialize_with = "id_string")]
    id: String,
    #[serde(default)]
    title: Option<String>,
    text: String,
}

#[derive(Deserialize)]
struct RawQuery {
    #[serde(rename = "_id", deserialize_with = "id_string")]
    id: String,
    text: String,
}

/// Parses JSON lines, one record per non-blank line, rejecting empty and duplicate ids.
fn parse_jsonl<'a, T: Deserialize<'a>>(
    text: &'a str,
    path: &Path,
    id_of: impl Fn(&T) -> &str,
) -> Result<Vec<T>> {
    let mut items = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let item: T = serde_json::from_str(line)
            .map_err(|e| EvalError::parse(path, line_no, format!("invalid JSON record: {e}")))?;
        let id = id_of(&item);
        if id.is_empty() {
            return Err(EvalError::parse(path, line_no, "empty _id"));
        }
        if let Some(first) = seen.insert(id.to_string(), line_no) {
            return Err(EvalError::parse(
                path,
                line_no,
                format!("duplicate _id {id:?} (first on line {first})"),
            ));
        }
        items.push(item);
    }
    Ok(items)
}

/// Reads a BEIR `corpus.jsonl`: one JSON object per line with `_id` (string or number),
/// `text` and optionally `title`. Document text is `"{title} {text}"` trimmed.
pub fn read_corpus(path: impl AsRef<Path>) -> Result<Vec<Document>> {
    let path = path.as_ref();
    let text = read_text(
        path,
        "BEIR corpus (corpus.jsonl: one JSON object per line with _id, title, text)",
    )?;
    Ok(parse_jsonl::<RawDoc>(&text, path, |d| &d.id)?
        .into_iter()
        .map(|d| {
            let title = d.title.unwrap_or_default();
            Document {
                text: format!("{title} {}", d.text).trim().to_string(),
                id: d.id,
            }
        })
        .collect())
}

/// Reads a BEIR `queries.jsonl`: one JSON object per line with `_id` (string or number)
/// and `text`; other fields are ignored.
pub fn read_queries(path: impl AsRef<Path>) -> Result<Vec<Query>> {
    let path = path.as_ref();
    let text = read_text(
        path,
        "BEIR queries (queries.jsonl: one JSON object per line with _id, text)",
    )?;
    Ok(parse_jsonl::<RawQuery>(&text, path, |q| &q.id)?
        .into_iter()
        .map(|q| Query {
            id: q.id,
            text: q.text,
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

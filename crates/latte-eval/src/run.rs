//! Retrieval runs: scored documents per query, TREC run files.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::path::Path;

use indexmap::IndexMap;

use crate::error::{EvalError, Result};
use crate::io_util::{read_text, write_text};

/// How documents with equal scores are ordered when a query's results are ranked.
///
/// Both orders rank by score, highest first; they differ only among equal scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TieBreak {
    /// Equal scores keep the order in which the documents were added to the run (file order for
    /// a run read from disk). This is what ranx does whenever its sort is stable (it is for
    /// queries with at most 15 results; beyond that ranx's order among ties is an artifact of
    /// numba's unstable quicksort and cannot be relied on). A run produced by a search engine
    /// already lists documents in rank order, so this keeps the engine's own order.
    #[default]
    InputOrder,
    /// Equal scores are ordered by document id, in decreasing byte order: trec_eval's rule.
    DocIdDescending,
}

/// A document returned for a query, with its retrieval score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked<'a> {
    /// Document id.
    pub doc_id: &'a str,
    /// Retrieval score (higher is better).
    pub score: f64,
}

/// Retrieval results: for each query, documents with scores (higher is better).
///
/// Queries and documents keep insertion order; ranking happens on demand ([`Run::ranked`]),
/// so the run does not have to be sorted. A document appears at most once per query and
/// scores are finite.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    name: Option<String>,
    queries: IndexMap<String, IndexMap<String, f64>>,
}

impl Run {
    /// Empty run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empty run with a name (written as the tag column of TREC run files).
    pub fn with_name(name: impl Into<String>) -> Self {
        Run {
            name: Some(name.into()),
            queries: IndexMap::new(),
        }
    }

    /// The run's name, if any (for a file read from disk: the tag of its first line).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Adds one scored document. Errors on a non-finite score or a document already present
    /// for the query.
    pub fn insert(&mut self, query_id: &str, doc_id: &str, score: f64) -> Result<()> {
        self.insert_inner(query_id, doc_id, score)
            .map_err(|message| EvalError::Invalid {
                what: "run",
                message,
            })
    }

    fn insert_inner(&mut self, query_id: &str, doc_id: &str, score: f64) -> Result<(), String> {
        if query_id.is_empty() || doc_id.is_empty() {
            return Err("empty query or document id".to_string());
        }
        if !score.is_finite() {
            return Err(format!(
                "score {score} of document {doc_id:?} for query {query_id:?} is not finite"
            ));
        }
        let docs = match self.queries.get_mut(query_id) {
            Some(docs) => docs,
            None => self.queries.entry(query_id.to_string()).or_default(),
        };
        if docs.contains_key(doc_id) {
            return Err(format!(
                "document {doc_id:?} appears twice for query {query_id:?}"
            ));
        }
        docs.insert(doc_id.to_string(), score);
        Ok(())
    }

    /// Adds a query with no results (it then counts as retrieved nothing).
    pub fn insert_empty_query(&mut self, query_id: &str) {
        if !self.queries.contains_key(query_id) {
            self.queries.insert(query_id.to_string(), IndexMap::new());
        }
    }

    /// Adds the results of one query, in rank order, from (document id, score) pairs.
    pub fn extend_query<I, S>(&mut self, query_id: &str, results: I) -> Result<()>
    where
        I: IntoIterator<Item = (S, f64)>,
        S: AsRef<str>,
    {
        self.insert_empty_query(query_id);
        for (doc, score) in results {
            self.insert(query_id, doc.as_ref(), score)?;
        }
        Ok(())
    }

    /// Number of queries.
    pub fn len(&self) -> usize {
        self.queries.len()
    }

    /// Whether the run has no queries.
    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }

    /// Query ids in insertion order.
    pub fn query_ids(&self) -> impl Iterator<Item = &str> {
        self.queries.keys().map(String::as_str)
    }

    /// Whether the query is present (possibly with no results).
    pub fn contains_query(&self, query_id: &str) -> bool {
        self.queries.contains_key(query_id)
    }

    /// The unranked results of one query (document id → score) in insertion order.
    pub fn results(&self, query_id: &str) -> Option<&IndexMap<String, f64>> {
        self.queries.get(query_id)
    }

    /// The results of one query ranked by decreasing score, ties ordered by `tie_break`.
    /// Empty for a query absent from the run.
    pub fn ranked(&self, query_id: &str, tie_break: TieBreak) -> Vec<Ranked<'_>> {
        let Some(docs) = self.queries.get(query_id) else {
            return Vec::new();
        };
        let mut ranked: Vec<Ranked<'_>> = docs
            .iter()
            .map(|(d, &s)| Ranked {
                doc_id: d.as_str(),
                score: s,
            })
            .collect();
        // Scores are finite (checked on insert), so partial_cmp never fails; -0.0 ties 0.0.
        let by_score = |a: &Ranked<'_>, b: &Ranked<'_>| {
            b.score.partial_cmp(&a.score).unwrap_or(Ordering::Equal)
        };
        match tie_break {
            // sort_by is stable: equal scores keep insertion order.
            TieBreak::InputOrder => ranked.sort_by(by_score),
            TieBreak::DocIdDescending => ranked.sort_by(|a, b| {
                by_score(a, b).then_with(|| b.doc_id.as_bytes().cmp(a.doc_id.as_bytes()))
            }),
        }
        ranked
    }

    /// Reads a TREC run file: whitespace-separated `qid Q0 docid rank score tag`, one line per
    /// retrieved document. The `Q0` and `rank` columns are not used for ranking (as in ranx and
    /// trec_eval, the score decides), but `rank` must be an integer. Blank lines are skipped.
    pub fn read_trec(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_text(path, "TREC run file (qid Q0 docid rank score tag)")?;
        Self::parse_trec(&text, path)
    }

    /// Parses TREC run text; `path` only names the source in errors.
    pub fn parse_trec(text: &str, path: &Path) -> Result<Self> {
        let mut run = Run::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            if fields.len() != 6 {
                return Err(EvalError::parse(
                    path,
                    line_no,
                    format!(
                        "expected 6 whitespace-separated fields (qid Q0 docid rank score tag), found {}",
                        fields.len()
                    ),
                ));
            }
            let (query_id, doc_id, rank, score, tag) =
                (fields[0], fields[2], fields[3], fields[4], fields[5]);
            if rank.parse::<i64>().is_err() {
                return Err(EvalError::parse(
                    path,
                    line_no,
                    format!("rank {rank:?} is not an integer"),
                ));
            }
            let score: f64 = score.parse().map_err(|_| {
                EvalError::parse(path, line_no, format!("score {score:?} is not a number"))
            })?;
            if run.name.is_none() {
                run.name = Some(tag.to_string());
            }
            run.insert_inner(query_id, doc_id, score)
                .map_err(|m| EvalError::parse(path, line_no, m))?;
        }
        if run.is_empty() {
            return Err(EvalError::parse(path, 1, "no results found"));
        }
        Ok(run)
    }

    /// Renders as a TREC run: queries in insertion order, each ranked by `tie_break`, ranks
    /// from 1. `tag` defaults to the run's name, else "latte". Scores are written in Rust's
    /// shortest round-trip form, so reading the file back gives the same run.
    pub fn to_trec_string(&self, tie_break: TieBreak, tag: Option<&str>) -> Result<String> {
        let tag = tag.or(self.name.as_deref()).unwrap_or("latte");
        if tag.is_empty() || tag.contains(char::is_whitespace) {
            return Err(EvalError::Invalid {
                what: "run",
                message: format!("run tag {tag:?} must be non-empty without whitespace"),
            });
        }
        let mut out = String::new();
        for query_id in self.query_ids() {
            if query_id.contains(char::is_whitespace) {
                return Err(EvalError::Invalid {
                    what: "run",
                    message: format!(
                        "query id {query_id:?} contains whitespace; TREC format cannot hold it"
                    ),
                });
            }
            for (rank, r) in self.ranked(query_id, tie_break).iter().enumerate() {
                if r.doc_id.contains(char::is_whitespace) {
                    return Err(EvalError::Invalid {
                        what: "run",
                        message: format!(
                            "document id {:?} contains whitespace; TREC format cannot hold it",
                            r.doc_id
                        ),
                    });
                }
                let _ = writeln!(
                    out,
                    "{query_id} Q0 {} {} {:?} {tag}",
                    r.doc_id,
                    rank + 1,
                    r.score
                );
            }
        }
        Ok(out)
    }

    /// Writes a TREC run file (see [`Run::to_trec_string`]).
    pub fn write_trec(
        &self,
        path: impl AsRef<Path>,
        tie_break: TieBreak,
        tag: Option<&str>,
    ) -> Result<()> {
        let text = self.to_trec_string(tie_break, tag)?;
        write_text(path.as_ref(), "TREC run file", &text)
    }
}

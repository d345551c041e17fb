//! Relevance judgments (qrels): BEIR tsv and TREC formats.

use std::fmt::Write as _;
use std::path::Path;

use indexmap::IndexMap;

use crate::error::{EvalError, Result};
use crate::io_util::{read_text, write_text};

/// On-disk layout of a qrels file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QrelsFormat {
    /// BEIR: tab-separated `query-id corpus-id score`, normally after a header line
    /// `query-id\tcorpus-id\tscore`.
    BeirTsv,
    /// TREC: whitespace-separated `qid iteration docid relevance` (the iteration column is ignored).
    Trec,
}

/// Graded relevance judgments: for each query, the judged documents and their relevance.
///
/// Queries and documents keep the order in which they were first inserted. A relevance is an
/// integer and may be zero or negative (not relevant); metrics count a document as relevant when
/// its relevance is at least the metric's relevance level (1 unless asked otherwise).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Qrels {
    queries: IndexMap<String, IndexMap<String, i32>>,
}

impl Qrels {
    /// Empty qrels.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a judgment. Repeating an identical judgment is accepted; judging the same
    /// (query, document) pair twice with different relevance is an error.
    pub fn insert(&mut self, query_id: &str, doc_id: &str, relevance: i32) -> Result<()> {
        self.insert_inner(query_id, doc_id, relevance)
            .map_err(|message| EvalError::Invalid {
                what: "qrels",
                message,
            })
    }

    fn insert_inner(&mut self, query_id: &str, doc_id: &str, relevance: i32) -> Result<(), String> {
        if query_id.is_empty() || doc_id.is_empty() {
            return Err("empty query or document id".to_string());
        }
        let docs = match self.queries.get_mut(query_id) {
            Some(docs) => docs,
            None => self.queries.entry(query_id.to_string()).or_default(),
        };
        match docs.get(doc_id) {
            Some(&old) if old != relevance => Err(format!(
                "query {query_id:?}, document {doc_id:?} judged twice with different relevance ({old} and {relevance})"
            )),
            Some(_) => Ok(()),
            None => {
                docs.insert(doc_id.to_string(), relevance);
                Ok(())
            }
        }
    }

    /// Number of queries.
    pub fn len(&self) -> usize {
        self.queries.len()
    }

    /// Whether there are no queries.
    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }

    /// Total number of judgments over all queries.
    pub fn num_judgments(&self) -> usize {
        self.queries.values().map(IndexMap::len).sum()
    }

    /// Query ids in insertion order.
    pub fn query_ids(&self) -> impl Iterator<Item = &str> {
        self.queries.keys().map(String::as_str)
    }

    /// Whether the query has judgments.
    pub fn contains_query(&self, query_id: &str) -> bool {
        self.queries.contains_key(query_id)
    }

    /// The judgments of one query (document id → relevance), in insertion order.
    pub fn judgments(&self, query_id: &str) -> Option<&IndexMap<String, i32>> {
        self.queries.get(query_id)
    }

    /// Relevance of one document for one query, if judged.
    pub fn relevance(&self, query_id: &str, doc_id: &str) -> Option<i32> {
        self.queries.get(query_id)?.get(doc_id).copied()
    }

    /// All queries with their judgments.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &IndexMap<String, i32>)> {
        self.queries.iter().map(|(q, d)| (q.as_str(), d))
    }

    /// Reads a qrels file, detecting its format from the first non-blank line: three
    /// tab-separated fields is BEIR tsv (a first line whose score is not an integer is taken as
    /// the header), four whitespace-separated fields is TREC.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_text(path, "qrels file (BEIR tsv or TREC qrels)")?;
        Self::parse(&text, path, None)
    }

    /// Reads a qrels file in the given format.
    pub fn read_format(path: impl AsRef<Path>, format: QrelsFormat) -> Result<Self> {
        let path = path.as_ref();
        let what = match format {
            QrelsFormat::BeirTsv => "BEIR qrels file (query-id, corpus-id, score; tab-separated)",
            QrelsFormat::Trec => "TREC qrels file (qid iteration docid relevance)",
        };
        let text = read_text(path, what)?;
        Self::parse(&text, path, Some(format))
    }

    /// Detects the format of qrels text (see [`Qrels::read`]). `None` when there is no
    /// non-blank line or the first one fits neither format.
    pub fn detect_format(text: &str) -> Option<QrelsFormat> {
        let first = text.lines().find(|l| !l.trim().is_empty())?;
        let first = first.trim_end_matches('\r');
        if first.split('\t').count() == 3 {
            Some(QrelsFormat::BeirTsv)
        } else if first.split_whitespace().count() == 4 {
            Some(QrelsFormat::Trec)
        } else {
            None
        }
    }

    /// Parses qrels text; `path` only names the source in errors. With `format` `None` the
    /// format is detected. Blank lines are skipped. An input without judgments is an error.
    pub fn parse(text: &str, path: &Path, format: Option<QrelsFormat>) -> Result<Self> {
        let format = match format {
            Some(f) => f,
            None => Self::detect_format(text).ok_or_else(|| {
                let line = text
                    .lines()
                    .position(|l| !l.trim().is_empty())
                    .map_or(1, |i| i + 1);
                EvalError::parse(
                    path,
                    line,
                    "unrecognised qrels format: expected BEIR tsv (query-id<TAB>corpus-id<TAB>score) \
                     or TREC qrels (qid 0 docid relevance)",
                )
            })?,
        };
        let mut qrels = Qrels::new();
        let mut seen_first = false;
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let first = !seen_first;
            seen_first = true;
            let (query_id, doc_id, rel) = match format {
                QrelsFormat::BeirTsv => {
                    let fields: Vec<&str> = line.split('\t').collect();
                    if fields.len() != 3 {
                        return Err(EvalError::parse(
                            path,
                            line_no,
                            format!(
                                "expected 3 tab-separated fields (query-id, corpus-id, score), found {}",
                                fields.len()
                            ),
                        ));
                    }
                    let rel = fields[2].trim();
                    if first && rel.parse::<i32>().is_err() {
                        // Header line, e.g. "query-id\tcorpus-id\tscore".
                        continue;
                    }
                    (fields[0].trim(), fields[1].trim(), rel)
                }
                QrelsFormat::Trec => {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    if fields.len() != 4 {
                        return Err(EvalError::parse(
                            path,
                            line_no,
                            format!(
                                "expected 4 whitespace-separated fields (qid iteration docid relevance), found {}",
                                fields.len()
                            ),
                        ));
                    }
                    (fields[0], fields[2], fields[3])
                }
            };
            let rel: i32 = rel.parse().map_err(|_| {
                EvalError::parse(
                    path,
                    line_no,
                    format!("relevance {rel:?} is not an integer"),
                )
            })?;
            qrels
                .insert_inner(query_id, doc_id, rel)
                .map_err(|m| EvalError::parse(path, line_no, m))?;
        }
        if qrels.is_empty() {
            return Err(EvalError::parse(path, 1, "no judgments found"));
        }
        Ok(qrels)
    }

    /// Renders in the given format (BEIR tsv includes the header line).
    pub fn to_string_format(&self, format: QrelsFormat) -> Result<String> {
        let mut out = String::new();
        if format == QrelsFormat::BeirTsv {
            out.push_str("query-id\tcorpus-id\tscore\n");
        }
        for (q, docs) in self.iter() {
            for (d, rel) in docs {
                match format {
                    QrelsFormat::BeirTsv => {
                        if q.contains(['\t', '\n']) || d.contains(['\t', '\n']) {
                            return Err(EvalError::Invalid {
                                what: "qrels",
                                message: format!("id {q:?} or {d:?} contains a tab or newline"),
                            });
                        }
                        let _ = writeln!(out, "{q}\t{d}\t{rel}");
                    }
                    QrelsFormat::Trec => {
                        if q.contains(char::is_whitespace) || d.contains(char::is_whitespace) {
                            return Err(EvalError::Invalid {
                                what: "qrels",
                                message: format!(
                                    "id {q:?} or {d:?} contains whitespace; TREC format cannot hold it"
                                ),
                            });
                        }
                        let _ = writeln!(out, "{q} 0 {d} {rel}");
                    }
                }
            }
        }
        Ok(out)
    }

    /// Writes a qrels file in the given format.
    pub fn write(&self, path: impl AsRef<Path>, format: QrelsFormat) -> Result<()> {
        let text = self.to_string_format(format)?;
        write_text(path.as_ref(), "qrels file", &text)
    }
}

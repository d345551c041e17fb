//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading evaluation data or computing metrics.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file or directory could not be opened, read or written.
    #[error("cannot access {what} at {}: {source}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// What was expected there, e.g. "BEIR corpus (corpus.jsonl)".
        what: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A line of an input file is malformed.
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },

    /// A corpus or queries file is malformed (a line, a duplicate id, no record), from latte-core's reader.
    #[error(transparent)]
    Input(#[from] latte_core::Error),

    /// The requested split has no qrels file in a BEIR folder.
    #[error(
        "split {split:?} not found: expected {}; available splits: {}",
        path.display(),
        if available.is_empty() { "none".to_string() } else { available.join(", ") }
    )]
    MissingSplit {
        /// The split asked for.
        split: String,
        /// The qrels file that would hold it.
        path: PathBuf,
        /// Splits that do exist (file stems of `qrels/*.tsv`).
        available: Vec<String>,
    },

    /// Qrels name queries or documents absent from the dataset.
    #[error(
        "{}: qrels name {count} unknown {kind} id(s), e.g. {}",
        path.display(),
        examples.join(", ")
    )]
    UnknownIds {
        /// The qrels file.
        path: PathBuf,
        /// "query" or "document".
        kind: &'static str,
        /// How many distinct unknown ids.
        count: usize,
        /// The first few of them, in file order.
        examples: Vec<String>,
    },

    /// A parent folder holds no BEIR dataset.
    #[error("{} holds no BEIR dataset: expected subfolders containing corpus.jsonl, queries.jsonl and qrels/", path.display())]
    NoDatasets {
        /// The parent folder.
        path: PathBuf,
    },

    /// A metric name could not be parsed.
    #[error("invalid metric {spec:?}: {reason}")]
    InvalidMetric {
        /// The text given.
        spec: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A run or qrels built in memory is inconsistent (duplicate ids, NaN scores, ...).
    #[error("invalid {what}: {message}")]
    Invalid {
        /// What is invalid: "run", "qrels" or "collection report".
        what: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Shorthand for results in this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

impl EvalError {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        what: impl Into<String>,
        source: std::io::Error,
    ) -> Self {
        EvalError::Io {
            path: path.into(),
            what: what.into(),
            source,
        }
    }

    pub(crate) fn parse(path: impl Into<PathBuf>, line: usize, message: impl Into<String>) -> Self {
        EvalError::Parse {
            path: path.into(),
            line,
            message: message.into(),
        }
    }
}

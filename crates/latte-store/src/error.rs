//! Typed errors of the document store.

use std::path::PathBuf;

use crate::filter::FilterError;

/// Everything a [`crate::DocStore`] call can fail with. Errors about the file name it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error while working on the file.
    #[error("{path}: SQLite error: {source}")]
    Sqlite {
        /// The store file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The file exists but is not a SQLite database, or is one that is not a latte document store.
    #[error("{path}: not a latte document store: {detail}")]
    NotADocStore {
        /// The file.
        path: PathBuf,
        /// What was expected and what was found.
        detail: String,
    },
    /// `DocStore::open` on a file that does not exist.
    #[error("{path}: no such document store (create it with DocStore::create)")]
    NotFound {
        /// The missing file.
        path: PathBuf,
    },
    /// `DocStore::create` on a path that already exists.
    #[error("{path}: already exists; open it with DocStore::open instead")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file system error outside SQLite (creating the file).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The store was written by a newer (or unknown) schema version.
    #[error("{path}: document store schema version {found} is not supported (this build reads version {supported})")]
    UnsupportedSchema {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: i64,
        /// The version this build reads and writes.
        supported: i64,
    },
    /// A write asked for a generation older than the store's.
    #[error("{path}: generation {requested} is older than the store's generation {current}")]
    GenerationRegressed {
        /// The file.
        path: PathBuf,
        /// The store's generation.
        current: u64,
        /// The generation the call asked for.
        requested: u64,
    },
    /// `rollback_to` asked for a generation the undo log cannot reach.
    #[error(
        "{path}: cannot roll back from generation {current} to {requested}: the undo log reaches back to generation {oldest} only"
    )]
    RollbackUnavailable {
        /// The file.
        path: PathBuf,
        /// The store's generation.
        current: u64,
        /// The generation asked for.
        requested: u64,
        /// The oldest generation the store can be brought back to.
        oldest: u64,
    },
    /// `reconcile` found the store behind the vector index: the commit protocol was not followed.
    #[error(
        "{path}: the document store is at generation {store} but the index is at generation {index}; the store must be committed before the index"
    )]
    StoreBehind {
        /// The file.
        path: PathBuf,
        /// The store's generation.
        store: u64,
        /// The index's generation.
        index: u64,
    },
    /// `rollback_to` asked for a generation newer than the store's.
    #[error("{path}: cannot roll forward from generation {current} to {requested}")]
    CannotRollForward {
        /// The file.
        path: PathBuf,
        /// The store's generation.
        current: u64,
        /// The generation asked for.
        requested: u64,
    },
    /// A generation number above `i64::MAX` (SQLite stores signed 64-bit integers).
    #[error("generation {0} is too large (at most 9223372036854775807)")]
    GenerationTooLarge(u64),
    /// A document (or a list of ids) handed to a write is invalid.
    #[error("invalid document {id:?}: {reason}")]
    InvalidDocument {
        /// The document's id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A malformed filter.
    #[error("invalid filter: {0}")]
    Filter(#[from] FilterError),
    /// A keyword query with too many terms.
    #[error("keyword query has {got} terms; at most {max} are allowed")]
    QueryTooLong {
        /// Terms in the query.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A read view opened at an index generation the store can no longer show (the index was written to
    /// more than once since the view's index was opened): reopen the index.
    #[error(
        "{path}: the document store is at generation {store} and can show generations {oldest}..={store} only, \
         not {view} (the index was written since it was opened; reopen it)"
    )]
    ViewUnavailable {
        /// The file.
        path: PathBuf,
        /// The generation the view was opened for.
        view: u64,
        /// The store's generation.
        store: u64,
        /// The oldest generation the store can show.
        oldest: u64,
    },
    /// A write through a read view ([`crate::DocStore::open_view`]).
    #[error("{path}: this connection is a read view at generation {view}; writes go through the index's writer")]
    ReadOnlyView {
        /// The file.
        path: PathBuf,
        /// The generation the view shows.
        view: u64,
    },
    /// A value stored in the file does not have the expected shape (e.g. metadata that is not a JSON object).
    #[error("{path}: corrupt row for document {id:?}: {detail}")]
    CorruptRow {
        /// The file.
        path: PathBuf,
        /// The document id.
        id: String,
        /// What was expected and what was found.
        detail: String,
    },
}

/// Errors of the fusion functions.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FusionError {
    /// A parameter outside its range.
    #[error("{name} must be {expected}, got {got}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// Its allowed range.
        expected: &'static str,
        /// The value given.
        got: f64,
    },
    /// A score that is NaN or infinite.
    #[error("list {list}, document {id:?}: score {score} is not finite")]
    NonFiniteScore {
        /// Index of the list among the inputs.
        list: usize,
        /// The document id.
        id: String,
        /// The score.
        score: f64,
    },
}

use std::path::PathBuf;

/// Errors returned by latte-index.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file failed its checks (magic, kind, length or checksum): the index must not be used.
    #[error("{} is corrupt or truncated: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A file was written by a format version this build cannot read.
    #[error(
        "{} has index format version {found}, this build reads versions {oldest} to {current}; \
         rebuild the index with this version of latte",
        path.display()
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Oldest version this build reads.
        oldest: u32,
        /// Version this build writes.
        current: u32,
    },
    /// The directory holds no latte index.
    #[error("{} is not a latte index (no meta.lt in it)", .0.display())]
    NotAnIndex(PathBuf),
    /// Another writer (in this or another process) holds the OS lock on the index's `LOCK` file.
    #[error(
        "the index at {} is being written by another process ({}), which holds the lock on {}; \
         wait for it to finish",
        path.display(), holder(*.pid), lock.display()
    )]
    Locked {
        /// Index directory.
        path: PathBuf,
        /// Lock file.
        lock: PathBuf,
        /// The holder's process id, as it wrote it into the lock file (`None` if not readable yet).
        pid: Option<u32>,
    },
    /// An embedding dimension does not match.
    #[error("dimension mismatch in {what}: expected {expected}, got {got}")]
    DimensionMismatch {
        /// What was being checked.
        what: String,
        /// Expected dimension.
        expected: usize,
        /// Dimension found.
        got: usize,
    },
    /// Array shapes do not fit together.
    #[error("invalid shape: {0}")]
    Shape(String),
    /// An argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The index holds no (live) documents.
    #[error("the index is empty: add documents before searching")]
    EmptyIndex,
    /// Ids to delete that the index does not hold.
    #[error("unknown document id(s), nothing was deleted: {0}")]
    UnknownIds(String),
    /// An id that is already in the index or repeated in the input.
    #[error("duplicate document id {0:?}: ids must be unique in an index")]
    DuplicateId(String),
    /// A document with no token embeddings.
    #[error("document {0:?} has no token embeddings")]
    EmptyDocument(String),
    /// Shared plumbing (`.npz` files, ...) failed. Shape errors of `latte_core` become [`Error::Shape`].
    #[error(transparent)]
    Core(latte_core::Error),
    /// The document store (`latte_store`) failed: filters, BM25, stored documents.
    #[error(transparent)]
    Store(#[from] latte_store::StoreError),
    /// The index has no document store (it was written before latte stored documents); its next writer
    /// (an add or a delete) creates one.
    #[error(
        "{} has no document store (documents.sqlite): the index was built before latte stored text and \
         metadata; rebuild it with its text, or run any add or delete to create the store (ids only)",
        .0.display()
    )]
    NoDocumentStore(std::path::PathBuf),
    /// Fusing result lists failed (a bad fusion parameter).
    #[error(transparent)]
    Fusion(#[from] latte_store::FusionError),
    /// A [`crate::DocumentSource`] failed.
    #[error("reading documents: {0}")]
    Source(String),
}

impl From<latte_core::Error> for Error {
    fn from(e: latte_core::Error) -> Self {
        match e {
            latte_core::Error::Shape(s) => Error::Shape(s),
            e => Error::Core(e),
        }
    }
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("pid {p}"),
        None => "pid unknown".into(),
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in latte-core. Every variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be opened, read or written.
    #[error("cannot access {} ({what}): {source}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// What was expected there.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A `.npy` / `.npz` file is malformed, truncated or of an unsupported kind.
    #[error("{}: {reason}", path.display())]
    Npz {
        /// The file (with `:entry` for an array inside an archive).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A line of a corpus or queries file is malformed.
    #[error("{}:{line}: {message}", path.display())]
    Input {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// Two records of one file share an id.
    #[error("{}:{line}: duplicate _id {} (first on line {first})", path.display(), short_id(id))]
    DuplicateId {
        /// The file.
        path: PathBuf,
        /// The repeated id.
        id: String,
        /// Line of its first occurrence.
        first: usize,
        /// Line of the repetition.
        line: usize,
    },
    /// A corpus or queries file holds no record.
    #[error("{}: no {what} (expected {expected})", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
        /// "documents" or "queries".
        what: &'static str,
        /// What a record looks like.
        expected: &'static str,
    },
    /// Array shapes do not fit together.
    #[error("invalid shape: {0}")]
    Shape(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        what: impl Into<String>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            path: path.into(),
            what: what.into(),
            source,
        }
    }

    pub(crate) fn npz(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Npz {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// An id as error messages show it: quoted, and, beyond 200 bytes, its first 100 characters followed by
/// `… (N bytes)`, so a huge id never floods a terminal.
pub fn short_id(id: &str) -> String {
    if id.len() <= 200 {
        format!("{id:?}")
    } else {
        let head: String = id.chars().take(100).collect();
        format!("{head:?}… ({} bytes)", id.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_ids_are_shortened() {
        assert_eq!(short_id("ab"), "\"ab\"");
        let long = "x".repeat(10_000);
        let s = short_id(&long);
        assert!(s.len() < 130, "{s}");
        assert!(s.ends_with("… (10000 bytes)"), "{s}");
    }
}

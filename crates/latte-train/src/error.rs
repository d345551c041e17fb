use std::path::PathBuf;

/// Errors of `latte-train`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model error (loading, encoding, saving).
    #[error(transparent)]
    Model(#[from] latte_models::Error),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A training data file is malformed or lacks what the loss needs.
    #[error("{path}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line or row number where there is one.
        message: String,
    },
    /// A checkpoint folder is missing a file or is inconsistent.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An invalid argument or configuration value.
    #[error("{0}")]
    Invalid(String),
    /// An evaluation failed.
    #[error("evaluation: {0}")]
    Eval(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Data {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result alias of `latte-train`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

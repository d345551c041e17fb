//! The error type of `latte-models`.

use std::path::PathBuf;

/// Everything that can go wrong while loading, building, encoding or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model needs is missing.
    #[error("missing file {path}: expected {expected}")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// What the file should have contained.
        expected: String,
    },
    /// A file exists but cannot be read or parsed.
    #[error("cannot read {path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// Why it could not be used.
        reason: String,
    },
    /// The model's backbone architecture is not implemented.
    #[error("unsupported architecture {found:?} in {path}; latte supports: {supported}")]
    UnsupportedArchitecture {
        /// What the config named.
        found: String,
        /// The config file.
        path: PathBuf,
        /// The supported architectures, comma separated.
        supported: String,
    },
    /// An activation function name that latte cannot build.
    #[error("unknown activation function {0:?}; supported: {1}")]
    UnknownActivation(String, String),
    /// A weight tensor is missing from the checkpoint.
    #[error("weight {name:?} not found in {path}")]
    MissingWeight {
        /// The tensor name.
        name: String,
        /// The checkpoint.
        path: PathBuf,
    },
    /// A tensor or argument has the wrong shape.
    #[error("wrong shape for {what}: expected {expected}, got {got}")]
    Shape {
        /// What was checked.
        what: String,
        /// The expected shape.
        expected: String,
        /// The shape found.
        got: String,
    },
    /// An invalid setting or argument.
    #[error("{0}")]
    Invalid(String),
    /// The model could not be found locally or on the Hugging Face Hub.
    #[error("cannot resolve model {model:?}: {reason}")]
    Resolve {
        /// The model id or path.
        model: String,
        /// Why.
        reason: String,
    },
    /// A tokenizer error.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor library error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn bad(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

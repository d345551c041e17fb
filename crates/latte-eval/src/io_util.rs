//! Small file helpers that attach the path and what was expected to I/O errors.

use std::path::Path;

use crate::error::{EvalError, Result};

/// Reads a whole UTF-8 text file; `what` describes the expected content for the error message.
pub(crate) fn read_text(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| EvalError::io(path, what, e))
}

/// Writes a whole text file, creating or truncating it.
pub(crate) fn write_text(path: &Path, what: &str, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| EvalError::io(path, what, e))
}

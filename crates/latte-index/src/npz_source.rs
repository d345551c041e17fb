//! A [`DocumentSource`] reading `.npz` archives of float32 arrays lazily, one document at a time, with
//! positioned reads (the archive is never loaded whole): latte-core's [`NpzArchive`] plus external ids.
//! Handles what `numpy.savez` and `latte encode` write: uncompressed (stored) entries `arr_0 … arr_{n-1}`
//! holding C-order `<f4` 2-D arrays, zip64 included.

use std::borrow::Cow;
use std::path::Path;

use latte_core::npz::NpzArchive;

use crate::plaid::DocumentSource;
use crate::{Error, Result};

/// Lazily read `.npz` embeddings plus their external ids.
#[derive(Debug)]
pub struct NpzSource {
    archive: NpzArchive,
    ids: Vec<String>,
}

impl NpzSource {
    /// Opens `path` (reading only the zip directory and array headers). Fails with a clear error naming the
    /// file for compressed entries, other dtypes, ragged dimensions or a truncated archive.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let archive = NpzArchive::open(path)?;
        let ids = (0..archive.len()).map(|i| i.to_string()).collect();
        Ok(Self { archive, ids })
    }

    /// Replaces the ids (by default `"0"`, `"1"`, …); there must be one per array.
    pub fn with_ids(mut self, ids: Vec<String>) -> Result<Self> {
        if ids.len() != self.archive.len() {
            return Err(Error::Source(format!(
                "{}: {} arrays but {} ids",
                self.archive.path().display(),
                self.archive.len(),
                ids.len()
            )));
        }
        self.ids = ids;
        Ok(self)
    }
}

impl DocumentSource for NpzSource {
    fn len(&self) -> usize {
        self.archive.len()
    }
    fn dim(&self) -> usize {
        self.archive.dim()
    }
    fn id(&self, i: usize) -> String {
        self.ids[i].clone()
    }
    fn embeddings(&self, i: usize) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Owned(self.archive.read(i)?))
    }
}

//! A [`DocumentSource`] spooled to a temporary file: documents are written once, in order, and read back one at
//! a time with positioned reads. It lets a build that must see a corpus more than once (a training sample, then
//! every document) hold only a bounded part of it in memory: `latte index --corpus` spools the documents it
//! encodes before the centroids exist, and [`crate::PlaidIndex::create`] spools the documents it pools, so each
//! is pooled once.
//!
//! The file is unnamed where the OS allows it (`tempfile::tempfile_in`) and removed when the source is dropped
//! or the process dies.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::plaid::DocumentSource;
use crate::{Error, Result};

/// Writes documents to a temporary file; [`SpoolWriter::finish`] turns it into a [`SpooledSource`].
#[derive(Debug)]
pub struct SpoolWriter {
    dir: PathBuf,
    out: BufWriter<File>,
    dim: usize,
    ids: Vec<String>,
    /// Token offset of each document, plus the end (`ids.len() + 1` entries).
    starts: Vec<u64>,
}

impl SpoolWriter {
    /// Starts a spool of `dim`-dimensional documents in a temporary file in `dir` (which must exist).
    pub fn new_in(dir: impl AsRef<Path>, dim: usize) -> Result<Self> {
        let dir = dir.as_ref();
        if dim == 0 {
            return Err(Error::InvalidArgument(
                "embedding dimension must be positive, got 0".into(),
            ));
        }
        let file = tempfile::tempfile_in(dir).at(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            dim,
            ids: Vec::new(),
            starts: vec![0],
        })
    }

    /// The embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Documents written so far.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no document was written.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Appends a document (`tokens × dim` values, row-major).
    pub fn push(&mut self, id: impl Into<String>, embeddings: &[f32]) -> Result<()> {
        let id = id.into();
        if !embeddings.len().is_multiple_of(self.dim) {
            return Err(Error::Shape(format!(
                "document {id:?}: {} values are not whole rows of dimension {}",
                embeddings.len(),
                self.dim
            )));
        }
        let mut bytes = Vec::with_capacity(embeddings.len() * 4);
        for v in embeddings {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.out.write_all(&bytes).at(&self.dir)?;
        let end = self.starts[self.starts.len() - 1] + (embeddings.len() / self.dim) as u64;
        self.starts.push(end);
        self.ids.push(id);
        Ok(())
    }

    /// Appends every document of `source`, in order.
    pub fn push_all(&mut self, source: &dyn DocumentSource) -> Result<()> {
        if source.dim() != self.dim {
            return Err(Error::DimensionMismatch {
                what: "documents to spool".into(),
                expected: self.dim,
                got: source.dim(),
            });
        }
        for i in 0..source.len() {
            self.push(source.id(i), &source.embeddings(i)?)?;
        }
        Ok(())
    }

    /// Flushes the file and makes it readable as a [`DocumentSource`].
    pub fn finish(self) -> Result<SpooledSource> {
        let Self {
            dir,
            out,
            dim,
            ids,
            starts,
        } = self;
        let file = out.into_inner().map_err(|e| Error::Io {
            path: dir.clone(),
            source: e.into_error(),
        })?;
        Ok(SpooledSource {
            dir,
            file,
            dim,
            ids,
            starts,
        })
    }
}

/// Documents spooled by a [`SpoolWriter`], read back one at a time (the file is removed on drop).
#[derive(Debug)]
pub struct SpooledSource {
    dir: PathBuf,
    file: File,
    dim: usize,
    ids: Vec<String>,
    starts: Vec<u64>,
}

impl SpooledSource {
    /// Total token vectors held.
    pub fn tokens(&self) -> u64 {
        self.starts[self.starts.len() - 1]
    }
}

impl DocumentSource for SpooledSource {
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn id(&self, i: usize) -> String {
        self.ids[i].clone()
    }
    fn embeddings(&self, i: usize) -> Result<Cow<'_, [f32]>> {
        let row = 4 * self.dim as u64;
        let (start, end) = (self.starts[i], self.starts[i + 1]);
        let mut bytes = vec![0u8; ((end - start) * row) as usize];
        self.file
            .read_exact_at(&mut bytes, start * row)
            .map_err(|source| Error::Io {
                path: self.dir.clone(),
                source,
            })?;
        Ok(Cow::Owned(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }
}

/// Spools `map(i)` for every document `i` of `source` (computed in parallel batches of 256, written in order)
/// into a temporary file in `dir`.
pub(crate) fn spool_each<'a, F>(
    dir: &Path,
    source: &'a dyn DocumentSource,
    map: F,
) -> Result<SpooledSource>
where
    F: Fn(usize) -> Result<Cow<'a, [f32]>> + Sync,
{
    use rayon::prelude::*;
    let mut spool = SpoolWriter::new_in(dir, source.dim())?;
    let n = source.len();
    let mut start = 0;
    while start < n {
        let end = (start + 256).min(n);
        let docs: Vec<Cow<'a, [f32]>> = (start..end)
            .into_par_iter()
            .map(&map)
            .collect::<Result<_>>()?;
        for (j, d) in docs.iter().enumerate() {
            spool.push(source.id(start + j), d)?;
        }
        start = end;
    }
    spool.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VecSource;

    #[test]
    fn spooled_documents_read_back_unchanged_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = VecSource::new(3);
        src.push("a", vec![1.0, -2.5, 3.25]).unwrap();
        src.push("b", vec![]).unwrap();
        src.push("c", (0..12).map(|v| v as f32 * 0.1 - 0.4).collect())
            .unwrap();
        let mut w = SpoolWriter::new_in(dir.path(), 3).unwrap();
        w.push_all(&src).unwrap();
        w.push("d", &[f32::MIN_POSITIVE, f32::MAX, -0.0]).unwrap();
        assert_eq!(w.len(), 4);
        let spool = w.finish().unwrap();
        assert_eq!((spool.len(), spool.dim(), spool.tokens()), (4, 3, 6));
        for i in [3usize, 0, 2, 1] {
            let want: Vec<f32> = if i == 3 {
                vec![f32::MIN_POSITIVE, f32::MAX, -0.0]
            } else {
                src.embeddings(i).unwrap().into_owned()
            };
            let got = spool.embeddings(i).unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        assert_eq!(spool.id(2), "c");
        // Nothing is left in the folder (the file is unnamed or already unlinked).
        drop(spool);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn ragged_and_mismatched_documents_are_refused_with_their_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::new_in(dir.path(), 4).unwrap();
        let err = w.push("doc-7", &[1.0; 6]).unwrap_err().to_string();
        assert!(
            err.contains("doc-7") && err.contains("dimension 4"),
            "{err}"
        );
        assert!(w.push_all(&VecSource::new(8)).is_err());
        assert!(SpoolWriter::new_in(dir.path(), 0).is_err());
        assert!(SpoolWriter::new_in(dir.path().join("missing"), 4).is_err());
    }
}

//! The one writer of an index ([`IndexWriter`], in the manner of tantivy's `IndexWriter`) and its lock.
//!
//! A writer holds an exclusive OS file lock on `<dir>/LOCK` ([`std::fs::File::try_lock`]): the operating system
//! releases it when the holder exits, however it exits, so a `LOCK` file left by a killed writer (or by an
//! older version of latte, which used the file's existence as the lock) blocks nobody. The holder writes its
//! pid into the file after locking, for the error a second writer gets ([`Error::Locked`]).
//!
//! The writer opens the index once (every checksum verified then). Each operation writes new files and
//! verifies only those; [`IndexWriter::commit`] makes the changes visible by replacing `meta.lt`. Readers
//! opened earlier keep their view until they reopen. Dropping a writer without committing discards its
//! uncommitted changes (their files are removed) and releases the lock.

use std::collections::HashSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use latte_store::{Doc, DocStore, Filter};

use super::build::{compact_into, pool_to_spool, train, validate_ids, write_chunk, write_ivf};
use super::config::IndexConfig;
use super::documents::{build_store, open_writer_store, remove_store, store_rows};
use super::layout::{collect_garbage, commit, read_meta, Meta, CODEC, LOCK, META};
use super::shared_codec::{IndexCodec, PoolingSource};
use super::{DocumentSource, PlaidIndex};
use crate::error::IoContext;
use crate::storage::{as_bytes, write_sections, FORMAT_VERSION};
use crate::{Error, Result};

/// What an add (or the initial build) did.
#[derive(Debug, Clone, PartialEq)]
pub struct AddReport {
    /// Documents added.
    pub documents: usize,
    /// Token vectors stored (after pooling).
    pub tokens: u64,
    /// Whether the centroids and codec were trained by this call (first build).
    pub trained: bool,
    /// Number of centroids.
    pub num_centroids: usize,
    /// Fraction of the new tokens whose residual norm exceeds the codec's 0.75-quantile threshold. About
    /// 0.25 when the new documents look like the training data; much higher means the centroids have
    /// drifted from the corpus and a rebuild would improve quality.
    pub outlier_fraction: f64,
    /// Ids that the index held before this call, in source order: their vectors, text and metadata were
    /// replaced (they count in `documents` too).
    pub replaced: Vec<String>,
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq)]
pub struct DeleteReport {
    /// Documents deleted.
    pub deleted: usize,
    /// Live documents left.
    pub remaining: usize,
    /// Whether the index was compacted (deleted documents physically removed).
    pub compacted: bool,
    /// Ids asked for that the index holds no live document for (unknown or already deleted), in the order
    /// given. [`IndexWriter::delete`] deletes the others; [`PlaidIndex::delete`] refuses the whole call.
    pub not_found: Vec<String>,
}

/// An exclusive OS lock on `<dir>/LOCK`, released (and the file removed) on drop, or by the OS when the
/// process dies.
#[derive(Debug)]
pub(super) struct WriterLock {
    path: PathBuf,
    _file: File,
}

impl WriterLock {
    pub(super) fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK);
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .at(&path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::Locked {
                        path: dir.to_path_buf(),
                        pid: read_pid(&path),
                        lock: path,
                    })
                }
                Err(TryLockError::Error(source)) => return Err(Error::Io { path, source }),
            }
            // A holder removes LOCK when it releases the lock: if that happened between our open and our lock,
            // we hold the lock of a removed file. Open the path again.
            if !still_at(&file, &path) {
                continue;
            }
            file.set_len(0).at(&path)?;
            writeln!(file, "pid {}", std::process::id()).at(&path)?;
            file.sync_all().at(&path)?;
            return Ok(Self { path, _file: file });
        }
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        // Removed while still locked (the file closes after this), so nobody locks a removed file for long.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pid a lock holder wrote into its lock file (`pid N`).
fn read_pid(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().strip_prefix("pid ")?.trim().parse().ok()
}

/// Whether `path` still names the open `file`.
#[cfg(unix)]
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn still_at(_file: &File, path: &Path) -> bool {
    path.exists()
}

/// Refuses an embedding dimension the index cannot store (residuals are packed whole bytes per 8 dimensions).
fn check_dim(dim: usize) -> Result<()> {
    if dim == 0 || !dim.is_multiple_of(8) {
        return Err(Error::InvalidArgument(format!(
            "embedding dimension must be a positive multiple of 8, got {dim}"
        )));
    }
    Ok(())
}

/// The writer of one index: [`PlaidIndex::writer`] opens it. It holds the index's lock until dropped, and
/// keeps the document store (`documents.sqlite`) in step with the vector files: each operation writes its
/// vector files, then its store rows under the generation the next `meta.lt` will have; [`IndexWriter::commit`]
/// commits the store (that generation) first and `meta.lt` second. Readers of the index at the committed
/// generation keep seeing its documents meanwhile ([`PlaidIndex::open_store`]); a writer dropped without
/// committing rolls the store back, and the next writer rolls back a store left ahead by a killed one.
///
/// When an operation fails after it started writing, a writer with no other uncommitted change returns to
/// the committed state and stays usable; one with uncommitted changes refuses further operations and
/// commits (drop it: the changes are discarded).
///
/// ```no_run
/// # fn main() -> latte_index::Result<()> {
/// use latte_index::{PlaidIndex, VecSource};
/// let mut more = VecSource::new(128);
/// more.push("doc-9", vec![0.1; 128])?;
/// let mut writer = PlaidIndex::writer("my-index")?;
/// writer.add(&more)?;
/// let report = writer.delete(&["doc-3".to_string()])?;
/// assert!(report.not_found.is_empty());
/// writer.commit()?; // nothing is visible to readers before this
/// # Ok(())
/// # }
/// ```
pub struct IndexWriter {
    dir: PathBuf,
    /// The index as this writer has written it, committed or not.
    index: PlaidIndex,
    /// The metadata in `meta.lt` now.
    committed: Meta,
    dirty: bool,
    /// The document store, read-write (it holds the uncommitted changes too).
    store: DocStore,
    /// An operation failed while other changes were uncommitted.
    poisoned: bool,
    _lock: WriterLock,
}

impl std::fmt::Debug for IndexWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexWriter")
            .field("dir", &self.dir)
            .field("documents", &self.index.len())
            .field("uncommitted", &self.dirty)
            .finish()
    }
}

impl PlaidIndex {
    /// The writer of the index in `dir`: takes the index's lock (a second writer, in this process or
    /// another, gets [`Error::Locked`] naming the holder's pid) and opens the index once.
    pub fn writer(dir: impl AsRef<Path>) -> Result<IndexWriter> {
        IndexWriter::open(dir.as_ref())
    }

    /// Builds a new index in `dir` (created if missing) from `source`. Fails if `dir` already holds an index;
    /// a folder left by an interrupted creation (no committed `meta.lt`) is cleared and built again.
    ///
    /// `source` is streamed (a sample for k-means, then every document in batches): memory is bounded by the
    /// k-means training set, not the corpus. With `pool_factor > 1` each document is pooled once, into an
    /// unnamed temporary file in `dir` that the build then reads.
    pub fn create(
        dir: impl AsRef<Path>,
        source: &dyn DocumentSource,
        config: &IndexConfig,
    ) -> Result<AddReport> {
        Self::create_with_documents(dir, source, &[], config)
    }

    /// Builds a new index in `dir` like [`PlaidIndex::create`], with the documents' text and metadata in
    /// its document store: `docs` are matched to `source` by id (a doc whose id the source lacks is an
    /// error; a source document without a doc gets a row with its id only).
    pub fn create_with_documents(
        dir: impl AsRef<Path>,
        source: &dyn DocumentSource,
        docs: &[Doc],
        config: &IndexConfig,
    ) -> Result<AddReport> {
        Self::create_inner(dir.as_ref(), source, docs, None, config)
    }

    /// Builds a new index in `dir` like [`PlaidIndex::create_with_documents`], with the centroids and
    /// residual codec of `codec` instead of training them: indexes built with one codec encode every token
    /// the same way (the shards of one collection). `codec` must have the documents' dimension and
    /// `config.nbits` (and `config.num_centroids` when given); the other training settings of `config` are
    /// recorded but unused. [`PlaidIndex::create`] is [`PlaidIndex::train_codec`] on the documents followed
    /// by this, byte for byte.
    pub fn create_with_codec(
        dir: impl AsRef<Path>,
        source: &dyn DocumentSource,
        docs: &[Doc],
        codec: &IndexCodec,
        config: &IndexConfig,
    ) -> Result<AddReport> {
        Self::create_inner(dir.as_ref(), source, docs, Some(codec), config)
    }

    /// Trains the centroids and residual codec that [`PlaidIndex::create`] would train on `sample` with
    /// `config` (documents pooled by `config.pool_factor` first, as the index will pool them), without
    /// building an index. Memory is bounded by the k-means training set, as in a build.
    ///
    /// `sample` may be the whole collection or a sample of it: when it is a sample, set
    /// `config.num_centroids` for the whole collection (the default counts the tokens of `sample`;
    /// [`default_num_centroids`](super::default_num_centroids) gives the default for a token count).
    pub fn train_codec(sample: &dyn DocumentSource, config: &IndexConfig) -> Result<IndexCodec> {
        config.validate()?;
        check_dim(sample.dim())?;
        if sample.is_empty() {
            return Err(Error::InvalidArgument(
                "no documents to train a codec on".into(),
            ));
        }
        let (centroids, codec) = if config.pool_factor > 1 {
            let pooled = PoolingSource {
                inner: sample,
                pool_factor: config.pool_factor,
            };
            train(&pooled, config)?
        } else {
            train(sample, config)?
        };
        Ok(IndexCodec::from_trained(&centroids, codec))
    }

    /// The one build path: `codec` given, or trained on `source` (pooled).
    fn create_inner(
        dir: &Path,
        source: &dyn DocumentSource,
        docs: &[Doc],
        given: Option<&IndexCodec>,
        config: &IndexConfig,
    ) -> Result<AddReport> {
        config.validate()?;
        check_dim(source.dim())?;
        if let Some(c) = given {
            c.check_fits(source.dim(), config)?;
        }
        if source.is_empty() {
            return Err(Error::InvalidArgument("no documents to index".into()));
        }
        std::fs::create_dir_all(dir).at(dir)?;
        let _lock = WriterLock::acquire(dir)?;
        if dir.join(META).exists() {
            return Err(Error::InvalidArgument(format!(
                "{} already holds an index",
                dir.display()
            )));
        }
        // Leftovers of an interrupted creation.
        collect_garbage(dir, None);
        remove_store(dir);
        let ids = validate_ids(source, &|_| false)?;
        let rows = store_rows(&ids, docs)?;
        // Each document is pooled once: into a temporary file the training sample and the encoding pass read.
        let pooled;
        let source: &dyn DocumentSource = if config.pool_factor > 1 {
            pooled = pool_to_spool(dir, source, config.pool_factor)?;
            &pooled
        } else {
            source
        };
        let trained;
        let shared = match given {
            Some(c) => c,
            None => {
                let (centroids, codec) = train(source, config)?;
                trained = IndexCodec::from_trained(&centroids, codec);
                &trained
            }
        };
        let k = shared.num_centroids();
        // Centroids are stored in half precision; documents are encoded against the rounded values.
        let half = shared.half();
        let centroids: Vec<f32> = shared.centroids();
        let codec = shared.codec();
        let written = (|| -> Result<(u64, u64)> {
            write_sections(
                &dir.join(CODEC),
                b"CODC",
                &[
                    as_bytes(half),
                    as_bytes(&codec.cutoffs),
                    as_bytes(&codec.weights),
                    as_bytes(&[codec.cluster_threshold]),
                ],
            )?;
            let mut meta = Meta {
                format_version: FORMAT_VERSION,
                dim: source.dim(),
                num_centroids: k,
                config: config.clone(),
                generation: 1,
                next_chunk: 0,
                chunks: Vec::new(),
                deleted: Vec::new(),
            };
            let (chunk, codes, outliers) =
                write_chunk(dir, &mut meta, &centroids, &codec, source, &ids, 1)?;
            let tokens = chunk.tokens;
            meta.chunks.push(chunk);
            write_ivf(dir, &meta, None, &codes)?;
            // The store first, then meta.lt: a folder without meta.lt is no index, whatever else it holds.
            build_store(dir, &rows, meta.generation)?;
            commit(dir, &meta)?;
            Ok((tokens, outliers))
        })();
        let (tokens, outliers) = written.inspect_err(|_| {
            collect_garbage(dir, None);
            remove_store(dir);
        })?;
        Ok(AddReport {
            documents: source.len(),
            tokens,
            trained: given.is_none(),
            num_centroids: k,
            outlier_fraction: outliers as f64 / tokens.max(1) as f64,
            replaced: Vec::new(),
        })
    }

    /// Adds documents to the index in `dir` with its existing centroids and commits: a writer's
    /// [`IndexWriter::add`] + [`IndexWriter::commit`]. Nothing changes unless every document is valid
    /// (dimension, ids unique within the source, at least one token); an id the index holds is replaced.
    pub fn add(dir: impl AsRef<Path>, source: &dyn DocumentSource) -> Result<AddReport> {
        let mut w = Self::writer(dir)?;
        let report = w.add(source)?;
        w.commit()?;
        Ok(report)
    }

    /// Deletes documents by external id and commits. Fails with [`Error::UnknownIds`], deleting nothing, if
    /// any id is unknown (or already deleted); [`IndexWriter::delete`] instead deletes the known ones and
    /// reports the others. Ids of the other documents never change. When more than a fifth of the stored
    /// documents are deleted, the index is compacted (their space reclaimed).
    pub fn delete(dir: impl AsRef<Path>, ids: &[String]) -> Result<DeleteReport> {
        let mut w = Self::writer(dir)?;
        let unknown: Vec<&str> = ids
            .iter()
            .filter(|id| !w.index.contains(id))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            let shown: Vec<&str> = unknown.iter().take(10).copied().collect();
            let more = if unknown.len() > 10 {
                format!(" and {} more", unknown.len() - 10)
            } else {
                String::new()
            };
            return Err(Error::UnknownIds(format!("{shown:?}{more}")));
        }
        let report = w.delete(ids)?;
        w.commit()?;
        Ok(report)
    }

    /// Rewrites the index without its deleted documents and commits. External ids are unchanged.
    pub fn compact(dir: impl AsRef<Path>) -> Result<()> {
        let mut w = Self::writer(dir)?;
        w.compact()?;
        w.commit()
    }
}

impl IndexWriter {
    fn open(dir: &Path) -> Result<Self> {
        if !dir.join(META).exists() {
            return Err(Error::NotAnIndex(dir.to_path_buf()));
        }
        let lock = WriterLock::acquire(dir)?;
        let index = PlaidIndex::open(dir)?;
        let store = open_writer_store(dir, &index)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            committed: index.meta.clone(),
            index,
            dirty: false,
            store,
            poisoned: false,
            _lock: lock,
        })
    }

    /// The document store as this writer has written it, uncommitted changes included.
    pub fn store(&self) -> &DocStore {
        &self.store
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::InvalidArgument(format!(
                "an earlier operation of this writer of {} failed while other changes were uncommitted; \
                 drop the writer (its uncommitted changes are discarded) and open a new one",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Runs the writing part of an operation. On failure, a writer with no earlier uncommitted change goes
    /// back to the committed state (files and store rows of the failed operation removed); one with such
    /// changes is poisoned.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.check_usable()?;
        let was_dirty = self.dirty;
        op(self).inspect_err(|_| {
            if was_dirty || self.restore().is_err() {
                self.poisoned = true;
            }
        })
    }

    /// Back to the committed state: the store rolled back, the view reassembled, new files removed.
    fn restore(&mut self) -> Result<()> {
        self.store.rollback_to(self.committed.generation)?;
        if self.dirty {
            let old = &self.index;
            self.index = PlaidIndex::assemble(
                &self.dir,
                self.committed.clone(),
                old.centroids.clone(),
                old.codec.clone(),
                old.chunks.clone(),
            )?;
            self.dirty = false;
        }
        collect_garbage(&self.dir, Some(&self.committed));
        Ok(())
    }

    /// The index directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index as this writer sees it, uncommitted changes included (readers see it after
    /// [`IndexWriter::commit`]).
    pub fn index(&self) -> &PlaidIndex {
        &self.index
    }

    /// Whether there are changes not yet committed.
    pub fn has_uncommitted_changes(&self) -> bool {
        self.dirty
    }

    /// Moves the writer's view to `meta` (whose new files were just written): unchanged chunks are kept as
    /// they are, only the new files are opened and verified.
    fn advance(&mut self, meta: Meta) -> Result<()> {
        let old = &self.index;
        self.index = PlaidIndex::assemble(
            &self.dir,
            meta,
            old.centroids.clone(),
            old.codec.clone(),
            old.chunks.clone(),
        )?;
        self.dirty = true;
        Ok(())
    }

    /// The metadata of the next commit: every operation between two commits writes the same generation
    /// (the one the store's rows of those operations carry).
    fn next_meta(&self) -> Meta {
        let mut meta = self.index.meta.clone();
        meta.format_version = FORMAT_VERSION;
        meta.generation = self.committed.generation + 1;
        meta
    }

    /// Adds documents with the index's existing centroids (visible after [`IndexWriter::commit`]):
    /// [`IndexWriter::add_documents`] without text or metadata (each document's store row holds its id).
    pub fn add(&mut self, source: &dyn DocumentSource) -> Result<AddReport> {
        self.add_documents(source, &[])
    }

    /// Adds documents with their text and metadata (visible after [`IndexWriter::commit`]). `docs` are
    /// matched to `source` by id: a doc whose id the source lacks is an error, a source document without a
    /// doc gets a store row with its id only. An id the index already holds is replaced: its vectors, text
    /// and metadata together ([`AddReport::replaced`]). Nothing changes unless every document is valid
    /// (dimension, ids unique within the source, at least one token). When replaced documents make more
    /// than a fifth of the stored documents deleted, the index is compacted.
    pub fn add_documents(
        &mut self,
        source: &dyn DocumentSource,
        docs: &[Doc],
    ) -> Result<AddReport> {
        self.check_usable()?;
        let current = &self.index;
        if source.dim() != current.meta.dim {
            return Err(Error::DimensionMismatch {
                what: "documents to add".into(),
                expected: current.meta.dim,
                got: source.dim(),
            });
        }
        if source.is_empty() {
            return Err(Error::InvalidArgument("no documents to add".into()));
        }
        let ids = validate_ids(source, &|_| false)?;
        let rows = store_rows(&ids, docs)?;
        let replaced: Vec<String> = ids
            .iter()
            .filter(|id| current.contains(id))
            .cloned()
            .collect();
        self.guarded(|w| {
            let current = &w.index;
            let mut meta = w.next_meta();
            meta.deleted
                .extend(replaced.iter().map(|id| current.by_id[id.as_str()]));
            meta.deleted.sort_unstable();
            let (chunk, codes, outliers) = write_chunk(
                &w.dir,
                &mut meta,
                &current.centroids.to_f32(),
                &current.codec,
                source,
                &ids,
                current.meta.config.pool_factor,
            )?;
            let tokens = chunk.tokens;
            meta.chunks.push(chunk);
            write_ivf(&w.dir, &meta, Some(current), &codes)?;
            let num_centroids = meta.num_centroids;
            w.store.upsert(&rows, meta.generation)?;
            w.advance(meta)?;
            if !replaced.is_empty() && w.index.meta.deleted.len() * 5 > w.index.ids.len() {
                let meta = compact_into(&w.dir, &w.index, w.next_meta())?;
                w.advance(meta)?;
            }
            Ok(AddReport {
                documents: source.len(),
                tokens,
                trained: false,
                num_centroids,
                outlier_fraction: outliers as f64 / tokens.max(1) as f64,
                replaced,
            })
        })
    }

    /// Deletes the live documents with these external ids (visible after [`IndexWriter::commit`]); the
    /// others are listed in [`DeleteReport::not_found`]. Ids of the other documents never change. When more
    /// than a fifth of the stored documents are deleted, the index is compacted.
    pub fn delete(&mut self, ids: &[String]) -> Result<DeleteReport> {
        self.check_usable()?;
        let current = &self.index;
        let mut del: Vec<u32> = current.meta.deleted.clone();
        let mut seen = HashSet::new();
        let mut not_found = Vec::new();
        let mut found: Vec<&str> = Vec::new();
        for id in ids {
            match current.by_id.get(id) {
                Some(&d) if !current.deleted[d as usize] => {
                    if seen.insert(d) {
                        del.push(d);
                        found.push(id);
                    }
                }
                _ => not_found.push(id.clone()),
            }
        }
        if seen.is_empty() {
            return Ok(DeleteReport {
                deleted: 0,
                remaining: current.live,
                compacted: false,
                not_found,
            });
        }
        del.sort_unstable();
        let found: Vec<String> = found.into_iter().map(str::to_owned).collect();
        self.guarded(|w| {
            let current = &w.index;
            let mut meta = w.next_meta();
            meta.deleted = del;
            let compacted = meta.deleted.len() * 5 > current.ids.len();
            let meta = if compacted {
                compact_into(&w.dir, current, meta)?
            } else {
                // Same inverted lists, new generation name (search skips deleted documents).
                write_ivf(&w.dir, &meta, Some(current), &[])?;
                meta
            };
            let remaining = current.live - found.len();
            w.store.delete(&found, meta.generation)?;
            w.advance(meta)?;
            Ok(DeleteReport {
                deleted: found.len(),
                remaining,
                compacted,
                not_found,
            })
        })
    }

    /// Deletes the documents whose metadata matches `filter` (visible after [`IndexWriter::commit`]), as
    /// [`IndexWriter::delete`] would with their ids; no match deletes nothing.
    pub fn delete_matching(&mut self, filter: &Filter) -> Result<DeleteReport> {
        self.check_usable()?;
        let ids = self.store.ids_matching(filter)?;
        self.delete(&ids)
    }

    /// Rewrites the index without its deleted documents (visible after [`IndexWriter::commit`]). External
    /// ids are unchanged.
    pub fn compact(&mut self) -> Result<()> {
        self.guarded(|w| {
            let meta = compact_into(&w.dir, &w.index, w.next_meta())?;
            w.advance(meta)
        })
    }

    /// Makes every change since the last commit visible: the document store is committed with the new
    /// generation, then `meta.lt` is replaced atomically, then the files it no longer references are
    /// removed. Readers opened earlier keep their view until they reopen.
    pub fn commit(&mut self) -> Result<()> {
        self.check_usable()?;
        if !self.dirty {
            return Ok(());
        }
        let generation = self.index.meta.generation;
        // Operations that change no document (a compaction) still move the store to the new generation.
        self.store.upsert::<Doc>(&[], generation)?;
        if let Err(e) = commit(&self.dir, &self.index.meta) {
            // meta.lt may have been replaced before the failure (syncing the folder failed).
            if read_meta(&self.dir).is_ok_and(|m| m.generation == generation) {
                self.committed = self.index.meta.clone();
                self.dirty = false;
            }
            return Err(e);
        }
        self.committed = self.index.meta.clone();
        self.dirty = false;
        Ok(())
    }
}

impl Drop for IndexWriter {
    fn drop(&mut self) {
        // Store rows written since the last commit: back to the committed generation (the next writer would
        // do it otherwise).
        if self
            .store
            .generation()
            .is_ok_and(|g| g > self.committed.generation)
        {
            let _ = self.store.rollback_to(self.committed.generation);
        }
        // Files written since the last commit (or by a failed operation) are not referenced by meta.lt.
        collect_garbage(&self.dir, Some(&self.committed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_names_the_pid_and_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let a = WriterLock::acquire(dir.path()).unwrap();
        let err = WriterLock::acquire(dir.path()).unwrap_err();
        match &err {
            Error::Locked { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("expected Locked, got {other}"),
        }
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(a);
        assert!(!dir.path().join(LOCK).exists());
        WriterLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_stale_lock_file_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        // Left by an older version or a killed writer: a pid that is not running.
        std::fs::write(dir.path().join(LOCK), "pid 4294967\n").unwrap();
        let lock = WriterLock::acquire(dir.path()).unwrap();
        assert_eq!(read_pid(&dir.path().join(LOCK)), Some(std::process::id()));
        drop(lock);
    }
}

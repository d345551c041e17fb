//! The index's document store (`documents.sqlite`, crate `latte-store`) as the writer keeps it in step with
//! the vector files: built whole under a temporary name and renamed in (a new index, or an index written
//! before the store existed), reconciled with `meta.lt`'s generation when a writer opens the index.
//! FORMAT.md ("Generation protocol") describes the order of the commits.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use latte_store::{Doc, DocStore, Filter, StoreError};

use super::PlaidIndex;
use crate::error::IoContext;
use crate::storage::sync_dir;
use crate::{Error, Result};

/// The store's file name in the index folder.
pub(super) const STORE: &str = latte_store::FILE_NAME;
/// The name a store is built under before it is renamed to [`STORE`].
const STORE_TMP: &str = "documents.sqlite.tmp";

pub(super) fn store_path(dir: &Path) -> PathBuf {
    dir.join(STORE)
}

/// Removes a SQLite database and its side files (`-wal`, `-shm`, `-journal`).
fn remove_db(dir: &Path, name: &str) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(dir.join(format!("{name}{suffix}")));
    }
}

/// Removes a store being built when a writer was killed.
pub(super) fn remove_store_leftovers(dir: &Path) {
    remove_db(dir, STORE_TMP);
}

/// Removes the store and any half-built one (a folder whose creation was interrupted).
pub(super) fn remove_store(dir: &Path) {
    remove_db(dir, STORE_TMP);
    remove_db(dir, STORE);
}

/// Builds the store under a temporary name with `rows` at `generation`, closes it (its log folded into the
/// file) and renames it to `documents.sqlite`. A crash before the rename leaves only the temporary files.
pub(super) fn build_store(dir: &Path, rows: &[Cow<'_, Doc>], generation: u64) -> Result<()> {
    remove_store_leftovers(dir);
    let tmp = dir.join(STORE_TMP);
    let built = (|| -> Result<()> {
        let mut store = DocStore::create(&tmp)?;
        store.upsert(rows, generation)?;
        store.close()?;
        Ok(())
    })();
    if let Err(e) = built {
        remove_store_leftovers(dir);
        return Err(e);
    }
    let path = store_path(dir);
    std::fs::rename(&tmp, &path).at(&path)?;
    sync_dir(dir)
}

/// Matches `docs` to the documents of `source` by id: every doc must name a document of the source, once.
/// Returns the store row of every source document, in source order (a document without a doc gets a row
/// with its id only).
pub(super) fn store_rows<'a>(ids: &[String], docs: &'a [Doc]) -> Result<Vec<Cow<'a, Doc>>> {
    let known: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut by_id: HashMap<&str, &'a Doc> = HashMap::with_capacity(docs.len());
    for (i, doc) in docs.iter().enumerate() {
        if !known.contains(doc.id.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "document {i} (id {:?}) has text or metadata but the source has no embeddings for that id",
                doc.id
            )));
        }
        if by_id.insert(doc.id.as_str(), doc).is_some() {
            return Err(Error::InvalidArgument(format!(
                "document {i} (id {:?}): the id appears twice among the documents",
                doc.id
            )));
        }
    }
    Ok(ids
        .iter()
        .map(|id| match by_id.get(id.as_str()) {
            Some(doc) => Cow::Borrowed(*doc),
            None => Cow::Owned(Doc::new(id.clone())),
        })
        .collect())
}

/// The writer's store for `index` (opened under the writer's lock): a store left ahead by a killed writer is
/// rolled back to the index's generation; a missing store (an index written before the store existed) is
/// built with a row per live id; a store behind the index (written to by a version that did not know the
/// store) gets its ids brought in line with the live ids.
pub(super) fn open_writer_store(dir: &Path, index: &PlaidIndex) -> Result<DocStore> {
    remove_store_leftovers(dir);
    let generation = index.meta.generation;
    let path = store_path(dir);
    if !path.exists() {
        let rows: Vec<Cow<'_, Doc>> = index
            .live_ids()
            .map(|id| Cow::Owned(Doc::new(id)))
            .collect();
        build_store(dir, &rows, generation)?;
    }
    let mut store = DocStore::open(&path)?;
    match store.reconcile(generation) {
        Ok(_) => Ok(store),
        Err(StoreError::StoreBehind { .. }) => {
            let live: HashSet<&str> = index.live_ids().collect();
            let stored: HashSet<String> = store.ids_matching(&Filter::all())?.into_iter().collect();
            let gone: Vec<&str> = stored
                .iter()
                .map(String::as_str)
                .filter(|id| !live.contains(id))
                .collect();
            let missing: Vec<Doc> = live
                .iter()
                .filter(|id| !stored.contains(**id))
                .map(|id| Doc::new(*id))
                .collect();
            store.delete(&gone, generation)?;
            store.upsert(&missing, generation)?;
            Ok(store)
        }
        Err(e) => Err(e.into()),
    }
}

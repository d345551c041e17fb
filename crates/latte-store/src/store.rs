//! [`DocStore`]: documents (id, title, text, metadata) in one SQLite file, with an FTS5 index and an undo
//! log for the last generation. The layout and the generation protocol are described in FORMAT.md.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{
    params, params_from_iter, Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction,
    TransactionBehavior,
};
use serde_json::{Map, Value};

use crate::error::StoreError;
use crate::filter::Filter;

/// The schema version this build reads and writes (`meta.schema_version`).
pub const SCHEMA_VERSION: i64 = 1;
/// `PRAGMA application_id` of a latte document store: "LTDS".
pub const APPLICATION_ID: i32 = 0x4C54_4453;
/// The most whitespace-separated terms a keyword query may have.
pub const MAX_QUERY_TERMS: usize = 1024;
/// The file name the index uses for its document store.
pub const FILE_NAME: &str = "documents.sqlite";

const SCHEMA: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE documents (
    doc_id   INTEGER PRIMARY KEY,
    id       TEXT NOT NULL UNIQUE,
    title    TEXT,
    text     TEXT,
    metadata TEXT CHECK (metadata IS NULL OR json_type(metadata) = 'object')
);
CREATE VIRTUAL TABLE documents_fts USING fts5(
    title, text,
    content = 'documents', content_rowid = 'doc_id',
    tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TRIGGER documents_fts_insert AFTER INSERT ON documents BEGIN
    INSERT INTO documents_fts (rowid, title, text) VALUES (new.doc_id, new.title, new.text);
END;
CREATE TRIGGER documents_fts_delete AFTER DELETE ON documents BEGIN
    INSERT INTO documents_fts (documents_fts, rowid, title, text)
        VALUES ('delete', old.doc_id, old.title, old.text);
END;
CREATE TRIGGER documents_fts_update AFTER UPDATE ON documents BEGIN
    INSERT INTO documents_fts (documents_fts, rowid, title, text)
        VALUES ('delete', old.doc_id, old.title, old.text);
    INSERT INTO documents_fts (rowid, title, text) VALUES (new.doc_id, new.title, new.text);
END;
CREATE TABLE undo (
    generation INTEGER NOT NULL,
    id         TEXT NOT NULL,
    existed    INTEGER NOT NULL CHECK (existed IN (0, 1)),
    title      TEXT,
    text       TEXT,
    metadata   TEXT,
    PRIMARY KEY (generation, id)
);
";

/// One document: an external id, and optionally a title, a text and a metadata object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Doc {
    /// The external id (the one the vector index knows). Must not be empty.
    pub id: String,
    /// A title, searched by BM25 beside the text.
    pub title: Option<String>,
    /// The passage text.
    pub text: Option<String>,
    /// Metadata for filters; a JSON object.
    pub metadata: Option<Map<String, Value>>,
}

impl Doc {
    /// A document with only an id.
    pub fn new(id: impl Into<String>) -> Doc {
        Doc {
            id: id.into(),
            ..Doc::default()
        }
    }

    /// Sets the title.
    pub fn with_title(mut self, title: impl Into<String>) -> Doc {
        self.title = Some(title.into());
        self
    }

    /// Sets the text.
    pub fn with_text(mut self, text: impl Into<String>) -> Doc {
        self.text = Some(text.into());
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Map<String, Value>) -> Doc {
        self.metadata = Some(metadata);
        self
    }
}

/// What an [`DocStore::upsert`] did, ids in input order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpsertReport {
    /// Ids that were not in the store.
    pub inserted: Vec<String>,
    /// Ids whose title, text and metadata were replaced.
    pub replaced: Vec<String>,
}

/// What a [`DocStore::delete`] did, ids in input order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteReport {
    /// Ids that were removed.
    pub deleted: Vec<String>,
    /// Ids that were not in the store (nothing was done for them).
    pub missing: Vec<String>,
}

/// The outcome of [`DocStore::reconcile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// The store was already at the index's generation.
    InSync,
    /// The store was ahead (a crash between the store's commit and the index's) and was brought back.
    RolledBack {
        /// The store's generation before.
        from: u64,
        /// The generation now (the index's).
        to: u64,
        /// Documents restored or removed.
        restored: usize,
    },
}

/// The document store: one SQLite file in WAL mode. See the crate documentation.
///
/// A store opened with [`DocStore::create`] or [`DocStore::open`] reads and writes the latest state. One
/// opened with [`DocStore::open_view`] is a read view pinned to a generation (the vector index's, when a
/// reader opened it): every read shows that generation's documents, also while the store is ahead of it
/// (a writer between its store commit and its index commit, or a crash there), and writes are refused.
#[derive(Debug)]
pub struct DocStore {
    conn: Connection,
    path: PathBuf,
    view: Option<u64>,
}

/// Maps a SQLite error on `path` to a [`StoreError`]; "not a database" and corruption become
/// [`StoreError::NotADocStore`].
fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
            StoreError::NotADocStore {
                path: path.to_path_buf(),
                detail: format!("the file is corrupt or not a SQLite database ({e})"),
            }
        }
        _ => StoreError::Sqlite {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

fn to_i64(generation: u64) -> Result<i64, StoreError> {
    i64::try_from(generation).map_err(|_| StoreError::GenerationTooLarge(generation))
}

fn read_meta(conn: &Connection, path: &Path, key: &str) -> Result<u64, StoreError> {
    let value: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = ?", [key], |r| r.get(0))
        .optional()
        .map_err(sql_err(path))?;
    let value = value.ok_or_else(|| StoreError::NotADocStore {
        path: path.to_path_buf(),
        detail: format!("the meta table has no {key:?} row"),
    })?;
    u64::try_from(value).map_err(|_| StoreError::NotADocStore {
        path: path.to_path_buf(),
        detail: format!("meta {key:?} is {value}, expected a non-negative integer"),
    })
}

fn write_meta(tx: &Connection, path: &Path, key: &str, value: u64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, to_i64(value)?],
    )
    .map_err(sql_err(path))?;
    Ok(())
}

/// A stored row: (title, text, metadata JSON text).
type Row = (Option<String>, Option<String>, Option<String>);

impl DocStore {
    /// Creates a new, empty store at `path` (generation 0). Fails if the path exists.
    pub fn create(path: impl AsRef<Path>) -> Result<DocStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    StoreError::AlreadyExists { path: path.clone() }
                }
                _ => StoreError::Io {
                    path: path.clone(),
                    source,
                },
            })?;
        let mut conn = Self::connect(&path)?;
        {
            let err = sql_err(&path);
            Self::configure(&conn, &path)?;
            // the application id is in the header page, written in the same transaction as the schema
            let tx = conn.transaction().map_err(&err)?;
            tx.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(&err)?;
            tx.execute_batch(SCHEMA).map_err(&err)?;
            write_meta(&tx, &path, "schema_version", SCHEMA_VERSION as u64)?;
            write_meta(&tx, &path, "generation", 0)?;
            write_meta(&tx, &path, "undo_base", 0)?;
            tx.commit().map_err(&err)?;
        }
        Ok(DocStore {
            conn,
            path,
            view: None,
        })
    }

    /// Opens an existing store, checking that it is one (application id, schema version).
    pub fn open(path: impl AsRef<Path>) -> Result<DocStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(StoreError::NotFound { path });
        }
        let conn = Self::connect(&path)?;
        let app: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(sql_err(&path))?;
        if app != APPLICATION_ID {
            return Err(StoreError::NotADocStore {
                path,
                detail: format!("SQLite application_id is {app:#x}, expected {APPLICATION_ID:#x}"),
            });
        }
        Self::configure(&conn, &path)?;
        let version = read_meta(&conn, &path, "schema_version")?;
        if version != SCHEMA_VERSION as u64 {
            return Err(StoreError::UnsupportedSchema {
                path,
                found: version as i64,
                supported: SCHEMA_VERSION,
            });
        }
        read_meta(&conn, &path, "generation")?;
        read_meta(&conn, &path, "undo_base")?;
        Ok(DocStore {
            conn,
            path,
            view: None,
        })
    }

    /// Opens a read view of the store at `generation` (the generation of the vector index a reader opened).
    /// Every read runs in one SQLite read transaction that first checks the store's generation: equal, it
    /// reads the documents as they are; ahead (a writer has committed the store for the next generation but
    /// not yet the index, or crashed between the two, or the reader's index is one commit old), it applies
    /// the undo log inside a transaction that is rolled back after the read, so the read shows `generation`
    /// exactly (BM25 statistics included). A store behind the view is [`StoreError::StoreBehind`]; one more
    /// than one commit ahead is [`StoreError::ViewUnavailable`] (reopen the index). Writes through a view
    /// are [`StoreError::ReadOnlyView`].
    pub fn open_view(path: impl AsRef<Path>, generation: u64) -> Result<DocStore, StoreError> {
        let mut store = DocStore::open(path)?;
        to_i64(generation)?;
        store.view = Some(generation);
        store.read(|_| Ok(()))?;
        Ok(store)
    }

    /// The generation a read view shows ([`DocStore::open_view`]); `None` for a read-write store.
    pub fn view_generation(&self) -> Option<u64> {
        self.view
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        match self.view {
            Some(view) => Err(StoreError::ReadOnlyView {
                path: self.path.clone(),
                view,
            }),
            None => Ok(()),
        }
    }

    /// Runs `f` in one read transaction showing the view's generation (or the latest state for a read-write
    /// store). See [`DocStore::open_view`].
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let path = &self.path;
        {
            let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Deferred)
                .map_err(sql_err(path))?;
            let current = read_meta(&tx, path, "generation")?;
            match self.view {
                None => return f(&tx),
                Some(view) if view == current => return f(&tx),
                Some(view) if view > current => {
                    return Err(StoreError::StoreBehind {
                        path: path.clone(),
                        store: current,
                        index: view,
                    })
                }
                Some(_) => {}
            }
            // Dropping the transaction ends it (nothing was written).
        }
        let view = self.view.expect("a view");
        // The store is ahead of the view: undo in a write transaction that is never committed. IMMEDIATE so
        // that no writer commits between the check and the undo.
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .map_err(sql_err(path))?;
        let current = read_meta(&tx, path, "generation")?;
        if view > current {
            return Err(StoreError::StoreBehind {
                path: path.clone(),
                store: current,
                index: view,
            });
        }
        let oldest = read_meta(&tx, path, "undo_base")?;
        if view < oldest {
            return Err(StoreError::ViewUnavailable {
                path: path.clone(),
                view,
                store: current,
                oldest,
            });
        }
        Self::undo_in(&tx, path, view)?;
        let out = f(&tx);
        tx.rollback().map_err(sql_err(path))?;
        out
    }

    /// Opens a connection, with a busy timeout for a concurrent writer.
    fn connect(path: &Path) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql_err(path))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sql_err(path))?;
        Ok(conn)
    }

    /// WAL journal (readers keep a consistent snapshot while a writer commits, and a commit is one append
    /// to the log) with `synchronous = FULL` (the log is fsynced at every commit, so a committed generation
    /// survives power loss). Called only once the file is known to be a store.
    fn configure(conn: &Connection, path: &Path) -> Result<(), StoreError> {
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(sql_err(path))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotADocStore {
                path: path.to_path_buf(),
                detail: format!("could not switch to WAL journal mode (got {mode:?})"),
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql_err(path))?;
        Ok(())
    }

    /// Folds the write-ahead log into the file (a `TRUNCATE` checkpoint) and closes the connection,
    /// reporting what dropping it would hide. With no other connection open, the file alone then holds
    /// every committed write (it can be renamed or copied).
    pub fn close(self) -> Result<(), StoreError> {
        let path = self.path;
        let err = sql_err(&path);
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(&err)?;
        self.conn.close().map_err(|(_, e)| err(e))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation of the last committed write (0 for a new store).
    pub fn generation(&self) -> Result<u64, StoreError> {
        read_meta(&self.conn, &self.path, "generation")
    }

    /// The oldest generation [`DocStore::rollback_to`] can bring the store back to: the store's generation
    /// before the first write of its current generation.
    pub fn oldest_reachable_generation(&self) -> Result<u64, StoreError> {
        read_meta(&self.conn, &self.path, "undo_base")
    }

    /// Number of documents.
    pub fn count(&self) -> Result<u64, StoreError> {
        let path = &self.path;
        self.read(|conn| {
            let n: i64 = conn
                .query_row("SELECT count(*) FROM documents", [], |r| r.get(0))
                .map_err(sql_err(path))?;
            Ok(n as u64)
        })
    }

    /// Number of documents with a title or a text (what BM25 can find).
    pub fn count_with_text(&self) -> Result<u64, StoreError> {
        let path = &self.path;
        self.read(|conn| {
            let n: i64 = conn
                .query_row(
                    "SELECT count(*) FROM documents WHERE coalesce(title, '') <> '' OR coalesce(text, '') <> ''",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql_err(path))?;
            Ok(n as u64)
        })
    }

    /// Starts a write transaction for `generation`: checks it is not older than the store's, and when it
    /// is newer, forgets the undo log of the previous generation (the caller has confirmed it by writing a
    /// newer one) and records the generation to roll back to.
    fn begin_write<'c>(
        conn: &'c mut Connection,
        path: &Path,
        generation: u64,
    ) -> Result<Transaction<'c>, StoreError> {
        to_i64(generation)?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql_err(path))?;
        let current = read_meta(&tx, path, "generation")?;
        if generation < current {
            return Err(StoreError::GenerationRegressed {
                path: path.to_path_buf(),
                current,
                requested: generation,
            });
        }
        if generation > current {
            tx.execute("DELETE FROM undo", []).map_err(sql_err(path))?;
            write_meta(&tx, path, "undo_base", current)?;
        }
        Ok(tx)
    }

    fn lookup(tx: &Transaction<'_>, path: &Path, id: &str) -> Result<Option<Row>, StoreError> {
        tx.prepare_cached("SELECT title, text, metadata FROM documents WHERE id = ?")
            .and_then(|mut s| {
                s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
            })
            .map_err(sql_err(path))
    }

    fn save_undo(
        tx: &Transaction<'_>,
        path: &Path,
        generation: u64,
        id: &str,
        old: Option<&Row>,
    ) -> Result<(), StoreError> {
        let (title, text, metadata) = match old {
            Some((a, b, c)) => (a.as_deref(), b.as_deref(), c.as_deref()),
            None => (None, None, None),
        };
        let generation = to_i64(generation)?;
        tx.prepare_cached(
            "INSERT OR IGNORE INTO undo (generation, id, existed, title, text, metadata) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .and_then(|mut s| {
            s.execute(params![
                generation,
                id,
                old.is_some(),
                title,
                text,
                metadata
            ])
        })
        .map_err(sql_err(path))?;
        Ok(())
    }

    /// Inserts or replaces documents, in one transaction that also sets the store's generation to
    /// `generation` (which must not be older than the store's). Replacing an id replaces its title, text
    /// and metadata together. Ids must be non-empty and distinct within one call.
    pub fn upsert<D: Borrow<Doc>>(
        &mut self,
        docs: &[D],
        generation: u64,
    ) -> Result<UpsertReport, StoreError> {
        self.check_writable()?;
        let mut seen = HashSet::with_capacity(docs.len());
        let mut metadata = Vec::with_capacity(docs.len());
        for doc in docs {
            let doc = doc.borrow();
            check_id(&doc.id)?;
            if !seen.insert(doc.id.as_str()) {
                return Err(StoreError::InvalidDocument {
                    id: doc.id.clone(),
                    reason: "the id appears more than once in this upsert".into(),
                });
            }
            metadata.push(
                doc.metadata
                    .as_ref()
                    .map(|m| Value::Object(m.clone()).to_string()),
            );
        }
        let path = &self.path;
        let tx = Self::begin_write(&mut self.conn, path, generation)?;
        let mut report = UpsertReport::default();
        for (doc, meta) in docs.iter().zip(&metadata) {
            let doc = doc.borrow();
            let old = Self::lookup(&tx, path, &doc.id)?;
            Self::save_undo(&tx, path, generation, &doc.id, old.as_ref())?;
            if old.is_some() {
                tx.prepare_cached(
                    "UPDATE documents SET title = ?, text = ?, metadata = ? WHERE id = ?",
                )
                .and_then(|mut s| s.execute(params![doc.title, doc.text, meta, doc.id]))
                .map_err(sql_err(path))?;
                report.replaced.push(doc.id.clone());
            } else {
                tx.prepare_cached(
                    "INSERT INTO documents (id, title, text, metadata) VALUES (?, ?, ?, ?)",
                )
                .and_then(|mut s| s.execute(params![doc.id, doc.title, doc.text, meta]))
                .map_err(sql_err(path))?;
                report.inserted.push(doc.id.clone());
            }
        }
        write_meta(&tx, path, "generation", generation)?;
        tx.commit().map_err(sql_err(path))?;
        Ok(report)
    }

    /// Deletes documents, in one transaction that also sets the store's generation. Unknown ids are
    /// reported in [`DeleteReport::missing`]; repeated ids count once.
    pub fn delete<S: AsRef<str>>(
        &mut self,
        ids: &[S],
        generation: u64,
    ) -> Result<DeleteReport, StoreError> {
        self.check_writable()?;
        let path = &self.path;
        let tx = Self::begin_write(&mut self.conn, path, generation)?;
        let mut report = DeleteReport::default();
        let mut seen = HashSet::with_capacity(ids.len());
        for id in ids {
            let id = id.as_ref();
            if !seen.insert(id) {
                continue;
            }
            match Self::lookup(&tx, path, id)? {
                Some(old) => {
                    Self::save_undo(&tx, path, generation, id, Some(&old))?;
                    tx.prepare_cached("DELETE FROM documents WHERE id = ?")
                        .and_then(|mut s| s.execute([id]))
                        .map_err(sql_err(path))?;
                    report.deleted.push(id.to_owned());
                }
                None => report.missing.push(id.to_owned()),
            }
        }
        write_meta(&tx, path, "generation", generation)?;
        tx.commit().map_err(sql_err(path))?;
        Ok(report)
    }

    /// Brings the store back to `generation`, which must lie between
    /// [`DocStore::oldest_reachable_generation`] and the current generation: every document changed since
    /// is restored from the undo log (or removed, if it was new). One transaction. Returns the number of
    /// documents restored or removed.
    pub fn rollback_to(&mut self, generation: u64) -> Result<usize, StoreError> {
        self.check_writable()?;
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql_err(path))?;
        let current = read_meta(&tx, path, "generation")?;
        if generation == current {
            return Ok(0);
        }
        if generation > current {
            return Err(StoreError::CannotRollForward {
                path: path.clone(),
                current,
                requested: generation,
            });
        }
        let restored = Self::undo_in(&tx, path, generation)?;
        tx.commit().map_err(sql_err(path))?;
        Ok(restored)
    }

    /// The work of [`DocStore::rollback_to`] inside `tx` (not committed): `generation` must lie between
    /// `undo_base` and the store's generation, which is below it.
    fn undo_in(tx: &Connection, path: &Path, generation: u64) -> Result<usize, StoreError> {
        let current = read_meta(tx, path, "generation")?;
        let undo: Vec<(String, bool, Row)> = tx
            .prepare("SELECT id, existed, title, text, metadata FROM undo ORDER BY id")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, (r.get(2)?, r.get(3)?, r.get(4)?)))
                })?
                .collect()
            })
            .map_err(sql_err(path))?;
        let oldest = read_meta(tx, path, "undo_base")?;
        if generation < oldest {
            return Err(StoreError::RollbackUnavailable {
                path: path.to_path_buf(),
                current,
                requested: generation,
                oldest,
            });
        }
        for (id, existed, (title, text, metadata)) in &undo {
            tx.execute("DELETE FROM documents WHERE id = ?", [id])
                .map_err(sql_err(path))?;
            if *existed {
                tx.execute(
                    "INSERT INTO documents (id, title, text, metadata) VALUES (?, ?, ?, ?)",
                    params![id, title, text, metadata],
                )
                .map_err(sql_err(path))?;
            }
        }
        tx.execute("DELETE FROM undo", []).map_err(sql_err(path))?;
        write_meta(tx, path, "undo_base", generation)?;
        write_meta(tx, path, "generation", generation)?;
        Ok(undo.len())
    }

    /// Brings the store in line with the vector index's committed generation, on open: equal → nothing to
    /// do; store ahead → [`DocStore::rollback_to`] the index's generation; store behind → an error (the
    /// store must always be committed before the index).
    pub fn reconcile(&mut self, index_generation: u64) -> Result<Reconciled, StoreError> {
        self.check_writable()?;
        let store = self.generation()?;
        if store == index_generation {
            return Ok(Reconciled::InSync);
        }
        if store < index_generation {
            return Err(StoreError::StoreBehind {
                path: self.path.clone(),
                store,
                index: index_generation,
            });
        }
        let restored = self.rollback_to(index_generation)?;
        Ok(Reconciled::RolledBack {
            from: store,
            to: index_generation,
            restored,
        })
    }

    /// The documents with these ids (`None` for unknown ids), read from one consistent snapshot.
    pub fn get<S: AsRef<str>>(&self, ids: &[S]) -> Result<Vec<Option<Doc>>, StoreError> {
        let path = &self.path;
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT title, text, metadata FROM documents WHERE id = ?")
                .map_err(sql_err(path))?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let id = id.as_ref();
                let row: Option<Row> = stmt
                    .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
                    .map_err(sql_err(path))?;
                out.push(match row {
                    None => None,
                    Some((title, text, metadata)) => Some(Doc {
                        id: id.to_owned(),
                        title,
                        text,
                        metadata: metadata.map(|m| parse_metadata(path, id, &m)).transpose()?,
                    }),
                });
            }
            Ok(out)
        })
    }

    /// Ids of the documents matching `filter`, in id order.
    pub fn ids_matching(&self, filter: &Filter) -> Result<Vec<String>, StoreError> {
        let mut sql = String::from("SELECT d.id FROM documents AS d WHERE ");
        let mut params: Vec<SqlValue> = Vec::new();
        filter.to_sql("d.metadata", &mut sql, &mut params);
        sql.push_str(" ORDER BY d.id");
        let path = &self.path;
        self.read(|conn| {
            let mut stmt = conn.prepare(&sql).map_err(sql_err(path))?;
            stmt.query_map(params_from_iter(params), |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
                .map_err(sql_err(path))
        })
    }

    /// BM25 keyword search over title and text: the `k` best documents matching any term of `query` (and
    /// `filter`, in the same query), as `(id, score)` with higher scores better (FTS5's `bm25()` negated),
    /// ties in id order. The query is plain text, never FTS5 syntax: each whitespace-separated word is
    /// quoted as an FTS5 string (so `-`, `*`, `NOT`, `"`, `:` mean nothing), and the words are OR-ed.
    /// A query without letters or digits matches nothing.
    pub fn bm25(
        &self,
        query: &str,
        k: usize,
        filter: Option<&Filter>,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let words: Vec<&str> = query
            .split_whitespace()
            .filter(|w| w.chars().any(char::is_alphanumeric))
            .collect();
        if words.len() > MAX_QUERY_TERMS {
            return Err(StoreError::QueryTooLong {
                got: words.len(),
                max: MAX_QUERY_TERMS,
            });
        }
        if words.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let fts_query = words
            .iter()
            .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(" OR ");
        let mut sql = String::from(
            "SELECT d.id, -bm25(documents_fts) AS score FROM documents_fts \
             JOIN documents AS d ON d.doc_id = documents_fts.rowid \
             WHERE documents_fts MATCH ? AND ",
        );
        let mut params: Vec<SqlValue> = vec![SqlValue::Text(fts_query)];
        match filter {
            Some(f) => f.to_sql("d.metadata", &mut sql, &mut params),
            None => sql.push('1'),
        }
        sql.push_str(" ORDER BY score DESC, d.id LIMIT ?");
        params.push(SqlValue::Integer(i64::try_from(k).unwrap_or(i64::MAX)));
        let path = &self.path;
        self.read(|conn| {
            let mut stmt = conn.prepare(&sql).map_err(sql_err(path))?;
            stmt.query_map(params_from_iter(params), |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect::<Result<Vec<(String, f64)>, _>>())
                .map_err(sql_err(path))
        })
    }

    /// Runs SQLite's `integrity_check` and FTS5's integrity check (the full-text index agrees with the
    /// documents). Reads the whole file.
    pub fn verify(&self) -> Result<(), StoreError> {
        let path = &self.path;
        let problems: Vec<String> = self
            .conn
            .prepare("PRAGMA integrity_check")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(sql_err(path))?;
        if problems != ["ok"] {
            return Err(StoreError::NotADocStore {
                path: path.clone(),
                detail: format!("integrity check failed: {}", problems.join("; ")),
            });
        }
        self.conn
            .execute(
                "INSERT INTO documents_fts (documents_fts, rank) VALUES ('integrity-check', 1)",
                [],
            )
            .map_err(|e| StoreError::NotADocStore {
                path: path.clone(),
                detail: format!("the full-text index disagrees with the documents: {e}"),
            })?;
        Ok(())
    }
}

fn check_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() {
        return Err(StoreError::InvalidDocument {
            id: String::new(),
            reason: "the id is empty".into(),
        });
    }
    Ok(())
}

fn parse_metadata(path: &Path, id: &str, text: &str) -> Result<Map<String, Value>, StoreError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(StoreError::CorruptRow {
            path: path.to_path_buf(),
            id: id.to_owned(),
            detail: format!("metadata should be a JSON object, got {other}"),
        }),
        Err(e) => Err(StoreError::CorruptRow {
            path: path.to_path_buf(),
            id: id.to_owned(),
            detail: format!("metadata is not valid JSON: {e}"),
        }),
    }
}

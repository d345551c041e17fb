//! The on-disk PLAID index: build (sampled k-means + residual codec), add, delete, compaction and search.
//!
//! * `config`: [`IndexConfig`] and [`SearchParams`] with their validation.
//! * `layout`: file names, `meta.lt` (the commit point), the codec file, garbage collection.
//! * `build`: training the codec, writing chunks and inverted lists, compaction's rewrite.
//! * `shared_codec`: [`IndexCodec`], the trained centroids and residual codec as a value that several indexes
//!   (the shards of one collection) can be built with.
//! * `documents`: the document store (`documents.sqlite`) as the writer keeps it in step with the vectors.
//! * `writer`: [`IndexWriter`], the one writer of an index (an OS lock on `LOCK`), and the convenience
//!   functions [`PlaidIndex::create`], [`PlaidIndex::add`], [`PlaidIndex::delete`], [`PlaidIndex::compact`].
//! * `search`: the search pipeline.

mod build;
mod config;
mod documents;
mod layout;
mod search;
mod shared_codec;
mod writer;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::centroids::Centroids;
use crate::codec::Codec;
use crate::ivf::InvertedLists;
use crate::scores::EmbRef;
use crate::storage::{cast, Mapped};
use crate::{Error, Result};
use latte_store::{Doc, DocStore, Filter};

pub use build::default_num_centroids;
pub use config::{IndexConfig, SearchParams};
pub use search::{EXACT_SUBSET_MAX_DOCS, EXACT_SUBSET_MAX_FRACTION_INV};
pub use shared_codec::IndexCodec;
pub use writer::{AddReport, DeleteReport, IndexWriter};

use layout::{chunk_file, parse_codec, read_meta, Meta, CODEC, META};

/// Documents to index, read one at a time (so a corpus never has to sit in memory at once).
pub trait DocumentSource: Sync {
    /// Number of documents.
    fn len(&self) -> usize;
    /// Whether there are no documents.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Embedding dimension.
    fn dim(&self) -> usize;
    /// External id of document `i`.
    fn id(&self, i: usize) -> String;
    /// Token embeddings of document `i`, `tokens × dim` row-major.
    fn embeddings(&self, i: usize) -> Result<Cow<'_, [f32]>>;
}

/// An in-memory [`DocumentSource`].
#[derive(Debug, Clone, Default)]
pub struct VecSource {
    dim: usize,
    ids: Vec<String>,
    docs: Vec<Vec<f32>>,
}

impl VecSource {
    /// An empty source of dimension `dim`.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            ids: Vec::new(),
            docs: Vec::new(),
        }
    }
    /// Adds a document (`tokens × dim` values).
    pub fn push(&mut self, id: impl Into<String>, embeddings: Vec<f32>) -> Result<()> {
        EmbRef::new(&embeddings, self.dim)?;
        self.ids.push(id.into());
        self.docs.push(embeddings);
        Ok(())
    }
}

impl DocumentSource for VecSource {
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
        Ok(Cow::Borrowed(&self.docs[i]))
    }
}

/// Summary of an index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexInfo {
    /// Live documents.
    pub documents: usize,
    /// Deleted documents not yet compacted away.
    pub deleted: usize,
    /// Token vectors stored (live and deleted).
    pub tokens: u64,
    /// Embedding dimension.
    pub dim: usize,
    /// Residual bits per dimension.
    pub nbits: usize,
    /// Number of centroids.
    pub num_centroids: usize,
    /// The build configuration.
    pub config: IndexConfig,
    /// Bytes on disk of the vector files (`meta.lt`, the codec, chunks and inverted lists).
    pub disk_bytes: u64,
    /// Bytes of the files search keeps hot (everything but the half-precision copy).
    pub resident_bytes: u64,
    /// Bytes on disk of the document store (`documents.sqlite` and its `-wal` log; 0 without one).
    pub store_bytes: u64,
    /// The committed generation (`meta.lt`).
    pub generation: u64,
    /// The newest format version of any file of the index (`meta.lt`'s `format_version`).
    pub format_version: u32,
}

#[derive(Clone)]
struct Chunk {
    /// The chunk's id (its file names).
    id: u64,
    /// Tokens of each document of the chunk.
    lens: Vec<u32>,
    /// External ids of the chunk's documents.
    names: Vec<String>,
    codes: Mapped,
    res: Mapped,
    full: Option<Mapped>,
    /// First internal doc id and first global token of this chunk.
    doc_base: usize,
    token_base: u64,
}

/// An open PLAID index (read-only; it keeps working while another process writes the directory).
pub struct PlaidIndex {
    dir: PathBuf,
    meta: Meta,
    centroids: Centroids,
    codec: Codec,
    chunks: Vec<Chunk>,
    /// Global token offset of each document (`n + 1` entries).
    doc_offsets: Vec<u64>,
    ids: Vec<String>,
    by_id: HashMap<String, u32>,
    deleted: Vec<bool>,
    live: usize,
    ivf: InvertedLists,
    /// Ids matching the filters used recently, for one generation ([`PlaidIndex::ids_matching`]).
    filter_cache: Mutex<FilterCache>,
}

/// Most filters [`PlaidIndex::ids_matching`] keeps the answer of.
const FILTER_CACHE_FILTERS: usize = 64;

/// The matching ids of recent filters (keyed by the parsed filter's canonical form) at `generation`. Bounded
/// in entries and in ids held (at most four times the index's documents); a bound reached empties it.
#[derive(Default)]
struct FilterCache {
    generation: u64,
    ids_held: usize,
    entries: HashMap<String, Arc<Vec<String>>>,
}

impl std::fmt::Debug for PlaidIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaidIndex")
            .field("dir", &self.dir)
            .field("documents", &self.live)
            .finish()
    }
}

enum Codes<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

impl PlaidIndex {
    /// Opens the index in `dir`, verifying every file's checksum.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        // A writer may commit and remove superseded files between our reading meta.lt and opening them: retry.
        let mut last = None;
        for _ in 0..10 {
            match Self::open_once(dir) {
                Err(Error::Io { source, path })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    last = Some(Error::Io { source, path });
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
        Err(last.expect("retried"))
    }

    fn open_once(dir: &Path) -> Result<Self> {
        let meta = read_meta(dir)?;
        let codec_file = Mapped::open(&dir.join(CODEC), b"CODC")?;
        let (centroids, codec) = parse_codec(codec_file, &meta)?;
        Self::assemble(dir, meta, centroids, codec, Vec::new())
    }

    /// The index described by `meta`: chunks found in `reuse` (by id) are taken as they are (already
    /// verified); the others and the inverted lists are opened (and their checksums verified) from `dir`.
    fn assemble(
        dir: &Path,
        meta: Meta,
        centroids: Centroids,
        codec: Codec,
        reuse: Vec<Chunk>,
    ) -> Result<Self> {
        let mut reuse: HashMap<u64, Chunk> = reuse.into_iter().map(|c| (c.id, c)).collect();
        let mut chunks = Vec::with_capacity(meta.chunks.len());
        let mut doc_offsets = vec![0u64];
        let mut ids = Vec::new();
        let mut doc_base = 0usize;
        let mut token_base = 0u64;
        let mut seen_chunks = std::collections::HashSet::with_capacity(meta.chunks.len());
        for c in &meta.chunks {
            if !seen_chunks.insert(c.id) {
                return Err(Error::Corrupt {
                    path: dir.join(META),
                    reason: format!("chunk {} is listed twice", c.id),
                });
            }
            let mut chunk = match reuse.remove(&c.id) {
                Some(chunk) => chunk,
                None => open_chunk(dir, &meta, &codec, c.id)?,
            };
            let docs_path = || dir.join(chunk_file(c.id, "docs"));
            if chunk.lens.len() != c.docs || chunk.names.len() != c.docs {
                return Err(Error::Corrupt {
                    path: docs_path(),
                    reason: format!(
                        "document count does not match meta.lt: expected {}, got {}",
                        c.docs,
                        chunk.lens.len()
                    ),
                });
            }
            let tokens: u64 = chunk.lens.iter().map(|&l| l as u64).sum();
            if tokens != c.tokens {
                return Err(Error::Corrupt {
                    path: docs_path(),
                    reason: format!(
                        "token count does not match meta.lt: expected {}, got {tokens}",
                        c.tokens
                    ),
                });
            }
            let mut t = token_base;
            for &l in &chunk.lens {
                t += l as u64;
                doc_offsets.push(t);
            }
            ids.extend(chunk.names.iter().cloned());
            chunk.doc_base = doc_base;
            chunk.token_base = token_base;
            chunks.push(chunk);
            doc_base += c.docs;
            token_base += c.tokens;
        }
        let ivf = InvertedLists::open(
            Mapped::open(&dir.join(meta.ivf_name()), b"IVFL")?,
            meta.num_centroids,
            ids.len(),
        )?;
        let meta_corrupt = |reason: String| Error::Corrupt {
            path: dir.join(META),
            reason,
        };
        let mut deleted = vec![false; ids.len()];
        for &d in &meta.deleted {
            match deleted.get_mut(d as usize) {
                Some(true) => {
                    return Err(meta_corrupt(format!(
                        "deleted document {d} is listed twice"
                    )))
                }
                Some(x) => *x = true,
                None => {
                    return Err(meta_corrupt(format!(
                        "deleted document {d} out of range (the index holds {} documents)",
                        ids.len()
                    )))
                }
            }
        }
        // Every entry of `meta.deleted` marked a distinct document, so this does not underflow.
        let live = ids.len() - meta.deleted.len();
        // An external id may be held by several documents only if all but at most one are deleted (a
        // deleted id added again before compaction); the map points at the live one.
        let mut by_id: HashMap<String, u32> = HashMap::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            match by_id.entry(id.clone()) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(i as u32);
                }
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let prev = *e.get() as usize;
                    if !deleted[prev] && !deleted[i] {
                        return Err(meta_corrupt(format!(
                            "external id {id:?} is held by two live documents ({prev} and {i})"
                        )));
                    }
                    if !deleted[i] {
                        e.insert(i as u32);
                    }
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            centroids,
            codec,
            chunks,
            doc_offsets,
            ids,
            by_id,
            deleted,
            live,
            ivf,
            filter_cache: Mutex::default(),
        })
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.meta.dim
    }

    /// Number of live documents.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether the index holds no live documents.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The model recorded at build time, if any.
    pub fn model(&self) -> Option<&str> {
        self.meta.config.model.as_deref()
    }

    /// The model options recorded at build time ([`IndexConfig::model_options`]), if any.
    pub fn model_options(&self) -> Option<&serde_json::Value> {
        self.meta.config.model_options.as_ref()
    }

    /// The committed generation this reader opened (`meta.lt`); every writer commit increments it.
    pub fn generation(&self) -> u64 {
        self.meta.generation
    }

    /// The index folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// External ids of the live documents, in internal order.
    pub fn live_ids(&self) -> impl Iterator<Item = &str> {
        self.ids
            .iter()
            .zip(&self.deleted)
            .filter(|(_, &d)| !d)
            .map(|(id, _)| id.as_str())
    }

    /// Whether the index has a document store (`documents.sqlite`); indexes written before the store
    /// existed get one from their next writer.
    pub fn has_store(&self) -> bool {
        documents::store_path(&self.dir).is_file()
    }

    /// A read connection to the document store showing this index's generation
    /// ([`DocStore::open_view`]): the text, titles and metadata of exactly the documents this reader
    /// searches, also while a writer is between its store commit and its index commit. One per thread or
    /// caller (a SQLite connection is not shared). [`Error::NoDocumentStore`] if the index has no store;
    /// a store error `ViewUnavailable` means the index was written to more than once since this reader
    /// opened it: reopen it.
    pub fn open_store(&self) -> Result<DocStore> {
        let path = documents::store_path(&self.dir);
        if !path.is_file() {
            return Err(Error::NoDocumentStore(self.dir.clone()));
        }
        Ok(DocStore::open_view(&path, self.meta.generation)?)
    }

    /// Ids of the documents matching `filter`, in id order, read from `store` — this index's
    /// [`Self::open_store`]. The answer is kept for this generation (up to 64 filters), so a filter used
    /// again (a tenant, a language) costs a hash lookup instead of a scan of the store; a store that is not a
    /// view at this index's generation is read every time.
    pub fn ids_matching(&self, store: &DocStore, filter: &Filter) -> Result<Arc<Vec<String>>> {
        let generation = self.meta.generation;
        if store.view_generation() != Some(generation) {
            return Ok(Arc::new(store.ids_matching(filter)?));
        }
        let key = format!("{filter:?}");
        {
            let cache = self.filter_cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.generation == generation {
                if let Some(ids) = cache.entries.get(&key) {
                    return Ok(ids.clone());
                }
            }
        }
        let ids = Arc::new(store.ids_matching(filter)?);
        let mut cache = self.filter_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.generation != generation
            || cache.entries.len() >= FILTER_CACHE_FILTERS
            || cache.ids_held + ids.len() > 4 * self.ids.len().max(1)
        {
            *cache = FilterCache {
                generation,
                ..FilterCache::default()
            };
        }
        cache.ids_held += ids.len();
        cache.entries.insert(key, ids.clone());
        Ok(ids)
    }

    /// The stored documents with these ids (`None` for an id this index holds no live document for), read
    /// at this index's generation. An index without a store gives each live document with its id only.
    pub fn get_documents<S: AsRef<str>>(&self, ids: &[S]) -> Result<Vec<Option<Doc>>> {
        if !self.has_store() {
            return Ok(ids
                .iter()
                .map(|id| {
                    let id = id.as_ref();
                    self.contains(id).then(|| Doc::new(id))
                })
                .collect());
        }
        Ok(self.open_store()?.get(ids)?)
    }

    /// Whether a live document with this external id exists.
    pub fn contains(&self, id: &str) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|&i| !self.deleted[i as usize])
    }

    /// A summary: counts, settings and sizes.
    pub fn info(&self) -> IndexInfo {
        let mut disk = 0u64;
        let mut full = 0u64;
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if self.meta.referenced_files().contains(&name) {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    disk += len;
                    if name.ends_with(".f16.lt") {
                        full += len;
                    }
                }
            }
        }
        let store_bytes = ["", "-wal"]
            .iter()
            .filter_map(|suffix| {
                std::fs::metadata(self.dir.join(format!("{}{suffix}", documents::STORE))).ok()
            })
            .map(|m| m.len())
            .sum();
        IndexInfo {
            store_bytes,
            generation: self.meta.generation,
            format_version: self.meta.format_version,
            documents: self.live,
            deleted: self.meta.deleted.len(),
            tokens: self.meta.chunks.iter().map(|c| c.tokens).sum(),
            dim: self.meta.dim,
            nbits: self.meta.config.nbits,
            num_centroids: self.meta.num_centroids,
            config: self.meta.config.clone(),
            disk_bytes: disk,
            resident_bytes: disk - full,
        }
    }

    fn chunk_of(&self, doc: usize) -> &Chunk {
        let i = self.chunks.partition_point(|c| c.doc_base <= doc) - 1;
        &self.chunks[i]
    }

    /// Token range of `doc` inside its chunk.
    fn local_range(&self, doc: usize) -> (&Chunk, usize, usize) {
        let c = self.chunk_of(doc);
        let s = (self.doc_offsets[doc] - c.token_base) as usize;
        let e = (self.doc_offsets[doc + 1] - c.token_base) as usize;
        (c, s, e)
    }

    /// Asks the CPU to start loading `doc`'s codes (and residual bytes) while the previous document is scored:
    /// candidates are scattered over the files, so each document's first lines would otherwise miss the caches.
    fn prefetch_doc(&self, doc: usize, residuals: bool) {
        let (c, s, e) = self.local_range(doc);
        let w = self.meta.code_width();
        latte_kernels::prefetch::prefetch_lines(&c.codes.payload()[s * w..e * w]);
        if residuals {
            let bpt = self.codec.bytes_per_token();
            latte_kernels::prefetch::prefetch_lines(&c.res.payload()[s * bpt..e * bpt]);
        }
    }

    fn codes_of(&self, doc: usize) -> Codes<'_> {
        let (c, s, e) = self.local_range(doc);
        let p = c.codes.payload();
        // Lengths and alignment were checked at open.
        if self.meta.code_width() == 2 {
            Codes::U16(&cast::<u16>(p, c.codes.path(), "codes").expect("checked")[s..e])
        } else {
            Codes::U32(&cast::<u32>(p, c.codes.path(), "codes").expect("checked")[s..e])
        }
    }
}

/// Opens (and verifies) the files of chunk `id`, checking their sizes against each other and `meta`.
fn open_chunk(dir: &Path, meta: &Meta, codec: &Codec, id: u64) -> Result<Chunk> {
    let docs = Mapped::open(&dir.join(chunk_file(id, "docs")), b"DOCS")?;
    let secs = docs.sections()?;
    let corrupt = |path: &Path, reason: &str| Error::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    if secs.len() != 2 {
        return Err(corrupt(docs.path(), "expected 2 sections"));
    }
    let lens: Vec<u32> = cast::<u32>(secs[0], docs.path(), "doclens")?.to_vec();
    let text =
        std::str::from_utf8(secs[1]).map_err(|_| corrupt(docs.path(), "ids are not UTF-8"))?;
    let names: Vec<String> = if text.is_empty() {
        Vec::new()
    } else {
        text.split('\n').map(str::to_string).collect()
    };
    if names.len() != lens.len() {
        return Err(corrupt(
            docs.path(),
            "the number of ids does not match the number of document lengths",
        ));
    }
    let tokens: u64 = lens.iter().map(|&l| l as u64).sum();
    let codes = Mapped::open(&dir.join(chunk_file(id, "codes")), b"CODE")?;
    if codes.payload().len() as u64 != tokens * meta.code_width() as u64 {
        return Err(corrupt(codes.path(), "wrong number of codes"));
    }
    let max_code = if meta.code_width() == 2 {
        cast::<u16>(codes.payload(), codes.path(), "codes")?
            .iter()
            .map(|&c| c as usize)
            .max()
    } else {
        cast::<u32>(codes.payload(), codes.path(), "codes")?
            .iter()
            .map(|&c| c as usize)
            .max()
    };
    if max_code.is_some_and(|m| m >= meta.num_centroids) {
        return Err(corrupt(codes.path(), "centroid code out of range"));
    }
    let res = Mapped::open(&dir.join(chunk_file(id, "res")), b"RESI")?;
    if res.payload().len() as u64 != tokens * codec.bytes_per_token() as u64 {
        return Err(corrupt(res.path(), "wrong residual length"));
    }
    let full = if meta.config.store_full {
        let f = Mapped::open(&dir.join(chunk_file(id, "f16")), b"FULL")?;
        if f.payload().len() as u64 != tokens * meta.dim as u64 * 2 {
            return Err(corrupt(f.path(), "wrong embedding length"));
        }
        Some(f)
    } else {
        None
    };
    Ok(Chunk {
        id,
        lens,
        names,
        codes,
        res,
        full,
        doc_base: 0,
        token_base: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_params_are_sane() {
        for k in [1, 10, 50, 100, 300, 1000, 5000] {
            let p = SearchParams::for_k(k);
            assert!(
                p.ndocs >= p.n_residual && p.n_residual >= p.n_rerank && p.n_rerank >= p.k,
                "{p:?}"
            );
        }
        // The measured operating points (BENCHMARKS.md).
        let p = SearchParams::for_k(10);
        assert_eq!((p.n_ivf_probe, p.n_residual, p.n_rerank), (8, 1000, 100));
        let p = SearchParams::for_k(100);
        assert_eq!((p.n_ivf_probe, p.n_residual, p.n_rerank), (8, 2000, 300));
        let p = SearchParams::for_k(1000);
        assert_eq!((p.n_ivf_probe, p.n_residual, p.n_rerank), (16, 5600, 2100));
    }
}

//! The on-disk PLAID index: build (sampled k-means + residual codec), add, delete, compaction and search.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use half::f16;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::centroids::Centroids;
use crate::codec::{check_nbits, Codec};
use crate::error::IoContext;
use crate::exact::top_k;
use crate::ivf::{self, InvertedLists};
use crate::linalg::{max_rows_into, maxsim_segments};
use crate::scores::EmbRef;
use crate::storage::{
    as_bytes, cast, sync_dir, write_sections, Mapped, StreamWriter, WriterLock, FORMAT_VERSION,
};
use crate::{kmeans, pool, Error, Hit, Result};

const META: &str = "meta.lt";
use crate::kernels::{self, LANES};
const CODEC: &str = "codec.lt";

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

/// Build settings, fixed when the index is created and stored in its metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexConfig {
    /// Bits per dimension of the residual codes: 1, 2 or 4.
    pub nbits: usize,
    /// Number of centroids; `None` = `2^floor(log2(16·sqrt(tokens)))`.
    pub num_centroids: Option<usize>,
    /// Lloyd iterations of k-means.
    pub kmeans_iters: usize,
    /// Training points per centroid (the k-means sample is capped at `num_centroids × this`).
    pub kmeans_points_per_centroid: usize,
    /// Seed for sampling and k-means.
    pub seed: u64,
    /// Token pooling factor (1 = none): documents are pooled to `tokens / pool_factor` vectors at index time.
    pub pool_factor: usize,
    /// Keep a half-precision copy of every token for the exact final rerank (and exhaustive search).
    pub store_full: bool,
    /// The model that produced the embeddings (a name or path), so search can encode queries with it.
    pub model: Option<String>,
    /// The options the model was loaded with when they change the embeddings (JSON object written by the
    /// `latte` CLI: truncate_dim, lengths, prefixes, …), so search can encode queries the same way. Absent in
    /// older metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_options: Option<serde_json::Value>,
    /// Centroid groups probed by the two-level nearest-centroid assignment (used above 16,384 centroids, in
    /// k-means training, encoding and later adds); `None` = 16. Absent in older metadata.
    #[serde(default)]
    pub assign_probe: Option<usize>,
}

impl IndexConfig {
    fn probe(&self) -> usize {
        self.assign_probe.unwrap_or(kmeans::DEFAULT_PROBE)
    }
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            nbits: 2,
            num_centroids: None,
            kmeans_iters: 4,
            kmeans_points_per_centroid: 32,
            seed: 42,
            pool_factor: 1,
            store_full: true,
            model: None,
            model_options: None,
            assign_probe: None,
        }
    }
}

/// Search settings. [`SearchParams::for_k`] gives the measured defaults.
///
/// The pipeline: centroid scores for every query token; the `n_ivf_probe` best inverted lists per token give
/// the candidates; (A) approximate MaxSim from centroid codes, skipping tokens whose centroid scores below
/// `centroid_score_threshold` for every query token, keeps `ndocs`; (B) the same on the full bags keeps
/// `n_residual`; (C) MaxSim with residuals added through a per-query lookup table (no decompression) keeps
/// `n_rerank`; (D) exact MaxSim from the half-precision copy (or from decompressed residuals when
/// `full_precision_rerank` is false or the index keeps no copy) orders the final `k`.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchParams {
    /// Number of results.
    pub k: usize,
    /// Inverted lists probed per query token.
    pub n_ivf_probe: usize,
    /// Centroid pruning threshold for pass A; `None` disables pruning.
    pub centroid_score_threshold: Option<f32>,
    /// Candidates kept after pass A.
    pub ndocs: usize,
    /// Candidates kept after pass B and scored with residuals.
    pub n_residual: usize,
    /// Candidates kept after pass C and scored exactly.
    pub n_rerank: usize,
    /// Final scores from the half-precision copy (true) or from decompressed residuals (false).
    pub full_precision_rerank: bool,
    /// Token pruning in pass C: a document token is scored with its residual only when its centroid score
    /// is within this margin of the document's best centroid score for some query token. `None` scores
    /// every token.
    pub token_margin: Option<f32>,
}

impl SearchParams {
    /// Defaults for `k` results, chosen by measurement on rustbooks against an exact top-1000 (BENCHMARKS.md):
    /// recall@k ≈ 0.97 at k = 10, 100 and 1000. The rerank depth is what recall at larger k needs most
    /// (k = 100: 200 reranked gives 0.958, 300 gives 0.976).
    pub fn for_k(k: usize) -> Self {
        let k1 = k.max(1);
        Self {
            k,
            n_ivf_probe: if k1 <= 100 { 8 } else { 16 },
            centroid_score_threshold: None,
            ndocs: (k1 * 100).max(2000),
            n_residual: (k1 * 20).min(k1 * 4 + 1600).max(1000),
            n_rerank: (k1 * 3).min(k1 * 2 + 100).max(100),
            full_precision_rerank: true,
            token_margin: Some(0.05),
        }
    }
    /// The same settings with final scores from the compressed index only (no half-precision rerank).
    pub fn without_rerank(mut self) -> Self {
        self.full_precision_rerank = false;
        self
    }
}

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
    /// Bytes on disk, all files.
    pub disk_bytes: u64,
    /// Bytes of the files search keeps hot (everything but the half-precision copy).
    pub resident_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChunkMeta {
    id: u64,
    docs: usize,
    tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    format_version: u32,
    dim: usize,
    num_centroids: usize,
    config: IndexConfig,
    generation: u64,
    next_chunk: u64,
    chunks: Vec<ChunkMeta>,
    /// Internal ids (positions over all chunks) of deleted documents, ascending.
    deleted: Vec<u32>,
}

impl Meta {
    fn ivf_name(&self) -> String {
        format!("ivf.{}.lt", self.generation)
    }
    fn code_width(&self) -> usize {
        if self.num_centroids <= 1 << 16 {
            2
        } else {
            4
        }
    }
    fn referenced_files(&self) -> HashSet<String> {
        let mut s: HashSet<String> = [META.to_string(), CODEC.to_string(), self.ivf_name()].into();
        for c in &self.chunks {
            for ext in ["docs", "codes", "res", "f16"] {
                s.insert(chunk_file(c.id, ext));
            }
        }
        s
    }
}

fn chunk_file(id: u64, ext: &str) -> String {
    format!("c{id}.{ext}.lt")
}

fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join(META);
    if !path.exists() {
        return Err(Error::NotAnIndex(dir.to_path_buf()));
    }
    let m = Mapped::open(&path, b"META")?;
    let meta: Meta = serde_json::from_slice(m.payload()).map_err(|e| Error::Corrupt {
        path: path.clone(),
        reason: format!("bad metadata: {e}"),
    })?;
    if meta.format_version > FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            path,
            found: meta.format_version,
            oldest: crate::storage::OLDEST_SUPPORTED_VERSION,
            current: FORMAT_VERSION,
        });
    }
    Ok(meta)
}

/// Commits `meta` (the single commit point of every write) and removes files it no longer references.
fn commit(dir: &Path, meta: &Meta) -> Result<()> {
    let json = serde_json::to_vec_pretty(meta).expect("metadata serialises");
    let mut w = StreamWriter::create(&dir.join(META), b"META")?;
    w.write(&json)?;
    w.finish()?;
    sync_dir(dir)?;
    collect_garbage(dir, Some(meta));
    Ok(())
}

/// Removes index files not referenced by `meta` (left by an interrupted or superseded write). Only names this
/// crate writes are touched.
fn collect_garbage(dir: &Path, meta: Option<&Meta>) {
    let keep = meta.map(Meta::referenced_files).unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let ours = (name.ends_with(".lt") || name.ends_with(".lt.tmp"))
            && (name.starts_with('c') || name.starts_with("ivf.") || name.starts_with("meta."));
        if ours && !keep.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

struct Chunk {
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
        let codec_path = dir.join(CODEC);
        let codec_file = Mapped::open(&codec_path, b"CODC")?;
        let (centroids, codec) = parse_codec(codec_file, &meta)?;
        let mut chunks = Vec::new();
        let mut doc_offsets = vec![0u64];
        let mut ids = Vec::new();
        let mut doc_base = 0usize;
        let mut token_base = 0u64;
        for c in &meta.chunks {
            let docs = Mapped::open(&dir.join(chunk_file(c.id, "docs")), b"DOCS")?;
            let secs = docs.sections()?;
            let corrupt = |reason: &str| Error::Corrupt {
                path: docs.path().to_path_buf(),
                reason: reason.into(),
            };
            if secs.len() != 2 {
                return Err(corrupt("expected 2 sections"));
            }
            let lens: &[u32] = cast(secs[0], docs.path(), "doclens")?;
            let names = std::str::from_utf8(secs[1]).map_err(|_| corrupt("ids are not UTF-8"))?;
            let before = ids.len();
            if !names.is_empty() {
                ids.extend(names.split('\n').map(str::to_string));
            }
            if lens.len() != c.docs || ids.len() - before != c.docs {
                return Err(corrupt("document count does not match meta.lt"));
            }
            let mut t = token_base;
            for &l in lens {
                t += l as u64;
                doc_offsets.push(t);
            }
            if t - token_base != c.tokens {
                return Err(corrupt("token count does not match meta.lt"));
            }
            let codes = Mapped::open(&dir.join(chunk_file(c.id, "codes")), b"CODE")?;
            if codes.payload().len() as u64 != c.tokens * meta.code_width() as u64 {
                return Err(Error::Corrupt {
                    path: codes.path().into(),
                    reason: "wrong number of codes".into(),
                });
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
                return Err(Error::Corrupt {
                    path: codes.path().into(),
                    reason: "centroid code out of range".into(),
                });
            }
            let res = Mapped::open(&dir.join(chunk_file(c.id, "res")), b"RESI")?;
            if res.payload().len() as u64 != c.tokens * codec.bytes_per_token() as u64 {
                return Err(Error::Corrupt {
                    path: res.path().into(),
                    reason: "wrong residual length".into(),
                });
            }
            let full = if meta.config.store_full {
                let f = Mapped::open(&dir.join(chunk_file(c.id, "f16")), b"FULL")?;
                if f.payload().len() as u64 != c.tokens * meta.dim as u64 * 2 {
                    return Err(Error::Corrupt {
                        path: f.path().into(),
                        reason: "wrong embedding length".into(),
                    });
                }
                Some(f)
            } else {
                None
            };
            chunks.push(Chunk {
                codes,
                res,
                full,
                doc_base,
                token_base,
            });
            doc_base += c.docs;
            token_base += c.tokens;
        }
        let ivf = InvertedLists::open(
            Mapped::open(&dir.join(meta.ivf_name()), b"IVFL")?,
            meta.num_centroids,
            ids.len(),
        )?;
        let mut by_id = HashMap::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            by_id.insert(id.clone(), i as u32);
        }
        let mut deleted = vec![false; ids.len()];
        for &d in &meta.deleted {
            match deleted.get_mut(d as usize) {
                Some(x) => *x = true,
                None => {
                    return Err(Error::Corrupt {
                        path: dir.join(META),
                        reason: "deleted id out of range".into(),
                    })
                }
            }
        }
        let live = ids.len() - meta.deleted.len();
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
        IndexInfo {
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
        prefetch_lines(&c.codes.payload()[s * w..e * w]);
        if residuals {
            let bpt = self.codec.bytes_per_token();
            prefetch_lines(&c.res.payload()[s * bpt..e * bpt]);
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

    fn check_query(&self, query: EmbRef<'_>, k: usize) -> Result<()> {
        if k == 0 {
            return Err(Error::InvalidArgument("k must be at least 1".into()));
        }
        if query.dim() != self.meta.dim {
            return Err(Error::DimensionMismatch {
                what: "query embeddings".into(),
                expected: self.meta.dim,
                got: query.dim(),
            });
        }
        if query.rows() == 0 {
            return Err(Error::InvalidArgument(
                "the query has no token embeddings".into(),
            ));
        }
        if self.live == 0 {
            return Err(Error::EmptyIndex);
        }
        Ok(())
    }

    fn subset_mask(&self, subset: Option<&[String]>) -> Option<Vec<u32>> {
        subset.map(|ids| {
            let mut v: Vec<u32> = ids
                .iter()
                .filter_map(|id| self.by_id.get(id).copied())
                .filter(|&d| !self.deleted[d as usize])
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        })
    }

    /// Searches one query with the PLAID pipeline. `subset` restricts results to those external ids (ids the
    /// index does not hold are ignored).
    pub fn search(
        &self,
        query: EmbRef<'_>,
        params: &SearchParams,
        subset: Option<&[String]>,
    ) -> Result<Vec<Hit>> {
        self.check_query(query, params.k)?;
        let subset = self.subset_mask(subset);
        Ok(self.search_inner(query, params, subset.as_deref()))
    }

    /// Searches many queries in parallel.
    pub fn search_batch(
        &self,
        queries: &[EmbRef<'_>],
        params: &SearchParams,
        subset: Option<&[String]>,
    ) -> Result<Vec<Vec<Hit>>> {
        for q in queries {
            self.check_query(*q, params.k)?;
        }
        let subset = self.subset_mask(subset);
        Ok(queries
            .par_iter()
            .map(|q| self.search_inner(*q, params, subset.as_deref()))
            .collect())
    }

    fn search_inner(&self, q: EmbRef<'_>, p: &SearchParams, subset: Option<&[u32]>) -> Vec<Hit> {
        // Per-thread score buffers (about 1.3 MB at 8,192 centroids): fresh ones would be page-faulted in by
        // every query.
        thread_local! {
            static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<i8>)> = Default::default();
        }
        let mut scratch = SCRATCH.with(|s| s.take());
        let hits = self.search_scored(q, p, subset, &mut scratch);
        SCRATCH.with(|s| *s.borrow_mut() = scratch);
        hits
    }

    fn search_scored(
        &self,
        q: EmbRef<'_>,
        p: &SearchParams,
        subset: Option<&[u32]>,
        scratch: &mut (Vec<f32>, Vec<i8>),
    ) -> Vec<Hit> {
        let lq = q.rows();
        let k_c = self.meta.num_centroids;
        let dim = self.meta.dim;
        // 1. Centroid scores, centroid-major and padded to groups of LANES query tokens:
        //    sp[(c * groups + g) * LANES + i] = <centroid c, query token g·LANES + i> (0 in the padding).
        let groups = lq.div_ceil(LANES);
        let stride = groups * LANES;
        let (qt, qstride) = crate::half_dot::transpose_query(q.data(), lq, dim);
        debug_assert_eq!(qstride, stride);
        // Every entry is written by the kernel; the buffer is reused across this thread's searches.
        let (sp_buf, sq_buf) = (&mut scratch.0, &mut scratch.1);
        sp_buf.resize(k_c * stride, 0.0);
        let sp_max = self
            .centroids
            .scores(q.data(), &qt, lq, dim, stride, sp_buf);
        let sp: &[f32] = sp_buf;
        // 2. Candidates.
        let candidates: Vec<u32> = match subset {
            Some(sub) if sub.len() <= p.ndocs.max(4 * p.k) => sub.to_vec(),
            _ => {
                let cells = top_cells(sp, stride, lq, p.n_ivf_probe.clamp(1, k_c));
                let allowed: Option<Vec<bool>> = subset.map(|sub| {
                    let mut m = vec![false; self.ids.len()];
                    sub.iter().for_each(|&d| m[d as usize] = true);
                    m
                });
                let mut seen = vec![false; self.ids.len()];
                let mut out = Vec::new();
                let mut list = Vec::new();
                for c in cells {
                    list.clear();
                    self.ivf.list_into(c as usize, &mut list);
                    for &d in &list {
                        let du = d as usize;
                        if !seen[du] && !self.deleted[du] && allowed.as_ref().is_none_or(|m| m[du])
                        {
                            seen[du] = true;
                            out.push(d);
                        }
                    }
                }
                out
            }
        };
        if candidates.is_empty() {
            return Vec::new();
        }
        // 3. Approximate scores from centroid codes, first with pruning, then on full bags.
        // Pass A and B read the scores quantised to i8 (a quarter of the memory traffic).
        let sq_scale = kernels::quantize_scores_into(sp, sp_max, sq_buf);
        let sq: &[i8] = sq_buf;
        // Per-centroid best score, only needed for pruning (empty = no pruning).
        let cmax: Vec<f32> = if p.centroid_score_threshold.is_some() {
            sp.chunks_exact(stride)
                .map(|r| r[..lq].iter().copied().fold(f32::NEG_INFINITY, f32::max))
                .collect()
        } else {
            Vec::new()
        };
        // Scores of `docs`, and with `keep_best` each document's per-lane maxima (`groups` rows per document,
        // for the token pruning of pass C).
        let approx = |docs: &[u32],
                      threshold: Option<f32>,
                      keep_best: bool|
         -> (Vec<f32>, Vec<[i8; LANES]>) {
            let thr = threshold.unwrap_or(f32::NEG_INFINITY);
            let per = if keep_best { groups } else { 0 };
            let block = |ch: &[u32]| -> (Vec<f32>, Vec<[i8; LANES]>) {
                let mut best = vec![[0i8; LANES]; ch.len() * per];
                let scores = ch
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if let Some(&next) = ch.get(i + 2) {
                            self.prefetch_doc(next as usize, false);
                        }
                        let b = &mut best[i * per..(i + 1) * per];
                        let units = match self.codes_of(d as usize) {
                            Codes::U16(cs) => kernels::bag_score_i8(cs, sq, groups, &cmax, thr, b),
                            Codes::U32(cs) => kernels::bag_score_i8(cs, sq, groups, &cmax, thr, b),
                        };
                        units as f32
                    })
                    .collect();
                (scores, best)
            };
            if docs.len() > 1024 {
                let parts: Vec<_> = docs.par_chunks(512).map(block).collect();
                let mut scores = Vec::with_capacity(docs.len());
                let mut best = Vec::with_capacity(docs.len() * per);
                for (s, b) in parts {
                    scores.extend(s);
                    best.extend(b);
                }
                (scores, best)
            } else {
                block(docs)
            }
        };
        // The `n` best of `docs` by `scores`, with their rows of `best` (when kept).
        let pick = |docs: &[u32], scores: &[f32], best: &[[i8; LANES]], n: usize| {
            let per = best.len() / docs.len().max(1);
            let top = top_k(scores, n.max(1));
            let ids: Vec<u32> = top.iter().map(|&(i, _)| docs[i]).collect();
            let rows: Vec<[i8; LANES]> = top
                .iter()
                .flat_map(|&(i, _)| best[i * per..(i + 1) * per].iter().copied())
                .collect();
            (ids, rows)
        };
        let keep_best = p.token_margin.is_some();
        let pruned = p.centroid_score_threshold.is_some();
        let (stage1, best1) = approx(
            &candidates,
            p.centroid_score_threshold,
            keep_best && !pruned,
        );
        let (cands, best) = if pruned {
            let (cands, _) = pick(&candidates, &stage1, &[], p.ndocs.max(p.k));
            let (stage2, best2) = approx(&cands, None, keep_best);
            pick(&cands, &stage2, &best2, p.n_residual.max(p.k))
        } else {
            // Without pruning, pass B would repeat pass A.
            pick(
                &candidates,
                &stage1,
                &best1,
                p.n_residual.min(p.ndocs).max(p.k),
            )
        };
        // 4. Residual-aware approximate MaxSim through the lookup table.
        let tables: Vec<(Vec<i16>, f32)> = (0..groups)
            .map(|g| {
                let rows = (lq - g * LANES).min(LANES);
                self.codec.query_table_i16(
                    &q.data()[g * LANES * dim..(g * LANES + rows) * dim],
                    rows,
                    LANES,
                )
            })
            .collect();
        let margin = p
            .token_margin
            .map(|m| kernels::round_i32(m * sq_scale).clamp(0, i16::MAX as i32) as i16);
        let stage3 = self.residual_scores(sp, sq, margin, &best, groups, &tables, lq, &cands);
        let (cands, _) = pick(&cands, &stage3, &[], p.n_rerank.max(p.k));
        // 5. Exact MaxSim: half-precision copy, or decompressed residuals.
        let full = p.full_precision_rerank && self.meta.config.store_full;
        let scores = self.score_docs(q, &cands, full);
        top_k(&scores, p.k)
            .into_iter()
            .map(|(i, sc)| Hit {
                id: self.ids[cands[i] as usize].clone(),
                score: sc,
            })
            .collect()
    }

    /// Pass C: `Σ_j max_t (S[code_t, j] + Σ_p table[p][byte_tp][j])` per document, in parallel blocks. With
    /// a `margin`, `best` holds each document's per-lane centroid-score maxima from pass A (`groups` rows per
    /// document, in the order of `docs`) and only the tokens near them are scored.
    #[allow(clippy::too_many_arguments)]
    fn residual_scores(
        &self,
        sp: &[f32],
        sq: &[i8],
        margin: Option<i16>,
        best: &[[i8; LANES]],
        groups: usize,
        tables: &[(Vec<i16>, f32)],
        lq: usize,
        docs: &[u32],
    ) -> Vec<f32> {
        let bpt = self.codec.bytes_per_token();
        if margin.is_some() {
            assert_eq!(best.len(), docs.len() * groups, "per-document maxima");
        }
        const BLOCK: usize = 64;
        // Per block of documents: gather the kept tokens, then score them position-major.
        let block = |(bi, ch): (usize, &[u32])| -> Vec<f32> {
            let mut keep = Vec::new();
            let mut gath = kernels::Gathered::default();
            for (i, &d) in ch.iter().enumerate() {
                if let Some(&next) = ch.get(i + 1) {
                    self.prefetch_doc(next as usize, true);
                }
                let (c, st, e) = self.local_range(d as usize);
                let res = &c.res.payload()[st * bpt..e * bpt];
                let at = (bi * BLOCK + i) * groups;
                fn push<C: kernels::Code>(
                    cs: &[C],
                    gath: &mut kernels::Gathered,
                    keep: &mut Vec<u32>,
                    margin: Option<(i16, &[[i8; LANES]])>,
                    res: &[u8],
                    bpt: usize,
                    (sq, groups, lq): (&[i8], usize, usize),
                ) {
                    match margin {
                        Some((m, best)) => kernels::keep_tokens(cs, sq, groups, lq, m, best, keep),
                        None => {
                            keep.clear();
                            keep.extend(0..cs.len() as u32);
                        }
                    }
                    gath.push_doc(cs, keep, res, bpt);
                }
                let m = margin.map(|m| (m, &best[at..at + groups]));
                let ctx = (sq, groups, lq);
                match self.codes_of(d as usize) {
                    Codes::U16(cs) => push(cs, &mut gath, &mut keep, m, res, bpt, ctx),
                    Codes::U32(cs) => push(cs, &mut gath, &mut keep, m, res, bpt, ctx),
                }
            }
            let mut out = Vec::new();
            kernels::residual_block(&mut gath, bpt, sp, groups, tables, lq, &mut out);
            out
        };
        if docs.len() > BLOCK {
            docs.par_chunks(BLOCK)
                .enumerate()
                .flat_map_iter(block)
                .collect()
        } else {
            block((0, docs))
        }
    }

    /// Token embeddings of `doc` as f32: from the half-precision copy when `full`, else decompressed.
    fn decompressed_tokens(&self, doc: usize, out: &mut Vec<f32>) {
        let dim = self.meta.dim;
        let (c, s, e) = self.local_range(doc);
        let start = out.len();
        out.resize(start + (e - s) * dim, 0.0);
        let dst = &mut out[start..];
        let bpt = self.codec.bytes_per_token();
        let res = &c.res.payload()[s * bpt..e * bpt];
        let codes = self.codes_of(doc);
        let mut centroid = vec![0f32; dim];
        for t in 0..e - s {
            let code = match &codes {
                Codes::U16(cs) => cs[t] as usize,
                Codes::U32(cs) => cs[t] as usize,
            };
            self.centroids.row_into(code, &mut centroid);
            self.codec.decode(
                &centroid,
                &res[t * bpt..(t + 1) * bpt],
                &mut dst[t * dim..(t + 1) * dim],
            );
        }
    }

    /// MaxSim of `q` against `docs` (from the f16 copy or decompressed), in parallel blocks.
    fn score_docs(&self, q: EmbRef<'_>, docs: &[u32], full: bool) -> Vec<f32> {
        let block = 32;
        let dim = self.meta.dim;
        let lq = q.rows();
        // The half-precision copy is scored in place (no f32 copy of the documents).
        let (qt, stride) = crate::half_dot::transpose_query(q.data(), lq, dim);
        let score_block = |ch: &[u32]| -> Vec<f32> {
            if full {
                let mut scratch = Vec::new();
                let mut acc = vec![0f32; lq];
                return ch
                    .iter()
                    .map(|&d| {
                        let (c, s, e) = self.local_range(d as usize);
                        let f = c.full.as_ref().expect("store_full");
                        let h: &[f16] = cast(f.payload(), f.path(), "f16").expect("checked");
                        scratch.resize((e - s) * stride, 0.0);
                        crate::half_dot::dots(
                            &h[s * dim..e * dim],
                            dim,
                            &qt,
                            stride,
                            q.data(),
                            lq,
                            &mut scratch,
                        );
                        acc.fill(f32::NEG_INFINITY);
                        max_rows_into(&scratch, stride, &mut acc);
                        if e > s {
                            acc.iter().sum()
                        } else {
                            0.0
                        }
                    })
                    .collect();
            }
            let mut buf = Vec::new();
            let mut offs = vec![0usize];
            for &d in ch {
                self.decompressed_tokens(d as usize, &mut buf);
                offs.push(buf.len() / dim);
            }
            maxsim_segments(q.data(), lq, &buf, &offs, dim)
        };
        if docs.len() > block {
            docs.par_chunks(block).flat_map_iter(score_block).collect()
        } else {
            score_block(docs)
        }
    }

    /// Exhaustive search: exact MaxSim against every live document (from the half-precision copy, or from
    /// decompressed residuals when the index keeps no copy).
    pub fn search_exact(
        &self,
        query: EmbRef<'_>,
        k: usize,
        subset: Option<&[String]>,
    ) -> Result<Vec<Hit>> {
        self.check_query(query, k)?;
        let docs: Vec<u32> = match self.subset_mask(subset) {
            Some(s) => s,
            None => (0..self.ids.len() as u32)
                .filter(|&d| !self.deleted[d as usize])
                .collect(),
        };
        let scores = self.score_docs(query, &docs, self.meta.config.store_full);
        Ok(top_k(&scores, k)
            .into_iter()
            .map(|(i, s)| Hit {
                id: self.ids[docs[i] as usize].clone(),
                score: s,
            })
            .collect())
    }

    /// Builds a new index in `dir` (created if missing) from `source`. Fails if `dir` already holds an index.
    pub fn create(
        dir: impl AsRef<Path>,
        source: &dyn DocumentSource,
        config: &IndexConfig,
    ) -> Result<AddReport> {
        let dir = dir.as_ref();
        check_nbits(config.nbits)?;
        if config.pool_factor == 0 {
            return Err(Error::InvalidArgument(
                "pool_factor must be at least 1".into(),
            ));
        }
        if config.assign_probe == Some(0) {
            return Err(Error::InvalidArgument(
                "assign_probe must be at least 1".into(),
            ));
        }
        if config.kmeans_points_per_centroid == 0 {
            return Err(Error::InvalidArgument(
                "kmeans_points_per_centroid must be at least 1".into(),
            ));
        }
        if source.dim() == 0 || !source.dim().is_multiple_of(8) {
            return Err(Error::InvalidArgument(format!(
                "embedding dimension must be a positive multiple of 8, got {}",
                source.dim()
            )));
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
        collect_garbage(dir, None);
        let ids = validate_ids(source, &HashMap::new())?;
        let (centroids, codec) = train(source, config)?;
        let k = centroids.len() / source.dim();
        // Centroids are stored in half precision; documents are encoded against the rounded values.
        let half: Vec<f16> = centroids.iter().map(|&v| f16::from_f32(v)).collect();
        let centroids: Vec<f32> = half.iter().map(|v| v.to_f32()).collect();
        write_sections(
            &dir.join(CODEC),
            b"CODC",
            &[
                as_bytes(&half),
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
            write_chunk(dir, &mut meta, &centroids, &codec, source, &ids)?;
        let tokens = chunk.tokens;
        meta.chunks.push(chunk);
        write_ivf(dir, &meta, None, &codes)?;
        commit(dir, &meta)?;
        Ok(AddReport {
            documents: source.len(),
            tokens,
            trained: true,
            num_centroids: k,
            outlier_fraction: outliers as f64 / tokens.max(1) as f64,
        })
    }

    /// Adds documents to the index in `dir` with its existing centroids. Nothing changes unless every document
    /// is valid (dimension, unique new ids, at least one token).
    pub fn add(dir: impl AsRef<Path>, source: &dyn DocumentSource) -> Result<AddReport> {
        let dir = dir.as_ref();
        if !dir.join(META).exists() {
            return Err(Error::NotAnIndex(dir.to_path_buf()));
        }
        let _lock = WriterLock::acquire(dir)?;
        let current = Self::open(dir)?;
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
        let ids = validate_ids(source, &current.by_id)?;
        let mut meta = current.meta.clone();
        meta.format_version = FORMAT_VERSION;
        meta.generation += 1;
        let (chunk, codes, outliers) = write_chunk(
            dir,
            &mut meta,
            &current.centroids.to_f32(),
            &current.codec,
            source,
            &ids,
        )?;
        let tokens = chunk.tokens;
        meta.chunks.push(chunk);
        write_ivf(dir, &meta, Some(&current), &codes)?;
        commit(dir, &meta)?;
        Ok(AddReport {
            documents: source.len(),
            tokens,
            trained: false,
            num_centroids: meta.num_centroids,
            outlier_fraction: outliers as f64 / tokens.max(1) as f64,
        })
    }

    /// Deletes documents by external id. Fails, deleting nothing, if any id is unknown. Ids of the other
    /// documents never change. When more than a fifth of the stored documents are deleted, the index is
    /// compacted (their space reclaimed).
    pub fn delete(dir: impl AsRef<Path>, ids: &[String]) -> Result<DeleteReport> {
        let dir = dir.as_ref();
        if !dir.join(META).exists() {
            return Err(Error::NotAnIndex(dir.to_path_buf()));
        }
        let _lock = WriterLock::acquire(dir)?;
        let current = Self::open(dir)?;
        let mut unknown = Vec::new();
        let mut del: Vec<u32> = current.meta.deleted.clone();
        let mut seen = HashSet::new();
        for id in ids {
            match current.by_id.get(id) {
                Some(&d) if !current.deleted[d as usize] => {
                    if seen.insert(d) {
                        del.push(d)
                    }
                }
                _ => unknown.push(id.as_str()),
            }
        }
        if !unknown.is_empty() {
            let shown: Vec<&str> = unknown.iter().take(10).copied().collect();
            let more = if unknown.len() > 10 {
                format!(" and {} more", unknown.len() - 10)
            } else {
                String::new()
            };
            return Err(Error::UnknownIds(format!("{shown:?}{more}")));
        }
        del.sort_unstable();
        let mut meta = current.meta.clone();
        meta.format_version = FORMAT_VERSION;
        meta.deleted = del;
        meta.generation += 1;
        let compact = meta.deleted.len() * 5 > current.ids.len();
        if compact {
            compact_into(dir, &current, meta)?;
        } else {
            // Same inverted lists, new generation name (search skips deleted documents).
            write_ivf(dir, &meta, Some(&current), &[])?;
            commit(dir, &meta)?;
        }
        Ok(DeleteReport {
            deleted: seen.len(),
            remaining: current.live - seen.len(),
            compacted: compact,
        })
    }

    /// Rewrites the index without its deleted documents. External ids are unchanged.
    pub fn compact(dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        if !dir.join(META).exists() {
            return Err(Error::NotAnIndex(dir.to_path_buf()));
        }
        let _lock = WriterLock::acquire(dir)?;
        let current = Self::open(dir)?;
        let mut meta = current.meta.clone();
        meta.format_version = FORMAT_VERSION;
        meta.generation += 1;
        compact_into(dir, &current, meta)
    }
}

/// The union of every query token's `probe` best centroids, ascending. `sp` is centroid-major with rows of
/// `stride ≥ lq` scores; one sequential pass, with a per-token admission threshold.
/// Prefetches every cache line of `bytes` into L1 (a hint; no effect off x86-64).
#[inline]
fn prefetch_lines(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes.len()).step_by(64) {
        // SAFETY: prefetching is a hint with no memory effect; the address is inside `bytes`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                bytes.as_ptr().add(off) as *const i8,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

fn top_cells(sp: &[f32], stride: usize, lq: usize, probe: usize) -> Vec<u32> {
    let mut best: Vec<Vec<(f32, u32)>> = vec![Vec::with_capacity(probe + 1); lq];
    let mut thr = vec![f32::NEG_INFINITY; lq];
    for (c, row) in sp.chunks_exact(stride).enumerate() {
        let row = &row[..lq];
        // Fast path: most rows beat no token's threshold.
        if !row.iter().zip(&thr).any(|(v, t)| v > t) {
            continue;
        }
        for j in 0..lq {
            let v = row[j];
            if v > thr[j] {
                let b = &mut best[j];
                let at = b.partition_point(|x| x.0 >= v);
                b.insert(at, (v, c as u32));
                if b.len() > probe {
                    b.pop();
                }
                if b.len() == probe {
                    thr[j] = b[probe - 1].0;
                }
            }
        }
    }
    let mut cells: Vec<u32> = best.into_iter().flatten().map(|(_, c)| c).collect();
    cells.sort_unstable();
    cells.dedup();
    cells
}

fn parse_codec(file: Mapped, meta: &Meta) -> Result<(Centroids, Codec)> {
    let corrupt = |r: &str| Error::Corrupt {
        path: file.path().to_path_buf(),
        reason: r.into(),
    };
    let secs = file.sections()?;
    if secs.len() != 4 {
        return Err(corrupt("expected 4 sections"));
    }
    let cutoffs: &[f32] = cast(secs[1], file.path(), "cutoffs")?;
    let weights: &[f32] = cast(secs[2], file.path(), "weights")?;
    let thr: &[f32] = cast(secs[3], file.path(), "threshold")?;
    let nbits = meta.config.nbits;
    check_nbits(nbits).map_err(|_| corrupt("bad nbits in meta.lt"))?;
    // Format 1 stores f32 centroids, format 2 f16.
    let width = if file.version() >= 2 { 2 } else { 4 };
    if secs[0].len() != meta.num_centroids * meta.dim * width
        || cutoffs.len() != (1 << nbits) - 1
        || weights.len() != 1 << nbits
        || thr.len() != 1
    {
        return Err(corrupt("codec sizes do not match meta.lt"));
    }
    let codec = Codec::new(nbits, meta.dim, cutoffs.to_vec(), weights.to_vec(), thr[0]);
    let centroids = if width == 4 {
        Centroids::F32(cast::<f32>(secs[0], file.path(), "centroids")?.to_vec())
    } else {
        cast::<f16>(secs[0], file.path(), "centroids")?;
        let start = secs[0].as_ptr() as usize - file.payload().as_ptr() as usize;
        let range = start..start + secs[0].len();
        Centroids::F16 { file, range }
    };
    Ok((centroids, codec))
}

fn validate_ids(
    source: &dyn DocumentSource,
    existing: &HashMap<String, u32>,
) -> Result<Vec<String>> {
    let mut seen = HashSet::with_capacity(source.len());
    let mut ids = Vec::with_capacity(source.len());
    for i in 0..source.len() {
        let id = source.id(i);
        if id.is_empty() || id.contains('\n') {
            return Err(Error::InvalidArgument(format!(
                "document id {id:?} is empty or contains a newline"
            )));
        }
        if existing.contains_key(&id) || !seen.insert(id.clone()) {
            return Err(Error::DuplicateId(id));
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Loads (and pools) document `i`, checking its shape.
fn load_doc<'a>(
    source: &'a dyn DocumentSource,
    i: usize,
    pool_factor: usize,
) -> Result<Cow<'a, [f32]>> {
    let dim = source.dim();
    let e = source.embeddings(i)?;
    if e.len() % dim != 0 {
        return Err(Error::Shape(format!(
            "document {:?}: {} values are not whole rows of dimension {dim}",
            source.id(i),
            e.len()
        )));
    }
    if e.is_empty() {
        return Err(Error::EmptyDocument(source.id(i)));
    }
    if pool_factor > 1 {
        Ok(Cow::Owned(pool::pool_embeddings_hierarchical(
            &e,
            dim,
            pool_factor,
            1,
        )?))
    } else {
        Ok(e)
    }
}

/// Samples documents, trains centroids (k-means) and the residual codec.
fn train(source: &dyn DocumentSource, config: &IndexConfig) -> Result<(Vec<f32>, Codec)> {
    let n = source.len();
    let dim = source.dim();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let n_sample = ((1.0 + 16.0 * (120.0 * n as f64).sqrt()) as usize).min(n);
    let mut picked: Vec<usize> = sample(&mut rng, n, n_sample).into_vec();
    picked.sort_unstable();
    // Estimate the corpus size from a probe of the sample.
    let probe: Vec<usize> = picked
        .iter()
        .copied()
        .step_by((n_sample / 512).max(1))
        .collect();
    let probe_tokens: usize = probe
        .par_iter()
        .map(|&i| load_doc(source, i, config.pool_factor).map(|e| e.len() / dim))
        .sum::<Result<usize>>()?;
    let avg = probe_tokens as f64 / probe.len() as f64;
    let est_tokens = avg * n as f64;
    let k_default = 1usize << ((16.0 * est_tokens.sqrt()).log2().floor().max(0.0) as u32);
    let k_want = config.num_centroids.unwrap_or(k_default).max(1);
    let heldout_cap = 50_000usize;
    let target = k_want * config.kmeans_points_per_centroid + heldout_cap;
    let keep_p = (target as f64 / (avg * n_sample as f64)).min(1.0);
    // Stream the sample, keeping each token with probability keep_p.
    let mut points: Vec<f32> = Vec::new();
    for batch in picked.chunks(256) {
        let docs: Vec<Cow<'_, [f32]>> = batch
            .par_iter()
            .map(|&i| load_doc(source, i, config.pool_factor))
            .collect::<Result<_>>()?;
        for d in docs {
            for row in d.chunks_exact(dim) {
                if keep_p >= 1.0 || rng.random::<f64>() < keep_p {
                    points.extend_from_slice(row);
                }
            }
        }
    }
    let total = points.len() / dim;
    if total == 0 {
        return Err(Error::InvalidArgument(
            "the sampled documents have no tokens".into(),
        ));
    }
    // Shuffle rows, split off a held-out set for the codec.
    let order = sample(&mut rng, total, total).into_vec();
    let heldout = if total >= 20 {
        (total / 20).min(heldout_cap)
    } else {
        0
    };
    let train_n = (total - heldout)
        .min(k_want * config.kmeans_points_per_centroid)
        .max(1);
    let gather = |idx: &[usize]| -> Vec<f32> {
        let mut v = Vec::with_capacity(idx.len() * dim);
        idx.iter()
            .for_each(|&i| v.extend_from_slice(&points[i * dim..(i + 1) * dim]));
        v
    };
    let train_pts = gather(&order[heldout..heldout + train_n.min(total - heldout)]);
    let held_pts = if heldout > 0 {
        gather(&order[..heldout])
    } else {
        train_pts.clone()
    };
    drop(points);
    let k = k_want.min(train_pts.len() / dim);
    let centroids = kmeans::train(
        &train_pts,
        dim,
        k,
        config.kmeans_iters,
        config.seed,
        config.probe(),
    );
    let codes = kmeans::Assigner::new(&centroids, dim, config.probe()).assign(&held_pts);
    let mut residuals = held_pts;
    for (t, &c) in codes.iter().enumerate() {
        let c = c as usize;
        for (r, &cv) in residuals[t * dim..(t + 1) * dim]
            .iter_mut()
            .zip(&centroids[c * dim..(c + 1) * dim])
        {
            *r -= cv;
        }
    }
    Ok((centroids, Codec::train(config.nbits, dim, &residuals)))
}

/// Encodes every document of `source` into a new chunk (codes, residuals, f16 copy, doclens + ids), streaming.
/// Returns the chunk, its codes (for the inverted lists) and the number of outlier tokens.
fn write_chunk(
    dir: &Path,
    meta: &mut Meta,
    centroids: &[f32],
    codec: &Codec,
    source: &dyn DocumentSource,
    ids: &[String],
) -> Result<(ChunkMeta, Vec<u32>, u64)> {
    let dim = meta.dim;
    let id = meta.next_chunk;
    meta.next_chunk += 1;
    let mut codes_w = StreamWriter::create(&dir.join(chunk_file(id, "codes")), b"CODE")?;
    let mut res_w = StreamWriter::create(&dir.join(chunk_file(id, "res")), b"RESI")?;
    let mut full_w = if meta.config.store_full {
        Some(StreamWriter::create(
            &dir.join(chunk_file(id, "f16")),
            b"FULL",
        )?)
    } else {
        None
    };
    let bpt = codec.bytes_per_token();
    let mut all_codes: Vec<u32> = Vec::new();
    let mut doclens: Vec<u32> = Vec::with_capacity(source.len());
    let mut outliers = 0u64;
    let thr2 = codec.cluster_threshold * codec.cluster_threshold;
    let assigner = kmeans::Assigner::new(centroids, dim, meta.config.probe());
    let mut start = 0;
    const BATCH_DOCS: usize = 512;
    while start < source.len() {
        let end = (start + BATCH_DOCS).min(source.len());
        let docs: Vec<Cow<'_, [f32]>> = (start..end)
            .into_par_iter()
            .map(|i| load_doc(source, i, meta.config.pool_factor))
            .collect::<Result<_>>()?;
        let mut flat: Vec<f32> = Vec::with_capacity(docs.iter().map(|d| d.len()).sum());
        for d in &docs {
            if d.len() / dim > u32::MAX as usize {
                return Err(Error::InvalidArgument(
                    "a document has more than 2^32 tokens".into(),
                ));
            }
            doclens.push((d.len() / dim) as u32);
            flat.extend_from_slice(d);
        }
        drop(docs);
        let codes = assigner.assign(&flat);
        let mut packed = vec![0u8; codes.len() * bpt];
        outliers += packed
            .par_chunks_mut(bpt.max(1) * 256)
            .enumerate()
            .map(|(b, out)| {
                let mut r = vec![0f32; dim];
                let mut n_out = 0u64;
                for (t, o) in out.chunks_exact_mut(bpt).enumerate() {
                    let tok = b * 256 + t;
                    let c = codes[tok] as usize;
                    let mut norm2 = 0f32;
                    for ((rv, &x), &cv) in r
                        .iter_mut()
                        .zip(&flat[tok * dim..(tok + 1) * dim])
                        .zip(&centroids[c * dim..(c + 1) * dim])
                    {
                        *rv = x - cv;
                        norm2 += *rv * *rv;
                    }
                    if norm2 > thr2 {
                        n_out += 1;
                    }
                    codec.encode(&r, o);
                }
                n_out
            })
            .sum::<u64>();
        if meta.code_width() == 2 {
            let c16: Vec<u16> = codes.iter().map(|&c| c as u16).collect();
            codes_w.write(as_bytes(&c16))?;
        } else {
            codes_w.write(as_bytes(&codes))?;
        }
        res_w.write(&packed)?;
        if let Some(w) = full_w.as_mut() {
            let h: Vec<f16> = flat.iter().map(|&v| f16::from_f32(v)).collect();
            w.write(as_bytes(&h))?;
        }
        all_codes.extend_from_slice(&codes);
        start = end;
    }
    let tokens = all_codes.len() as u64;
    codes_w.finish()?;
    res_w.finish()?;
    if let Some(w) = full_w {
        w.finish()?;
    }
    let names = ids.join("\n");
    write_sections(
        &dir.join(chunk_file(id, "docs")),
        b"DOCS",
        &[as_bytes(&doclens), names.as_bytes()],
    )?;
    Ok((
        ChunkMeta {
            id,
            docs: source.len(),
            tokens,
        },
        all_codes,
        outliers,
    ))
}

/// Writes the inverted lists (centroid → ascending unique internal doc ids) for `meta`'s chunks: the chunks of
/// `current` (read from disk) followed by the new chunk whose codes are `new_codes`.
fn write_ivf(
    dir: &Path,
    meta: &Meta,
    current: Option<&PlaidIndex>,
    new_codes: &[u32],
) -> Result<()> {
    let k = meta.num_centroids;
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    let mut doc = 0u32;
    let mut per_doc: Vec<u32> = Vec::new();
    let flush = |per_doc: &mut Vec<u32>, doc: u32, pairs: &mut Vec<(u32, u32)>| {
        per_doc.sort_unstable();
        per_doc.dedup();
        pairs.extend(per_doc.iter().map(|&c| (c, doc)));
        per_doc.clear();
    };
    if let Some(cur) = current {
        for d in 0..cur.ids.len() {
            match cur.codes_of(d) {
                Codes::U16(cs) => per_doc.extend(cs.iter().map(|&c| c as u32)),
                Codes::U32(cs) => per_doc.extend_from_slice(cs),
            }
            flush(&mut per_doc, doc, &mut pairs);
            doc += 1;
        }
    }
    if !new_codes.is_empty() {
        let last = meta.chunks.last().expect("new chunk");
        let lens = chunk_doclens(dir, last.id)?;
        let mut t = 0usize;
        for l in lens {
            per_doc.extend_from_slice(&new_codes[t..t + l as usize]);
            t += l as usize;
            flush(&mut per_doc, doc, &mut pairs);
            doc += 1;
        }
    }
    pairs.par_sort_unstable();
    let (offsets, data) = ivf::encode(&pairs, k);
    write_sections(
        &dir.join(meta.ivf_name()),
        b"IVFL",
        &[as_bytes(&offsets), &data],
    )
}

fn chunk_doclens(dir: &Path, id: u64) -> Result<Vec<u32>> {
    let f = Mapped::open(&dir.join(chunk_file(id, "docs")), b"DOCS")?;
    let secs = f.sections()?;
    Ok(cast::<u32>(secs[0], f.path(), "doclens")?.to_vec())
}

/// Writes one new chunk holding the live documents of `current`, new inverted lists, and commits.
fn compact_into(dir: &Path, current: &PlaidIndex, mut meta: Meta) -> Result<()> {
    let dim = meta.dim;
    let dead: HashSet<u32> = meta.deleted.iter().copied().collect();
    let id = meta.next_chunk;
    meta.next_chunk += 1;
    let mut codes_w = StreamWriter::create(&dir.join(chunk_file(id, "codes")), b"CODE")?;
    let mut res_w = StreamWriter::create(&dir.join(chunk_file(id, "res")), b"RESI")?;
    let mut full_w = if meta.config.store_full {
        Some(StreamWriter::create(
            &dir.join(chunk_file(id, "f16")),
            b"FULL",
        )?)
    } else {
        None
    };
    let bpt = current.codec.bytes_per_token();
    let cw = meta.code_width();
    let mut doclens = Vec::new();
    let mut ids = Vec::new();
    let mut all_codes = Vec::new();
    for d in 0..current.ids.len() {
        if dead.contains(&(d as u32)) {
            continue;
        }
        let (c, s, e) = current.local_range(d);
        codes_w.write(&c.codes.payload()[s * cw..e * cw])?;
        res_w.write(&c.res.payload()[s * bpt..e * bpt])?;
        if let (Some(w), Some(f)) = (full_w.as_mut(), c.full.as_ref()) {
            w.write(&f.payload()[s * dim * 2..e * dim * 2])?;
        }
        match current.codes_of(d) {
            Codes::U16(cs) => all_codes.extend(cs.iter().map(|&c| c as u32)),
            Codes::U32(cs) => all_codes.extend_from_slice(cs),
        }
        doclens.push((e - s) as u32);
        ids.push(current.ids[d].as_str());
    }
    codes_w.finish()?;
    res_w.finish()?;
    if let Some(w) = full_w {
        w.finish()?;
    }
    write_sections(
        &dir.join(chunk_file(id, "docs")),
        b"DOCS",
        &[as_bytes(&doclens), ids.join("\n").as_bytes()],
    )?;
    meta.chunks = vec![ChunkMeta {
        id,
        docs: ids.len(),
        tokens: all_codes.len() as u64,
    }];
    meta.deleted.clear();
    write_ivf(dir, &meta, None, &all_codes)?;
    commit(dir, &meta)
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

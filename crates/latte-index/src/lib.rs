//! Late-interaction (ColBERT) scoring and indexes for latte.
//!
//! * [`scores`]: PyLate-compatible `colbert_scores`, `colbert_scores_pairwise`, `colbert_kd_scores` and a fast
//!   multi-threaded MaxSim kernel built on a matrix multiply.
//! * [`rerank`]: PyLate's `rank.rerank` (candidates sorted by exact MaxSim).
//! * [`ExactIndex`]: brute-force in-memory index, the ground truth.
//! * [`PlaidIndex`]: on-disk PLAID index (k-means centroids, residual codec, inverted lists) with add, delete,
//!   compaction, subset search and a half-precision copy of the embeddings for an exact final rerank.
//! * [`IndexCodec`]: an index's trained centroids and residual codec ([`PlaidIndex::train_codec`],
//!   [`IndexCodec::from_index`]), to build several indexes with one ([`PlaidIndex::create_with_codec`]).
//! * [`IndexWriter`]: the one writer of a [`PlaidIndex`] ([`PlaidIndex::writer`]), holding an OS lock on the
//!   index's `LOCK` file; add, delete and compact, then [`IndexWriter::commit`].
//! * [`kmeans`]: spherical k-means and nearest-centroid assignment (brute force, or two-level above 4,096
//!   centroids through a reusable [`kmeans::Assigner`]).
//! * [`pool`]: token pooling (Ward hierarchical clustering), matching PyLate's `pool_embeddings_hierarchical`.
//!
//! * [`DocumentSource`]: documents to index, read one at a time ([`VecSource`] in memory, [`NpzSource`] lazily
//!   from a `.npz` archive, [`SpooledSource`] written once to a temporary file by a [`SpoolWriter`],
//!   [`SyntheticSource`] generated on the fly for scale benchmarks), so a build never holds the whole corpus.
//!
//! Embeddings are passed as row-major `f32` matrices (`tokens × dim`) through [`EmbRef`]. The on-disk layout is
//! documented in FORMAT.md; measured numbers and the benchmark commands are in BENCHMARKS.md.
#![warn(missing_docs)]
// Every SIMD and unsafe hot loop lives in latte-kernels; only the memory maps (storage.rs) need unsafe here.
#![deny(unsafe_code)]

#[cfg(target_endian = "big")]
compile_error!("latte-index stores little-endian data and memory-maps it; big-endian targets are not supported");

mod centroids;
mod codec;
mod error;
mod exact;
mod hybrid;
mod ivf;
pub mod kmeans;
mod npz_source;
mod plaid;
pub mod pool;
mod rerank_mod;
pub mod scores;
mod spool;
// Memory-mapping the index files, and viewing their mapped bytes as plain numbers.
#[allow(unsafe_code)]
mod storage;
mod synth;

pub use error::{Error, Result};
pub use exact::ExactIndex;
pub use hybrid::{search_bm25, Fusion, HYBRID_DEPTH};
pub use latte_store::{Doc, DocStore, Filter, FilterError, StoreError, RRF_K};
pub use npz_source::NpzSource;
pub use plaid::{
    default_num_centroids, AddReport, DeleteReport, DocumentSource, IndexCodec, IndexConfig,
    IndexInfo, IndexWriter, PlaidIndex, SearchParams, VecSource, EXACT_SUBSET_MAX_DOCS,
    EXACT_SUBSET_MAX_FRACTION_INV,
};
pub use rerank_mod::{rerank, RerankResult};
pub use scores::{maxsim, EmbRef};
pub use spool::{SpoolWriter, SpooledSource};
pub use storage::FORMAT_VERSION;
pub use synth::{SynthConfig, SyntheticSource};

/// Reranking (PyLate `rank`).
pub mod rerank {
    pub use crate::rerank_mod::{rerank, RerankResult};
}

/// One search result: the document's external id and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// External document id.
    pub id: String,
    /// MaxSim score (exact unless the search ran without the final rerank).
    pub score: f32,
}

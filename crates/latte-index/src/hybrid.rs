//! Filtered and hybrid search over a [`PlaidIndex`] and the [`DocStore`] holding its documents' text and
//! metadata: a [`Filter`] selects the matching ids in the store and [`PlaidIndex::search_subset`] searches
//! them (exact or restricted PLAID by selectivity); hybrid search runs BM25 over the stored text beside
//! MaxSim, both under the same filter, and fuses the two lists.

use latte_store::{fuse_linear, fuse_rrf, DocStore, Filter};

use crate::{EmbRef, Error, Hit, PlaidIndex, Result, SearchParams};

/// How hybrid search fuses the MaxSim and BM25 lists.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fusion {
    /// Reciprocal rank fusion: Σ 1 / (k + rank); `k` = 60 is the usual choice ([`latte_store::RRF_K`]).
    Rrf {
        /// The rank offset.
        k: f64,
    },
    /// `alpha · dense + (1 − alpha) · sparse` over min-max normalised scores, `alpha` in [0, 1].
    Linear {
        /// The weight of the MaxSim list.
        alpha: f64,
    },
}

impl Default for Fusion {
    fn default() -> Self {
        Fusion::Rrf {
            k: latte_store::RRF_K,
        }
    }
}

/// Each list fused by hybrid search holds this many documents (or `k`, if larger).
pub const HYBRID_DEPTH: usize = 100;

/// BM25 alone over the stored title and text: the `k` best documents matching `filter` (if any).
pub fn search_bm25(
    store: &DocStore,
    query_text: &str,
    k: usize,
    filter: Option<&Filter>,
) -> Result<Vec<Hit>> {
    if k == 0 {
        return Err(Error::InvalidArgument("k must be at least 1".into()));
    }
    Ok(store
        .bm25(query_text, k, filter)?
        .into_iter()
        .map(|(id, s)| Hit {
            id,
            score: s as f32,
        })
        .collect())
}

impl PlaidIndex {
    /// MaxSim search restricted to the documents of `store` matching `filter`, with the strategy chosen by
    /// selectivity ([`PlaidIndex::search_subset`]); the matching ids come from [`PlaidIndex::ids_matching`]
    /// (kept per filter for this generation).
    pub fn search_filtered(
        &self,
        query: EmbRef<'_>,
        params: &SearchParams,
        store: &DocStore,
        filter: &Filter,
    ) -> Result<Vec<Hit>> {
        let ids = self.ids_matching(store, filter)?;
        self.search_subset(query, params, &ids)
    }

    /// Hybrid search: MaxSim (`query_emb`) and BM25 (`query_text` over the stored text), both restricted to
    /// `filter` when given, each to `max(k, HYBRID_DEPTH)` documents, fused by `fusion`; the `params.k`
    /// best fused documents with their fused scores.
    pub fn search_hybrid(
        &self,
        store: &DocStore,
        query_emb: EmbRef<'_>,
        query_text: &str,
        params: &SearchParams,
        filter: Option<&Filter>,
        fusion: Fusion,
    ) -> Result<Vec<Hit>> {
        let k = params.k;
        let depth = k.max(HYBRID_DEPTH);
        let mut deep = params.clone();
        deep.k = depth;
        deep.ndocs = deep.ndocs.max(depth);
        deep.n_residual = deep.n_residual.max(depth);
        deep.n_rerank = deep.n_rerank.max(depth);
        let dense = match filter {
            Some(f) => self.search_filtered(query_emb, &deep, store, f)?,
            None => self.search(query_emb, &deep, None)?,
        };
        let dense: Vec<(String, f64)> = dense.into_iter().map(|h| (h.id, h.score as f64)).collect();
        let sparse = store.bm25(query_text, depth, filter)?;
        let fused = match fusion {
            Fusion::Rrf { k } => fuse_rrf(&[dense, sparse], k)?,
            Fusion::Linear { alpha } => fuse_linear(&dense, &sparse, alpha)?,
        };
        Ok(fused
            .into_iter()
            .take(k)
            .map(|(id, s)| Hit {
                id,
                score: s as f32,
            })
            .collect())
    }
}

//! PyLate `rank.rerank`: candidates sorted by exact MaxSim.

use rayon::prelude::*;

use crate::scores::EmbRef;
use crate::{Error, Result};
use latte_kernels::dot::{matmul_abt, max_rows_into};

/// A reranked candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct RerankResult<I> {
    /// The candidate's id, as given.
    pub id: I,
    /// Its MaxSim score.
    pub score: f32,
}

/// Sorts each query's candidates by MaxSim, best first (PyLate `rank.rerank`).
///
/// `documents_ids[i]` and `documents_embeddings[i]` are query `i`'s candidates. PyLate zero-pads the candidates
/// of a query to the longest one, so a candidate shorter than the longest sees an extra similarity of 0 in its
/// max: its per-token max is `max(0, best)`. That is reproduced here. Ties keep the input order.
pub fn rerank<I: Clone + Send + Sync>(
    documents_ids: &[Vec<I>],
    queries_embeddings: &[EmbRef<'_>],
    documents_embeddings: &[Vec<EmbRef<'_>>],
) -> Result<Vec<Vec<RerankResult<I>>>> {
    if documents_ids.len() != queries_embeddings.len()
        || documents_embeddings.len() != queries_embeddings.len()
    {
        return Err(Error::Shape(format!(
            "{} queries, {} id lists and {} embedding lists: they must match",
            queries_embeddings.len(),
            documents_ids.len(),
            documents_embeddings.len()
        )));
    }
    for (i, (ids, docs)) in documents_ids.iter().zip(documents_embeddings).enumerate() {
        if ids.len() != docs.len() {
            return Err(Error::Shape(format!(
                "query {i}: {} ids but {} documents",
                ids.len(),
                docs.len()
            )));
        }
        for d in docs {
            if d.dim() != queries_embeddings[i].dim() {
                return Err(Error::DimensionMismatch {
                    what: format!("candidates of query {i}"),
                    expected: queries_embeddings[i].dim(),
                    got: d.dim(),
                });
            }
        }
    }
    Ok(queries_embeddings
        .par_iter()
        .zip(
            documents_ids
                .par_iter()
                .zip(documents_embeddings.par_iter()),
        )
        .map(|(q, (ids, docs))| {
            let longest = docs.iter().map(|d| d.rows()).max().unwrap_or(0);
            let mut buf = Vec::new();
            let mut out: Vec<RerankResult<I>> = ids
                .iter()
                .zip(docs)
                .map(|(id, d)| {
                    let mut acc = vec![f32::NEG_INFINITY; q.rows()];
                    if d.rows() < longest {
                        acc.fill(0.0);
                    }
                    if d.rows() > 0 && q.rows() > 0 {
                        buf.resize(d.rows() * q.rows(), 0.0);
                        matmul_abt(
                            d.data(),
                            d.rows(),
                            q.data(),
                            q.rows(),
                            q.dim(),
                            &mut buf,
                            false,
                        );
                        max_rows_into(&buf, q.rows(), &mut acc);
                    }
                    let score = if longest == 0 { 0.0 } else { acc.iter().sum() };
                    RerankResult {
                        id: id.clone(),
                        score,
                    }
                })
                .collect();
            out.sort_by(|a, b| b.score.total_cmp(&a.score));
            out
        })
        .collect())
}

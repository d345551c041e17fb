//! Brute-force index: every document scored with exact MaxSim. The ground truth for the PLAID index, and the
//! right choice for small corpora.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::scores::EmbRef;
use crate::{Error, Hit, Result};
use latte_kernels::dot::maxsim_segments;

/// An in-memory exhaustive MaxSim index over `f32` token embeddings.
#[derive(Debug, Clone)]
pub struct ExactIndex {
    dim: usize,
    ids: Vec<String>,
    by_id: HashMap<String, usize>,
    offsets: Vec<usize>,
    data: Vec<f32>,
}

impl ExactIndex {
    /// An empty index for embeddings of dimension `dim`.
    pub fn new(dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(Error::InvalidArgument(
                "embedding dimension must be positive".into(),
            ));
        }
        Ok(Self {
            dim,
            ids: Vec::new(),
            by_id: HashMap::new(),
            offsets: vec![0],
            data: Vec::new(),
        })
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the index holds no documents.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Adds one document. Fails (and changes nothing) on a duplicate id, an empty document or a wrong dimension.
    pub fn add(&mut self, id: impl Into<String>, embeddings: EmbRef<'_>) -> Result<()> {
        let id = id.into();
        if embeddings.dim() != self.dim {
            return Err(Error::DimensionMismatch {
                what: format!("document {id:?}"),
                expected: self.dim,
                got: embeddings.dim(),
            });
        }
        if embeddings.rows() == 0 {
            return Err(Error::EmptyDocument(id));
        }
        if self.by_id.contains_key(&id) {
            return Err(Error::DuplicateId(id));
        }
        self.by_id.insert(id.clone(), self.ids.len());
        self.ids.push(id);
        self.data.extend_from_slice(embeddings.data());
        self.offsets.push(self.data.len() / self.dim);
        Ok(())
    }

    /// Removes documents by id. Fails (and removes nothing) if any id is unknown.
    pub fn remove(&mut self, ids: &[String]) -> Result<()> {
        let unknown: Vec<&String> = ids
            .iter()
            .filter(|id| !self.by_id.contains_key(*id))
            .collect();
        if !unknown.is_empty() {
            return Err(Error::UnknownIds(format!("{unknown:?}")));
        }
        let drop: std::collections::HashSet<usize> = ids.iter().map(|id| self.by_id[id]).collect();
        let mut next = ExactIndex::new(self.dim)?;
        for i in 0..self.ids.len() {
            if !drop.contains(&i) {
                let rows = &self.data[self.offsets[i] * self.dim..self.offsets[i + 1] * self.dim];
                next.add(self.ids[i].clone(), EmbRef::new(rows, self.dim)?)?;
            }
        }
        *self = next;
        Ok(())
    }

    /// Exact MaxSim of `query` against every document (in insertion order), in parallel.
    pub fn scores(&self, query: EmbRef<'_>) -> Result<Vec<f32>> {
        if query.dim() != self.dim {
            return Err(Error::DimensionMismatch {
                what: "query".into(),
                expected: self.dim,
                got: query.dim(),
            });
        }
        const DOCS_PER_TASK: usize = 256;
        let n = self.ids.len();
        let tasks: Vec<usize> = (0..n).step_by(DOCS_PER_TASK).collect();
        let parts: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&s| {
                let e = (s + DOCS_PER_TASK).min(n);
                let base = self.offsets[s];
                let offs: Vec<usize> = self.offsets[s..=e].iter().map(|o| o - base).collect();
                maxsim_segments(
                    query.data(),
                    query.rows(),
                    &self.data[base * self.dim..self.offsets[e] * self.dim],
                    &offs,
                    self.dim,
                )
            })
            .collect();
        Ok(parts.concat())
    }

    /// The `k` best documents for `query`, best first (ties: insertion order).
    pub fn search(&self, query: EmbRef<'_>, k: usize) -> Result<Vec<Hit>> {
        if k == 0 {
            return Err(Error::InvalidArgument("k must be at least 1".into()));
        }
        if self.is_empty() {
            return Err(Error::EmptyIndex);
        }
        let scores = self.scores(query)?;
        Ok(top_k(&scores, k)
            .into_iter()
            .map(|(i, s)| Hit {
                id: self.ids[i].clone(),
                score: s,
            })
            .collect())
    }

    /// [`Self::search`] for many queries, in parallel.
    pub fn search_batch(&self, queries: &[EmbRef<'_>], k: usize) -> Result<Vec<Vec<Hit>>> {
        queries.par_iter().map(|q| self.search(*q, k)).collect()
    }
}

/// Indices and values of the `k` largest scores, best first; ties broken by lower index.
pub(crate) fn top_k(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let cmp = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, scores[i])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_search_orders_by_maxsim() {
        let mut ix = ExactIndex::new(2).unwrap();
        ix.add("a", EmbRef::new(&[1.0, 0.0], 2).unwrap()).unwrap();
        ix.add("b", EmbRef::new(&[0.0, 1.0, 0.6, 0.8], 2).unwrap())
            .unwrap();
        ix.add("c", EmbRef::new(&[0.0, 1.0], 2).unwrap()).unwrap();
        let q = [1.0, 0.0, 0.0, 1.0];
        let hits = ix.search(EmbRef::new(&q, 2).unwrap(), 2).unwrap();
        assert_eq!(hits[0].id, "b");
        assert!((hits[0].score - 1.6).abs() < 1e-6);
        assert_eq!(hits[1].id, "a");
        assert!(matches!(
            ix.add("a", EmbRef::new(&[1.0, 0.0], 2).unwrap()),
            Err(Error::DuplicateId(_))
        ));
        assert!(matches!(
            ix.search(EmbRef::new(&q, 2).unwrap(), 0),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            ix.remove(&["zz".to_string()]),
            Err(Error::UnknownIds(_))
        ));
        ix.remove(&["b".to_string()]).unwrap();
        let hits = ix.search(EmbRef::new(&q, 2).unwrap(), 5).unwrap();
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].score, 1.0);
    }
}

//! The search pipeline: centroid scores, candidate generation from the inverted lists, the approximate passes
//! over centroid codes and residual lookup tables, and the exact rerank.

use half::f16;
use rayon::prelude::*;

use super::{Codes, PlaidIndex, SearchParams};
use crate::exact::top_k;
use crate::scores::EmbRef;
use crate::storage::cast;
use crate::{Error, Hit, Result};
use latte_kernels::dot::{max_rows_into, maxsim_segments};
use latte_kernels::search::{self as kernels, LANES};

impl PlaidIndex {
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
        if let Some(p) = query.data().iter().position(|x| !x.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "query: value {} at token {}, dimension {} is not finite",
                query.data()[p],
                p / query.dim(),
                p % query.dim()
            )));
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
        params.validate()?;
        self.check_query(query, params.k)?;
        let subset = self.subset_mask(subset);
        Ok(self.search_inner(query, params, subset.as_deref()))
    }

    /// Searches one query restricted to the documents with these external ids (a filter's matches), choosing
    /// the strategy by selectivity so that recall against exact MaxSim over the matching documents holds:
    /// when the matching documents are few (at most [`EXACT_SUBSET_MAX_DOCS`], or at most
    /// 1/[`EXACT_SUBSET_MAX_FRACTION_INV`] of the live documents) they are scored exactly; otherwise the
    /// PLAID pipeline runs restricted to them with its candidate depths (`ndocs`, `n_residual`, `n_rerank`)
    /// multiplied by `2 · live / matching` (between 4× and 20×), twice the probed centroids and no centroid
    /// pruning, since most candidates an unrestricted search would keep are filtered out. Ids the index does
    /// not hold are ignored; no matching document gives no hits.
    pub fn search_subset(
        &self,
        query: EmbRef<'_>,
        params: &SearchParams,
        ids: &[String],
    ) -> Result<Vec<Hit>> {
        params.validate()?;
        self.check_query(query, params.k)?;
        let mask = self.subset_mask(Some(ids)).unwrap_or_default();
        if mask.is_empty() {
            return Ok(Vec::new());
        }
        let n = mask.len();
        if n <= EXACT_SUBSET_MAX_DOCS || n * EXACT_SUBSET_MAX_FRACTION_INV <= self.live {
            let scores = self.score_docs(query, &mask, self.meta.config.store_full);
            return Ok(top_k(&scores, params.k)
                .into_iter()
                .map(|(i, s)| Hit {
                    id: self.ids[mask[i] as usize].clone(),
                    score: s,
                })
                .collect());
        }
        let p = scaled_params(params, self.live, n);
        Ok(self.search_inner(query, &p, Some(&mask)))
    }

    /// Searches many queries in parallel.
    pub fn search_batch(
        &self,
        queries: &[EmbRef<'_>],
        params: &SearchParams,
        subset: Option<&[String]>,
    ) -> Result<Vec<Vec<Hit>>> {
        params.validate()?;
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
        let (qt, qstride) = latte_kernels::half::transpose_query(q.data(), lq, dim);
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
        let (qt, stride) = latte_kernels::half::transpose_query(q.data(), lq, dim);
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
                        latte_kernels::half::dots(
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
}

/// The union of every query token's `probe` best centroids, ascending. `sp` is centroid-major with rows of
/// `stride ≥ lq` scores; one sequential pass, with a per-token admission threshold.
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

/// Matching sets of at most this many documents are scored exactly by [`PlaidIndex::search_subset`].
pub const EXACT_SUBSET_MAX_DOCS: usize = 2_000;
/// Matching sets of at most 1/this of the live documents are scored exactly by [`PlaidIndex::search_subset`].
pub const EXACT_SUBSET_MAX_FRACTION_INV: usize = 20;

/// PLAID depths for a search restricted to `matching` of `live` documents: candidate depths grow with twice
/// the inverse selectivity (4× to 20×), probing doubles, centroid pruning is off.
fn scaled_params(params: &SearchParams, live: usize, matching: usize) -> SearchParams {
    let factor = (2 * live).div_ceil(matching.max(1)).clamp(4, 20);
    let mut p = params.clone();
    p.ndocs = p.ndocs.saturating_mul(factor);
    p.n_residual = p.n_residual.saturating_mul(factor);
    p.n_rerank = p.n_rerank.saturating_mul(factor);
    p.n_ivf_probe = p.n_ivf_probe.saturating_mul(2);
    p.centroid_score_threshold = None;
    p
}

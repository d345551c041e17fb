//! Metric names (ranx syntax) and their per-query definitions.

use std::fmt;
use std::str::FromStr;

use crate::error::EvalError;

/// The kind of an IR metric. Definitions follow ranx (0.3) and, where they agree, trec_eval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// Normalised discounted cumulative gain with linear gain (Järvelin & Kekäläinen; ranx
    /// `ndcg`, trec_eval `ndcg_cut`): DCG@k = Σ_{i=1..k} rel_i / log2(i + 1) where rel_i is the
    /// judged relevance of the document at rank i (0 when unjudged or below the relevance
    /// level), divided by the DCG@k of the ideal ranking of the query's judged documents.
    Ndcg,
    /// Reciprocal rank of the first relevant document within the cutoff (0 if none).
    Mrr,
    /// Relevant documents retrieved within the cutoff, divided by all relevant documents.
    Recall,
    /// Relevant documents retrieved within the cutoff, divided by the cutoff k (even when
    /// fewer than k documents were retrieved; without a cutoff, by the number retrieved).
    Precision,
    /// Average precision within the cutoff: the sum of precision at each relevant rank ≤ k,
    /// divided by the number of relevant documents (all of them, not min(k, R)).
    Map,
    /// Number of relevant documents retrieved within the cutoff (ranx `hits`).
    Hits,
    /// 1 if any relevant document is retrieved within the cutoff, else 0 (ranx `hit_rate`,
    /// trec_eval `success`).
    HitRate,
}

impl MetricKind {
    /// The ranx name.
    pub fn name(self) -> &'static str {
        match self {
            MetricKind::Ndcg => "ndcg",
            MetricKind::Mrr => "mrr",
            MetricKind::Recall => "recall",
            MetricKind::Precision => "precision",
            MetricKind::Map => "map",
            MetricKind::Hits => "hits",
            MetricKind::HitRate => "hit_rate",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "ndcg" => MetricKind::Ndcg,
            "mrr" | "recip_rank" => MetricKind::Mrr,
            "recall" => MetricKind::Recall,
            "precision" | "p" => MetricKind::Precision,
            "map" => MetricKind::Map,
            "hits" => MetricKind::Hits,
            "hit_rate" | "success" => MetricKind::HitRate,
            _ => return None,
        })
    }
}

/// A metric with its cutoff and relevance level, written as in ranx: `ndcg@10`, `mrr`,
/// `recall@100`, `map@100-l2` (documents with relevance ≥ 2 count as relevant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Metric {
    /// What is measured.
    pub kind: MetricKind,
    /// Only the top `k` ranked documents count; `None` means all retrieved documents.
    pub k: Option<usize>,
    /// Minimum relevance for a document to count as relevant (≥ 1; default 1).
    pub rel_level: i32,
}

impl Metric {
    /// A metric with relevance level 1.
    pub fn new(kind: MetricKind, k: Option<usize>) -> Self {
        Metric {
            kind,
            k,
            rel_level: 1,
        }
    }

    /// Parses a comma-separated list such as `ndcg@10,mrr@10,recall@100` (spaces allowed).
    pub fn parse_list(spec: &str) -> Result<Vec<Metric>, EvalError> {
        let metrics = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Metric>, _>>()?;
        if metrics.is_empty() {
            return Err(EvalError::InvalidMetric {
                spec: spec.to_string(),
                reason: "no metric given".to_string(),
            });
        }
        Ok(metrics)
    }

    /// The metric's value for one query.
    ///
    /// `ranked_rels` holds, for the query's ranked results (best first), each document's
    /// judged relevance (`None` when unjudged). `judged` holds the relevance of every judged
    /// document of the query (any order). A query with no relevant document scores 0 on every
    /// metric, as in ranx and trec_eval.
    pub fn compute(&self, ranked_rels: &[Option<i32>], judged: &[i32]) -> f64 {
        let level = self.rel_level;
        let is_rel = |r: &Option<i32>| r.is_some_and(|r| r >= level);
        let num_rel = judged.iter().filter(|&&r| r >= level).count();
        if num_rel == 0 {
            return 0.0;
        }
        let depth = self
            .k
            .map_or(ranked_rels.len(), |k| k.min(ranked_rels.len()));
        let top = &ranked_rels[..depth];
        let hits = top.iter().filter(|r| is_rel(r)).count();
        match self.kind {
            MetricKind::Hits => hits as f64,
            MetricKind::HitRate => f64::from(u8::from(hits > 0)),
            MetricKind::Recall => hits as f64 / num_rel as f64,
            MetricKind::Precision => {
                let denom = self.k.unwrap_or(ranked_rels.len());
                if denom == 0 {
                    0.0
                } else {
                    hits as f64 / denom as f64
                }
            }
            MetricKind::Mrr => top
                .iter()
                .position(is_rel)
                .map_or(0.0, |i| 1.0 / (i + 1) as f64),
            MetricKind::Map => {
                let mut found = 0usize;
                let mut sum = 0.0;
                for (i, r) in top.iter().enumerate() {
                    if is_rel(r) {
                        found += 1;
                        sum += found as f64 / (i + 1) as f64;
                    }
                }
                sum / num_rel as f64
            }
            MetricKind::Ndcg => {
                let gain = |r: i32| if r >= level { f64::from(r) } else { 0.0 };
                let dcg: f64 = top
                    .iter()
                    .enumerate()
                    .map(|(i, r)| r.map_or(0.0, gain) / ((i + 2) as f64).log2())
                    .sum();
                let mut ideal: Vec<i32> = judged.iter().copied().filter(|&r| r >= level).collect();
                ideal.sort_unstable_by(|a, b| b.cmp(a));
                let ideal_depth = self.k.map_or(ideal.len(), |k| k.min(ideal.len()));
                let idcg: f64 = ideal[..ideal_depth]
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| gain(r) / ((i + 2) as f64).log2())
                    .sum();
                if idcg == 0.0 {
                    0.0
                } else {
                    dcg / idcg
                }
            }
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())?;
        if let Some(k) = self.k {
            write!(f, "@{k}")?;
        }
        if self.rel_level != 1 {
            write!(f, "-l{}", self.rel_level)?;
        }
        Ok(())
    }
}

impl FromStr for Metric {
    type Err = EvalError;

    /// Parses `name[@k][-lLEVEL]`, e.g. `ndcg@10`, `mrr`, `recall@100`, `map@10-l2`.
    /// Names: ndcg, mrr (recip_rank), recall, precision (p), map, hits, hit_rate (success);
    /// case-insensitive.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| EvalError::InvalidMetric {
            spec: spec.to_string(),
            reason,
        };
        let lower = spec.trim().to_ascii_lowercase();
        let (body, rel_level) = match lower.rsplit_once("-l") {
            Some((body, level)) => {
                let level: i32 = level
                    .parse()
                    .map_err(|_| invalid(format!("relevance level {level:?} is not an integer")))?;
                if level < 1 {
                    return Err(invalid("relevance level must be at least 1".to_string()));
                }
                (body, level)
            }
            None => (lower.as_str(), 1),
        };
        let (name, k) = match body.split_once('@') {
            Some((name, k)) => {
                let k: usize = k
                    .parse()
                    .map_err(|_| invalid(format!("cutoff {k:?} is not a positive integer")))?;
                if k == 0 {
                    return Err(invalid(
                        "cutoff must be at least 1 (leave out @k to use all results)".to_string(),
                    ));
                }
                (name, Some(k))
            }
            None => (body, None),
        };
        let kind = MetricKind::from_name(name).ok_or_else(|| {
            invalid(format!(
                "unknown metric {name:?}; known: ndcg, mrr, recall, precision, map, hits, hit_rate"
            ))
        })?;
        Ok(Metric { kind, k, rel_level })
    }
}

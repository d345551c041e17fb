//! Build settings ([`IndexConfig`]) and search settings ([`SearchParams`]), with their validation.

use serde::{Deserialize, Serialize};

use crate::codec::check_nbits;
use crate::{kmeans, Error, Result};

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
    /// Centroid groups probed by the two-level nearest-centroid assignment (used above 4,096 centroids, in
    /// k-means training, encoding and later adds); `None` = 16. Absent in older metadata.
    #[serde(default)]
    pub assign_probe: Option<usize>,
}

impl IndexConfig {
    pub(super) fn probe(&self) -> usize {
        self.assign_probe.unwrap_or(kmeans::DEFAULT_PROBE)
    }

    /// Checks the settings: `nbits` 1, 2 or 4, and no count of zero. The error names the setting.
    pub fn validate(&self) -> Result<()> {
        check_nbits(self.nbits)?;
        let at_least_one = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::InvalidArgument(format!(
                    "{name} must be at least 1, got 0"
                )))
            } else {
                Ok(())
            }
        };
        at_least_one("pool_factor", self.pool_factor)?;
        at_least_one(
            "kmeans_points_per_centroid",
            self.kmeans_points_per_centroid,
        )?;
        if let Some(p) = self.assign_probe {
            at_least_one("assign_probe", p)?;
        }
        if let Some(k) = self.num_centroids {
            at_least_one("num_centroids", k)?;
        }
        Ok(())
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

    /// Checks the settings: `k`, `n_ivf_probe`, `ndocs`, `n_residual` and `n_rerank` of at least 1, a finite
    /// `centroid_score_threshold`, a finite non-negative `token_margin`. The error names the parameter.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("k", self.k),
            ("n_ivf_probe", self.n_ivf_probe),
            ("ndocs", self.ndocs),
            ("n_residual", self.n_residual),
            ("n_rerank", self.n_rerank),
        ] {
            if v == 0 {
                return Err(Error::InvalidArgument(format!(
                    "{name} must be at least 1, got 0"
                )));
            }
        }
        if let Some(t) = self.centroid_score_threshold {
            if !t.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "centroid_score_threshold must be a finite number, got {t}"
                )));
            }
        }
        if let Some(m) = self.token_margin {
            if !m.is_finite() || m < 0.0 {
                return Err(Error::InvalidArgument(format!(
                    "token_margin must be a finite number of at least 0, got {m}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_search_params_name_the_parameter() {
        assert!(SearchParams::for_k(10).validate().is_ok());
        type Spoil = fn(&mut SearchParams);
        let cases: [(&str, Spoil); 7] = [
            ("k", |p| p.k = 0),
            ("n_ivf_probe", |p| p.n_ivf_probe = 0),
            ("ndocs", |p| p.ndocs = 0),
            ("n_residual", |p| p.n_residual = 0),
            ("n_rerank", |p| p.n_rerank = 0),
            ("centroid_score_threshold", |p| {
                p.centroid_score_threshold = Some(f32::NAN)
            }),
            ("token_margin", |p| p.token_margin = Some(-0.5)),
        ];
        for (name, spoil) in cases {
            let mut p = SearchParams::for_k(10);
            spoil(&mut p);
            let err = p.validate().unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn impossible_index_configs_name_the_setting() {
        assert!(IndexConfig::default().validate().is_ok());
        type Spoil = fn(&mut IndexConfig);
        let cases: [(&str, Spoil); 5] = [
            ("nbits", |c| c.nbits = 3),
            ("pool_factor", |c| c.pool_factor = 0),
            ("kmeans_points_per_centroid", |c| {
                c.kmeans_points_per_centroid = 0
            }),
            ("assign_probe", |c| c.assign_probe = Some(0)),
            ("num_centroids", |c| c.num_centroids = Some(0)),
        ];
        for (name, spoil) in cases {
            let mut c = IndexConfig::default();
            spoil(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
    }
}

//! Combining ranked lists (dense ColBERT results, BM25 results) into one ranking.
//!
//! Both functions return `(id, fused score)` sorted by score, highest first; equal scores are ordered by
//! id (byte order), so the output is deterministic. An id that appears more than once in one input list
//! counts once, at its first (best) position.

use std::collections::BTreeMap;
use std::collections::HashSet;

use crate::error::FusionError;

/// The `k` of reciprocal rank fusion used by Cormack et al. and by most engines.
pub const RRF_K: f64 = 60.0;

/// Reciprocal rank fusion: each list is in rank order (best first) and gives the document at 1-based rank
/// `r` the score `1 / (k + r)`; a document's fused score is the sum over the lists it appears in. Scores
/// in the inputs are ignored. `k` must be finite and ≥ 0 (use [`RRF_K`] unless you have a reason).
pub fn fuse_rrf<L: AsRef<[(String, f64)]>>(
    lists: &[L],
    k: f64,
) -> Result<Vec<(String, f64)>, FusionError> {
    if !(k.is_finite() && k >= 0.0) {
        return Err(FusionError::InvalidParameter {
            name: "k",
            expected: "finite and at least 0",
            got: k,
        });
    }
    let mut fused: BTreeMap<&str, f64> = BTreeMap::new();
    for list in lists {
        let mut seen = HashSet::new();
        let mut rank = 0usize;
        for (id, _) in list.as_ref() {
            if !seen.insert(id.as_str()) {
                continue;
            }
            rank += 1;
            *fused.entry(id.as_str()).or_insert(0.0) += 1.0 / (k + rank as f64);
        }
    }
    Ok(sorted(
        fused
            .into_iter()
            .map(|(id, s)| (id.to_owned(), s))
            .collect(),
    ))
}

/// Linear fusion of min–max normalised scores: `alpha · dense + (1 − alpha) · sparse`, where each list's
/// scores are mapped to `[0, 1]` by `(s − min) / (max − min)` (a list whose scores are all equal maps them
/// to 1), and a document missing from a list gets 0 for it. Scores are higher-is-better in both lists.
/// `alpha` must lie in `[0, 1]`; every score must be finite.
pub fn fuse_linear(
    dense: &[(String, f64)],
    sparse: &[(String, f64)],
    alpha: f64,
) -> Result<Vec<(String, f64)>, FusionError> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(FusionError::InvalidParameter {
            name: "alpha",
            expected: "between 0 and 1",
            got: alpha,
        });
    }
    let dense = normalised(dense, 0)?;
    let sparse = normalised(sparse, 1)?;
    let mut fused: BTreeMap<&str, f64> = BTreeMap::new();
    for (id, s) in &dense {
        *fused.entry(id).or_insert(0.0) += alpha * s;
    }
    for (id, s) in &sparse {
        *fused.entry(id).or_insert(0.0) += (1.0 - alpha) * s;
    }
    Ok(sorted(
        fused
            .into_iter()
            .map(|(id, s)| (id.to_owned(), s))
            .collect(),
    ))
}

/// First occurrence of each id with its min–max normalised score.
fn normalised(list: &[(String, f64)], which: usize) -> Result<Vec<(&str, f64)>, FusionError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for (id, score) in list {
        if !score.is_finite() {
            return Err(FusionError::NonFiniteScore {
                list: which,
                id: id.clone(),
                score: *score,
            });
        }
        if seen.insert(id.as_str()) {
            out.push((id.as_str(), *score));
        }
    }
    let min = out.iter().map(|&(_, s)| s).fold(f64::INFINITY, f64::min);
    let max = out
        .iter()
        .map(|&(_, s)| s)
        .fold(f64::NEG_INFINITY, f64::max);
    let range = max - min;
    for (_, s) in &mut out {
        *s = if range > 0.0 { (*s - min) / range } else { 1.0 };
    }
    Ok(out)
}

fn sorted(mut v: Vec<(String, f64)>) -> Vec<(String, f64)> {
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[(&str, f64)]) -> Vec<(String, f64)> {
        items.iter().map(|&(id, s)| (id.to_owned(), s)).collect()
    }

    fn close(got: &[(String, f64)], want: &[(&str, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?}");
        for ((gid, gs), (wid, ws)) in got.iter().zip(want) {
            assert_eq!(gid, wid, "{got:?}");
            assert!((gs - ws).abs() < 1e-12, "{gid}: {gs} vs {ws}");
        }
    }

    #[test]
    fn rrf_matches_hand_computed_values() {
        // dense: a, b, c; sparse: c, a, d. k = 60.
        let dense = list(&[("a", 9.0), ("b", 8.0), ("c", 7.0)]);
        let sparse = list(&[("c", 3.0), ("a", 2.0), ("d", 1.0)]);
        let got = fuse_rrf(&[dense, sparse], 60.0).unwrap();
        // a: 1/61 + 1/62, c: 1/63 + 1/61, b: 1/62, d: 1/63
        close(
            &got,
            &[
                ("a", 1.0 / 61.0 + 1.0 / 62.0),
                ("c", 1.0 / 63.0 + 1.0 / 61.0),
                ("b", 1.0 / 62.0),
                ("d", 1.0 / 63.0),
            ],
        );
    }

    #[test]
    fn rrf_ties_are_ordered_by_id_and_duplicates_count_once() {
        // x first in one list, y first in the other: equal scores, x before y.
        let got = fuse_rrf(&[list(&[("y", 1.0)]), list(&[("x", 1.0)])], 1.0).unwrap();
        close(&got, &[("x", 0.5), ("y", 0.5)]);
        // the repeated "a" does not take a rank: b is at rank 2
        let got = fuse_rrf(&[list(&[("a", 3.0), ("a", 2.0), ("b", 1.0)])], 0.0).unwrap();
        close(&got, &[("a", 1.0), ("b", 0.5)]);
        assert!(fuse_rrf::<Vec<(String, f64)>>(&[], 60.0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn rrf_rejects_bad_k() {
        for k in [-1.0, f64::NAN, f64::INFINITY] {
            let e = fuse_rrf(&[list(&[("a", 1.0)])], k).unwrap_err();
            assert!(
                e.to_string().starts_with("k must be finite and at least 0"),
                "{e}"
            );
        }
    }

    #[test]
    fn linear_matches_hand_computed_values() {
        // dense 0.9, 0.5, 0.1 → 1, 0.5, 0; sparse 10, 4, 2 → 1, 0.25, 0.
        let dense = list(&[("a", 0.9), ("b", 0.5), ("c", 0.1)]);
        let sparse = list(&[("b", 10.0), ("d", 4.0), ("a", 2.0)]);
        let got = fuse_linear(&dense, &sparse, 0.7).unwrap();
        // a: 0.7·1 + 0.3·0 = 0.7; b: 0.7·0.5 + 0.3·1 = 0.65; d: 0.3·0.25 = 0.075; c: 0
        close(&got, &[("a", 0.7), ("b", 0.65), ("d", 0.075), ("c", 0.0)]);
        // alpha 1: only the dense list counts, and missing docs tie at 0, ordered by id
        let got = fuse_linear(&dense, &sparse, 1.0).unwrap();
        close(&got, &[("a", 1.0), ("b", 0.5), ("c", 0.0), ("d", 0.0)]);
    }

    #[test]
    fn linear_constant_lists_and_empty_lists() {
        let got = fuse_linear(&list(&[("a", 3.0), ("b", 3.0)]), &[], 0.5).unwrap();
        close(&got, &[("a", 0.5), ("b", 0.5)]);
        assert!(fuse_linear(&[], &[], 0.5).unwrap().is_empty());
    }

    #[test]
    fn linear_rejects_bad_input() {
        let e = fuse_linear(&[], &[], 1.5).unwrap_err();
        assert_eq!(e.to_string(), "alpha must be between 0 and 1, got 1.5");
        assert!(fuse_linear(&[], &[], f64::NAN).is_err());
        let e = fuse_linear(&[], &list(&[("z", f64::NAN)]), 0.5).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("list 1, document \"z\": score NaN is not finite"),
            "{e}"
        );
    }
}

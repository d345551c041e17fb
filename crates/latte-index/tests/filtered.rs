//! Search restricted to a set of matching documents (a filter's matches): at every selectivity, recall@10
//! against exact MaxSim over the matching documents is at least 0.97, and every hit matches.

mod fault;

use std::collections::HashSet;

use fault::{config, corpus, DIM};
use latte_index::{EmbRef, PlaidIndex, SearchParams, EXACT_SUBSET_MAX_DOCS};

#[test]
fn restricted_search_keeps_recall_at_every_selectivity() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let n = 5_000;
    let docs = corpus(n, 11, "d");
    PlaidIndex::create(dir, &docs.source(), &config()).unwrap();
    let index = PlaidIndex::open(dir).unwrap();
    let queries = corpus(20, 99, "q");
    let params = SearchParams::for_k(10);
    // Selectivity in thousandths: 0.1 %, 1 %, 10 %, 50 %, 100 %. The last two exceed the exact limit and
    // take the restricted PLAID path.
    for per_mille in [1usize, 10, 100, 500, 1000] {
        let matching: Vec<String> = (0..n)
            .filter(|i| (i.wrapping_mul(2_654_435_761) >> 7) % 1000 < per_mille)
            .map(|i| format!("d{i}"))
            .collect();
        if per_mille >= 500 {
            assert!(matching.len() > EXACT_SUBSET_MAX_DOCS);
        }
        let allowed: HashSet<&str> = matching.iter().map(String::as_str).collect();
        let (mut found, mut wanted) = (0usize, 0usize);
        for q in &queries.embs {
            let q = EmbRef::new(q, DIM).unwrap();
            let exact = index.search_exact(q, 10, Some(&matching)).unwrap();
            let hits = index.search_subset(q, &params, &matching).unwrap();
            assert!(hits.len() <= 10);
            for h in &hits {
                assert!(
                    allowed.contains(h.id.as_str()),
                    "{per_mille}‰: {} not matching",
                    h.id
                );
            }
            let got: HashSet<&str> = hits.iter().map(|h| h.id.as_str()).collect();
            wanted += exact.len();
            found += exact.iter().filter(|h| got.contains(h.id.as_str())).count();
        }
        let recall = found as f64 / wanted.max(1) as f64;
        assert!(
            recall >= 0.97,
            "{per_mille}‰ selectivity: recall@10 {recall}"
        );
    }
    // No matching document: no hits, not an error.
    let q = EmbRef::new(&queries.embs[0], DIM).unwrap();
    assert!(index
        .search_subset(q, &params, &["nope".to_string()])
        .unwrap()
        .is_empty());
}

//! Filtered, BM25-only and hybrid search over an index and a document store holding its text and metadata.

mod fault;

use std::collections::HashSet;

use fault::{config, corpus, DIM};
use latte_index::{search_bm25, EmbRef, Error, Fusion, PlaidIndex, SearchParams};
use latte_index::{Doc, DocStore, Filter};

fn setup(dir: &std::path::Path) -> (fault::Docs, PlaidIndex, DocStore) {
    let docs = corpus(200, 3, "d");
    let rows: Vec<Doc> = (0..200)
        .map(|i| {
            let mut m = serde_json::Map::new();
            m.insert("bucket".into(), (i % 10).into());
            let word = if i % 7 == 0 {
                "ferris crab"
            } else {
                "plain words"
            };
            Doc::new(format!("d{i}"))
                .with_text(format!("document {i} {word}"))
                .with_metadata(m)
        })
        .collect();
    PlaidIndex::create_with_documents(dir, &docs.source(), &rows, &config()).unwrap();
    let index = PlaidIndex::open(dir).unwrap();
    let store = index.open_store().unwrap();
    (docs, index, store)
}

#[test]
fn filters_restrict_maxsim_bm25_and_hybrid() {
    let tmp = tempfile::tempdir().unwrap();
    let (docs, index, store) = setup(tmp.path());
    let filter = Filter::parse(&serde_json::json!({"bucket": 3})).unwrap();
    let allowed: HashSet<String> = (0..200)
        .filter(|i| i % 10 == 3)
        .map(|i| format!("d{i}"))
        .collect();
    let q = EmbRef::new(&docs.embs[13], DIM).unwrap();
    let params = SearchParams::for_k(5);

    let hits = index.search_filtered(q, &params, &store, &filter).unwrap();
    assert_eq!(hits.len(), 5);
    assert_eq!(hits[0].id, "d13", "{hits:?}");
    assert!(hits.iter().all(|h| allowed.contains(&h.id)), "{hits:?}");

    let kw = search_bm25(&store, "crab", 50, Some(&filter)).unwrap();
    // "crab" is in documents i % 7 == 0; with i % 10 == 3 below 200 those are 63 and 133.
    let ids: HashSet<&str> = kw.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, HashSet::from(["d63", "d133"]), "{kw:?}");

    for fusion in [Fusion::default(), Fusion::Linear { alpha: 0.5 }] {
        let hy = index
            .search_hybrid(&store, q, "crab", &params, Some(&filter), fusion)
            .unwrap();
        assert_eq!(hy.len(), 5, "{fusion:?}");
        assert!(
            hy.iter().all(|h| allowed.contains(&h.id)),
            "{fusion:?}: {hy:?}"
        );
        // The two keyword matches head the BM25 list: RRF lifts them into the top 5.
        if fusion == Fusion::default() {
            let top: HashSet<&str> = hy.iter().map(|h| h.id.as_str()).collect();
            assert!(top.contains("d63") && top.contains("d133"), "{hy:?}");
        }
    }
    let err = index
        .search_hybrid(
            &store,
            q,
            "crab",
            &params,
            None,
            Fusion::Linear { alpha: 2.0 },
        )
        .unwrap_err();
    assert!(matches!(err, Error::Fusion(_)), "{err}");
    assert!(err.to_string().contains("alpha"), "{err}");
}

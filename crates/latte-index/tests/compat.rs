//! Format compatibility: a committed index written by format version 1 must keep opening and answering the same.
//! If the fixture directory is missing (a new format version), the test writes it; commit the result.

use std::path::PathBuf;

use latte_index::{EmbRef, IndexConfig, PlaidIndex, SearchParams, VecSource, FORMAT_VERSION};

const DIM: usize = 8;

fn doc(i: usize) -> Vec<f32> {
    // Document i: (i % 3) + 2 tokens, each a unit vector along axis (i + t) % DIM with a small offset.
    let mut d = Vec::new();
    for t in 0..(i % 3) + 2 {
        let mut v = [0.05f32; DIM];
        v[(i + t) % DIM] = 1.0;
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        d.extend(v.iter().map(|x| x / n));
    }
    d
}

#[test]
fn format_v1_fixture_opens_and_searches() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/index_v{FORMAT_VERSION}"));
    if !dir.join("meta.lt").exists() {
        let mut src = VecSource::new(DIM);
        for i in 0..24 {
            src.push(format!("doc{i}"), doc(i)).unwrap();
        }
        let config = IndexConfig {
            num_centroids: Some(4),
            ..IndexConfig::default()
        };
        PlaidIndex::create(&dir, &src, &config).unwrap();
    }
    let index = PlaidIndex::open(&dir).unwrap();
    assert_eq!(index.len(), 24);
    assert_eq!(index.dim(), DIM);
    // The query equals document 5's tokens, so document 5 scores highest (ties broken towards documents whose
    // token sets contain it, all of which score the same maximum).
    let q = doc(5);
    let hits = index
        .search(EmbRef::new(&q, DIM).unwrap(), &SearchParams::for_k(3), None)
        .unwrap();
    assert_eq!(hits.len(), 3);
    let top = hits[0].score;
    assert!(
        (top - (q.len() / DIM) as f32).abs() < 1e-2,
        "top score {top}"
    );
    let exact = index
        .search_exact(EmbRef::new(&q, DIM).unwrap(), 1, None)
        .unwrap();
    assert!((exact[0].score - top).abs() < 1e-6);
}

//! Format compatibility: a committed index written by every format version must keep opening and answering the
//! same, and an older index must keep accepting adds and deletes. If the fixture directory of the current version
//! is missing (a new format version), the test writes it; commit the result.

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

fn fixture(version: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/index_v{version}"))
}

fn source(range: std::ops::Range<usize>) -> VecSource {
    let mut src = VecSource::new(DIM);
    for i in range {
        src.push(format!("doc{i}"), doc(i)).unwrap();
    }
    src
}

/// The version in a file's header (bytes 8..12).
fn file_version(path: &std::path::Path) -> u32 {
    let b = std::fs::read(path).unwrap();
    u32::from_le_bytes(b[8..12].try_into().unwrap())
}

fn check_answers(dir: &std::path::Path, docs: usize) {
    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!(index.len(), docs);
    // The fixtures were written before `assign_probe` existed: absent from meta.lt, it reads as None.
    assert_eq!(index.info().config.assign_probe, None);
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

#[test]
fn current_format_fixture_opens_and_searches() {
    let dir = fixture(FORMAT_VERSION);
    if !dir.join("meta.lt").exists() {
        let config = IndexConfig {
            num_centroids: Some(4),
            ..IndexConfig::default()
        };
        PlaidIndex::create(&dir, &source(0..24), &config).unwrap();
    }
    assert_eq!(file_version(&dir.join("codec.lt")), FORMAT_VERSION);
    check_answers(&dir, 24);
}

#[test]
fn format_v1_fixture_opens_and_searches() {
    let dir = fixture(1);
    assert_eq!(file_version(&dir.join("codec.lt")), 1);
    check_answers(&dir, 24);
}

#[test]
fn format_v1_index_accepts_adds_and_deletes() {
    // An add writes its new files (chunk, inverted lists, meta) in the current format next to the old ones.
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(1)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let dir = tmp.path();
    PlaidIndex::add(dir, &source(24..30)).unwrap();
    assert_eq!(file_version(&dir.join("codec.lt")), 1);
    assert_eq!(file_version(&dir.join("ivf.2.lt")), FORMAT_VERSION);
    check_answers(dir, 30);
    let index = PlaidIndex::open(dir).unwrap();
    let q = doc(27);
    let hits = index
        .search_exact(EmbRef::new(&q, DIM).unwrap(), 1, None)
        .unwrap();
    assert!((hits[0].score - (q.len() / DIM) as f32).abs() < 1e-2);
    drop(index);
    PlaidIndex::delete(dir, &["doc5".to_string()]).unwrap();
    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!(index.len(), 29);
    assert!(!index.contains("doc5"));
    PlaidIndex::compact(dir).unwrap();
    assert_eq!(PlaidIndex::open(dir).unwrap().len(), 29);
}

/// `model_options` (added without a format bump): indexes written before it open with none recorded, and a
/// new index keeps what it was given.
#[test]
fn model_options_are_optional_and_round_trip() {
    for version in 1..=FORMAT_VERSION {
        let dir = fixture(version);
        if dir.join("meta.lt").exists() {
            let index = PlaidIndex::open(&dir).unwrap();
            assert_eq!(index.model_options(), None, "index_v{version}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let options = serde_json::json!({"truncate_dim": 64, "query_length": 16});
    let config = IndexConfig {
        num_centroids: Some(4),
        model: Some("some/model".into()),
        model_options: Some(options.clone()),
        ..IndexConfig::default()
    };
    PlaidIndex::create(dir.path(), &source(0..24), &config).unwrap();
    let index = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(index.model(), Some("some/model"));
    assert_eq!(index.model_options(), Some(&options));
}

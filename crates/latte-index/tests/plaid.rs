//! End-to-end tests of the on-disk PLAID index: build, search against the exact index, add, delete, subset,
//! compaction, crash safety, corruption and bad input.

use std::path::Path;

use latte_index::{EmbRef, Error, ExactIndex, IndexConfig, PlaidIndex, SearchParams, VecSource};

const DIM: usize = 32;

/// Deterministic pseudo-random numbers (xorshift), so the test data needs no extra dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

/// `n` documents of 4–19 unit tokens scattered around 24 topic directions.
fn corpus(n: usize, seed: u64, prefix: &str) -> (VecSource, Vec<Vec<f32>>) {
    let mut rng = Rng(seed);
    let mut topics = Rng(7);
    let centers: Vec<Vec<f32>> = (0..24)
        .map(|_| {
            let mut c: Vec<f32> = (0..DIM).map(|_| topics.next()).collect();
            normalize(&mut c);
            c
        })
        .collect();
    let mut src = VecSource::new(DIM);
    let mut docs = Vec::new();
    for i in 0..n {
        let len = 4 + (i * 7) % 16;
        let mut d = Vec::with_capacity(len * DIM);
        for _ in 0..len {
            let c = &centers[((rng.next() + 1.0) * 12.0) as usize % 24];
            let mut t: Vec<f32> = c.iter().map(|x| x + 0.35 * rng.next()).collect();
            normalize(&mut t);
            d.extend_from_slice(&t);
        }
        src.push(format!("{prefix}{i}"), d.clone()).unwrap();
        docs.push(d);
    }
    (src, docs)
}

fn queries(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let (_, docs) = corpus(n, seed, "q");
    docs.into_iter().map(|d| d[..4 * DIM].to_vec()).collect()
}

fn config() -> IndexConfig {
    IndexConfig {
        num_centroids: Some(32),
        ..IndexConfig::default()
    }
}

fn exact_of(src_docs: &[Vec<f32>], prefix: &str) -> ExactIndex {
    let mut ex = ExactIndex::new(DIM).unwrap();
    for (i, d) in src_docs.iter().enumerate() {
        ex.add(format!("{prefix}{i}"), EmbRef::new(d, DIM).unwrap())
            .unwrap();
    }
    ex
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn plaid_search_agrees_with_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (src, docs) = corpus(300, 1, "d");
    let report = PlaidIndex::create(dir.path(), &src, &config()).unwrap();
    assert!(report.trained);
    assert_eq!(report.documents, 300);
    let index = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(index.len(), 300);
    let ex = exact_of(&docs, "d");
    let mut found = 0;
    let mut total = 0;
    for q in queries(20, 99) {
        let q = EmbRef::new(&q, DIM).unwrap();
        let want = ex.search(q, 10).unwrap();
        let got = index.search(q, &SearchParams::for_k(10), None).unwrap();
        assert_eq!(got.len(), 10);
        total += 10;
        found += got
            .iter()
            .filter(|h| want.iter().any(|w| w.id == h.id))
            .count();
        // Scores after the final rerank are exact up to half precision.
        for h in &got {
            let e = ex
                .search(q, 300)
                .unwrap()
                .into_iter()
                .find(|w| w.id == h.id)
                .unwrap();
            assert!(
                (e.score - h.score).abs() < 2e-2,
                "{} vs {}",
                e.score,
                h.score
            );
        }
        // Exhaustive search over the f16 copy gives the exact ranking.
        let all = index.search_exact(q, 10, None).unwrap();
        let ids: Vec<&str> = all.iter().map(|h| h.id.as_str()).collect();
        let want_ids: Vec<&str> = want.iter().map(|h| h.id.as_str()).collect();
        let overlap = ids.iter().filter(|i| want_ids.contains(i)).count();
        assert!(
            overlap >= 9,
            "exhaustive f16 search: {ids:?} vs {want_ids:?}"
        );
    }
    let recall = found as f64 / total as f64;
    assert!(recall >= 0.9, "recall@10 {recall}");
}

#[test]
fn every_nbits_builds_and_searches_without_rerank() {
    for nbits in [1, 2, 4] {
        let dir = tempfile::tempdir().unwrap();
        let (src, docs) = corpus(120, 3, "d");
        PlaidIndex::create(
            dir.path(),
            &src,
            &IndexConfig {
                nbits,
                store_full: false,
                ..config()
            },
        )
        .unwrap();
        let index = PlaidIndex::open(dir.path()).unwrap();
        let ex = exact_of(&docs, "d");
        let q = &queries(1, 5)[0];
        let q = EmbRef::new(q, DIM).unwrap();
        let got = index
            .search(q, &SearchParams::for_k(5).without_rerank(), None)
            .unwrap();
        let want = ex.search(q, 5).unwrap();
        assert_eq!(got.len(), 5);
        assert!(
            want.iter()
                .take(1)
                .all(|w| got.iter().any(|h| h.id == w.id)),
            "nbits {nbits}: top-1 missed"
        );
    }
}

#[test]
fn add_delete_subset_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let (src, docs) = corpus(200, 11, "a");
    PlaidIndex::create(dir.path(), &src, &config()).unwrap();
    let (more, more_docs) = corpus(60, 12, "b");
    let r = PlaidIndex::add(dir.path(), &more).unwrap();
    assert!(!r.trained);
    assert_eq!(r.documents, 60);
    assert!(r.outlier_fraction < 0.6, "drift {}", r.outlier_fraction);
    let index = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(index.len(), 260);
    // A query equal to an added document finds it first.
    let q = EmbRef::new(&more_docs[5], DIM).unwrap();
    let hits = index.search(q, &SearchParams::for_k(3), None).unwrap();
    assert_eq!(hits[0].id, "b5");

    // Subset: only those ids come back.
    let subset: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    let hits = index
        .search(q, &SearchParams::for_k(5), Some(&subset))
        .unwrap();
    assert_eq!(hits.len(), 5);
    assert!(hits.iter().all(|h| subset.contains(&h.id)));

    // Unknown id: error, nothing deleted.
    let before = snapshot(dir.path());
    let err = PlaidIndex::delete(dir.path(), &["b5".into(), "nope".into()]).unwrap_err();
    assert!(matches!(err, Error::UnknownIds(_)), "{err}");
    assert_eq!(snapshot(dir.path()), before);

    // Delete a few: not returned any more, other ids and scores unchanged.
    let score_a3 = index
        .search(
            EmbRef::new(&docs[3], DIM).unwrap(),
            &SearchParams::for_k(1),
            None,
        )
        .unwrap()[0]
        .clone();
    let r = PlaidIndex::delete(dir.path(), &["b5".into(), "a7".into()]).unwrap();
    assert_eq!((r.deleted, r.remaining, r.compacted), (2, 258, false));
    let after = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(after.len(), 258);
    assert!(!after.contains("b5") && after.contains("b6"));
    let hits = after.search(q, &SearchParams::for_k(10), None).unwrap();
    assert!(hits.iter().all(|h| h.id != "b5"));
    // The reader opened before the delete still answers from its snapshot.
    assert_eq!(
        index.search(q, &SearchParams::for_k(3), None).unwrap()[0].id,
        "b5"
    );

    // Deleting more than a fifth compacts; ids stay the same.
    let many: Vec<String> = (100..160).map(|i| format!("a{i}")).collect();
    let r = PlaidIndex::delete(dir.path(), &many).unwrap();
    assert!(r.compacted);
    let compacted = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(compacted.len(), 198);
    assert_eq!(compacted.info().deleted, 0);
    let again = compacted
        .search(
            EmbRef::new(&docs[3], DIM).unwrap(),
            &SearchParams::for_k(1),
            None,
        )
        .unwrap();
    assert_eq!(again[0], score_a3);
    // Adding after a compaction keeps working.
    let (third, _) = corpus(5, 13, "c");
    PlaidIndex::add(dir.path(), &third).unwrap();
    assert_eq!(PlaidIndex::open(dir.path()).unwrap().len(), 203);
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_the_index_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = corpus(50, 21, "d");
    PlaidIndex::create(dir.path(), &src, &config()).unwrap();
    let before = snapshot(dir.path());
    let index = PlaidIndex::open(dir.path()).unwrap();

    // Wrong dimension on add and search.
    let mut wrong = VecSource::new(16);
    wrong.push("x", vec![0.5; 32]).unwrap();
    assert!(matches!(
        PlaidIndex::add(dir.path(), &wrong),
        Err(Error::DimensionMismatch { .. })
    ));
    let q16 = vec![0.25f32; 16];
    let err = index
        .search(
            EmbRef::new(&q16, 16).unwrap(),
            &SearchParams::for_k(3),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DimensionMismatch {
                expected: 32,
                got: 16,
                ..
            }
        ),
        "{err}"
    );
    // k = 0.
    let q = vec![0.1f32; DIM];
    let err = index
        .search(EmbRef::new(&q, DIM).unwrap(), &SearchParams::for_k(0), None)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    // An id twice in one add (an id already in the index is replaced instead), and an empty document in
    // the middle of a batch.
    let mut dup = VecSource::new(DIM);
    dup.push("twice", vec![0.1; DIM]).unwrap();
    dup.push("twice", vec![0.2; DIM]).unwrap();
    assert!(matches!(
        PlaidIndex::add(dir.path(), &dup),
        Err(Error::DuplicateId(_))
    ));
    let mut empty = VecSource::new(DIM);
    empty.push("ok", vec![0.1; DIM]).unwrap();
    empty.push("empty", vec![]).unwrap();
    assert!(matches!(
        PlaidIndex::add(dir.path(), &empty),
        Err(Error::EmptyDocument(_))
    ));
    // Creating over an existing index.
    assert!(PlaidIndex::create(dir.path(), &src, &config()).is_err());
    assert_eq!(snapshot(dir.path()), before);

    // A directory that is not an index.
    let other = tempfile::tempdir().unwrap();
    assert!(matches!(
        PlaidIndex::open(other.path()),
        Err(Error::NotAnIndex(_))
    ));
    assert!(matches!(
        PlaidIndex::delete(other.path(), &["a".into()]),
        Err(Error::NotAnIndex(_))
    ));
    // An index whose documents were all deleted is empty.
    let all: Vec<String> = (0..50).map(|i| format!("d{i}")).collect();
    PlaidIndex::delete(dir.path(), &all).unwrap();
    let err = PlaidIndex::open(dir.path()).unwrap().search(
        EmbRef::new(&q, DIM).unwrap(),
        &SearchParams::for_k(3),
        None,
    );
    assert!(matches!(err, Err(Error::EmptyIndex)));
    // nbits 3 is refused.
    let d3 = tempfile::tempdir().unwrap();
    let err = PlaidIndex::create(
        d3.path(),
        &src,
        &IndexConfig {
            nbits: 3,
            ..config()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("nbits"), "{err}");
}

#[test]
fn corrupt_or_truncated_files_are_detected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = corpus(40, 31, "d");
    PlaidIndex::create(dir.path(), &src, &config()).unwrap();
    let files: Vec<String> = snapshot(dir.path())
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".lt"))
        .collect();
    assert!(files.len() >= 7, "{files:?}");
    for name in &files {
        let path = dir.path().join(name);
        let good = std::fs::read(&path).unwrap();
        // One flipped bit in the middle of the payload.
        let mut bad = good.clone();
        let at = 32 + (bad.len() - 40) / 2;
        bad[at] ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        let err = PlaidIndex::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains(name.as_str()), "{name}: {err}");
        // Truncated.
        std::fs::write(&path, &good[..good.len() - 5]).unwrap();
        let err = PlaidIndex::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains(name.as_str()), "{name}: {err}");
        std::fs::write(&path, &good).unwrap();
    }
    PlaidIndex::open(dir.path()).unwrap();
}

#[test]
fn interrupted_writes_and_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = corpus(40, 41, "d");
    PlaidIndex::create(dir.path(), &src, &config()).unwrap();
    let before = snapshot(dir.path());
    let q = vec![0.2f32; DIM];
    let q = EmbRef::new(&q, DIM).unwrap();
    let hits_before = PlaidIndex::open(dir.path())
        .unwrap()
        .search(q, &SearchParams::for_k(5), None)
        .unwrap();

    // A crash mid-add leaves temporary and unreferenced chunk files: the index still opens with the old state,
    // and the next write removes the leftovers.
    std::fs::write(dir.path().join("c9.codes.lt.tmp"), b"partial").unwrap();
    std::fs::write(dir.path().join("c9.res.lt"), b"orphan").unwrap();
    std::fs::write(dir.path().join("meta.lt.tmp"), b"half a meta").unwrap();
    let index = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(
        index.search(q, &SearchParams::for_k(5), None).unwrap(),
        hits_before
    );

    // A second writer is refused while the lock is held, and nothing changes.
    let holder = PlaidIndex::writer(dir.path()).unwrap();
    let (more, _) = corpus(5, 42, "e");
    let err = PlaidIndex::add(dir.path(), &more).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(err.to_string().contains("LOCK"), "{err}");
    drop(holder);

    PlaidIndex::add(dir.path(), &more).unwrap();
    let names: Vec<String> = snapshot(dir.path()).into_iter().map(|(n, _)| n).collect();
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with(".tmp") || n == "c9.res.lt"),
        "{names:?}"
    );
    assert!(!names.contains(&"LOCK".to_string()));
    // The reader opened before the add keeps answering from its snapshot.
    assert_eq!(
        index.search(q, &SearchParams::for_k(5), None).unwrap(),
        hits_before
    );
    assert_ne!(snapshot(dir.path()), before);
}

#[test]
fn pooling_at_index_time_reduces_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (src, docs) = corpus(60, 51, "d");
    let tokens: usize = docs.iter().map(|d| d.len() / DIM).sum();
    let r = PlaidIndex::create(
        dir.path(),
        &src,
        &IndexConfig {
            pool_factor: 2,
            ..config()
        },
    )
    .unwrap();
    assert!(
        (r.tokens as usize) < tokens * 2 / 3,
        "{} of {tokens}",
        r.tokens
    );
    let index = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(index.info().config.pool_factor, 2);
    let q = EmbRef::new(&docs[4][..2 * DIM], DIM).unwrap();
    assert_eq!(
        index
            .search(q, &SearchParams::for_k(3), None)
            .unwrap()
            .len(),
        3
    );
}

/// A source that counts how often each document is read.
struct Counting {
    inner: VecSource,
    reads: Vec<std::sync::atomic::AtomicUsize>,
}

impl latte_index::DocumentSource for Counting {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn id(&self, i: usize) -> String {
        self.inner.id(i)
    }
    fn embeddings(&self, i: usize) -> latte_index::Result<std::borrow::Cow<'_, [f32]>> {
        self.reads[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.embeddings(i)
    }
}

#[test]
fn a_pooled_build_reads_and_pools_each_document_once_and_equals_a_prepooled_build() {
    use latte_index::DocumentSource;
    let (src, _) = corpus(80, 77, "d");
    let counting = Counting {
        reads: (0..src.len()).map(|_| Default::default()).collect(),
        inner: src.clone(),
    };
    let pooled_dir = tempfile::tempdir().unwrap();
    let pooled = IndexConfig {
        pool_factor: 3,
        ..config()
    };
    let r = PlaidIndex::create(pooled_dir.path(), &counting, &pooled).unwrap();
    for (i, n) in counting.reads.iter().enumerate() {
        assert_eq!(
            n.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "document {i}"
        );
    }
    // The same documents pooled beforehand and indexed without pooling give the same files (meta.lt records
    // the different pool_factor) and the same results.
    let pre = latte_index::pool::pool_source(&src, 3).unwrap();
    let pre_dir = tempfile::tempdir().unwrap();
    let r_pre = PlaidIndex::create(pre_dir.path(), &pre, &config()).unwrap();
    assert_eq!(r, r_pre);
    let files = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        snapshot(dir)
            .into_iter()
            .filter(|(n, _)| !n.starts_with("meta."))
            .collect()
    };
    let a = files(pooled_dir.path());
    assert!(
        a.iter().any(|(n, _)| n.ends_with(".res.lt")),
        "{:?}",
        a.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert_eq!(a, files(pre_dir.path()));
    // Nothing but the index's files and its document store is left in the folder (the temporary file is gone).
    assert!(
        a.iter()
            .all(|(n, _)| n.ends_with(".lt") || n == "documents.sqlite"),
        "{:?}",
        a.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
}

#[test]
fn assign_probe_is_kept_and_used_by_a_two_level_index_and_its_adds() {
    use latte_index::{SynthConfig, SyntheticSource};
    let dim = 16;
    let synth = |docs, seed| {
        SyntheticSource::new(SynthConfig {
            docs,
            dim,
            mean_tokens: 10,
            topics: 200,
            seed,
            ..SynthConfig::default()
        })
        .unwrap()
    };
    let src = synth(3000, 1);
    let dir = tempfile::tempdir().unwrap();
    // More than 4,096 centroids: assignment is two-level, probing 4 groups.
    let config = IndexConfig {
        num_centroids: Some(20_000),
        kmeans_points_per_centroid: 1,
        kmeans_iters: 2,
        assign_probe: Some(4),
        ..IndexConfig::default()
    };
    assert!(matches!(
        PlaidIndex::create(
            dir.path(),
            &src,
            &IndexConfig {
                assign_probe: Some(0),
                ..config.clone()
            }
        ),
        Err(Error::InvalidArgument(_))
    ));
    let r = PlaidIndex::create(dir.path(), &src, &config).unwrap();
    assert_eq!(r.num_centroids, 20_000);
    let find = |index: &PlaidIndex, doc: &[f32], want: &str| {
        let q = EmbRef::new(&doc[..4 * dim], dim).unwrap();
        let hits = index.search(q, &SearchParams::for_k(3), None).unwrap();
        assert_eq!(hits[0].id, want);
    };
    {
        let index = PlaidIndex::open(dir.path()).unwrap();
        assert_eq!(index.info().config.assign_probe, Some(4));
        for d in [0usize, 1234, 2999] {
            find(&index, &src.document(d), &d.to_string());
        }
    }
    // Re-opened for an add: the new documents are encoded with the stored probe and found.
    // Documents 3000.. of the same corpus (same topics), under new ids.
    let extra = synth(3040, 1);
    let mut add = VecSource::new(dim);
    for i in 0..40 {
        add.push(format!("new{i}"), extra.document(3000 + i))
            .unwrap();
    }
    let r = PlaidIndex::add(dir.path(), &add).unwrap();
    assert_eq!(r.documents, 40);
    assert!(r.outlier_fraction < 0.5, "outliers {}", r.outlier_fraction);
    let index = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(index.len(), 3040);
    assert_eq!(index.info().config.assign_probe, Some(4));
    find(&index, &extra.document(3007), "new7");
    find(&index, &src.document(5), "5");
}

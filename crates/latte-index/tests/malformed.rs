//! Malformed input to the library: wrong dimensions, non-finite values, empty documents, duplicate ids,
//! unusual ids, odd settings. Each is a clear error that leaves the index unchanged, or a documented
//! acceptance checked here; none may panic. Known defects of today's code are listed in `KNOWN_DEFECTS`
//! (printed, not asserted, so that fixing one does not break the test).

mod fault;

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use fault::{config, corpus, Docs, DIM};
use latte_index::{
    DocumentSource, EmbRef, Error, IndexConfig, PlaidIndex, Result, SearchParams, VecSource,
};

/// Accepted today though they should be refused: none left (non-finite values and values beyond half
/// precision in documents, and non-finite queries, are now `Error::InvalidArgument`).
const KNOWN_DEFECTS: &[&str] = &[];

/// Every file of the index with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn build(dir: &Path) -> Docs {
    let docs = corpus(60, 5, "d");
    PlaidIndex::create(dir, &docs.source(), &config()).unwrap();
    docs
}

/// Runs a write that must fail without panicking and without changing a byte of the index.
fn refused<T: std::fmt::Debug>(dir: &Path, case: &str, write: impl FnOnce() -> Result<T>) -> Error {
    let before = snapshot(dir);
    let res = catch_unwind(AssertUnwindSafe(write));
    let err = match res {
        Err(_) => panic!("{case}: panicked"),
        Ok(Ok(v)) => panic!("{case}: accepted: {v:?}"),
        Ok(Err(e)) => e,
    };
    assert!(
        snapshot(dir) == before,
        "{case}: the refused write changed the index"
    );
    err
}

fn one(id: &str, emb: Vec<f32>) -> VecSource {
    let mut s = VecSource::new(DIM);
    s.push(id, emb).unwrap();
    s
}

/// A source that hands out whatever it is given, bypassing `VecSource`'s shape check.
struct RawSource {
    dim: usize,
    docs: Vec<(String, Vec<f32>)>,
    fail_at: Option<usize>,
}

impl DocumentSource for RawSource {
    fn len(&self) -> usize {
        self.docs.len()
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn id(&self, i: usize) -> String {
        self.docs[i].0.clone()
    }
    fn embeddings(&self, i: usize) -> Result<Cow<'_, [f32]>> {
        if self.fail_at == Some(i) {
            return Err(Error::Source(format!("cannot read document {i}")));
        }
        Ok(Cow::Borrowed(&self.docs[i].1))
    }
}

#[test]
fn wrong_dimensions_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let docs = build(dir);
    let good = docs.embs[0].clone();

    // VecSource checks shapes itself.
    let mut s = VecSource::new(DIM);
    let err = s.push("x", vec![0.1; DIM + 3]).unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    assert!(err.to_string().contains(&(DIM + 3).to_string()), "{err}");
    assert!(VecSource::new(0).push("x", vec![0.1; 4]).is_err());

    // A source of another dimension.
    let mut s16 = VecSource::new(16);
    s16.push("x", vec![0.25; 16]).unwrap();
    let err = refused(dir, "add dim 16", || PlaidIndex::add(dir, &s16));
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
    // A ragged document from a source that does not check (the error names the document).
    let ragged = RawSource {
        dim: DIM,
        docs: vec![
            ("ok".into(), good.clone()),
            ("ragged".into(), vec![0.1; DIM + 1]),
        ],
        fail_at: None,
    };
    let err = refused(dir, "add ragged", || PlaidIndex::add(dir, &ragged));
    assert!(matches!(err, Error::Shape(_)), "{err}");
    assert!(err.to_string().contains("ragged"), "{err}");
    // A source that fails mid-way.
    let failing = RawSource {
        dim: DIM,
        docs: vec![("a".into(), good.clone()), ("b".into(), good.clone())],
        fail_at: Some(1),
    };
    let err = refused(dir, "add failing source", || PlaidIndex::add(dir, &failing));
    assert!(matches!(err, Error::Source(_)), "{err}");
    // Dimensions that are not a multiple of 8 cannot be created.
    let other = tempfile::tempdir().unwrap();
    let odd = RawSource {
        dim: 12,
        docs: vec![("a".into(), vec![0.5; 24])],
        fail_at: None,
    };
    let err = PlaidIndex::create(other.path(), &odd, &config()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("12"),
        "{err}"
    );
    assert!(!other.path().join("meta.lt").exists());

    // Queries of the wrong dimension.
    let index = PlaidIndex::open(dir).unwrap();
    let q16 = vec![0.25f32; 32];
    let q = EmbRef::new(&q16, 16).unwrap();
    for err in [
        index.search(q, &SearchParams::for_k(3), None).unwrap_err(),
        index.search_exact(q, 3, None).unwrap_err(),
        index
            .search_batch(
                &[EmbRef::new(&good, DIM).unwrap(), q],
                &SearchParams::for_k(3),
                None,
            )
            .unwrap_err(),
    ] {
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
    }
}

#[test]
fn empty_documents_sources_and_queries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let docs = build(dir);
    let mut s = VecSource::new(DIM);
    s.push("fine", docs.embs[1].clone()).unwrap();
    s.push("hollow", vec![]).unwrap();
    let err = refused(dir, "add empty document", || PlaidIndex::add(dir, &s));
    assert!(
        matches!(&err, Error::EmptyDocument(id) if id == "hollow"),
        "{err}"
    );
    let err = refused(dir, "add empty source", || {
        PlaidIndex::add(dir, &VecSource::new(DIM))
    });
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");

    let other = tempfile::tempdir().unwrap();
    let err = PlaidIndex::create(other.path(), &s, &config()).unwrap_err();
    assert!(
        matches!(&err, Error::EmptyDocument(id) if id == "hollow"),
        "{err}"
    );
    let err = PlaidIndex::create(other.path(), &VecSource::new(DIM), &config()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(!other.path().join("meta.lt").exists());

    let index = PlaidIndex::open(dir).unwrap();
    let empty = EmbRef::new(&[], DIM).unwrap();
    let err = index
        .search(empty, &SearchParams::for_k(3), None)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = index.search_exact(empty, 3, None).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[test]
fn duplicate_ids_are_refused_and_duplicate_deletes_count_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let docs = build(dir);
    let e = docs.embs[2].clone();
    // Twice in one add.
    let mut s = VecSource::new(DIM);
    s.push("new", e.clone()).unwrap();
    s.push("twice", e.clone()).unwrap();
    s.push("twice", e.clone()).unwrap();
    let err = refused(dir, "duplicate in one add", || PlaidIndex::add(dir, &s));
    assert!(
        matches!(&err, Error::DuplicateId(id) if id == "twice"),
        "{err}"
    );
    // Already in the index: replaced (its vectors; the add report says so).
    let r = PlaidIndex::add(dir, &one("d7", e.clone())).unwrap();
    assert_eq!(r.replaced, ["d7"]);
    assert_eq!(r.documents, 1);
    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!(index.len(), 60);
    let hits = index
        .search_exact(EmbRef::new(&e, DIM).unwrap(), 1, Some(&["d7".into()]))
        .unwrap();
    let want = fault::maxsim_f16(&e, &e);
    assert!(
        (hits[0].score - want).abs() < 1e-3 * want,
        "{hits:?} vs {want}"
    );
    // Twice in one create.
    let other = tempfile::tempdir().unwrap();
    let err = PlaidIndex::create(other.path(), &s, &config()).unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateId(id) if id == "twice"),
        "{err}"
    );

    // Deletes: unknown or already deleted ids delete nothing; a repeated id counts once; an empty list is
    // accepted and deletes nothing (it still commits a new generation).
    let err = refused(dir, "delete unknown", || {
        PlaidIndex::delete(dir, &["d1".into(), "nope".into()])
    });
    assert!(
        matches!(&err, Error::UnknownIds(s) if s.contains("nope") && !s.contains("d1")),
        "{err}"
    );
    let r = PlaidIndex::delete(dir, &["d1".into(), "d1".into()]).unwrap();
    assert_eq!((r.deleted, r.remaining), (1, 59));
    let err = refused(dir, "delete deleted", || {
        PlaidIndex::delete(dir, &["d1".into()])
    });
    assert!(matches!(err, Error::UnknownIds(_)), "{err}");
    let r = PlaidIndex::delete(dir, &[]).unwrap();
    assert_eq!((r.deleted, r.remaining), (0, 59));
    assert_eq!(PlaidIndex::open(dir).unwrap().len(), 59);
    // A deleted id can be added again before compaction (the delete-then-add update path).
    let again = one("d1", docs.embs[30].clone());
    PlaidIndex::add(dir, &again).unwrap();
    // Reopening sees the deleted and the new document holding the same id, and maps the id to the live one.
    let index = PlaidIndex::open(dir).unwrap();
    assert!(index.contains("d1"));
    assert_eq!(index.len(), 60);
    // The id now holds the new vectors.
    let q = EmbRef::new(&docs.embs[30], DIM).unwrap();
    let hits = index.search_exact(q, 1, Some(&["d1".into()])).unwrap();
    let want = fault::maxsim_f16(&docs.embs[30], &docs.embs[30]);
    assert!(
        (hits[0].score - want).abs() < 1e-3 * want,
        "{hits:?} vs {want}"
    );
}

#[test]
fn ids_with_newlines_or_empty_are_refused_other_ids_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let docs = build(dir);
    let e = docs.embs[4].clone();
    for bad in ["", "a\nb", "\n", "trailing\n"] {
        let err = refused(dir, &format!("id {bad:?}"), || {
            PlaidIndex::add(dir, &one(bad, e.clone()))
        });
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
        assert!(err.to_string().contains("newline"), "{err}");
    }
    // Documented acceptance: any other UTF-8 string is an id, including control characters, a NUL, spaces
    // and a 1 MiB id. They survive reopening, a compaction (which rewrites the id list) and deletion.
    let huge = "x".repeat(1 << 20);
    let odd: Vec<String> = [
        "cr\rid",
        "tab\tid",
        "nul\0id",
        " ",
        " padded ",
        "ünï€😀",
        "a,b;c\"d'e",
        huge.as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut s = VecSource::new(DIM);
    for (i, id) in odd.iter().enumerate() {
        s.push(id.clone(), docs.embs[10 + i].clone()).unwrap();
    }
    PlaidIndex::add(dir, &s).unwrap();
    let check = |stage: &str| {
        let index = PlaidIndex::open(dir).unwrap();
        for (i, id) in odd.iter().enumerate() {
            assert!(
                index.contains(id),
                "{stage}: {:?} lost",
                &id[..id.len().min(20)]
            );
            let q = EmbRef::new(&docs.embs[10 + i], DIM).unwrap();
            let hits = index
                .search_exact(q, 1, Some(std::slice::from_ref(id)))
                .unwrap();
            assert_eq!(hits.len(), 1, "{stage}");
            assert!(hits[0].id == *id, "{stage}: search returned another id");
        }
    };
    check("after add");
    // Deleting 20 of 68 stored documents compacts.
    let del: Vec<String> = (20..40).map(|i| format!("d{i}")).collect();
    assert!(PlaidIndex::delete(dir, &del).unwrap().compacted);
    check("after compaction");
    PlaidIndex::delete(dir, &odd).unwrap();
    let index = PlaidIndex::open(dir).unwrap();
    assert!(odd.iter().all(|id| !index.contains(id)));
    assert_eq!(index.len(), 40);
}

type SearchFn<'a> = dyn Fn() -> Result<Vec<latte_index::Hit>> + 'a;

#[test]
fn non_finite_values_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let docs = build(dir);
    let probe = EmbRef::new(&docs.embs[9], DIM).unwrap();
    // (case, outcome): "refused", "accepted" or "panicked".
    let mut outcomes: Vec<(String, &str)> = Vec::new();
    for (what, v) in [
        ("NaN", f32::NAN),
        ("+inf", f32::INFINITY),
        ("-inf", f32::NEG_INFINITY),
        ("1e5", 1e5),
    ] {
        let case = if what == "1e5" {
            "add: 1e5 in a document (beyond f16)".to_string()
        } else {
            format!("add: {what} in a document")
        };
        let mut e = docs.embs[3].clone();
        e[DIM + 5] = v;
        let id = format!("bad{what}");
        let before = snapshot(dir);
        match catch_unwind(AssertUnwindSafe(|| PlaidIndex::add(dir, &one(&id, e)))) {
            Err(_) => outcomes.push((case, "panicked")),
            Ok(Err(err)) => {
                assert!(
                    snapshot(dir) == before,
                    "{case}: refused but changed the index"
                );
                assert!(err.to_string().contains(&id), "{case}: {err}");
                outcomes.push((case, "refused"));
            }
            Ok(Ok(_)) => {
                outcomes.push((case, "accepted"));
                // Whatever was stored, the index must still open and answer.
                let index = PlaidIndex::open(dir).unwrap();
                index.search(probe, &SearchParams::for_k(3), None).unwrap();
                index.search_exact(probe, 3, None).unwrap();
            }
        }
    }
    for (what, v) in [("NaN", f32::NAN), ("+inf", f32::INFINITY)] {
        let case = format!("create: {what} in a document");
        let mut bad = docs.clone();
        bad.embs[0][7] = v;
        let other = tempfile::tempdir().unwrap();
        let res = catch_unwind(AssertUnwindSafe(|| {
            PlaidIndex::create(other.path(), &bad.source(), &config())
        }));
        match res {
            Err(_) => outcomes.push((case, "panicked")),
            Ok(Err(err)) => {
                assert!(err.to_string().contains("d0"), "{case}: {err}");
                outcomes.push((case, "refused"));
            }
            Ok(Ok(_)) => {
                outcomes.push((case, "accepted"));
                let index = PlaidIndex::open(other.path()).unwrap();
                index.search(probe, &SearchParams::for_k(3), None).unwrap();
            }
        }
    }
    let index = PlaidIndex::open(dir).unwrap();
    for (what, v) in [("NaN", f32::NAN), ("+inf", f32::INFINITY)] {
        let mut q = docs.embs[9].clone();
        q[1] = v;
        let q = EmbRef::new(&q, DIM).unwrap();
        let runs: [(&str, Box<SearchFn>); 2] = [
            (
                "search",
                Box::new(|| index.search(q, &SearchParams::for_k(3), None)),
            ),
            ("search_exact", Box::new(|| index.search_exact(q, 3, None))),
        ];
        for (name, run) in runs {
            let case = format!("{name}: {what} in the query");
            match catch_unwind(AssertUnwindSafe(run)) {
                Err(_) => outcomes.push((case, "panicked")),
                Ok(Err(err)) => {
                    assert!(matches!(err, Error::InvalidArgument(_)), "{case}: {err}");
                    outcomes.push((case, "refused"));
                }
                Ok(Ok(_)) => outcomes.push((case, "accepted")),
            }
        }
    }
    let mut failures = Vec::new();
    for (case, outcome) in &outcomes {
        let known = KNOWN_DEFECTS.contains(&case.as_str());
        match (*outcome, known) {
            ("panicked", _) => failures.push(format!("{case}: panicked")),
            ("accepted", true) => println!("known defect: {case}: accepted"),
            ("accepted", false) => failures.push(format!("{case}: accepted")),
            (_, true) => println!("known defect fixed, remove it from KNOWN_DEFECTS: {case}"),
            _ => {}
        }
    }
    assert_eq!(outcomes.len(), 10);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn odd_settings_are_refused_or_clamped() {
    let docs = corpus(40, 8, "d");
    let src = docs.source();
    for (what, cfg) in [
        (
            "nbits 0",
            IndexConfig {
                nbits: 0,
                ..config()
            },
        ),
        (
            "nbits 3",
            IndexConfig {
                nbits: 3,
                ..config()
            },
        ),
        (
            "pool_factor 0",
            IndexConfig {
                pool_factor: 0,
                ..config()
            },
        ),
        (
            "assign_probe 0",
            IndexConfig {
                assign_probe: Some(0),
                ..config()
            },
        ),
        (
            "kmeans_points_per_centroid 0",
            IndexConfig {
                kmeans_points_per_centroid: 0,
                ..config()
            },
        ),
    ] {
        let other = tempfile::tempdir().unwrap();
        let err = PlaidIndex::create(other.path(), &src, &cfg).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{what}: {err}");
        assert!(!other.path().join("meta.lt").exists(), "{what}");
    }
    // Zero centroids is refused, naming the parameter (it used to be turned into 1 silently).
    let other = tempfile::tempdir().unwrap();
    let zero = IndexConfig {
        num_centroids: Some(0),
        ..config()
    };
    match PlaidIndex::create(other.path(), &src, &zero) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("num_centroids"), "{m}"),
        other => panic!("num_centroids 0: expected InvalidArgument, got {other:?}"),
    }
    // Documented acceptance: centroid counts are clamped to what the data supports (more centroids than
    // tokens → at most one per token); 0 k-means iterations keep the initial centroids.
    let tokens = docs.tokens() as usize;
    for (what, cfg) in [
        (
            "num_centroids 10^6",
            IndexConfig {
                num_centroids: Some(1_000_000),
                ..config()
            },
        ),
        (
            "kmeans_iters 0",
            IndexConfig {
                kmeans_iters: 0,
                ..config()
            },
        ),
    ] {
        let other = tempfile::tempdir().unwrap();
        let r = PlaidIndex::create(other.path(), &src, &cfg).unwrap();
        assert!((1..=tokens).contains(&r.num_centroids), "{what}: {r:?}");
        let index = PlaidIndex::open(other.path()).unwrap();
        let q = EmbRef::new(&docs.embs[6], DIM).unwrap();
        let hits = index.search(q, &SearchParams::for_k(1), None).unwrap();
        assert_eq!(hits[0].id, "d6", "{what}");
    }
    // Search settings out of range: k = 0 is refused; zero or huge depths are clamped.
    let tmp = tempfile::tempdir().unwrap();
    PlaidIndex::create(tmp.path(), &src, &config()).unwrap();
    let index = PlaidIndex::open(tmp.path()).unwrap();
    let q = EmbRef::new(&docs.embs[6], DIM).unwrap();
    assert!(matches!(
        index.search(q, &SearchParams::for_k(0), None),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        index.search_exact(q, 0, None),
        Err(Error::InvalidArgument(_))
    ));
    let base = SearchParams::for_k(3);
    // Zero depths and NaN thresholds are refused, naming the parameter; huge ones are clamped.
    for (what, name, p) in [
        (
            "n_ivf_probe 0",
            "n_ivf_probe",
            SearchParams {
                n_ivf_probe: 0,
                ..base.clone()
            },
        ),
        (
            "ndocs 0",
            "ndocs",
            SearchParams {
                ndocs: 0,
                ..base.clone()
            },
        ),
        (
            "n_residual 0",
            "n_residual",
            SearchParams {
                n_residual: 0,
                ..base.clone()
            },
        ),
        (
            "n_rerank 0",
            "n_rerank",
            SearchParams {
                n_rerank: 0,
                ..base.clone()
            },
        ),
        (
            "NaN threshold",
            "centroid_score_threshold",
            SearchParams {
                centroid_score_threshold: Some(f32::NAN),
                ..base.clone()
            },
        ),
        (
            "NaN token margin",
            "token_margin",
            SearchParams {
                token_margin: Some(f32::NAN),
                ..base.clone()
            },
        ),
    ] {
        match index.search(q, &p, None) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(name), "{what}: {m}"),
            other => panic!("{what}: expected InvalidArgument, got {other:?}"),
        }
    }
    {
        let what = "n_ivf_probe 10^9";
        let p = SearchParams {
            n_ivf_probe: 1_000_000_000,
            ..base.clone()
        };
        let hits = index.search(q, &p, None).unwrap();
        assert!(!hits.is_empty() && hits.len() <= 3, "{what}: {hits:?}");
        assert_eq!(hits[0].id, "d6", "{what}");
    }
    let all = index
        .search(q, &SearchParams::for_k(1_000_000), None)
        .unwrap();
    assert_eq!(all.len(), 40);
    assert_eq!(index.search_exact(q, 1_000_000, None).unwrap().len(), 40);
    assert!(index.search(q, &base, Some(&[])).unwrap().is_empty());
    assert!(index
        .search(q, &base, Some(&["nope".into()]))
        .unwrap()
        .is_empty());
    assert!(index.search_batch(&[], &base, None).unwrap().is_empty());
}

#[test]
fn edge_operations_keep_the_index_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let docs = build(dir);
    // Compacting with nothing deleted changes no answer.
    let q = EmbRef::new(&docs.embs[11], DIM).unwrap();
    let before = PlaidIndex::open(dir)
        .unwrap()
        .search_exact(q, 5, None)
        .unwrap();
    PlaidIndex::compact(dir).unwrap();
    PlaidIndex::compact(dir).unwrap();
    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!(index.search_exact(q, 5, None).unwrap(), before);
    assert_eq!((index.len(), index.info().deleted), (60, 0));
    // Deleting every document (which compacts) leaves an empty index that refuses searches and takes adds.
    let r = PlaidIndex::delete(dir, &docs.ids).unwrap();
    assert!(r.compacted && r.remaining == 0, "{r:?}");
    let index = PlaidIndex::open(dir).unwrap();
    assert!(index.is_empty());
    assert_eq!(index.info().tokens, 0);
    assert!(matches!(
        index.search(q, &SearchParams::for_k(3), None),
        Err(Error::EmptyIndex)
    ));
    PlaidIndex::compact(dir).unwrap();
    PlaidIndex::add(dir, &one("back", docs.embs[11].clone())).unwrap();
    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!(index.len(), 1);
    let hits = index.search(q, &SearchParams::for_k(3), None).unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].id, "back");
    // The old ids can be used again after the compaction.
    PlaidIndex::add(dir, &docs.source()).unwrap();
    assert_eq!(PlaidIndex::open(dir).unwrap().len(), 61);
}

//! The document store on a real SQLite file: writes, reports, generations and rollback, BM25, crash
//! consistency, corrupt files and a concurrent reader.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use latte_store::{Doc, DocStore, Filter, Reconciled, StoreError, MAX_QUERY_TERMS};
use serde_json::{json, Value};

fn meta(v: Value) -> Option<serde_json::Map<String, Value>> {
    Some(v.as_object().expect("object").clone())
}

fn doc(id: &str, title: &str, text: &str, m: Value) -> Doc {
    Doc {
        id: id.into(),
        title: Some(title.into()),
        text: Some(text.into()),
        metadata: meta(m),
    }
}

fn new_store() -> (tempfile::TempDir, PathBuf, DocStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("documents.sqlite");
    let store = DocStore::create(&path).unwrap();
    (dir, path, store)
}

fn all_ids(store: &DocStore) -> Vec<String> {
    store.ids_matching(&Filter::all()).unwrap()
}

#[test]
fn create_write_reopen_read() {
    let (_dir, path, mut store) = new_store();
    assert_eq!(store.generation().unwrap(), 0);
    assert_eq!(store.count().unwrap(), 0);
    let docs = vec![
        doc(
            "d1",
            "Ownership",
            "Borrowing rules in Rust",
            json!({"lang": "en", "n": 1}),
        ),
        Doc::new("d2"),
        Doc::new("d3")
            .with_text("only text")
            .with_metadata(json!({"a": [1, {"b": null}]}).as_object().unwrap().clone()),
    ];
    let report = store.upsert(&docs, 1).unwrap();
    assert_eq!(report.inserted, ["d1", "d2", "d3"]);
    assert!(report.replaced.is_empty());
    drop(store);

    let store = DocStore::open(&path).unwrap();
    assert_eq!(store.path(), path);
    assert_eq!(store.generation().unwrap(), 1);
    assert_eq!(store.count().unwrap(), 3);
    assert_eq!(store.count_with_text().unwrap(), 2);
    let got = store.get(&["d3", "nope", "d1", "d2"]).unwrap();
    assert_eq!(
        got,
        vec![
            Some(docs[2].clone()),
            None,
            Some(docs[0].clone()),
            Some(docs[1].clone())
        ]
    );
    store.verify().unwrap();
}

#[test]
fn replace_and_delete_reports() {
    let (_dir, _path, mut store) = new_store();
    store
        .upsert(
            &[
                doc("a", "Alpha", "apples and pears", json!({"k": 1})),
                doc("b", "Beta", "bananas", json!({"k": 2})),
            ],
            1,
        )
        .unwrap();
    // replacing replaces text and metadata together, including removing them
    let report = store
        .upsert(&[Doc::new("a").with_text("cherries"), Doc::new("c")], 2)
        .unwrap();
    assert_eq!(report.inserted, ["c"]);
    assert_eq!(report.replaced, ["a"]);
    assert_eq!(
        store.get(&["a"]).unwrap()[0],
        Some(Doc::new("a").with_text("cherries"))
    );
    assert!(store.bm25("apples", 10, None).unwrap().is_empty());
    assert!(store.bm25("alpha", 10, None).unwrap().is_empty());
    assert_eq!(store.bm25("cherries", 10, None).unwrap()[0].0, "a");
    assert!(store
        .ids_matching(&"{\"k\": 1}".parse().unwrap())
        .unwrap()
        .is_empty());

    let report = store.delete(&["b", "zzz", "b", "c"], 3).unwrap();
    assert_eq!(report.deleted, ["b", "c"]);
    assert_eq!(report.missing, ["zzz"]);
    assert_eq!(all_ids(&store), ["a"]);
    assert!(store.bm25("bananas", 10, None).unwrap().is_empty());
    assert_eq!(store.generation().unwrap(), 3);
    store.verify().unwrap();
}

#[test]
fn invalid_writes_change_nothing() {
    let (_dir, path, mut store) = new_store();
    store.upsert(&[Doc::new("a")], 2).unwrap();
    let e = store.upsert(&[Doc::new("x"), Doc::new("")], 3).unwrap_err();
    assert!(matches!(e, StoreError::InvalidDocument { .. }), "{e}");
    let e = store
        .upsert(&[Doc::new("x"), Doc::new("x")], 3)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid document \"x\": the id appears more than once in this upsert"
    );
    let e = store.upsert(&[Doc::new("x")], 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: generation 1 is older than the store's generation 2",
            path.display()
        )
    );
    let e = store.delete(&["a"], 1).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::GenerationRegressed {
                current: 2,
                requested: 1,
                ..
            }
        ),
        "{e}"
    );
    let e = store.upsert(&[Doc::new("x")], u64::MAX).unwrap_err();
    assert!(matches!(e, StoreError::GenerationTooLarge(u64::MAX)), "{e}");
    assert_eq!(all_ids(&store), ["a"]);
    assert_eq!(store.generation().unwrap(), 2);
}

#[test]
fn rollback_restores_the_previous_generation() {
    let (_dir, path, mut store) = new_store();
    let a1 = doc("a", "A", "first apple", json!({"v": 1}));
    let b1 = doc("b", "B", "first banana", json!({"v": 1}));
    store.upsert(&[a1.clone(), b1.clone()], 1).unwrap();
    assert_eq!(store.oldest_reachable_generation().unwrap(), 0);
    // generation 2, in several calls: replace a twice, delete b, insert c
    store
        .upsert(&[doc("a", "A", "second apple", json!({"v": 2}))], 2)
        .unwrap();
    store
        .upsert(
            &[doc("a", "A", "third apple", json!({"v": 3})), Doc::new("c")],
            2,
        )
        .unwrap();
    store.delete(&["b"], 2).unwrap();
    assert_eq!(all_ids(&store), ["a", "c"]);
    assert_eq!(store.oldest_reachable_generation().unwrap(), 1);

    let e = store.rollback_to(3).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::CannotRollForward {
                current: 2,
                requested: 3,
                ..
            }
        ),
        "{e}"
    );
    let e = store.rollback_to(0).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: cannot roll back from generation 2 to 0: the undo log reaches back to generation 1 only",
            path.display()
        )
    );
    assert_eq!(store.rollback_to(2).unwrap(), 0);

    assert_eq!(store.rollback_to(1).unwrap(), 3);
    assert_eq!(store.generation().unwrap(), 1);
    assert_eq!(
        store.get(&["a", "b", "c"]).unwrap(),
        vec![Some(a1), Some(b1), None]
    );
    assert_eq!(store.bm25("first", 10, None).unwrap().len(), 2);
    assert!(store.bm25("third", 10, None).unwrap().is_empty());
    store.verify().unwrap();
    // the undo log is spent: nothing older is reachable
    assert_eq!(store.oldest_reachable_generation().unwrap(), 1);
    assert!(matches!(
        store.rollback_to(0),
        Err(StoreError::RollbackUnavailable { oldest: 1, .. })
    ));
    // and writing goes on from generation 1
    store.upsert(&[Doc::new("d")], 2).unwrap();
    assert_eq!(all_ids(&store), ["a", "b", "d"]);
}

#[test]
fn a_newer_generation_forgets_the_older_undo_log_and_skipped_generations_are_reachable() {
    let (_dir, _path, mut store) = new_store();
    store.upsert(&[Doc::new("a").with_text("one")], 1).unwrap();
    store.upsert(&[Doc::new("a").with_text("two")], 2).unwrap();
    store
        .upsert(&[Doc::new("a").with_text("three")], 5)
        .unwrap();
    assert_eq!(store.oldest_reachable_generation().unwrap(), 2);
    assert!(matches!(
        store.rollback_to(1),
        Err(StoreError::RollbackUnavailable { oldest: 2, .. })
    ));
    // nothing was written at 3 or 4: their state is generation 2's
    store.rollback_to(3).unwrap();
    assert_eq!(store.generation().unwrap(), 3);
    assert_eq!(
        store.get(&["a"]).unwrap()[0]
            .as_ref()
            .unwrap()
            .text
            .as_deref(),
        Some("two")
    );
}

#[test]
fn reconcile_with_the_index_generation() {
    let (_dir, path, mut store) = new_store();
    store.upsert(&[Doc::new("a")], 1).unwrap();
    store.upsert(&[Doc::new("b")], 2).unwrap();
    drop(store);
    // the index committed generation 1 only (a crash after the store's commit of 2)
    let mut store = DocStore::open(&path).unwrap();
    assert_eq!(store.reconcile(2).unwrap(), Reconciled::InSync);
    assert_eq!(
        store.reconcile(1).unwrap(),
        Reconciled::RolledBack {
            from: 2,
            to: 1,
            restored: 1
        }
    );
    assert_eq!(all_ids(&store), ["a"]);
    let e = store.reconcile(4).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::StoreBehind {
                store: 1,
                index: 4,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bm25_scores_filters_and_safe_queries() {
    let (_dir, _path, mut store) = new_store();
    store
        .upsert(
            &[
                doc(
                    "r1",
                    "Rust ownership",
                    "The borrow checker enforces ownership rules",
                    json!({"lang": "rust"}),
                ),
                doc(
                    "r2",
                    "Lifetimes",
                    "Lifetimes describe how long a borrow lives",
                    json!({"lang": "rust"}),
                ),
                doc(
                    "p1",
                    "Python",
                    "Garbage collection instead of ownership",
                    json!({"lang": "python"}),
                ),
                doc(
                    "c1",
                    "Café crème",
                    "un café noir, s'il vous plaît",
                    json!({"lang": "fr"}),
                ),
                doc("t1", "same", "identical words", json!({})),
                doc("t0", "same", "identical words", json!({})),
                doc("x1", "filler one", "nothing relevant at all", json!({})),
                doc("x2", "filler two", "still nothing relevant", json!({})),
            ],
            1,
        )
        .unwrap();
    let hits = store.bm25("ownership borrow", 10, None).unwrap();
    let ids: Vec<&str> = hits.iter().map(|(id, _)| id.as_str()).collect();
    // r1 has both words (ownership twice), r2 borrow, p1 ownership
    assert_eq!(ids[0], "r1");
    assert_eq!(hits.len(), 3);
    assert!(hits.iter().all(|(_, s)| *s > 0.0), "{hits:?}");
    assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1), "{hits:?}");
    // k limits, k = 0 gives nothing
    assert_eq!(store.bm25("ownership borrow", 1, None).unwrap(), hits[..1]);
    assert!(store.bm25("ownership", 0, None).unwrap().is_empty());
    // the filter is applied in the same query
    let python: Filter = "{\"lang\": \"python\"}".parse().unwrap();
    let hits = store.bm25("ownership borrow", 10, Some(&python)).unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].0, "p1");
    // titles are searched; diacritics are folded both ways
    assert_eq!(store.bm25("lifetimes", 10, None).unwrap()[0].0, "r2");
    assert_eq!(store.bm25("cafe", 10, None).unwrap()[0].0, "c1");
    assert_eq!(store.bm25("PLAIT", 10, None).unwrap()[0].0, "c1");
    // equal scores are ordered by id
    let tied = store.bm25("identical", 10, None).unwrap();
    assert_eq!(tied.len(), 2);
    assert_eq!((tied[0].0.as_str(), tied[1].0.as_str()), ("t0", "t1"));
    assert_eq!(tied[0].1, tied[1].1);
    // FTS5 syntax in user text is plain text
    for q in [
        "NOT ownership",
        "owner*",
        "\"",
        "title:rust",
        "a AND (",
        "-borrow",
        "NEAR(ownership borrow)",
        "ownership\" OR \"x",
        "^rust",
        "{title}: rust",
        "'; DROP TABLE documents; --",
    ] {
        store
            .bm25(q, 10, None)
            .unwrap_or_else(|e| panic!("{q}: {e}"));
    }
    assert_eq!(store.bm25("-borrow", 10, None).unwrap().len(), 2);
    assert!(store.bm25("owner*", 10, None).unwrap().is_empty());
    // no letters or digits: nothing
    assert!(store.bm25("", 10, None).unwrap().is_empty());
    assert!(store.bm25("  !!! ... ", 10, None).unwrap().is_empty());
    let long = "w ".repeat(MAX_QUERY_TERMS + 1);
    assert!(matches!(
        store.bm25(&long, 10, None),
        Err(StoreError::QueryTooLong { .. })
    ));
    assert_eq!(store.count().unwrap(), 8);
}

/// A trigger added behind the store's back makes a statement fail in the middle of a write.
fn inject_failure(path: &PathBuf, trigger: &str) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(trigger).unwrap();
}

#[test]
fn a_write_that_fails_midway_leaves_the_previous_state_and_generation() {
    let (_dir, path, mut store) = new_store();
    store
        .upsert(
            &[
                doc("a", "A", "apple", json!({"v": 1})),
                doc("b", "B", "banana", json!({"v": 1})),
            ],
            1,
        )
        .unwrap();
    let before = store.get(&["a", "b"]).unwrap();

    // fails at the third document, after two were written (one replaced, one inserted)
    inject_failure(
        &path,
        "CREATE TRIGGER poison BEFORE INSERT ON documents WHEN new.id = 'poison'
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    );
    let e = store
        .upsert(
            &[
                doc("a", "A", "avocado", json!({"v": 2})),
                Doc::new("new"),
                Doc::new("poison"),
            ],
            2,
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("injected failure"),
        "{msg}"
    );
    assert_eq!(store.generation().unwrap(), 1);
    assert_eq!(store.get(&["a", "b"]).unwrap(), before);
    assert_eq!(all_ids(&store), ["a", "b"]);
    assert!(store.bm25("avocado", 10, None).unwrap().is_empty());
    assert_eq!(store.oldest_reachable_generation().unwrap(), 0);

    // fails at the last statement, the generation update, after the documents were deleted
    inject_failure(
        &path,
        "CREATE TRIGGER gen3 BEFORE UPDATE ON meta WHEN new.key = 'generation' AND new.value = 3
         BEGIN SELECT RAISE(ABORT, 'injected at commit'); END;",
    );
    let e = store.delete(&["a", "b"], 3).unwrap_err();
    assert!(e.to_string().contains("injected at commit"), "{e}");
    assert_eq!(store.generation().unwrap(), 1);
    assert_eq!(store.get(&["a", "b"]).unwrap(), before);
    store.verify().unwrap();

    // a fresh connection sees the same, and the undo log still brings generation 1 back to 0
    drop(store);
    let mut store = DocStore::open(&path).unwrap();
    assert_eq!(store.generation().unwrap(), 1);
    assert_eq!(store.get(&["a", "b"]).unwrap(), before);
    store.rollback_to(0).unwrap();
    assert_eq!(store.count().unwrap(), 0);
}

#[test]
fn bad_files_are_clear_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // random bytes
    let junk = dir.path().join("junk.sqlite");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..16384)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&junk, &bytes).unwrap();
    let e = DocStore::open(&junk).unwrap_err();
    assert!(matches!(e, StoreError::NotADocStore { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{}: not a latte document store", junk.display())),
        "{msg}"
    );

    // an empty file and some other SQLite database
    let empty = dir.path().join("empty.sqlite");
    std::fs::write(&empty, b"").unwrap();
    let e = DocStore::open(&empty).unwrap_err();
    assert!(
        e.to_string()
            .contains("application_id is 0x0, expected 0x4c544453"),
        "{e}"
    );
    let other = dir.path().join("other.sqlite");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x);")
        .unwrap();
    let e = DocStore::open(&other).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}: not a latte document store", other.display())),
        "{e}"
    );

    // missing file, existing file on create
    let e = DocStore::open(dir.path().join("missing.sqlite")).unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    let e = DocStore::create(&junk).unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");

    // a newer schema version
    let path = dir.path().join("newer.sqlite");
    drop(DocStore::create(&path).unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    let e = DocStore::open(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: document store schema version 99 is not supported (this build reads version 1)",
            path.display()
        )
    );
}

#[test]
fn damaged_pages_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("documents.sqlite");
    let mut store = DocStore::create(&path).unwrap();
    let docs: Vec<Doc> = (0..400)
        .map(|i| {
            doc(
                &format!("doc{i:04}"),
                "title",
                &"lorem ipsum dolor ".repeat(20),
                json!({"i": i}),
            )
        })
        .collect();
    store.upsert(&docs, 1).unwrap();
    drop(store); // the last connection checkpoints the WAL into the file
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 16 * 4096, "{}", bytes.len());
    // overwrite pages 3.. (the schema on page 1 stays readable)
    for (i, b) in bytes[2 * 4096..].iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    std::fs::write(&path, &bytes).unwrap();
    let result = DocStore::open(&path).and_then(|s| {
        s.verify()?;
        s.get(&["doc0001"])?;
        s.bm25("lorem", 10, None)
    });
    let e = result.unwrap_err();
    assert!(
        e.to_string().starts_with(&path.display().to_string()),
        "{e}"
    );
}

#[test]
fn a_concurrent_reader_sees_old_or_new_never_half() {
    let (_dir, path, mut writer) = new_store();
    let ids: Vec<String> = (0..20).map(|i| format!("id{i:02}")).collect();
    const GENERATIONS: u64 = 30;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, ids, done) = (path.clone(), ids.clone(), done.clone());
        std::thread::spawn(move || {
            let reader = DocStore::open(&path).unwrap();
            let mut reads = 0u32;
            let mut last = 0i64;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let docs = reader.get(&ids).unwrap();
                let versions: Vec<Option<i64>> = docs
                    .iter()
                    .map(|d| {
                        d.as_ref()
                            .map(|d| d.metadata.as_ref().unwrap()["v"].as_i64().unwrap())
                    })
                    .collect();
                // all absent (before the first commit) or all of one generation
                assert!(
                    versions.iter().all(|v| *v == versions[0]),
                    "half a write seen: {versions:?}"
                );
                let v = versions[0].unwrap_or(0);
                assert!(v >= last, "went back from {last} to {v}");
                last = v;
                let matching = reader
                    .ids_matching(&Filter::parse(&json!({"v": v})).unwrap())
                    .unwrap();
                assert!(matching.len() == 20 || matching.is_empty(), "{matching:?}");
                reads += 1;
                if finished {
                    break;
                }
            }
            (reads, last)
        })
    };
    for g in 1..=GENERATIONS {
        let docs: Vec<Doc> = ids
            .iter()
            .map(|id| {
                Doc::new(id.clone())
                    .with_text(format!("generation {g}"))
                    .with_metadata(meta(json!({"v": g})).unwrap())
            })
            .collect();
        writer.upsert(&docs, g).unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let (reads, last) = reader.join().unwrap();
    assert!(reads >= 1);
    assert_eq!(last, GENERATIONS as i64);
}

/// A read view pinned to a generation shows that generation's documents while the store is one commit ahead
/// (get, filters, counts and BM25 with that generation's statistics), refuses writes, and reports a store
/// two commits ahead or behind it.
#[test]
fn a_read_view_shows_its_generation_while_the_store_is_ahead() {
    let (_dir, path, mut store) = new_store();
    store
        .upsert(
            &[
                doc("a", "Rust", "borrow checker", json!({"v": 1})),
                doc("b", "Python", "garbage collector", json!({"v": 1})),
                doc("c", "Go", "borrow nothing", json!({"v": 1})),
            ],
            1,
        )
        .unwrap();
    let view = DocStore::open_view(&path, 1).unwrap();
    assert_eq!(view.view_generation(), Some(1));
    let filter: Filter = r#"{"v": 1}"#.parse().unwrap();
    let before = (
        view.get(&["a", "b", "c", "d"]).unwrap(),
        view.ids_matching(&filter).unwrap(),
        view.bm25("borrow", 10, None).unwrap(),
        view.count().unwrap(),
    );
    assert_eq!(before.1, ["a", "b", "c"]);
    // The writer commits generation 2 to the store (the index is not committed yet).
    store
        .upsert(
            &[
                doc("a", "Rust", "ownership", json!({"v": 2})),
                Doc::new("d"),
            ],
            2,
        )
        .unwrap();
    store.delete(&["b"], 2).unwrap();
    let after = (
        view.get(&["a", "b", "c", "d"]).unwrap(),
        view.ids_matching(&filter).unwrap(),
        view.bm25("borrow", 10, None).unwrap(),
        view.count().unwrap(),
    );
    assert_eq!(after, before);
    // The undo was never committed: the store still holds generation 2.
    assert_eq!(store.generation().unwrap(), 2);
    assert_eq!(all_ids(&store), ["a", "c", "d"]);
    let now = DocStore::open_view(&path, 2).unwrap();
    assert_eq!(now.ids_matching(&filter).unwrap(), ["c"]);
    // Writes through a view are refused.
    let mut w = DocStore::open_view(&path, 2).unwrap();
    assert!(matches!(
        w.upsert(&[Doc::new("x")], 2),
        Err(StoreError::ReadOnlyView { view: 2, .. })
    ));
    assert!(matches!(
        w.delete(&["a"], 2),
        Err(StoreError::ReadOnlyView { .. })
    ));
    // Two commits ahead: generation 1 is out of reach.
    store.upsert(&[Doc::new("e")], 3).unwrap();
    let e = view.get(&["a"]).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::ViewUnavailable {
                view: 1,
                store: 3,
                oldest: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("reopen"), "{e}");
    assert!(matches!(
        DocStore::open_view(&path, 1),
        Err(StoreError::ViewUnavailable { .. })
    ));
    // Behind the view.
    assert!(matches!(
        DocStore::open_view(&path, 4),
        Err(StoreError::StoreBehind {
            store: 3,
            index: 4,
            ..
        })
    ));
}

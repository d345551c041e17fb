//! Documents (text and metadata) wired through index creation and the writer: the store is filled, replaced
//! and deleted from together with the vectors, readers see their own generation's documents while a writer
//! is between its two commits, and indexes written before the store existed keep working.

mod fault;

use fault::{config, corpus, maxsim_f16, DIM};
use latte_index::{
    Doc, DocStore, EmbRef, Error, Filter, PlaidIndex, SearchParams, StoreError, VecSource,
};
use serde_json::{json, Value};

fn meta(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().expect("object").clone()
}

/// Text and metadata for `d{i}`: every third document has a doc with a title, version `v`.
fn docs_for(n: usize, v: i64) -> Vec<Doc> {
    (0..n)
        .filter(|i| i % 3 != 2)
        .map(|i| {
            Doc::new(format!("d{i}"))
                .with_title(format!("title {i}"))
                .with_text(format!("passage {i} version {v}"))
                .with_metadata(meta(json!({"bucket": i % 4, "v": v})))
        })
        .collect()
}

fn all(index: &PlaidIndex) -> Vec<String> {
    index
        .open_store()
        .unwrap()
        .ids_matching(&Filter::all())
        .unwrap()
}

fn sorted_live(index: &PlaidIndex) -> Vec<String> {
    let mut v: Vec<String> = index.live_ids().map(str::to_owned).collect();
    v.sort();
    v
}

#[test]
fn create_with_documents_stores_text_and_metadata_and_ids_for_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let corpus = corpus(30, 1, "d");
    let docs = docs_for(30, 1);
    let r = PlaidIndex::create_with_documents(dir, &corpus.source(), &docs, &config()).unwrap();
    assert!(r.replaced.is_empty());
    let index = PlaidIndex::open(dir).unwrap();
    assert!(index.has_store());
    let got = index.get_documents(&["d0", "d2", "nope"]).unwrap();
    assert_eq!(got[0].as_ref(), Some(&docs[0]));
    assert_eq!(got[1], Some(Doc::new("d2")));
    assert_eq!(got[2], None);
    // The store holds exactly the live ids.
    assert_eq!(all(&index), sorted_live(&index));
    let store = index.open_store().unwrap();
    assert_eq!(store.view_generation(), Some(index.generation()));
    let f: Filter = r#"{"bucket": 1, "v": 1}"#.parse().unwrap();
    let ids = store.ids_matching(&f).unwrap();
    let mut want: Vec<String> = (0..30)
        .filter(|i| i % 4 == 1 && i % 3 != 2)
        .map(|i| format!("d{i}"))
        .collect();
    want.sort();
    assert_eq!(ids, want);
    // A filtered search returns only matching documents.
    let q = EmbRef::new(corpus.get("d13").unwrap(), DIM).unwrap();
    let hits = index
        .search_filtered(q, &SearchParams::for_k(3), &store, &f)
        .unwrap();
    assert_eq!(hits[0].id, "d13");
    assert!(hits.iter().all(|h| ids.contains(&h.id)), "{hits:?}");

    // PlaidIndex::create still gives every document a row with its id.
    let plain = tmp.path().join("plain");
    PlaidIndex::create(&plain, &corpus.source(), &config()).unwrap();
    let plain = PlaidIndex::open(&plain).unwrap();
    assert_eq!(all(&plain), sorted_live(&plain));
    assert_eq!(
        plain.get_documents(&["d5"]).unwrap(),
        [Some(Doc::new("d5"))]
    );
}

#[test]
fn documents_that_do_not_match_the_source_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ix");
    let corpus = corpus(10, 2, "d");
    let stray = [Doc::new("d1"), Doc::new("zz")];
    let err =
        PlaidIndex::create_with_documents(&dir, &corpus.source(), &stray, &config()).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("\"zz\"")),
        "{err}"
    );
    assert!(matches!(PlaidIndex::open(&dir), Err(Error::NotAnIndex(_))));
    let twice = [Doc::new("d1"), Doc::new("d1").with_text("again")];
    let err =
        PlaidIndex::create_with_documents(&dir, &corpus.source(), &twice, &config()).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    // The folder is still creatable.
    PlaidIndex::create_with_documents(&dir, &corpus.source(), &[], &config()).unwrap();
    let mut w = PlaidIndex::writer(&dir).unwrap();
    let mut one = VecSource::new(DIM);
    one.push("n1", corpus.embs[0].clone()).unwrap();
    let err = w.add_documents(&one, &[Doc::new("n2")]).unwrap_err();
    assert!(err.to_string().contains("\"n2\""), "{err}");
    assert!(!w.has_uncommitted_changes());
}

#[test]
fn adding_an_existing_id_replaces_vectors_text_and_metadata_and_deletes_remove_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = corpus(40, 3, "d");
    PlaidIndex::create_with_documents(dir, &base.source(), &docs_for(40, 1), &config()).unwrap();

    // Replace d0 and d1 with new vectors and new text, add n0.
    let other = corpus(3, 4, "x");
    let mut src = VecSource::new(DIM);
    src.push("d0", other.embs[0].clone()).unwrap();
    src.push("n0", other.embs[1].clone()).unwrap();
    src.push("d1", other.embs[2].clone()).unwrap();
    let new_d0 = Doc::new("d0")
        .with_text("replaced text")
        .with_metadata(meta(json!({"v": 2})));
    let mut w = PlaidIndex::writer(dir).unwrap();
    let r = w
        .add_documents(&src, std::slice::from_ref(&new_d0))
        .unwrap();
    assert_eq!(r.replaced, ["d0", "d1"]);
    assert_eq!(r.documents, 3);
    // The writer sees its change before the commit; a reader does not.
    assert_eq!(w.store().get(&["d0"]).unwrap(), [Some(new_d0.clone())]);
    let reader = PlaidIndex::open(dir).unwrap();
    assert_eq!(
        reader.get_documents(&["d0"]).unwrap()[0]
            .as_ref()
            .unwrap()
            .text
            .as_deref(),
        Some("passage 0 version 1")
    );
    w.commit().unwrap();
    drop(w);

    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!(index.len(), 41);
    assert_eq!(
        index.get_documents(&["d0", "d1", "n0"]).unwrap(),
        [Some(new_d0), Some(Doc::new("d1")), Some(Doc::new("n0"))]
    );
    // d0 holds its new vectors.
    let e = &other.embs[0];
    let hits = index
        .search_exact(EmbRef::new(e, DIM).unwrap(), 1, Some(&["d0".into()]))
        .unwrap();
    assert!((hits[0].score - maxsim_f16(e, e)).abs() < 1e-3 * maxsim_f16(e, e));
    assert_eq!(all(&index), sorted_live(&index));
    // The reader opened before the commit still sees the old document (the store is one commit ahead).
    assert_eq!(
        reader.get_documents(&["d0"]).unwrap()[0]
            .as_ref()
            .unwrap()
            .text
            .as_deref(),
        Some("passage 0 version 1")
    );

    // Deletes by id (unknown ids reported) and by metadata filter remove the store rows.
    let mut w = PlaidIndex::writer(dir).unwrap();
    let r = w
        .delete(&["d3".into(), "nope".into(), "d3".into()])
        .unwrap();
    assert_eq!(
        (r.deleted, r.not_found.clone()),
        (1, vec!["nope".to_string()])
    );
    let f: Filter = r#"{"bucket": {"$in": [2]}}"#.parse().unwrap();
    let matching = w.store().ids_matching(&f).unwrap();
    assert!(!matching.is_empty());
    let r = w.delete_matching(&f).unwrap();
    assert_eq!(r.deleted, matching.len());
    assert!(r.not_found.is_empty());
    w.commit().unwrap();
    drop(w);
    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!(index.len(), 41 - 1 - matching.len());
    assert_eq!(all(&index), sorted_live(&index));
    assert_eq!(index.get_documents(&["d3"]).unwrap(), [None]);
    assert!(index
        .open_store()
        .unwrap()
        .ids_matching(&f)
        .unwrap()
        .is_empty());
    // A second reopen of the old reader's view is out of reach: a clear error asking to reopen.
    let err = reader.get_documents(&["d0"]).unwrap_err();
    assert!(
        matches!(err, Error::Store(StoreError::ViewUnavailable { .. })),
        "{err}"
    );
}

#[test]
fn replacing_many_documents_compacts_and_keeps_the_store_in_step() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = corpus(20, 5, "d");
    PlaidIndex::create_with_documents(dir, &base.source(), &docs_for(20, 1), &config()).unwrap();
    let again = corpus(20, 6, "d");
    let r = PlaidIndex::add(dir, &again.source()).unwrap();
    assert_eq!(r.replaced.len(), 20);
    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!((index.len(), index.info().deleted), (20, 0));
    assert_eq!(
        index.get_documents(&["d0"]).unwrap(),
        [Some(Doc::new("d0"))]
    );
    fault::check_vectors(&index, &again, &again.ids.iter().cloned().collect()).unwrap();
}

#[test]
fn a_writer_dropped_without_committing_or_killed_between_its_commits_leaves_the_committed_documents(
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = corpus(20, 7, "d");
    PlaidIndex::create_with_documents(dir, &base.source(), &docs_for(20, 1), &config()).unwrap();
    let before = PlaidIndex::open(dir)
        .unwrap()
        .get_documents(&["d0", "d1"])
        .unwrap();

    let mut w = PlaidIndex::writer(dir).unwrap();
    w.delete(&["d0".into()]).unwrap();
    w.add_documents(&base.source(), &docs_for(20, 2)).unwrap();
    drop(w);
    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!(index.get_documents(&["d0", "d1"]).unwrap(), before);
    let path = dir.join("documents.sqlite");
    assert_eq!(
        DocStore::open(&path).unwrap().generation().unwrap(),
        index.generation()
    );

    // A writer killed after committing the store but before meta.lt: the store is one generation ahead.
    {
        let mut store = DocStore::open(&path).unwrap();
        store
            .upsert(&docs_for(20, 3), index.generation() + 1)
            .unwrap();
        store.delete(&["d1"], index.generation() + 1).unwrap();
    }
    // Readers see the index's generation.
    let reader = PlaidIndex::open(dir).unwrap();
    assert_eq!(reader.get_documents(&["d0", "d1"]).unwrap(), before);
    let store = reader.open_store().unwrap();
    let f: Filter = r#"{"v": 3}"#.parse().unwrap();
    assert!(store.ids_matching(&f).unwrap().is_empty());
    assert!(store.bm25("version", 5, Some(&f)).unwrap().is_empty());
    assert_eq!(store.count().unwrap(), 20);
    // The next writer rolls the store back and works.
    let mut w = PlaidIndex::writer(dir).unwrap();
    assert_eq!(w.store().generation().unwrap(), index.generation());
    w.delete(&["d1".into()]).unwrap();
    w.commit().unwrap();
    drop(w);
    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!(
        index.get_documents(&["d0", "d1"]).unwrap(),
        [before[0].clone(), None]
    );
    assert_eq!(all(&index), sorted_live(&index));
}

#[test]
fn an_index_without_a_store_opens_searches_and_gets_one_from_its_next_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = corpus(20, 8, "d");
    PlaidIndex::create(dir, &base.source(), &config()).unwrap();
    std::fs::remove_file(dir.join("documents.sqlite")).unwrap();
    let index = PlaidIndex::open(dir).unwrap();
    assert!(!index.has_store());
    let q = EmbRef::new(&base.embs[4], DIM).unwrap();
    assert_eq!(
        index.search(q, &SearchParams::for_k(1), None).unwrap()[0].id,
        "d4"
    );
    assert_eq!(
        index.get_documents(&["d4", "x"]).unwrap(),
        [Some(Doc::new("d4")), None]
    );
    let err = index.open_store().unwrap_err();
    assert!(matches!(err, Error::NoDocumentStore(_)), "{err}");
    assert!(err.to_string().contains("documents.sqlite"), "{err}");
    // A delete creates the store with a row per live id.
    PlaidIndex::delete(dir, &["d2".into()]).unwrap();
    let index = PlaidIndex::open(dir).unwrap();
    assert!(index.has_store());
    assert_eq!(all(&index), sorted_live(&index));
    assert_eq!(index.len(), 19);
    // A store left behind the index (a write by a version that did not know the store) is brought in line.
    std::fs::copy(dir.join("documents.sqlite"), tmp.path().join("old.sqlite")).unwrap();
    drop(index);
    PlaidIndex::delete(dir, &["d3".into()]).unwrap();
    std::fs::copy(tmp.path().join("old.sqlite"), dir.join("documents.sqlite")).unwrap();
    let index = PlaidIndex::open(dir).unwrap();
    assert!(matches!(
        index.open_store(),
        Err(Error::Store(StoreError::StoreBehind { .. }))
    ));
    PlaidIndex::delete(dir, &["d4".into()]).unwrap();
    let index = PlaidIndex::open(dir).unwrap();
    assert_eq!(all(&index), sorted_live(&index));
    assert_eq!(index.len(), 17);
}

#[test]
fn an_index_is_shared_across_threads_and_each_opens_its_own_store() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PlaidIndex>();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = corpus(20, 9, "d");
    PlaidIndex::create_with_documents(dir, &base.source(), &docs_for(20, 1), &config()).unwrap();
    let index = std::sync::Arc::new(PlaidIndex::open(dir).unwrap());
    let handles: Vec<_> = (0..3)
        .map(|t| {
            let index = index.clone();
            std::thread::spawn(move || {
                let store = index.open_store().unwrap();
                store.get(&[format!("d{t}")]).unwrap()[0].clone()
            })
        })
        .collect();
    for (t, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap().unwrap().id, format!("d{t}"));
    }
}

#[test]
fn matching_ids_are_kept_per_filter_for_one_generation_and_a_new_generation_reads_them_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = corpus(24, 5, "d");
    PlaidIndex::create_with_documents(dir, &base.source(), &docs_for(24, 1), &config()).unwrap();
    let old = PlaidIndex::open(dir).unwrap();
    let store = old.open_store().unwrap();
    let f: Filter = r#"{"bucket": {"$in": [1, 2]}}"#.parse().unwrap();
    let g: Filter = r#"{"bucket": 3}"#.parse().unwrap();
    let first = old.ids_matching(&store, &f).unwrap();
    assert_eq!(*first, store.ids_matching(&f).unwrap());
    // The same filter again (parsed anew) is the kept answer; another filter has its own.
    let again = old
        .ids_matching(&store, &r#"{"bucket": {"$in": [1, 2]}}"#.parse().unwrap())
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    let other = old.ids_matching(&store, &g).unwrap();
    assert_eq!(*other, store.ids_matching(&g).unwrap());
    assert_ne!(*other, *first);

    // A writer adds a matching document; its live store is never answered from the reader's memory.
    let extra = corpus(1, 6, "n");
    let mut src = VecSource::new(DIM);
    src.push("n0", extra.embs[0].clone()).unwrap();
    let mut w = PlaidIndex::writer(dir).unwrap();
    w.add_documents(
        &src,
        &[Doc::new("n0").with_metadata(meta(json!({"bucket": 2})))],
    )
    .unwrap();
    let live = w.index().ids_matching(w.store(), &f).unwrap();
    assert!(live.contains(&"n0".to_string()), "{live:?}");
    w.commit().unwrap();
    drop(w);

    // The old reader keeps answering for its generation (as its vectors do); a new reader sees n0.
    assert!(std::sync::Arc::ptr_eq(
        &old.ids_matching(&store, &f).unwrap(),
        &first
    ));
    let new = PlaidIndex::open(dir).unwrap();
    let new_store = new.open_store().unwrap();
    let now = new.ids_matching(&new_store, &f).unwrap();
    assert_eq!(now.len(), first.len() + 1);
    assert!(now.contains(&"n0".to_string()));
    // A store of another generation is read, not answered from the cache.
    assert_eq!(*new.ids_matching(&store, &f).unwrap(), *first);
    let q = EmbRef::new(&extra.embs[0], DIM).unwrap();
    let hits = new
        .search_filtered(q, &SearchParams::for_k(3), &new_store, &f)
        .unwrap();
    assert_eq!(hits[0].id, "n0");
}

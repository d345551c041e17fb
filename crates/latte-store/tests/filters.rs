//! Filter semantics against a real SQLite file.

use latte_store::{Doc, DocStore, Filter, StoreError};
use serde_json::{json, Value};

fn doc(id: &str, metadata: Option<Value>) -> Doc {
    Doc {
        id: id.into(),
        title: None,
        text: Some(format!("text of {id}")),
        metadata: metadata.map(|m| m.as_object().expect("object").clone()),
    }
}

fn store() -> (tempfile::TempDir, DocStore) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = DocStore::create(dir.path().join("documents.sqlite")).unwrap();
    store
        .upsert(
            &[
                doc(
                    "a",
                    Some(json!({"lang": "rust", "year": 2021, "source": {"site": "github", "stars": 10},
                                "tags": ["db", "rust"], "draft": false})),
                ),
                doc(
                    "b",
                    Some(json!({"lang": "python", "year": 2019, "source": {"site": "pypi"}, "tags": ["ml"],
                                "draft": true, "score": 1.5})),
                ),
                doc("c", Some(json!({"lang": "rust", "year": "2023", "nothing": null}))),
                doc("d", None),
                doc(
                    "e",
                    Some(json!({"lang": "Rust", "year": 2020.0, "a') OR 1=1 --": 2, "odd key": 1,
                                "naïve": {"ключ": "значение"}})),
                ),
            ],
            1,
        )
        .unwrap();
    (dir, store)
}

fn ids(store: &DocStore, filter: Value) -> Vec<String> {
    let f = Filter::parse(&filter).unwrap_or_else(|e| panic!("{filter}: {e}"));
    store.ids_matching(&f).unwrap()
}

#[track_caller]
fn check(store: &DocStore, filter: Value, want: &[&str]) {
    assert_eq!(ids(store, filter.clone()), want, "filter {filter}");
}

#[test]
fn equality_and_inequality() {
    let (_dir, s) = store();
    check(&s, json!({}), &["a", "b", "c", "d", "e"]);
    check(&s, json!({"lang": "rust"}), &["a", "c"]);
    check(&s, json!({"lang": {"$eq": "rust"}}), &["a", "c"]);
    check(&s, json!({"lang": "RUST"}), &[]);
    // $ne matches documents without the field and without metadata
    check(&s, json!({"lang": {"$ne": "rust"}}), &["b", "d", "e"]);
    check(&s, json!({"year": 2020}), &["e"]); // integer equals the real 2020.0
    check(&s, json!({"year": 2021.0}), &["a"]);
    check(&s, json!({"draft": false}), &["a"]);
    check(&s, json!({"draft": true}), &["b"]);
    check(&s, json!({"odd key": 1}), &["e"]);
    check(&s, json!({"naïve.ключ": "значение"}), &["e"]);
}

#[test]
fn type_mismatches_never_match() {
    let (_dir, s) = store();
    // the string "2023" is not the number 2023, and is not greater than a number
    check(&s, json!({"year": 2023}), &[]);
    check(&s, json!({"year": {"$gt": 2022}}), &[]);
    check(&s, json!({"year": "2023"}), &["c"]);
    check(&s, json!({"year": {"$gt": "2000"}}), &["c"]);
    // booleans are not numbers
    check(&s, json!({"draft": 0}), &[]);
    check(&s, json!({"draft": {"$in": [0, 1]}}), &[]);
    // objects and arrays are never compared whole; objects are not searched member by member
    check(&s, json!({"source": "github"}), &[]);
    check(
        &s,
        json!({"source": {"$ne": "github"}}),
        &["a", "b", "c", "d", "e"],
    );
}

#[test]
fn ranges() {
    let (_dir, s) = store();
    check(&s, json!({"year": {"$gt": 2020}}), &["a"]);
    check(&s, json!({"year": {"$gte": 2020}}), &["a", "e"]);
    check(&s, json!({"year": {"$lt": 2020}}), &["b"]);
    check(&s, json!({"year": {"$lte": 2020}}), &["b", "e"]);
    check(&s, json!({"year": {"$gt": 2019, "$lt": 2021}}), &["e"]);
    check(&s, json!({"score": {"$gt": 1}}), &["b"]);
    check(&s, json!({"score": {"$lte": 1.5}}), &["b"]);
    check(&s, json!({"lang": {"$gte": "r"}}), &["a", "c"]); // byte order: "Rust" < "python" < "r"
}

#[test]
fn membership_and_arrays() {
    let (_dir, s) = store();
    check(
        &s,
        json!({"lang": {"$in": ["python", "Rust"]}}),
        &["b", "e"],
    );
    check(&s, json!({"lang": {"$nin": ["rust"]}}), &["b", "d", "e"]);
    check(&s, json!({"lang": {"$in": []}}), &[]);
    check(
        &s,
        json!({"lang": {"$nin": []}}),
        &["a", "b", "c", "d", "e"],
    );
    check(&s, json!({"tags": "rust"}), &["a"]);
    check(&s, json!({"tags": {"$in": ["ml", "x"]}}), &["b"]);
    check(&s, json!({"tags": {"$ne": "rust"}}), &["b", "c", "d", "e"]);
    check(&s, json!({"tags": {"$gte": "m"}}), &["a", "b"]);
}

#[test]
fn missing_fields_null_and_exists() {
    let (_dir, s) = store();
    check(&s, json!({"nothing": {"$exists": true}}), &["c"]);
    check(
        &s,
        json!({"nothing": {"$exists": false}}),
        &["a", "b", "d", "e"],
    );
    // null matches JSON null and missing fields (MongoDB)
    check(&s, json!({"nothing": null}), &["a", "b", "c", "d", "e"]);
    check(&s, json!({"lang": null}), &["d"]);
    check(&s, json!({"lang": {"$ne": null}}), &["a", "b", "c", "e"]);
    check(&s, json!({"lang": {"$in": ["python", null]}}), &["b", "d"]);
    check(&s, json!({"missing": {"$gt": 0}}), &[]);
    check(
        &s,
        json!({"missing": {"$not": {"$gt": 0}}}),
        &["a", "b", "c", "d", "e"],
    );
}

#[test]
fn dotted_keys() {
    let (_dir, s) = store();
    check(&s, json!({"source.site": "github"}), &["a"]);
    check(&s, json!({"source.stars": {"$gte": 10}}), &["a"]);
    check(&s, json!({"source.site": {"$exists": true}}), &["a", "b"]);
    check(&s, json!({"source.site.deeper": {"$exists": true}}), &[]);
}

#[test]
fn logical_operators_and_nesting() {
    let (_dir, s) = store();
    check(
        &s,
        json!({"$and": [{"lang": "rust"}, {"year": {"$gte": 2021}}]}),
        &["a"],
    );
    check(
        &s,
        json!({"$or": [{"lang": "python"}, {"tags": "rust"}]}),
        &["a", "b"],
    );
    check(&s, json!({"$not": {"lang": "rust"}}), &["b", "d", "e"]);
    check(
        &s,
        json!({"year": {"$not": {"$gt": 2020}}}),
        &["b", "c", "d", "e"],
    );
    check(&s, json!({"lang": "rust", "year": 2021}), &["a"]);
    check(
        &s,
        json!({"$or": [
            {"$and": [{"lang": "rust"}, {"$not": {"year": {"$exists": false}}}]},
            {"source.site": "pypi"}
        ]}),
        &["a", "b", "c"],
    );
    check(
        &s,
        json!({"$and": [{"$or": [{"lang": "rust"}, {"lang": "Rust"}]}, {"$not": {"year": "2023"}}]}),
        &["a", "e"],
    );
}

#[test]
fn injection_attempts_match_nothing_and_break_nothing() {
    let (_dir, s) = store();
    check(&s, json!({"a') OR 1=1 --": 1}), &[]);
    // the same odd key is an ordinary key
    check(&s, json!({"a') OR 1=1 --": 2}), &["e"]);
    check(&s, json!({"lang": "rust' OR '1'='1"}), &[]);
    check(
        &s,
        json!({"x'); DROP TABLE documents; --": {"$exists": false}}),
        &["a", "b", "c", "d", "e"],
    );
    check(
        &s,
        json!({"lang": {"$in": ["') OR 1=1 --", "\" OR \"\"=\""]}}),
        &[],
    );
    assert_eq!(s.count().unwrap(), 5);
    s.verify().unwrap();
}

#[test]
fn malformed_filters_are_errors_with_positions() {
    let e: StoreError = "{\"$and\": [{\"a\": 1}, {\"year\": {\"$gtx\": 1}}]}"
        .parse::<Filter>()
        .unwrap_err()
        .into();
    assert_eq!(
        e.to_string(),
        "invalid filter: /$and/1/year/$gtx: unknown operator \"$gtx\""
    );
}

#[test]
fn the_largest_allowed_filters_run() {
    let (_dir, s) = store();
    let many: Vec<Value> = (0..latte_store::filter::MAX_LIST)
        .map(|i| json!(format!("v{i}")))
        .collect();
    let mut with_rust = many.clone();
    with_rust[700] = json!("rust");
    check(&s, json!({"lang": {"$in": with_rust}}), &["a", "c"]);
    check(
        &s,
        json!({"lang": {"$nin": many.clone()}}),
        &["a", "b", "c", "d", "e"],
    );
    let branches: Vec<Value> = (0..latte_store::filter::MAX_LIST)
        .map(|i| json!({"year": i + 3000}))
        .collect();
    check(&s, json!({"$or": branches.clone()}), &[]);
    check(
        &s,
        json!({"$and": [{"$or": branches}, {"lang": {"$in": many}}]}),
        &[],
    );
    // the deepest filter allowed: 29 levels of $and / $or around a field with a $not operator
    let mut deep = json!({"lang": {"$not": {"$ne": "python"}}});
    for level in 0..latte_store::filter::MAX_DEPTH - 3 {
        deep = match level % 3 {
            0 => json!({"$and": [deep, {}]}),
            1 => json!({"$or": [{"lang": "none"}, deep]}),
            _ => json!({"$not": {"lang": "none"}, "$and": [deep]}),
        };
    }
    let too_deep = json!({"$and": [deep.clone()]});
    check(&s, deep, &["b"]);
    let e = Filter::parse(&too_deep).unwrap_err();
    assert!(e.message.contains("deeper than 32"), "{e}");
}

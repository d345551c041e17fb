//! Training data loading: column conventions, Parquet, PyLate's distillation layout, clear errors.

use std::path::{Path, PathBuf};

use latte_train::data::{Table, TrainingData};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn jsonl_keeps_column_order_and_roles() {
    let d = TrainingData::load(&fixture(
        "expected/modernbert_noexp_contrastive.train.jsonl",
    ))
    .unwrap();
    assert_eq!(
        d.text_columns,
        ["anchor", "positive", "negative_1", "negative_2"]
    );
    assert_eq!(d.len(), 4);
    let b = d.batch(&[2, 0]);
    assert_eq!(b.columns.len(), 4);
    assert!(b.columns[0].is_query && !b.columns[1].is_query);
    assert_eq!(
        b.columns[0].texts,
        vec!["".to_string(), "how do I borrow a value mutably?".into()]
    );
    assert!(b.labels.is_none());
}

#[test]
fn parquet_snappy_and_zstd_read_like_jsonl() {
    let j = TrainingData::load(&fixture(
        "expected/modernbert_noexp_contrastive.train.jsonl",
    ))
    .unwrap();
    for f in ["data/triplets.parquet", "data/triplets_zstd.parquet"] {
        let p = TrainingData::load(&fixture(f)).unwrap();
        assert_eq!(p.text_columns, j.text_columns, "{f}");
        assert_eq!(p.rows, j.rows, "{f}");
    }
}

#[test]
fn inline_distillation_parquet_flattens_documents() {
    let d = TrainingData::load(&fixture("data/kd_inline.parquet")).unwrap();
    assert_eq!(d.text_columns, ["query", "documents"]);
    assert_eq!(d.label_column.as_deref(), Some("scores"));
    assert_eq!(d.list_columns, [false, true]);
    let b = d.batch(&[0, 1]);
    assert_eq!(b.columns[1].texts.len(), 6);
    assert_eq!(b.labels.as_ref().unwrap()[0], vec![3.0, 1.5, -1.0]);
}

#[test]
fn pylate_distillation_layout_joins_and_truncates_to_n_ways() {
    for train in ["data/kd_train.jsonl", "data/kd_train.parquet"] {
        let d = TrainingData::distillation(
            &Table::read(&fixture(train)).unwrap(),
            &Table::read(&fixture("data/kd_queries.jsonl")).unwrap(),
            &Table::read(&fixture("data/kd_documents.jsonl")).unwrap(),
            2,
        )
        .unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(
            d.rows[1].texts[0],
            vec!["what is a trait object".to_string()]
        );
        assert_eq!(d.rows[1].texts[1].len(), 2);
        assert!(d.rows[1].texts[1][0].starts_with("Trait objects"));
        assert_eq!(d.rows[1].label.as_ref().unwrap(), &vec![3.0, 1.1]);
    }
    // n_ways larger than the rows offer.
    let e = TrainingData::distillation(
        &Table::read(&fixture("data/kd_train.jsonl")).unwrap(),
        &Table::read(&fixture("data/kd_queries.jsonl")).unwrap(),
        &Table::read(&fixture("data/kd_documents.jsonl")).unwrap(),
        5,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("n_ways = 5"), "{e}");
}

#[test]
fn missing_ids_and_columns_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let q = write(
        dir.path(),
        "q.jsonl",
        "{\"query_id\": 1, \"text\": \"a\"}\n",
    );
    let docs = write(
        dir.path(),
        "d.jsonl",
        "{\"document_id\": \"x\", \"text\": \"b\"}\n",
    );
    let t = write(
        dir.path(),
        "t.jsonl",
        "{\"query_id\": 7, \"document_ids\": [\"x\"], \"scores\": [1.0]}\n",
    );
    let e = TrainingData::distillation(
        &Table::read(&t).unwrap(),
        &Table::read(&q).unwrap(),
        &Table::read(&docs).unwrap(),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("query_id \"7\"") && e.contains("q.jsonl"), "{e}");
    let bad = write(dir.path(), "bad.jsonl", "{\"query\": 1, \"text\": \"a\"}\n");
    let e = TrainingData::distillation(
        &Table::read(&t).unwrap(),
        &Table::read(&bad).unwrap(),
        &Table::read(&docs).unwrap(),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("missing column \"query_id\"") && e.contains("bad.jsonl"),
        "{e}"
    );
    // A document id that is not in the documents table becomes "" (PyLate's behaviour).
    let t2 = write(
        dir.path(),
        "t2.jsonl",
        "{\"query_id\": 1, \"document_ids\": \"[\\\"x\\\", \\\"nope\\\"]\", \"scores\": \"[1.0, 2.0]\"}\n",
    );
    let d = TrainingData::distillation(
        &Table::read(&t2).unwrap(),
        &Table::read(&q).unwrap(),
        &Table::read(&docs).unwrap(),
        2,
    )
    .unwrap();
    assert_eq!(d.rows[0].texts[1], vec!["b".to_string(), String::new()]);
    assert_eq!(d.rows[0].label.as_ref().unwrap(), &vec![1.0, 2.0]);
}

#[test]
fn bad_training_files_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("noquery.jsonl", "{\"text\": \"a\", \"positive\": \"b\"}\n", "must be the query"),
        ("onecol.jsonl", "{\"query\": \"a\"}\n", "at least one document column"),
        (
            "line.jsonl",
            "{\"query\": \"a\", \"positive\": \"b\"}\n{\"query\": \"a\", \"positive\": \n",
            "line 2",
        ),
        (
            "null.jsonl",
            "{\"query\": \"a\", \"positive\": \"b\"}\n{\"query\": \"a\", \"positive\": null}\n",
            "row 2: column \"positive\" is missing",
        ),
        (
            "extra.jsonl",
            "{\"query\": \"a\", \"positive\": \"b\"}\n{\"query\": \"a\", \"positive\": \"b\", \"neg\": \"c\"}\n",
            "not in the first row's columns",
        ),
        (
            "ragged.jsonl",
            "{\"query\": \"a\", \"documents\": [\"b\", \"c\"], \"scores\": [1, 2]}\n{\"query\": \"a\", \"documents\": [\"b\"], \"scores\": [1]}\n",
            "row 2: column \"documents\" has 1 texts",
        ),
        (
            "number.jsonl",
            "{\"query\": \"a\", \"positive\": 3}\n",
            "expected a string",
        ),
        ("empty.jsonl", "\n\n", "no rows"),
    ];
    for (name, text, want) in cases {
        let p = write(dir.path(), name, text);
        let e = TrainingData::load(&p).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains(name), "{name}: {e}");
    }
    let e = TrainingData::load(&dir.path().join("absent.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.jsonl") && e.contains("not found"), "{e}");
    let p = write(dir.path(), "fake.parquet", "not parquet");
    let e = TrainingData::load(&p).unwrap_err().to_string();
    assert!(e.contains("Parquet"), "{e}");
}

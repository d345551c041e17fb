//! BEIR folders: loading, filtering, collections and error messages.

use std::path::Path;

use latte_eval::{
    available_splits, evaluate, is_beir_dir, load_collection, BeirDataset, CollectionReport,
    EvalError, LoadOptions, Metric, Run, UnknownDocuments,
};

const CORPUS: &str = r#"{"_id": "d1", "title": "Ownership", "text": "Each value has an owner."}
{"_id": 2, "title": "", "text": "  Borrowing rules.  "}
{"_id": "d3", "text": "No title field.", "metadata": {"url": "x"}}

{"_id": "d4", "title": "Only title", "text": ""}
"#;

const QUERIES: &str = r#"{"_id": "q1", "text": "what is ownership"}
{"_id": "q2", "text": "borrow checker"}
{"_id": 3, "text": "numeric id query"}
{"_id": "q4", "text": "never judged"}
"#;

fn make_dataset(dir: &Path, qrels: &[(&str, &str)]) {
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    std::fs::write(dir.join("corpus.jsonl"), CORPUS).unwrap();
    std::fs::write(dir.join("queries.jsonl"), QUERIES).unwrap();
    for (split, text) in qrels {
        std::fs::write(dir.join("qrels").join(format!("{split}.tsv")), text).unwrap();
    }
}

const TEST_QRELS: &str = "query-id\tcorpus-id\tscore\n3\td1\t1\nq2\t2\t2\nq2\td3\t0\nq1\td1\t1\n";

#[test]
fn loads_a_split_and_keeps_only_judged_queries_in_qrels_order() {
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), &[("test", TEST_QRELS), ("dev", "q4\td4\t1\n")]);
    assert!(is_beir_dir(dir.path()));
    assert_eq!(available_splits(dir.path()), ["dev", "test"]);

    let ds = BeirDataset::load(dir.path(), "test").unwrap();
    let texts: Vec<(&str, &str)> = ds
        .corpus
        .iter()
        .map(|d| (d.id.as_str(), d.text.as_str()))
        .collect();
    assert_eq!(
        texts,
        [
            ("d1", "Ownership Each value has an owner."),
            ("2", "Borrowing rules."),
            ("d3", "No title field."),
            ("d4", "Only title"),
        ]
    );
    let queries: Vec<&str> = ds.queries.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(queries, ["3", "q2", "q1"]);
    assert_eq!(ds.queries[0].text, "numeric id query");
    assert_eq!(ds.qrels.len(), 3);
    assert_eq!(ds.qrels.relevance("q2", "d3"), Some(0));

    let dev = BeirDataset::load(dir.path(), "dev").unwrap();
    assert_eq!(dev.queries.len(), 1);
    assert_eq!(dev.queries[0].id, "q4");
}

#[test]
fn missing_split_lists_the_available_ones() {
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), &[("test", TEST_QRELS), ("dev", "q4\td4\t1\n")]);
    let err = BeirDataset::load(dir.path(), "train").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EvalError::MissingSplit { .. }));
    assert!(
        msg.contains("\"train\"") && msg.contains("train.tsv"),
        "{msg}"
    );
    assert!(msg.contains("available splits: dev, test"), "{msg}");
}

#[test]
fn unknown_queries_and_documents_are_reported_with_examples() {
    let dir = tempfile::tempdir().unwrap();
    let qrels = "query-id\tcorpus-id\tscore\nq1\td1\t1\nqx\td1\t1\nqy\td1\t1\nqx\td2\t1\n";
    make_dataset(dir.path(), &[("test", qrels)]);
    let err = BeirDataset::load(dir.path(), "test").unwrap_err();
    match &err {
        EvalError::UnknownIds {
            kind,
            count,
            examples,
            ..
        } => {
            assert_eq!(*kind, "query");
            assert_eq!(*count, 2);
            assert_eq!(examples, &["qx", "qy"]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("2 unknown query id(s), e.g. qx, qy"),
        "{err}"
    );

    let many: String = (0..8).map(|i| format!("q1\tghost{i}\t1\n")).collect();
    std::fs::write(
        dir.path().join("qrels/test.tsv"),
        format!("q1\td1\t1\n{many}"),
    )
    .unwrap();
    let err = BeirDataset::load(dir.path(), "test").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("8 unknown document id(s), e.g. ghost0, ghost1, ghost2, ghost3, ghost4"),
        "{msg}"
    );
    assert!(!msg.contains("ghost5"), "{msg}");

    let options = LoadOptions {
        unknown_documents: UnknownDocuments::Keep,
    };
    let ds = BeirDataset::load_with(dir.path(), "test", &options).unwrap();
    assert_eq!(ds.qrels.num_judgments(), 9);
}

#[test]
fn malformed_json_lines_give_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    make_dataset(dir.path(), &[("test", TEST_QRELS)]);
    let corpus = dir.path().join("corpus.jsonl");

    std::fs::write(
        &corpus,
        "{\"_id\": \"a\", \"text\": \"x\"}\n{\"_id\": \"b\", \"text\": \n",
    )
    .unwrap();
    let msg = BeirDataset::load(dir.path(), "test")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("corpus.jsonl:2: invalid JSON record"), "{msg}");

    std::fs::write(
        &corpus,
        "{\"_id\": \"a\", \"text\": \"x\"}\n{\"title\": \"t\", \"text\": \"y\"}\n",
    )
    .unwrap();
    let msg = BeirDataset::load(dir.path(), "test")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("corpus.jsonl:2:") && msg.contains("_id"),
        "{msg}"
    );

    std::fs::write(
        &corpus,
        "{\"_id\": \"a\", \"text\": \"x\"}\n{\"_id\": \"a\", \"text\": \"y\"}\n",
    )
    .unwrap();
    let msg = BeirDataset::load(dir.path(), "test")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("corpus.jsonl:2: duplicate _id \"a\" (first on line 1)"),
        "{msg}"
    );

    std::fs::write(&corpus, "{\"_id\": [1], \"text\": \"x\"}\n").unwrap();
    let msg = BeirDataset::load(dir.path(), "test")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("corpus.jsonl:1:"), "{msg}");

    std::fs::remove_file(dir.path().join("queries.jsonl")).unwrap();
    std::fs::write(&corpus, CORPUS).unwrap();
    let msg = BeirDataset::load(dir.path(), "test")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("queries.jsonl") && msg.contains("BEIR queries"),
        "{msg}"
    );
}

#[test]
fn collections_load_every_beir_subfolder_and_average_per_dataset() {
    let parent = tempfile::tempdir().unwrap();
    make_dataset(
        &parent.path().join("NanoB"),
        &[("test", "q1\td1\t1\nq2\t2\t1\n")],
    );
    make_dataset(&parent.path().join("NanoA"), &[("test", "q1\td1\t1\n")]);
    std::fs::create_dir(parent.path().join("results")).unwrap();
    std::fs::write(parent.path().join("README.md"), "not a dataset").unwrap();

    let datasets = load_collection(parent.path(), "test", &LoadOptions::default()).unwrap();
    let names: Vec<&str> = datasets.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["NanoA", "NanoB"]);

    // The same run for both: q1 -> d1 at rank 1, q2 -> d1 only (its relevant doc is "2").
    let mut run = Run::new();
    run.extend_query("q1", [("d1", 1.0)]).unwrap();
    run.extend_query("q2", [("d1", 1.0)]).unwrap();
    let mrr: Metric = "mrr@10".parse().unwrap();
    let reports = datasets
        .iter()
        .map(|d| (d.name.clone(), evaluate(&run, &d.dataset.qrels, &[mrr])))
        .collect();
    let collection = CollectionReport::new(reports).unwrap();
    assert_eq!(collection.datasets()[0].1.mean(&mrr), Some(1.0));
    assert_eq!(collection.datasets()[1].1.mean(&mrr), Some(0.5));
    // Unweighted over datasets: (1.0 + 0.5) / 2, not (1 + 1 + 0) / 3.
    assert_eq!(collection.mean(&mrr), Some(0.75));

    let table = collection.to_table();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].contains("dataset") && lines[0].contains("mrr@10"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("NanoA") && lines[1].ends_with("1.0000"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("mean") && lines[3].ends_with("0.7500"),
        "{table}"
    );
    let json = collection.to_json(false);
    assert_eq!(json["mean"]["mrr@10"], 0.75);
    assert_eq!(json["datasets"]["NanoB"]["num_queries"], 2);

    let empty = tempfile::tempdir().unwrap();
    let err = load_collection(empty.path(), "test", &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, EvalError::NoDatasets { .. }), "{err:?}");
    assert!(CollectionReport::new(Vec::new()).is_err());
}

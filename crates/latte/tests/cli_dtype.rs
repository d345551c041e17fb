//! `--dtype f32|bf16|int8`: `latte index` records it in the index's model options, `latte search` reuses
//! it unless overridden, and a bad value is refused naming the flag and the values allowed.

use std::path::Path;

use latte_index::PlaidIndex;

mod common;
use common::*;

const DOCS: [(&str, &str); 5] = [
    (
        "d1",
        "Each value in Rust has an owner, and there can only be one owner at a time.",
    ),
    (
        "d2",
        "References borrow a value without taking ownership of it.",
    ),
    (
        "d3",
        "A trait defines functionality a particular type has and can share with other types.",
    ),
    (
        "d4",
        "Closures are anonymous functions you can save in a variable or pass as arguments.",
    ),
    ("d5", "Cargo is the Rust build system and package manager."),
];

/// `(doc, score)` of every hit of a TREC run.
fn hits(run: &str) -> Vec<(String, f64)> {
    run.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 6, "{l}");
            (f[2].to_string(), f[4].parse().unwrap())
        })
        .collect()
}

#[test]
fn dtype_round_trips_through_index_and_search() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    let text: String = DOCS
        .iter()
        .map(|(id, t)| format!("{{\"_id\": \"{id}\", \"text\": \"{t}\"}}\n"))
        .collect();
    std::fs::write(&corpus, text).unwrap();
    let queries = dir.path().join("queries.jsonl");
    std::fs::write(
        &queries,
        "{\"_id\": \"q1\", \"text\": \"who owns a value\"}\n\
         {\"_id\": \"q2\", \"text\": \"package manager\"}\n",
    )
    .unwrap();
    let index = dir.path().join("index");
    let m = model("bert_pylate");
    let build = |dtype: &str, index: &Path| {
        ok(&[
            "index",
            "--index",
            s(index),
            "--model",
            &m,
            "--corpus",
            s(&corpus),
            "--dtype",
            dtype,
        ]);
    };
    build("bf16", &index);
    let opened = PlaidIndex::open(&index).unwrap();
    assert_eq!(
        opened.model_options(),
        Some(&serde_json::json!({"dtype": "bf16"}))
    );
    drop(opened);

    let search = |extra: &[&str]| {
        let mut args = vec!["search", "--index", s(&index), "--queries", s(&queries)];
        args.extend_from_slice(&["--k", "5"]);
        args.extend_from_slice(extra);
        hits(&ok(&args))
    };
    // No flag: the recorded bf16; the same as naming it.
    let recorded = search(&[]);
    assert_eq!(recorded.len(), 10);
    assert_eq!(recorded, search(&["--dtype", "bf16"]));
    // Overrides run and score close to the recorded dtype.
    for dtype in ["f32", "int8"] {
        let other = search(&["--dtype", dtype]);
        assert_eq!(other.len(), recorded.len());
        let mut a = recorded.clone();
        let mut b = other.clone();
        a.sort_by(|x, y| x.0.cmp(&y.0));
        b.sort_by(|x, y| x.0.cmp(&y.0));
        for ((da, sa), (db, sb)) in a.iter().zip(&b) {
            assert_eq!(da, db);
            assert!(
                (sa - sb).abs() < 0.05 * sa.abs().max(1.0),
                "{dtype}: {sa} vs {sb}"
            );
        }
    }

    // Adding documents with another dtype is refused; the recorded one applies when none is given.
    let more = dir.path().join("more.jsonl");
    std::fs::write(
        &more,
        "{\"_id\": \"d6\", \"text\": \"Lifetimes ensure references are valid.\"}\n",
    )
    .unwrap();
    let out = latte(&[
        "index",
        "--index",
        s(&index),
        "--model",
        &m,
        "--corpus",
        s(&more),
        "--dtype",
        "int8",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--dtype") && err.contains("bf16") && err.contains("int8"),
        "{err}"
    );
    ok(&[
        "index",
        "--index",
        s(&index),
        "--model",
        &m,
        "--corpus",
        s(&more),
    ]);
    assert_eq!(PlaidIndex::open(&index).unwrap().len(), 6);

    // `latte encode --dtype int8` writes embeddings of the same shapes as f32.
    let npz = |dtype: &str| {
        let out = dir.path().join(format!("emb-{dtype}.npz"));
        ok(&[
            "encode",
            "--model",
            &m,
            "--input",
            s(&corpus),
            "--output",
            s(&out),
            "--dtype",
            dtype,
        ]);
        std::fs::metadata(&out).unwrap().len()
    };
    assert_eq!(npz("int8"), npz("f32"));
}

#[test]
fn bad_dtype_is_refused() {
    let m = model("bert_pylate");
    let out = latte(&[
        "encode", "--model", &m, "--input", "x.jsonl", "--output", "x.npz", "--dtype", "fp16",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--dtype")
            && err.contains("fp16")
            && err.contains("expected one of f32, bf16, int8"),
        "{err}"
    );
}

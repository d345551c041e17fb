//! The model flags every model-loading command honours: `latte index` records the model and its options,
//! `latte search` reuses them (flags override and are checked), `latte evaluate` honours `--truncate-dim`,
//! and `--pool-factor` pools each document once.

use std::path::{Path, PathBuf};

use latte_index::PlaidIndex;

mod common;
use common::*;

const DOCS: [(&str, &str); 6] = [
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
    (
        "d5",
        "The iterator pattern allows you to perform some task on a sequence of items in turn.",
    ),
    ("d6", "Cargo is the Rust build system and package manager."),
];

/// A BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv.
fn write_dataset(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    let corpus: String = DOCS
        .iter()
        .map(|(id, t)| format!("{{\"_id\": \"{id}\", \"text\": \"{t}\"}}\n"))
        .collect();
    std::fs::write(dir.join("corpus.jsonl"), corpus).unwrap();
    std::fs::write(
        dir.join("queries.jsonl"),
        "{\"_id\": \"q1\", \"text\": \"who owns a value\"}\n\
         {\"_id\": \"q2\", \"text\": \"shared behaviour between types\"}\n\
         {\"_id\": \"q3\", \"text\": \"package manager\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t1\nq3\td6\t1\n",
    )
    .unwrap();
    (dir.join("corpus.jsonl"), dir.join("queries.jsonl"))
}

/// Every line `qid Q0 doc rank score latte`, with `k` hits per query.
fn check_run(run: &str, queries: usize, k: usize) {
    let lines: Vec<&str> = run.lines().collect();
    assert_eq!(lines.len(), queries * k, "{run}");
    for l in &lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f.len(), 6, "{l}");
        assert_eq!(f[1], "Q0");
        assert!(DOCS.iter().any(|(id, _)| *id == f[2]), "{l}");
        assert!(f[4].parse::<f32>().unwrap().is_finite(), "{l}");
    }
}

#[test]
fn index_records_the_options_and_search_uses_them() {
    let dir = tempfile::tempdir().unwrap();
    let (corpus, queries) = write_dataset(dir.path());
    let index = dir.path().join("index");
    let m = model("bert_pylate"); // 16-dimensional: --embedding-size 128 gives room to truncate to 64
    ok(&[
        "index",
        "--index",
        s(&index),
        "--model",
        &m,
        "--corpus",
        s(&corpus),
        "--embedding-size",
        "128",
        "--truncate-dim",
        "64",
        "--document-length",
        "24",
    ]);
    let opened = PlaidIndex::open(&index).unwrap();
    assert_eq!(opened.dim(), 64);
    assert_eq!(opened.model(), Some(m.as_str()));
    assert_eq!(
        opened.model_options(),
        Some(
            &serde_json::json!({"embedding_size": 128, "truncate_dim": 64, "document_length": 24})
        )
    );
    drop(opened);

    // No model flags: the recorded model and options encode 64-dimensional queries.
    let run = ok(&[
        "search",
        "--index",
        s(&index),
        "--queries",
        s(&queries),
        "--k",
        "3",
    ]);
    check_run(&run, 3, 3);
    // The same as naming them.
    let explicit = ok(&[
        "search",
        "--index",
        s(&index),
        "--queries",
        s(&queries),
        "--k",
        "3",
        "--model",
        &m,
        "--embedding-size",
        "128",
        "--truncate-dim",
        "64",
    ]);
    assert_eq!(run, explicit);
    // A flag that gives another dimension is an error saying expected / got.
    fails(
        &[
            "search",
            "--index",
            s(&index),
            "--queries",
            s(&queries),
            "--truncate-dim",
            "32",
        ],
        &["--truncate-dim 32", "expected 64, got 32"],
    );
    // Query-side flags override the recorded options.
    let short = ok(&[
        "search",
        "--index",
        s(&index),
        "--queries",
        s(&queries),
        "--k",
        "3",
        "--query-length",
        "8",
    ]);
    check_run(&short, 3, 3);

    // Adding documents: the recorded options apply; a flag that disagrees with them is refused.
    let more = dir.path().join("more.jsonl");
    std::fs::write(
        &more,
        "{\"_id\": \"d7\", \"text\": \"Lifetimes ensure references are valid.\"}\n",
    )
    .unwrap();
    fails(
        &[
            "index",
            "--index",
            s(&index),
            "--model",
            &m,
            "--corpus",
            s(&more),
            "--truncate-dim",
            "32",
        ],
        &["--truncate-dim", "64", "32"],
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
    assert_eq!(PlaidIndex::open(&index).unwrap().len(), 7);
}

/// Tokens one pooling gives a document of `n` tokens (the first kept, the rest in `max(rest / f, 1)` clusters).
fn pooled_once(n: usize, f: usize) -> usize {
    let rest = n - 1;
    let k = (rest / f).max(1);
    1 + k.min(rest)
}

#[test]
fn pool_factor_pools_each_document_once() {
    let dir = tempfile::tempdir().unwrap();
    let (corpus, _) = write_dataset(dir.path());
    let m = model("bert_pylate");
    let npz = dir.path().join("docs.npz");
    let ids = dir.path().join("ids.txt");
    ok(&[
        "encode",
        "--model",
        &m,
        "--input",
        s(&corpus),
        "--output",
        s(&npz),
        "--ids-output",
        s(&ids),
    ]);
    let rows: Vec<usize> = latte::npz::read_npz(&npz)
        .unwrap()
        .into_iter()
        .map(|(_, a)| a.rows)
        .collect();
    assert_eq!(rows.len(), DOCS.len());
    let unpooled: usize = rows.iter().sum();
    let want: usize = rows.iter().map(|&n| pooled_once(n, 2)).sum();
    assert!(want < unpooled);

    let from_corpus = dir.path().join("pooled-corpus");
    ok(&[
        "index",
        "--index",
        s(&from_corpus),
        "--model",
        &m,
        "--corpus",
        s(&corpus),
        "--pool-factor",
        "2",
    ]);
    let from_npz = dir.path().join("pooled-npz");
    ok(&[
        "index",
        "--index",
        s(&from_npz),
        "--embeddings",
        s(&npz),
        "--ids",
        s(&ids),
        "--pool-factor",
        "2",
    ]);
    for index in [&from_corpus, &from_npz] {
        let opened = PlaidIndex::open(index).unwrap();
        assert_eq!(opened.info().tokens, want as u64, "{}", index.display());
        assert_eq!(
            opened.model_options().and_then(|o| o.get("pool_factor")),
            Some(&serde_json::json!(2))
        );
    }
    // Adding pools the new documents once too, with the index's factor.
    let more = dir.path().join("more.jsonl");
    std::fs::write(
        &more,
        "{\"_id\": \"d7\", \"text\": \"Lifetimes ensure that references stay valid for as long as they are used.\"}\n",
    )
    .unwrap();
    let before = PlaidIndex::open(&from_corpus).unwrap().info().tokens;
    ok(&[
        "index",
        "--index",
        s(&from_corpus),
        "--model",
        &m,
        "--corpus",
        s(&more),
    ]);
    let more_npz = dir.path().join("more.npz");
    ok(&[
        "encode",
        "--model",
        &m,
        "--input",
        s(&more),
        "--output",
        s(&more_npz),
    ]);
    let n = latte::npz::read_npz(&more_npz).unwrap()[0].1.rows;
    let after = PlaidIndex::open(&from_corpus).unwrap().info().tokens;
    assert_eq!(after - before, pooled_once(n, 2) as u64);
    fails(
        &[
            "index",
            "--index",
            s(&from_corpus),
            "--model",
            &m,
            "--corpus",
            s(&more),
            "--pool-factor",
            "3",
        ],
        &["--pool-factor", "2", "3"],
    );
}

#[test]
fn evaluate_honours_truncate_dim() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(&dir.path().join("tiny"));
    let m = model("bert_pylate");
    let index_dir = dir.path().join("eval-index");
    let args = |dim: &str| -> Vec<String> {
        [
            "evaluate",
            "--model",
            &m,
            "--dataset",
            s(&dir.path().join("tiny")),
            "--index-dir",
            s(&index_dir),
            "--k",
            "3",
            "--json",
            "--embedding-size",
            "128",
            "--truncate-dim",
            dim,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let a = args("64");
    let out = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(out.contains("ndcg@10"), "{out}");
    assert!(v["stages_s"]["search"].as_f64().is_some(), "{out}");
    let opened = PlaidIndex::open(&index_dir).unwrap();
    assert_eq!(opened.dim(), 64);
    assert_eq!(
        opened
            .model_options()
            .and_then(|o| o.get("truncate_dim"))
            .cloned(),
        Some(serde_json::json!(64))
    );
    drop(opened);
    // Reusing that index with another truncation is refused rather than searched with the wrong dimension.
    let b = args("32");
    fails(
        &b.iter().map(String::as_str).collect::<Vec<_>>(),
        &["--truncate-dim", "64", "32"],
    );
}

//! Corpus and queries files through every command that reads them (`encode`, `index`, `search`,
//! `evaluate`, `mine`): one id rule (`_id`, else `id`; numbers as strings), one message for a missing id,
//! and clear errors for duplicate ids, empty files and huge ids.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DOCS: [(&str, &str); 6] = [
    (
        "Ownership",
        "Each value in Rust has an owner, and there can only be one owner at a time.",
    ),
    (
        "Borrowing",
        "References borrow a value without taking ownership of it.",
    ),
    (
        "Traits",
        "A trait defines functionality a type has and can share with other types.",
    ),
    (
        "Closures",
        "Closures are anonymous functions that can capture their environment.",
    ),
    (
        "Iterators",
        "The iterator pattern performs some task on a sequence of items in turn.",
    ),
    (
        "Cargo",
        "Cargo is the Rust build system and package manager.",
    ),
];
const QUERIES: [&str; 3] = [
    "who owns a value",
    "shared behaviour between types",
    "package manager",
];

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../latte-models/tests/fixtures/models/bert_pylate")
}

fn latte(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latte"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run latte")
}

fn ok(dir: &Path, args: &[&str]) -> Output {
    let out = latte(dir, args);
    assert!(
        out.status.success(),
        "latte {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fails(dir: &Path, args: &[&str], needle: &str) -> String {
    let out = latte(dir, args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "latte {args:?} should fail");
    assert!(
        err.contains(needle),
        "latte {args:?}: expected {needle:?} in {err}"
    );
    err
}

/// How the records of a test dataset name their ids.
#[derive(Clone, Copy)]
enum Ids {
    /// `"_id": "d1"`.
    Underscore,
    /// `"id": "d1"`.
    Plain,
    /// `"_id": 101` (documents) / `"_id": 1` (queries).
    Numeric,
    /// The second document and the second query have no id.
    Missing,
}

fn doc_id(ids: Ids, i: usize) -> String {
    match ids {
        Ids::Numeric => format!("{}", 101 + i),
        _ => format!("d{}", i + 1),
    }
}

fn query_id(ids: Ids, i: usize) -> String {
    match ids {
        Ids::Numeric => format!("{}", i + 1),
        _ => format!("q{}", i + 1),
    }
}

fn id_field(ids: Ids, i: usize, id: &str) -> String {
    match ids {
        Ids::Underscore => format!("\"_id\": \"{id}\", "),
        Ids::Plain => format!("\"id\": \"{id}\", "),
        Ids::Numeric => format!("\"_id\": {id}, "),
        Ids::Missing if i == 1 => String::new(),
        Ids::Missing => format!("\"_id\": \"{id}\", "),
    }
}

/// A BEIR folder `dir/name` (corpus, queries, qrels/test.tsv) whose ids follow `ids`.
fn dataset(dir: &Path, name: &str, ids: Ids) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(d.join("qrels")).unwrap();
    let corpus: String = DOCS
        .iter()
        .enumerate()
        .map(|(i, (t, x))| {
            format!(
                "{{{}\"title\": \"{t}\", \"text\": \"{x}\"}}\n",
                id_field(ids, i, &doc_id(ids, i))
            )
        })
        .collect();
    std::fs::write(d.join("corpus.jsonl"), corpus).unwrap();
    let queries: String = QUERIES
        .iter()
        .enumerate()
        .map(|(i, q)| {
            format!(
                "{{{}\"text\": \"{q}\"}}\n",
                id_field(ids, i, &query_id(ids, i))
            )
        })
        .collect();
    std::fs::write(d.join("queries.jsonl"), queries).unwrap();
    let qrels = format!(
        "query-id\tcorpus-id\tscore\n{}\t{}\t1\n{}\t{}\t1\n{}\t{}\t2\n",
        query_id(ids, 0),
        doc_id(ids, 0),
        query_id(ids, 1),
        doc_id(ids, 2),
        query_id(ids, 2),
        doc_id(ids, 5)
    );
    std::fs::write(d.join("qrels/test.tsv"), qrels).unwrap();
    d
}

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

/// The message every command gives for the second record lacking an id.
fn missing_id_message(file: &Path) -> String {
    format!(
        "{}:2: expected an id: \"_id\" (or \"id\") as a string or a number, got none",
        file.display()
    )
}

/// Runs `f` on the `_id`, `id`, numeric and missing-id datasets.
struct Sets {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    under: PathBuf,
    plain: PathBuf,
    numeric: PathBuf,
    missing: PathBuf,
}

fn sets() -> Sets {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    Sets {
        under: dataset(&dir, "under", Ids::Underscore),
        plain: dataset(&dir, "plain", Ids::Plain),
        numeric: dataset(&dir, "numeric", Ids::Numeric),
        missing: dataset(&dir, "missing", Ids::Missing),
        dir,
        _tmp: tmp,
    }
}

#[test]
fn encode_reads_ids_by_one_rule() {
    let t = sets();
    let m = s(&model());
    let encode = |set: &Path, name: &str| -> (Vec<u8>, String) {
        let out = t.dir.join(format!("{name}.npz"));
        let ids = t.dir.join(format!("{name}.ids"));
        ok(
            &t.dir,
            &[
                "encode",
                "--model",
                &m,
                "-i",
                &s(&set.join("corpus.jsonl")),
                "-o",
                &s(&out),
                "--ids-output",
                &s(&ids),
            ],
        );
        (
            std::fs::read(out).unwrap(),
            std::fs::read_to_string(ids).unwrap(),
        )
    };
    let (under, under_ids) = encode(&t.under, "under");
    let (plain, plain_ids) = encode(&t.plain, "plain");
    assert_eq!(under, plain);
    assert_eq!(under_ids, plain_ids);
    assert_eq!(under_ids.lines().next(), Some("d1"));
    let (numeric, numeric_ids) = encode(&t.numeric, "numeric");
    assert_eq!(numeric, under);
    assert_eq!(
        numeric_ids.lines().collect::<Vec<_>>(),
        ["101", "102", "103", "104", "105", "106"]
    );
    let corpus = t.missing.join("corpus.jsonl");
    fails(
        &t.dir,
        &[
            "encode",
            "--model",
            &m,
            "-i",
            &s(&corpus),
            "-o",
            &s(&t.dir.join("x.npz")),
        ],
        &missing_id_message(&corpus),
    );
    // Queries too, with `--queries`.
    let q = t.missing.join("queries.jsonl");
    fails(
        &t.dir,
        &[
            "encode",
            "--queries",
            "--model",
            &m,
            "-i",
            &s(&q),
            "-o",
            &s(&t.dir.join("x.npz")),
        ],
        &missing_id_message(&q),
    );
}

/// Builds an index of `set`'s corpus and searches it with `queries`; returns the run.
fn index_and_search(t: &Sets, set: &Path, queries: &Path, name: &str) -> String {
    let m = s(&model());
    let index = s(&t.dir.join(format!("idx-{name}")));
    ok(
        &t.dir,
        &[
            "index",
            "--index",
            &index,
            "--model",
            &m,
            "--corpus",
            &s(&set.join("corpus.jsonl")),
            "--centroids",
            "4",
        ],
    );
    let out = ok(
        &t.dir,
        &[
            "search",
            "--index",
            &index,
            "--queries",
            &s(queries),
            "--k",
            "3",
        ],
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn index_and_search_read_ids_by_one_rule() {
    let t = sets();
    let under = index_and_search(&t, &t.under, &t.under.join("queries.jsonl"), "under");
    assert_eq!(under.lines().count(), 9, "{under}");
    assert!(under.starts_with("q1 Q0 d"), "{under}");
    // `id` in the corpus, then in the queries: the same run.
    let plain = index_and_search(&t, &t.plain, &t.plain.join("queries.jsonl"), "plain");
    assert_eq!(plain, under);
    // Numeric ids come back as their decimal strings.
    let numeric = index_and_search(&t, &t.numeric, &t.numeric.join("queries.jsonl"), "numeric");
    let renamed: String = under
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let q: usize = f[0][1..].parse().unwrap();
            let d: usize = f[2][1..].parse().unwrap();
            format!("{q} Q0 {} {} {} latte\n", 100 + d, f[3], f[4])
        })
        .collect();
    assert_eq!(numeric, renamed);

    // A missing id: the same message as every other command.
    let m = s(&model());
    let corpus = t.missing.join("corpus.jsonl");
    fails(
        &t.dir,
        &[
            "index",
            "--index",
            &s(&t.dir.join("idx-missing")),
            "--model",
            &m,
            "--corpus",
            &s(&corpus),
        ],
        &missing_id_message(&corpus),
    );
    assert!(!t.dir.join("idx-missing/meta.lt").exists());
    let queries = t.missing.join("queries.jsonl");
    fails(
        &t.dir,
        &[
            "search",
            "--index",
            &s(&t.dir.join("idx-under")),
            "--queries",
            &s(&queries),
        ],
        &missing_id_message(&queries),
    );
}

fn evaluate(t: &Sets, set: &Path) -> serde_json::Value {
    let m = s(&model());
    let out = ok(
        &t.dir,
        &[
            "evaluate",
            "--model",
            &m,
            "--dataset",
            &s(set),
            "--index",
            "exact",
            "--k",
            "5",
            "--json",
        ],
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn metrics(v: &serde_json::Value) -> String {
    // Everything but timings.
    format!("{} {}", v["num_queries"], v["metrics"])
}

#[test]
fn evaluate_reads_ids_by_one_rule() {
    let t = sets();
    let under = evaluate(&t, &t.under);
    assert_eq!(under["num_queries"], 3, "{under}");
    assert!(under["metrics"]["ndcg@10"].as_f64().is_some(), "{under}");
    assert_eq!(metrics(&evaluate(&t, &t.plain)), metrics(&under));
    assert_eq!(metrics(&evaluate(&t, &t.numeric)), metrics(&under));
    let m = s(&model());
    fails(
        &t.dir,
        &[
            "evaluate",
            "--model",
            &m,
            "--dataset",
            &s(&t.missing),
            "--index",
            "exact",
        ],
        &missing_id_message(&t.missing.join("corpus.jsonl")),
    );
}

#[test]
fn mine_reads_ids_by_one_rule() {
    let t = sets();
    let m = s(&model());
    let mine = |set: &Path, name: &str| -> String {
        let out = t.dir.join(format!("{name}.jsonl"));
        ok(
            &t.dir,
            &[
                "mine",
                "--model",
                &m,
                "--dataset",
                &s(set),
                "--split",
                "test",
                "--output",
                &s(&out),
            ],
        );
        std::fs::read_to_string(out).unwrap()
    };
    let under = mine(&t.under, "under");
    assert_eq!(under.lines().count(), 3, "{under}");
    assert_eq!(mine(&t.plain, "plain"), under);
    assert_eq!(mine(&t.numeric, "numeric"), under);
    fails(
        &t.dir,
        &[
            "mine",
            "--model",
            &m,
            "--dataset",
            &s(&t.missing),
            "--split",
            "test",
            "--output",
            &s(&t.dir.join("x.jsonl")),
        ],
        &missing_id_message(&t.missing.join("corpus.jsonl")),
    );
}

#[test]
fn duplicate_empty_and_huge_ids_are_clear_errors() {
    let t = sets();
    let m = s(&model());
    let index = s(&t.dir.join("idx"));
    ok(
        &t.dir,
        &[
            "index",
            "--index",
            &index,
            "--model",
            &m,
            "--corpus",
            &s(&t.under.join("corpus.jsonl")),
            "--centroids",
            "4",
        ],
    );
    let q = t.dir.join("dup.jsonl");
    std::fs::write(
        &q,
        "{\"_id\": \"a\", \"text\": \"x\"}\n{\"_id\": \"b\", \"text\": \"y\"}\n{\"id\": \"a\", \"text\": \"z\"}\n",
    )
    .unwrap();
    fails(
        &t.dir,
        &["search", "--index", &index, "--queries", &s(&q)],
        &format!("{}:3: duplicate _id \"a\" (first on line 1)", q.display()),
    );

    let empty_q = t.dir.join("empty-queries.jsonl");
    std::fs::write(&empty_q, "\n").unwrap();
    fails(
        &t.dir,
        &["search", "--index", &index, "--queries", &s(&empty_q)],
        &format!("{}: no queries", empty_q.display()),
    );
    let empty_c = t.dir.join("empty-corpus.jsonl");
    std::fs::write(&empty_c, "").unwrap();
    fails(
        &t.dir,
        &[
            "index",
            "--index",
            &s(&t.dir.join("idx-empty")),
            "--model",
            &m,
            "--corpus",
            &s(&empty_c),
        ],
        &format!("{}: no documents", empty_c.display()),
    );

    // A 10 MB id, repeated: the message stays short.
    let huge = "x".repeat(10 << 20);
    let big = t.dir.join("huge.jsonl");
    std::fs::write(
        &big,
        format!(
            "{{\"_id\": \"{huge}\", \"text\": \"a\"}}\n{{\"_id\": \"{huge}\", \"text\": \"b\"}}\n"
        ),
    )
    .unwrap();
    let err = fails(
        &t.dir,
        &["search", "--index", &index, "--queries", &s(&big)],
        "(10485760 bytes)",
    );
    assert!(err.len() < 1024, "{} bytes", err.len());
    let err = fails(
        &t.dir,
        &[
            "index",
            "--index",
            &s(&t.dir.join("idx-huge")),
            "--model",
            &m,
            "--corpus",
            &s(&big),
        ],
        "duplicate _id",
    );
    assert!(err.len() < 1024, "{} bytes", err.len());
}

#[test]
fn corpus_streams_in_chunks_into_an_existing_index() {
    let t = sets();
    let m = s(&model());
    let first = t.dir.join("first.jsonl");
    let rest = t.dir.join("rest.jsonl");
    let corpus = std::fs::read_to_string(t.under.join("corpus.jsonl")).unwrap();
    let lines: Vec<&str> = corpus.lines().collect();
    std::fs::write(&first, lines[..2].join("\n") + "\n").unwrap();
    std::fs::write(&rest, lines[2..].join("\n") + "\n").unwrap();
    let build = |name: &str, chunk: &str, chunks: usize| -> String {
        let index = s(&t.dir.join(name));
        ok(
            &t.dir,
            &[
                "index",
                "--index",
                &index,
                "--model",
                &m,
                "--corpus",
                &s(&first),
                "--centroids",
                "2",
            ],
        );
        let out = ok(
            &t.dir,
            &[
                "index",
                "--index",
                &index,
                "--model",
                &m,
                "--corpus",
                &s(&rest),
                "--chunk-docs",
                chunk,
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("added 4 documents"), "{err}");
        // One progress line per chunk when there are several.
        assert_eq!(err.matches("chunk ").count(), chunks, "{err}");
        let out = ok(
            &t.dir,
            &[
                "search",
                "--index",
                &index,
                "--queries",
                &s(&t.under.join("queries.jsonl")),
                "--k",
                "6",
                "--exact",
            ],
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let whole = build("idx-whole", "2048", 0);
    assert_eq!(whole.lines().count(), 18, "{whole}");
    let chunked = build("idx-chunked", "1", 4);
    assert_eq!(chunked, whole);
}

#[test]
fn a_new_index_from_a_corpus_is_the_same_whatever_the_chunk_size() {
    // The chunks are spooled and the index built from all of them at once: the k-means sample is drawn from
    // the whole corpus, so the files do not depend on --chunk-docs, and nothing but the index is left.
    let t = sets();
    let m = s(&model());
    let corpus = s(&t.under.join("corpus.jsonl"));
    let build = |name: &str, chunk: &str, pool: &str| -> (Vec<(String, Vec<u8>)>, String) {
        let index = t.dir.join(name);
        let out = ok(
            &t.dir,
            &[
                "index",
                "--index",
                &s(&index),
                "--model",
                &m,
                "--corpus",
                &corpus,
                "--chunk-docs",
                chunk,
                "--pool-factor",
                pool,
                "--centroids",
                "4",
                // One document per forward pass: every document is encoded alone whatever the chunking, so
                // the embeddings are bit-identical on every kernel level (the AVX2 `gemm` path rounds a row
                // differently in batches of other shapes; the AVX-512 tile does not).
                "--batch-size",
                "1",
            ],
        );
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&index)
            .unwrap()
            .flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect();
        files.sort();
        (files, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for pool in ["1", "2"] {
        let (whole, log) = build(&format!("new-whole-{pool}"), "2048", pool);
        assert!(log.contains("indexed 6 documents"), "{log}");
        assert_eq!(log.matches("chunk ").count(), 0, "{log}");
        let (chunked, log) = build(&format!("new-chunked-{pool}"), "4", pool);
        assert_eq!(log.matches("chunk ").count(), 2, "{log}");
        let names: Vec<&str> = whole.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.contains(&"meta.lt")
                && names
                    .iter()
                    .all(|n| n.ends_with(".lt") || *n == "documents.sqlite"),
            "{names:?}"
        );
        assert_eq!(chunked, whole, "pool factor {pool}");
    }
    // A build that fails after encoding (here: an impossible setting) leaves no folder behind.
    let missing = t.dir.join("never-built");
    fails(
        &t.dir,
        &[
            "index",
            "--index",
            &s(&missing),
            "--model",
            &m,
            "--corpus",
            &corpus,
            "--centroids",
            "0",
        ],
        "num_centroids must be at least 1",
    );
    assert!(!missing.exists());
}

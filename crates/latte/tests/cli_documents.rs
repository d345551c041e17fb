//! Documents in the CLI: `latte index` storing titles, texts and metadata (`--corpus`, `--metadata`,
//! `--no-store-text`), replacement of existing ids, `latte get`, `latte info`, and `latte search` with
//! `--filter`/`--filter-file`, `--hybrid` (`--fusion`, `--alpha`) and `--bm25-only`, on the fixture model
//! and the demo data.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{fails, latte, model, ok, ok_stderr, s};
use latte::npz::{write_npz, Matrix};
use serde_json::{json, Value};

/// The first `n` documents of data/demo with metadata: `year` (2000 + i mod 30), `book` (the id's first
/// path part) and `tags`.
fn demo_corpus(dir: &Path, n: usize) -> (std::path::PathBuf, Vec<Value>) {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/demo/corpus.jsonl");
    let text = std::fs::read_to_string(demo).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .take(n)
        .enumerate()
        .map(|(i, l)| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let id = v["_id"].as_str().unwrap().to_string();
            v["year"] = json!(2000 + i % 30);
            v["book"] = json!(id.split('/').next().unwrap());
            v["tags"] = json!([format!("t{}", i % 3)]);
            v
        })
        .collect();
    let path = dir.join("corpus.jsonl");
    let body: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&path, body.join("\n") + "\n").unwrap();
    (path, lines)
}

fn demo_queries(dir: &Path, n: usize) -> std::path::PathBuf {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/demo/queries.jsonl");
    let text = std::fs::read_to_string(demo).unwrap();
    let path = dir.join("queries.jsonl");
    let body: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(&path, body.join("\n") + "\n").unwrap();
    path
}

/// `(qid, docid, rank, score)` of a TREC run.
fn parse_run(run: &str) -> Vec<(String, String, usize, f64)> {
    run.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 6, "{l}");
            (
                f[0].to_string(),
                f[2].to_string(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
            )
        })
        .collect()
}

fn get(index: &Path, dir: &Path, ids: &[&str]) -> (bool, Vec<Value>, String) {
    let path = dir.join("get-ids.txt");
    std::fs::write(&path, ids.join("\n") + "\n").unwrap();
    let out = latte(&["get", "--index", s(index), "--ids", s(&path)]);
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn corpus_documents_are_stored_filtered_and_searched_by_keywords() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (corpus, lines) = demo_corpus(t, 40);
    let queries = demo_queries(t, 4);
    let index = t.join("idx");
    let m = model("bert_pylate");
    ok(&[
        "index",
        "--index",
        s(&index),
        "--model",
        &m,
        "--corpus",
        s(&corpus),
        "--centroids",
        "16",
    ]);
    let by_id: HashMap<String, &Value> = lines
        .iter()
        .map(|v| (v["_id"].as_str().unwrap().to_string(), v))
        .collect();

    // info: text and JSON.
    let info: Value = serde_json::from_str(&ok(&["info", "--index", s(&index), "--json"])).unwrap();
    assert_eq!(info["documents"], 40);
    assert_eq!(info["stored_documents"], 40);
    assert_eq!(info["documents_with_text"], 40);
    assert_eq!(info["dim"], 16);
    assert_eq!(info["nbits"], 2);
    assert_eq!(info["num_centroids"], 16);
    assert_eq!(info["model"], json!(m));
    assert_eq!(info["format_version"], latte_index::FORMAT_VERSION);
    assert!(info["tokens"].as_u64().unwrap() > 40);
    let disk = info["disk_bytes"].as_u64().unwrap();
    assert!(info["store_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        disk,
        info["store_bytes"].as_u64().unwrap() + info["vector_bytes"].as_u64().unwrap()
    );
    let text = ok(&["info", "--index", s(&index)]);
    assert!(text.contains("documents:           40"), "{text}");
    assert!(
        text.contains(&format!("bytes on disk:       {disk}")),
        "{text}"
    );

    // get: the stored title, text and every other field as metadata; unknown ids on stderr, exit 2.
    let id0 = lines[0]["_id"].as_str().unwrap();
    let id5 = lines[5]["_id"].as_str().unwrap();
    let (success, got, err) = get(&index, t, &[id5, "no-such-id", id0]);
    assert!(!success);
    assert!(
        err.contains("no-such-id") && err.contains("1 of 3 ids"),
        "{err}"
    );
    assert_eq!(got.len(), 2);
    for (g, src) in got.iter().zip([&lines[5], &lines[0]]) {
        assert_eq!(g["_id"], src["_id"]);
        assert_eq!(g["text"], src["text"]);
        assert_eq!(g.get("title").unwrap_or(&json!("")), &src["title"]);
        assert_eq!(
            g["metadata"],
            json!({"year": src["year"], "book": src["book"], "tags": src["tags"]})
        );
    }
    let (success, got, _) = get(&index, t, &[id0]);
    assert!(success);
    assert_eq!(got.len(), 1);

    // --filter and --filter-file: every hit matches, and the two give the same run.
    let filter = r#"{"$and": [{"year": {"$gte": 2010}}, {"tags": {"$in": ["t1", "t2"]}}]}"#;
    let matches = |id: &str| {
        let v = by_id[id];
        v["year"].as_u64().unwrap() >= 2010 && v["tags"][0] != "t0"
    };
    let base = [
        "search",
        "--index",
        s(&index),
        "--queries",
        s(&queries),
        "--k",
        "5",
    ];
    let run = ok(&[&base[..], &["--filter", filter]].concat());
    let hits = parse_run(&run);
    assert_eq!(hits.len(), 20);
    assert!(hits.iter().all(|h| matches(&h.1)), "{run}");
    let filter_file = t.join("filter.json");
    std::fs::write(&filter_file, filter).unwrap();
    assert_eq!(
        ok(&[&base[..], &["--filter-file", s(&filter_file)]].concat()),
        run
    );
    // Unfiltered, some hit does not match (the filter did something).
    let all = parse_run(&ok(&base));
    assert!(all.iter().any(|h| !matches(&h.1)));
    // With --exact, the filtered results are the exact MaxSim order over the matching documents.
    let exact = parse_run(&ok(&[&base[..], &["--filter", filter, "--exact"]].concat()));
    assert!(exact.iter().all(|h| matches(&h.1)));
    assert_eq!(exact.len(), 20);

    // Malformed filters: clear errors naming the position.
    fails(
        &[&base[..], &["--filter", r#"{"year": {"$foo": 1}}"#]].concat(),
        &["--filter", "$foo", "year"],
    );
    fails(
        &[&base[..], &["--filter", r#"{"year": "#]].concat(),
        &["--filter", "column"],
    );
    fails(
        &[&base[..], &["--filter-file", s(&t.join("nope.json"))]].concat(),
        &["nope.json"],
    );

    // BM25 alone: hits share a word with the query and obey the filter.
    let bm25 = ok(&[&base[..], &["--bm25-only"]].concat());
    let hits = parse_run(&bm25);
    assert!(!hits.is_empty());
    let qtext: HashMap<String, String> = std::fs::read_to_string(&queries)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["_id"].as_str().unwrap().to_string(),
                v["text"].as_str().unwrap().to_lowercase(),
            )
        })
        .collect();
    let words = |s: &str| -> Vec<String> {
        s.to_lowercase()
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect()
    };
    for (qid, doc, _, score) in &hits {
        assert!(*score > 0.0);
        let d = by_id[doc.as_str()];
        let dwords = words(&format!("{} {}", d["title"], d["text"]));
        assert!(
            words(&qtext[qid]).iter().any(|w| dwords.contains(w)),
            "{qid} -> {doc}"
        );
    }
    let filtered = parse_run(&ok(
        &[&base[..], &["--bm25-only", "--filter", filter]].concat()
    ));
    assert!(filtered.iter().all(|h| matches(&h.1)));

    // Hybrid: RRF by default; linear with --alpha; alpha 1 ranks like MaxSim alone.
    let hybrid = parse_run(&ok(&[&base[..], &["--hybrid"]].concat()));
    assert_eq!(hybrid.len(), 20);
    let rrf = parse_run(&ok(&[&base[..], &["--hybrid", "--fusion", "rrf"]].concat()));
    assert_eq!(rrf, hybrid);
    // An RRF score is at most 2 / (60 + 1).
    assert!(hybrid.iter().all(|h| h.3 <= 2.0 / 61.0 + 1e-6));
    let dense: Vec<(String, String)> = all.iter().map(|h| (h.0.clone(), h.1.clone())).collect();
    let linear1: Vec<(String, String)> = parse_run(&ok(&[
        &base[..],
        &["--hybrid", "--fusion", "linear", "--alpha", "1"],
    ]
    .concat()))
    .into_iter()
    .map(|h| (h.0, h.1))
    .collect();
    assert_eq!(linear1.len(), dense.len());
    let top = |v: &[(String, String)]| -> Vec<(String, String)> {
        v.iter()
            .filter(|h| h.0 == v[0].0)
            .take(1)
            .cloned()
            .collect()
    };
    assert_eq!(top(&linear1), top(&dense));
    let hf = parse_run(&ok(&[&base[..], &["--hybrid", "--filter", filter]].concat()));
    assert!(!hf.is_empty() && hf.iter().all(|h| matches(&h.1)));
    fails(
        &[&base[..], &["--hybrid", "--alpha", "0.3"]].concat(),
        &["--alpha", "linear"],
    );
    fails(
        &[
            &base[..],
            &["--hybrid", "--fusion", "linear", "--alpha", "1.5"],
        ]
        .concat(),
        &["--alpha", "1.5"],
    );
    fails(
        &[&base[..], &["--fusion", "linear"]].concat(),
        &["--hybrid"],
    );
    fails(
        &[&base[..], &["--hybrid", "--bm25-only"]].concat(),
        &["--bm25-only"],
    );
    // --ndocs 0 and --n-ivf-probe 0 are errors.
    fails(&[&base[..], &["--ndocs", "0"]].concat(), &["ndocs"]);
    fails(
        &[&base[..], &["--n-ivf-probe", "0"]].concat(),
        &["n_ivf_probe"],
    );

    // Adding a line with an existing id replaces it (the report says so); text and metadata follow.
    let more = t.join("more.jsonl");
    std::fs::write(
        &more,
        format!(
            "{}\n{}\n",
            json!({"_id": id0, "title": "New title", "text": "completely new words", "year": 1999}),
            json!({"_id": "fresh", "text": "a fresh document", "lang": "en"})
        ),
    )
    .unwrap();
    let err = ok_stderr(&[
        "index",
        "--index",
        s(&index),
        "--model",
        &m,
        "--corpus",
        s(&more),
    ]);
    assert!(
        err.contains("replaced 1 documents") && err.contains(id0),
        "{err}"
    );
    let (_, got, _) = get(&index, t, &[id0, "fresh"]);
    assert_eq!(
        got,
        [
            json!({"_id": id0, "title": "New title", "text": "completely new words", "metadata": {"year": 1999}}),
            json!({"_id": "fresh", "text": "a fresh document", "metadata": {"lang": "en"}})
        ]
    );
    let info: Value = serde_json::from_str(&ok(&["info", "--index", s(&index), "--json"])).unwrap();
    assert_eq!(info["documents"], 41);
    assert_eq!(info["stored_documents"], 41);
    // Deleting: unknown ids are named and nothing is deleted; known ones leave the store too.
    let del = t.join("del.txt");
    std::fs::write(&del, format!("{id5}\nghost\n")).unwrap();
    fails(
        &["delete", "--index", s(&index), "--ids", s(&del)],
        &["ghost"],
    );
    std::fs::write(&del, format!("{id5}\n")).unwrap();
    ok(&["delete", "--index", s(&index), "--ids", s(&del)]);
    let (success, got, err) = get(&index, t, &[id5]);
    assert!(!success && got.is_empty() && err.contains(id5), "{err}");
    // Deleting by filter: exactly the matching documents go (year 2000 + i % 30 < 2003 for i % 30 in 0..3;
    // the replaced first document has year 1999, the deleted sixth is gone, "fresh" has no year).
    let before: Value =
        serde_json::from_str(&ok(&["info", "--index", s(&index), "--json"])).unwrap();
    let old_years: Vec<String> = lines
        .iter()
        .filter(|v| v["year"].as_u64().unwrap() < 2003)
        .map(|v| v["_id"].as_str().unwrap().to_string())
        .filter(|id| id != id5)
        .collect();
    assert!(!old_years.is_empty());
    let err = ok_stderr(&[
        "delete",
        "--index",
        s(&index),
        "--filter",
        r#"{"year": {"$lt": 2003}}"#,
    ]);
    assert!(
        err.contains(&format!("deleted {} documents", old_years.len())),
        "{err}"
    );
    let after: Value =
        serde_json::from_str(&ok(&["info", "--index", s(&index), "--json"])).unwrap();
    assert_eq!(
        after["documents"].as_u64().unwrap() + old_years.len() as u64,
        before["documents"].as_u64().unwrap()
    );
    let refs: Vec<&str> = old_years.iter().map(String::as_str).collect();
    let (success, got, _) = get(&index, t, &refs);
    assert!(!success && got.is_empty());
    // A filter matching nothing deletes nothing; a bad filter names the problem; one way to choose is needed.
    let err = ok_stderr(&["delete", "--index", s(&index), "--filter", r#"{"year": 1}"#]);
    assert!(err.contains("deleted 0 documents"), "{err}");
    fails(
        &[
            "delete",
            "--index",
            s(&index),
            "--filter",
            r#"{"year": {"$foo": 1}}"#,
        ],
        &["--filter", "$foo"],
    );
    fails(&["delete", "--index", s(&index)], &["--ids", "--filter"]);
}

#[test]
fn text_can_be_left_out_and_keyword_search_then_says_why_it_cannot_run() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (corpus, lines) = demo_corpus(t, 12);
    let queries = demo_queries(t, 2);
    let index = t.join("idx");
    ok(&[
        "index",
        "--index",
        s(&index),
        "--model",
        &model("bert_pylate"),
        "--corpus",
        s(&corpus),
        "--centroids",
        "4",
        "--no-store-text",
    ]);
    let id = lines[3]["_id"].as_str().unwrap();
    let (_, got, _) = get(&index, t, &[id]);
    assert_eq!(
        got,
        [json!({"_id": id, "metadata": {"year": 2003, "book": lines[3]["book"], "tags": ["t0"]}})]
    );
    let base = ["search", "--index", s(&index), "--queries", s(&queries)];
    for flag in ["--hybrid", "--bm25-only"] {
        fails(&[&base[..], &[flag]].concat(), &[flag, "stores no text"]);
    }
    // Dense search with a filter still works.
    let hits = parse_run(&ok(
        &[&base[..], &["--filter", r#"{"year": 2003}"#]].concat()
    ));
    assert!(hits.iter().all(|h| h.1 == id), "{hits:?}");
}

fn embeddings(dir: &Path, name: &str, ids: &[&str], seed: u64) -> (String, String) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let arrays: Vec<Matrix> = ids
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let rows = 3 + i % 4;
            let data: Vec<f32> = (0..rows * 16)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            Matrix {
                rows,
                cols: 16,
                data,
            }
        })
        .collect();
    let npz = dir.join(format!("{name}.npz"));
    write_npz(&npz, &arrays).unwrap();
    let idf = dir.join(format!("{name}.txt"));
    std::fs::write(&idf, ids.join("\n") + "\n").unwrap();
    (npz.to_string_lossy().into(), idf.to_string_lossy().into())
}

#[test]
fn embeddings_take_metadata_from_a_jsonl_file() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ids: Vec<String> = (0..30).map(|i| format!("e{i}")).collect();
    let idr: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (npz, idf) = embeddings(t, "docs", &idr, 1);
    let meta = t.join("meta.jsonl");
    let body: Vec<String> = (0..30)
        .filter(|i| i % 5 != 0)
        .map(|i| {
            json!({"_id": format!("e{i}"), "group": i % 3, "text": format!("passage number {i}")})
                .to_string()
        })
        .collect();
    std::fs::write(&meta, body.join("\n") + "\n\n").unwrap();
    let index = t.join("idx");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "index",
            "--index",
            s(&index),
            "--embeddings",
            &npz,
            "--ids",
            &idf,
            "--centroids",
            "4",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        latte(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Bad metadata files: errors naming the file and line, nothing built.
    let bad = t.join("bad.jsonl");
    for (content, needles) in [
        (
            "{\"_id\": \"e1\"}\n{\"_id\": \"zz\"}\n",
            vec!["bad.jsonl: line 2", "zz", "--ids"],
        ),
        (
            "{\"_id\": \"e1\"}\n\n{\"_id\": \"e1\"}\n",
            vec!["line 3", "duplicate", "line 1"],
        ),
        ("[1]\n", vec!["line 1", "JSON object"]),
        ("{\"group\": 1}\n", vec!["line 1", "_id"]),
        (
            "{\"_id\": \"e1\", \"text\": 5}\n",
            vec!["line 1", "\"text\" must be a string"],
        ),
        ("{\"_id\": \"e1\",\n", vec!["line 1", "invalid JSON"]),
    ] {
        std::fs::write(&bad, content).unwrap();
        let out = run(&["--metadata", s(&bad)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{content}");
        for n in needles {
            assert!(err.contains(n), "{content}: expected {n:?} in {err}");
        }
        assert!(!index.join("meta.lt").exists());
    }
    let out = run(&["--metadata", s(&meta)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, got, _) = get(&index, t, &["e1", "e5"]);
    assert_eq!(
        got,
        [
            json!({"_id": "e1", "text": "passage number 1", "metadata": {"group": 1}}),
            json!({"_id": "e5"})
        ]
    );
    // Filtered search with query embeddings.
    let (q, qids) = embeddings(t, "q", &["q0", "q1"], 9);
    let base = [
        "search",
        "--index",
        s(&index),
        "--query-embeddings",
        &q,
        "--query-ids",
        &qids,
        "--k",
        "4",
    ];
    let hits = parse_run(&ok(&[&base[..], &["--filter", r#"{"group": 2}"#]].concat()));
    assert_eq!(hits.len(), 8);
    assert!(hits.iter().all(|h| {
        let i: usize = h.1[1..].parse().unwrap();
        i % 3 == 2 && !i.is_multiple_of(5)
    }));
    // Keyword search needs the query text.
    fails(
        &[&base[..], &["--hybrid"]].concat(),
        &["--hybrid", "--queries"],
    );
    // Re-adding ids replaces them, with the new metadata.
    let (npz2, idf2) = embeddings(t, "again", &["e1", "e2", "n1"], 5);
    let meta2 = t.join("meta2.jsonl");
    std::fs::write(&meta2, json!({"_id": "e2", "group": 9}).to_string() + "\n").unwrap();
    let err = ok_stderr(&[
        "index",
        "--index",
        s(&index),
        "--embeddings",
        &npz2,
        "--ids",
        &idf2,
        "--metadata",
        s(&meta2),
    ]);
    assert!(
        err.contains("replaced 2 documents") && err.contains("\"e1\", \"e2\""),
        "{err}"
    );
    let (_, got, _) = get(&index, t, &["e1", "e2", "n1"]);
    assert_eq!(
        got,
        [
            json!({"_id": "e1"}),
            json!({"_id": "e2", "metadata": {"group": 9}}),
            json!({"_id": "n1"})
        ]
    );
    let info: Value = serde_json::from_str(&ok(&["info", "--index", s(&index), "--json"])).unwrap();
    assert_eq!(
        (
            info["documents"].as_u64(),
            info["stored_documents"].as_u64()
        ),
        (Some(31), Some(31))
    );
}

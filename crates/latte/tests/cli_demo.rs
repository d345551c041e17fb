//! README's first command: `latte evaluate` on the demo set that ships in `data/demo`, with the tiny test
//! model, from a clean checkout (nothing beside the repository).

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn demo_set_is_a_valid_beir_folder() {
    let demo = repo().join("data/demo");
    let corpus = std::fs::read_to_string(demo.join("corpus.jsonl")).unwrap();
    let queries = std::fs::read_to_string(demo.join("queries.jsonl")).unwrap();
    let qrels = std::fs::read_to_string(demo.join("qrels/test.tsv")).unwrap();
    let ids: std::collections::HashSet<String> = corpus
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!((300..=1000).contains(&ids.len()), "{} passages", ids.len());
    assert!(queries.lines().count() >= 100);
    // Every judged passage is in the corpus.
    for line in qrels.lines().skip(1) {
        let doc = line.split('\t').nth(1).unwrap();
        assert!(ids.contains(doc), "qrels names {doc}, not in the corpus");
    }
    let bytes: u64 = [
        "corpus.jsonl",
        "queries.jsonl",
        "qrels/test.tsv",
        "README.md",
    ]
    .iter()
    .map(|f| std::fs::metadata(demo.join(f)).unwrap().len())
    .sum();
    assert!(
        bytes < 2 << 20,
        "the demo set must stay under 2 MB, is {bytes} bytes"
    );
}

#[test]
fn readme_first_command_runs_on_the_demo_set() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(
        readme.contains("latte evaluate --model crates/latte-models/tests/fixtures/models/bert_pylate --dataset data/demo"),
        "README's first command changed: update this test with it"
    );
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_latte"))
        .current_dir(work.path())
        .args(["evaluate", "--model"])
        .arg(repo().join("crates/latte-models/tests/fixtures/models/bert_pylate"))
        .arg("--dataset")
        .arg(repo().join("data/demo"))
        .args(["--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = work
        .path()
        .join("latte-eval/demo-bert_pylate-plaid/run.test.trec");
    let text = std::fs::read_to_string(&run).unwrap();
    let queries: std::collections::HashSet<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(queries.len(), 117, "every demo query is answered");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.to_string().contains("ndcg@10"), "{report}");
}

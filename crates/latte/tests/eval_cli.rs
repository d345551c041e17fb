//! `latte eval` end to end through the binary.

use std::process::Command;

#[test]
fn latte_eval_prints_json_and_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run.trec");
    let qrels = dir.path().join("qrels.trec");
    std::fs::write(&run, "q1 Q0 a 1 0.9 t\nq1 Q0 b 2 0.8 t\nq2 Q0 c 1 0.7 t\n").unwrap();
    std::fs::write(&qrels, "q1 0 b 1\nq2 0 c 2\n").unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_latte"))
        .args(["eval", "--metrics", "mrr@10,ndcg@1", "--json", "--run"])
        .arg(&run)
        .arg("--qrels")
        .arg(&qrels)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["num_queries"], 2);
    assert_eq!(value["metrics"]["mrr@10"], 0.75);
    assert_eq!(value["metrics"]["ndcg@1"], 0.5);

    std::fs::write(&qrels, "q1 0 b\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_latte"))
        .args(["eval", "--run"])
        .arg(&run)
        .arg("--qrels")
        .arg(&qrels)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: reading the qrels"), "{stderr}");
    assert!(
        stderr.contains("qrels.trec:1: unrecognised qrels format"),
        "{stderr}"
    );
}

//! `latte evaluate` end to end on a small BEIR folder, with both index kinds and index reuse.

use std::path::Path;
use std::process::Command;

fn write_dataset(dir: &Path) {
    let docs = [
        (
            "d1",
            "Ownership",
            "Each value in Rust has an owner, and there can only be one owner at a time.",
        ),
        (
            "d2",
            "Borrowing",
            "References borrow a value without taking ownership of it.",
        ),
        (
            "d3",
            "Traits",
            "A trait defines functionality a type has and can share with other types.",
        ),
        (
            "d4",
            "Closures",
            "Closures are anonymous functions that can capture their environment.",
        ),
        (
            "d5",
            "Iterators",
            "The iterator pattern performs some task on a sequence of items in turn.",
        ),
        (
            "d6",
            "Cargo",
            "Cargo is the Rust build system and package manager.",
        ),
    ];
    let corpus: String = docs
        .iter()
        .map(|(id, t, x)| format!("{{\"_id\": \"{id}\", \"title\": \"{t}\", \"text\": \"{x}\"}}\n"))
        .collect();
    std::fs::write(dir.join("corpus.jsonl"), corpus).unwrap();
    std::fs::write(
        dir.join("queries.jsonl"),
        "{\"_id\": \"q1\", \"text\": \"who owns a value\"}\n{\"_id\": \"q2\", \"text\": \"shared behaviour between types\"}\n{\"_id\": \"q3\", \"text\": \"package manager\"}\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    std::fs::write(
        dir.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t1\nq3\td6\t2\n",
    )
    .unwrap();
}

#[test]
fn evaluate_exact_and_plaid_and_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tiny");
    std::fs::create_dir(&data).unwrap();
    write_dataset(&data);
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../latte-models/tests/fixtures/models/bert_pylate");
    for kind in ["exact", "plaid", "plaid"] {
        let out = Command::new(env!("CARGO_BIN_EXE_latte"))
            .current_dir(dir.path())
            .args(["evaluate", "--model"])
            .arg(&model)
            .arg("--dataset")
            .arg(&data)
            .args(["--index", kind, "--k", "5", "--json"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{kind}: {stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ndcg = v.to_string();
        assert!(ndcg.contains("ndcg@10"), "{ndcg}");
        assert!(v["stages_s"]["search"].as_f64().is_some(), "{v}");
        let run = dir
            .path()
            .join(format!("latte-eval/tiny-bert_pylate-{kind}/run.test.trec"));
        let lines = std::fs::read_to_string(&run).unwrap();
        assert_eq!(lines.lines().filter(|l| l.starts_with("q1 ")).count(), 5);
    }
    // The second plaid run reused the index instead of encoding the corpus again.
    let out = Command::new(env!("CARGO_BIN_EXE_latte"))
        .current_dir(dir.path())
        .args(["evaluate", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&data)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("reusing the index"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("encode queries"));
}

#[test]
fn evaluate_missing_split_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path());
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../latte-models/tests/fixtures/models/bert_pylate");
    let out = Command::new(env!("CARGO_BIN_EXE_latte"))
        .current_dir(dir.path())
        .args(["evaluate", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(dir.path())
        .args(["--split", "dev"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dev") && err.contains("test"), "{err}");
}

#[test]
fn evaluate_a_folder_of_datasets_reports_each_and_the_mean() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("sets");
    for name in ["alpha", "beta"] {
        let d = parent.join(name);
        std::fs::create_dir_all(&d).unwrap();
        write_dataset(&d);
    }
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../latte-models/tests/fixtures/models/bert_pylate");
    let out = Command::new(env!("CARGO_BIN_EXE_latte"))
        .current_dir(dir.path())
        .args(["evaluate", "--index", "exact", "--k", "3", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&parent)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("mean over 2 datasets"), "{stdout}");
    assert!(dir
        .path()
        .join("latte-eval/alpha-bert_pylate-exact/run.test.trec")
        .is_file());
    assert!(dir
        .path()
        .join("latte-eval/beta-bert_pylate-exact/run.test.trec")
        .is_file());
}

/// Copies a folder and its sub-folders.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn kept_embeddings_of_a_model_changed_in_place_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tiny");
    std::fs::create_dir(&data).unwrap();
    write_dataset(&data);
    let model = dir.path().join("model");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../latte-models/tests/fixtures/models/bert_pylate"),
        &model,
    );
    let run = |kind: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_latte"))
            .current_dir(dir.path())
            .args(["evaluate", "--model"])
            .arg(&model)
            .arg("--dataset")
            .arg(&data)
            .args(["--index", kind])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, stdout, _) = run("exact");
    assert!(ok && stdout.contains("encode corpus"), "{stdout}");
    let (ok, stdout, _) = run("exact");
    assert!(ok && !stdout.contains("encode corpus"), "reused: {stdout}");
    let (ok, _, stderr) = run("plaid");
    assert!(ok, "{stderr}");
    // The model is retrained in place: same names, new weights (here: the same bytes, written anew).
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    let (ok, stdout, stderr) = run("exact");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("encode corpus"), "{stdout}");
    assert!(stderr.contains("other model files"), "{stderr}");
    let (ok, _, stderr) = run("plaid");
    assert!(!ok, "a PLAID index of the old weights was used");
    assert!(stderr.contains("other files of model"), "{stderr}");
}

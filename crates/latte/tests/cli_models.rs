//! The `latte encode` / `latte convert` contract, run through the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

fn latte() -> Command {
    Command::new(env!("CARGO_BIN_EXE_latte"))
}

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../latte-models/tests/fixtures/models")
        .join(name)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn encode_jsonl_and_txt_to_npz_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    std::fs::write(
        &corpus,
        "{\"_id\": \"d1\", \"title\": \"Ownership\", \"text\": \"Each value has an owner.\"}\n{\"_id\": \"d2\", \"text\": \"\"}\n{\"_id\": \"d3\", \"text\": \"Borrowing lets code use a value without owning it, as long as the rules hold.\"}\n",
    )
    .unwrap();
    let out = dir.path().join("docs.npz");
    run_ok(
        latte()
            .args(["encode", "--model"])
            .arg(model("bert_pylate"))
            .arg("--input")
            .arg(&corpus)
            .arg("--output")
            .arg(&out)
            .args(["--batch-size", "2"]),
    );
    let arrays = latte::npz::read_npz(&out).unwrap();
    assert_eq!(arrays.len(), 3);
    // The library gives the same vectors in the same order.
    let m = latte_models::ColBERT::load_dir(&model("bert_pylate"), &Default::default()).unwrap();
    let texts = vec![
        "Ownership Each value has an owner.".to_string(),
        "".to_string(),
        "Borrowing lets code use a value without owning it, as long as the rules hold.".to_string(),
    ];
    let embs = m.encode(&texts, false, &Default::default()).unwrap();
    for ((name, a), e) in arrays.iter().zip(&embs) {
        assert_eq!((a.rows, a.cols), (e.rows, e.cols), "{name}");
        let diff = a
            .data
            .iter()
            .zip(&e.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    // Queries from a .txt file: every query has query_length rows with expansion.
    let txt = dir.path().join("q.txt");
    std::fs::write(&txt, "what is ownership\nborrow checker\n").unwrap();
    let qout = dir.path().join("q.npz");
    run_ok(
        latte()
            .args(["encode", "--queries", "--model"])
            .arg(model("bert_pylate"))
            .arg("--input")
            .arg(&txt)
            .arg("--output")
            .arg(&qout),
    );
    let q = latte::npz::read_npz(&qout).unwrap();
    assert_eq!(q.len(), 2);
    assert!(q.iter().all(|(_, m)| m.rows == 32 && m.cols == 16));
}

#[test]
fn malformed_jsonl_names_the_line_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("bad.jsonl");
    std::fs::write(
        &corpus,
        "{\"_id\": \"1\", \"text\": \"fine\"}\n{\"_id\": \"2\", \"text\": \n",
    )
    .unwrap();
    let out = dir.path().join("out.npz");
    let err = run_err(
        latte()
            .args(["encode", "--model"])
            .arg(model("bert_pylate"))
            .arg("--input")
            .arg(&corpus)
            .arg("--output")
            .arg(&out),
    );
    assert!(err.contains("bad.jsonl:2"), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary files left behind"
    );
}

#[test]
fn missing_model_file_names_path_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    std::fs::create_dir(&m).unwrap();
    std::fs::copy(
        model("bert_pylate").join("config.json"),
        m.join("config.json"),
    )
    .unwrap();
    let txt = dir.path().join("t.txt");
    std::fs::write(&txt, "hello\n").unwrap();
    let out = dir.path().join("o.npz");
    let err = run_err(
        latte()
            .args(["encode", "--model"])
            .arg(&m)
            .arg("--input")
            .arg(&txt)
            .arg("--output")
            .arg(&out),
    );
    assert!(
        err.contains("model.safetensors") && err.contains("expected model weights"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn convert_stanford_checkpoint_to_pylate_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("converted");
    run_ok(
        latte()
            .args(["convert", "--model"])
            .arg(model("bert_stanford_st"))
            .arg("--output")
            .arg(&out),
    );
    let modules = std::fs::read_to_string(out.join("modules.json")).unwrap();
    assert!(modules.contains("pylate.models.Dense.Dense"));
    let cfg = std::fs::read_to_string(out.join("config_sentence_transformers.json")).unwrap();
    assert!(
        cfg.contains("\"query_prefix\": \"[unused0]\"") && cfg.contains("\"query_length\": 20"),
        "{cfg}"
    );
    let a =
        latte_models::ColBERT::load_dir(&model("bert_stanford_st"), &Default::default()).unwrap();
    let b = latte_models::ColBERT::load_dir(&out, &Default::default()).unwrap();
    let t = vec!["late interaction".to_string()];
    assert_eq!(
        a.encode(&t, true, &Default::default()).unwrap(),
        b.encode(&t, true, &Default::default()).unwrap()
    );
}

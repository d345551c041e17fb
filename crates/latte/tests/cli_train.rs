//! `latte train` and `latte mine`, run through the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

fn latte() -> Command {
    Command::new(env!("CARGO_BIN_EXE_latte"))
}

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../latte-train/tests/fixtures")
        .join(p)
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn train_with_a_toml_config_then_encode_with_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("train.toml");
    std::fs::write(
        &cfg,
        "batch_size = 2\nlearning_rate = 1e-3\nepochs = 2\nloss = \"cached-contrastive\"\nmini_batch_size = 1\nsave_steps = 2\n",
    )
    .unwrap();
    let out = dir.path().join("model");
    let (ok, stdout, stderr) = run(latte()
        .args(["train", "--model"])
        .arg(fixture("models/bert_pylate"))
        .arg("--train")
        .arg(fixture("expected/bert_contrastive.train.jsonl"))
        .arg("--config")
        .arg(&cfg)
        .arg("--output")
        .arg(&out)
        .args(["--epochs", "3", "--json"])
        .arg("--eval-triplets")
        .arg(fixture("data/triplets.parquet")));
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    // The flag (3 epochs of 2 steps) overrides the file (2 epochs).
    assert_eq!(v["steps"], 6);
    assert!(v["eval"]["triplets_accuracy"].is_number(), "{v}");
    assert!(out
        .join("checkpoints/checkpoint-6/trainer_state.json")
        .is_file());
    assert!(out.join("metrics.jsonl").is_file());
    // The output is a model folder.
    let texts = dir.path().join("q.txt");
    std::fs::write(&texts, "what is a trait\n").unwrap();
    let npz = dir.path().join("q.npz");
    let (ok, _, stderr) = run(latte()
        .args(["encode", "--queries", "--model"])
        .arg(&out)
        .arg("--input")
        .arg(&texts)
        .arg("--output")
        .arg(&npz));
    assert!(ok, "{stderr}");
    assert!(npz.is_file());
    // --resume picks the newest checkpoint; with the same number of epochs there is nothing left to do.
    let (ok, stdout, stderr) = run(latte()
        .args(["train", "--model"])
        .arg(fixture("models/bert_pylate"))
        .arg("--train")
        .arg(fixture("expected/bert_contrastive.train.jsonl"))
        .arg("--config")
        .arg(&cfg)
        .arg("--output")
        .arg(&out)
        .args(["--epochs", "4", "--resume", "--json"]));
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["steps"], 8);
}

#[test]
fn distillation_from_pylate_layout() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kd");
    let (ok, stdout, stderr) = run(latte()
        .args(["train", "--loss", "distillation", "--model"])
        .arg(fixture("models/bert_dense_chain"))
        .arg("--train")
        .arg(fixture("data/kd_train.jsonl"))
        .arg("--queries")
        .arg(fixture("data/kd_queries.jsonl"))
        .arg("--documents")
        .arg(fixture("data/kd_documents.jsonl"))
        .args(["--n-ways", "3", "--batch-size", "2", "--json", "--output"])
        .arg(&out)
        .arg("--eval-distillation")
        .arg(fixture("data/kd_inline.parquet")));
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["steps"], 2);
    assert!(v["eval"]["distillation_kl_divergence"].as_f64().unwrap() > 0.0);
}

#[test]
fn train_with_dtype_bf16_writes_an_f32_model_that_differs_from_f32_training() {
    // `--dtype bf16`: the same steps with bf16 products; the model written is f32 and loads as any other.
    let dir = tempfile::tempdir().unwrap();
    let train = |dtype: &str| -> PathBuf {
        let out = dir.path().join(dtype);
        let (ok, stdout, stderr) = run(latte()
            .args(["train", "--model"])
            .arg(fixture("models/bert_pylate"))
            .arg("--train")
            .arg(fixture("expected/bert_contrastive.train.jsonl"))
            .args([
                "--batch-size",
                "2",
                "--epochs",
                "2",
                "--lr",
                "1e-3",
                "--no-dropout",
            ])
            .args(["--dtype", dtype, "--json", "--output"])
            .arg(&out));
        assert!(ok, "{dtype}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(v["loss"].as_f64().is_some_and(f64::is_finite), "{v}");
        out
    };
    let (a, b) = (train("f32"), train("bf16"));
    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model.safetensors")).unwrap();
    assert_eq!(wa.len(), wb.len(), "same f32 tensors");
    assert_ne!(wa, wb, "bf16 products change the trained weights");
}

#[test]
fn train_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("models/bert_pylate");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--train".into(),
                fixture("expected/bert_contrastive.train.jsonl")
                    .display()
                    .to_string(),
            ],
            "--output is required",
        ),
        (
            vec![
                "--train".into(),
                fixture("expected/bert_contrastive.train.jsonl")
                    .display()
                    .to_string(),
                "--loss".into(),
                "triplet".into(),
                "--output".into(),
                dir.path().join("x").display().to_string(),
            ],
            "unknown loss \"triplet\"",
        ),
        (
            vec![
                "--train".into(),
                fixture("data/kd_inline.parquet").display().to_string(),
                "--output".into(),
                dir.path().join("y").display().to_string(),
            ],
            "use --loss distillation",
        ),
        (
            vec![
                "--train".into(),
                fixture("expected/bert_contrastive.train.jsonl")
                    .display()
                    .to_string(),
                "--loss".into(),
                "distillation".into(),
                "--output".into(),
                dir.path().join("z").display().to_string(),
            ],
            "needs teacher scores",
        ),
        (
            vec![
                "--train".into(),
                dir.path().join("missing.jsonl").display().to_string(),
                "--output".into(),
                dir.path().join("w").display().to_string(),
            ],
            "missing.jsonl",
        ),
        (
            vec![
                "--train".into(),
                fixture("expected/bert_contrastive.train.jsonl")
                    .display()
                    .to_string(),
                "--dtype".into(),
                "int8".into(),
                "--output".into(),
                dir.path().join("v").display().to_string(),
            ],
            "training runs in f32 or bf16",
        ),
    ];
    for (args, want) in cases {
        let (ok, _, stderr) = run(latte().args(["train", "--model"]).arg(&model).args(&args));
        assert!(!ok && stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn mine_writes_triplets_with_hard_negatives() {
    let dir = tempfile::tempdir().unwrap();
    let docs = [
        "Cargo is the Rust build system and package manager.",
        "Traits define shared behaviour for types.",
        "Closures are anonymous functions that capture their environment.",
        "Vectors store values of the same type next to each other in memory.",
        "Lifetimes make sure references stay valid.",
    ];
    let mut corpus = String::new();
    let mut queries = String::new();
    let mut qrels = String::from("query-id\tcorpus-id\tscore\n");
    for (i, d) in docs.iter().enumerate() {
        corpus += &format!("{{\"_id\": \"d{i}\", \"title\": \"\", \"text\": \"{d}\"}}\n");
        queries += &format!("{{\"_id\": \"q{i}\", \"text\": \"about {d}\"}}\n");
        qrels += &format!("q{i}\td{i}\t1\n");
    }
    std::fs::write(dir.path().join("corpus.jsonl"), corpus).unwrap();
    std::fs::write(dir.path().join("queries.jsonl"), queries).unwrap();
    std::fs::create_dir(dir.path().join("qrels")).unwrap();
    std::fs::write(dir.path().join("qrels/train.tsv"), qrels).unwrap();
    let out = dir.path().join("triplets.jsonl");
    let (ok, _, stderr) = run(latte()
        .args(["mine", "--model"])
        .arg(fixture("models/bert_pylate"))
        .arg("--dataset")
        .arg(dir.path())
        .args(["--negatives", "2", "--output"])
        .arg(&out));
    assert!(ok, "{stderr}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 5);
    for (i, line) in text.lines().enumerate() {
        assert!(line.starts_with("{\"query\": "), "{line}");
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["positive"], docs[i]);
        let (n1, n2) = (
            v["negative_1"].as_str().unwrap(),
            v["negative_2"].as_str().unwrap(),
        );
        assert!(n1 != docs[i] && n2 != docs[i] && n1 != n2, "{line}");
    }
    // The written file is valid training data as is.
    let (ok, _, stderr) = run(latte()
        .args(["train", "--batch-size", "5", "--max-steps", "1", "--model"])
        .arg(fixture("models/bert_pylate"))
        .arg("--train")
        .arg(&out)
        .arg("--output")
        .arg(dir.path().join("m")));
    assert!(ok, "{stderr}");
}

//! `dtype` bf16 and int8 against f32 on every fixture model: same shapes, mean per-token cosine ≥ 0.999
//! (bf16) and ≥ 0.995 (int8), at the best kernel level of this CPU and, in subprocesses, with
//! `LATTE_SIMD=portable` and `LATTE_SIMD=avx2`. The observed values and the levels are printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use latte_models::{ColBERT, Dtype, Embedding, EncodeOptions, LoadOptions};

const CHILD: &str = "LATTE_DTYPE_TEST_CHILD";

fn models() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixture models in {}", dir.display());
    v
}

fn texts() -> Vec<String> {
    [
        "Ownership is a set of rules that govern how a Rust program manages memory.",
        "A crate is the smallest amount of code that the Rust compiler considers at a time.",
        "x",
        "Traits define shared behaviour; generics let one function work on many types, and lifetimes \
         make sure references stay valid as long as they are used, which the borrow checker verifies.",
        "The quick brown fox jumps over the lazy dog 0123456789 times.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn encode(model: &ColBERT, texts: &[String], is_query: bool) -> Vec<Embedding> {
    let opts = EncodeOptions {
        batch_size: 2,
        show_progress: Some(false),
        ..Default::default()
    };
    model.encode(texts, is_query, &opts).unwrap()
}

/// Mean over tokens of the cosine between corresponding token vectors; the shapes must agree.
fn mean_cosine(a: &[Embedding], b: &[Embedding]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut sum, mut count) = (0f64, 0usize);
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "shapes differ");
        for (u, v) in x.data.chunks(x.cols).zip(y.data.chunks(y.cols)) {
            let dot: f64 = u.iter().zip(v).map(|(p, q)| *p as f64 * *q as f64).sum();
            let nu: f64 = u.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            let nv: f64 = v.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            sum += if nu == 0.0 && nv == 0.0 {
                1.0
            } else {
                dot / (nu * nv).max(f64::MIN_POSITIVE)
            };
            count += 1;
        }
    }
    sum / count.max(1) as f64
}

fn check_here() {
    let texts = texts();
    let (bl, il) = (
        latte_kernels::lowp::bf16_level(),
        latte_kernels::lowp::i8_level(),
    );
    println!(
        "dtype test at kernel level {:?} (bf16 kernels: {bl:?}, int8 kernels: {il:?})",
        latte_kernels::level()
    );
    for dir in models() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut model = ColBERT::load_dir(&dir, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.dtype(), Dtype::F32);
        for is_query in [false, true] {
            model.set_dtype(Dtype::F32);
            let want = encode(&model, &texts, is_query);
            let mut line = format!("{name:<22} {:<5}", if is_query { "query" } else { "doc" });
            for (dtype, gate) in [(Dtype::Bf16, 0.999), (Dtype::Int8, 0.995)] {
                model.set_dtype(dtype);
                let got = encode(&model, &texts, is_query);
                let cos = mean_cosine(&got, &want);
                line += &format!("  {dtype}: {cos:.6}");
                assert!(
                    cos >= gate,
                    "{name} ({}): {dtype} mean per-token cosine {cos} < {gate}",
                    if is_query { "queries" } else { "documents" }
                );
            }
            println!("{line}");
        }
        // Opting back in to f32 gives the f32 embeddings again.
        model.set_dtype(Dtype::F32);
        assert_eq!(encode(&model, &texts, false), encode(&model, &texts, false));
    }
}

#[test]
fn bf16_and_int8_track_f32_on_every_fixture_model_at_every_level() {
    check_here();
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for cap in ["portable", "avx2"] {
        let out = Command::new(&exe)
            .args([
                "--exact",
                "bf16_and_int8_track_f32_on_every_fixture_model_at_every_level",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("LATTE_SIMD", cap)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        println!("--- LATTE_SIMD={cap} ---\n{text}");
        assert!(
            out.status.success(),
            "LATTE_SIMD={cap}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("dtype test at kernel level"), "{text}");
    }
}

#[test]
fn training_takes_bf16_and_refuses_int8() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/bert_pylate");
    let load = |dtype| {
        let opts = LoadOptions {
            dtype,
            ..Default::default()
        };
        ColBERT::load_dir(&dir, &opts).unwrap()
    };
    let int8 = load(Dtype::Int8);
    assert_eq!(int8.dtype(), Dtype::Int8);
    let toks = int8.tokenize(&texts()[..1], false).unwrap();
    let err = int8
        .forward_tokens(&toks, latte_models::Mode::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("int8") && err.contains("f32 or bf16"), "{err}");
    assert!(int8
        .forward_tokens(&toks, latte_models::Mode::Infer)
        .is_ok());
    // bf16 trains (bf16 products, f32 weights): its training forward pass runs.
    let bf16 = load(Dtype::Bf16);
    let f32m = load(Dtype::F32);
    let a = bf16
        .forward_tokens(&toks, latte_models::Mode::Train)
        .unwrap();
    let b = f32m
        .forward_tokens(&toks, latte_models::Mode::Train)
        .unwrap();
    assert_eq!(a.0.dims(), b.0.dims());
}

//! Parity with PyLate 1.6.0 on the golden fixtures made by `scripts/make_fixtures.py`: every loading
//! path, Dense variant and backbone, compared on resolved settings, module lists, token ids and
//! embeddings (max abs diff ≤ 1e-5; ≤ 1e-4 for the XLM-RoBERTa, jina flash and Gemma 3 cases of
//! `scripts/make_backbone_fixtures.py`, as the backbones issue asks).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use latte_models::{ColBERT, EncodeOptions, LoadOptions, PartialSettings};
use serde_json::Value;

const TOL: f32 = 1e-5;
/// Tolerance of the cases made by `scripts/make_backbone_fixtures.py`.
const BACKBONE_TOL: f32 = 1e-4;

fn tolerance(name: &str) -> f32 {
    if ["xlmr_", "jina_", "gemma_"]
        .iter()
        .any(|p| name.starts_with(p))
    {
        BACKBONE_TOL
    } else {
        TOL
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Case {
    json: Value,
    tensors: HashMap<String, Tensor>,
    model: ColBERT,
}

fn load_case(name: &str) -> Case {
    let dir = fixtures();
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("expected/{name}.json"))).unwrap(),
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(
        dir.join(format!("expected/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let kw = &json["kwargs"];
    let s = |k: &str| kw.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let u = |k: &str| kw.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    let b = |k: &str| kw.get(k).and_then(|v| v.as_bool());
    let opts = LoadOptions {
        settings: PartialSettings {
            query_prefix: s("query_prefix"),
            document_prefix: s("document_prefix"),
            query_length: u("query_length"),
            document_length: u("document_length"),
            do_query_expansion: b("do_query_expansion"),
            attend_to_expansion_tokens: b("attend_to_expansion_tokens"),
            skiplist_words: kw
                .get("skiplist_words")
                .map(|v| serde_json::from_value(v.clone()).unwrap()),
        },
        embedding_size: u("embedding_size"),
        bias: b("bias").unwrap_or(false),
        ..Default::default()
    };
    let model_dir = dir.join(json["model"].as_str().unwrap());
    let model = ColBERT::load_dir(&model_dir, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    Case {
        json,
        tensors,
        model,
    }
}

fn texts(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn check_settings(name: &str, c: &Case) {
    let r = &c.json["resolved"];
    let s = c.model.settings();
    assert_eq!(
        s.query_prefix,
        r["query_prefix"].as_str().unwrap(),
        "{name}"
    );
    assert_eq!(
        s.document_prefix,
        r["document_prefix"].as_str().unwrap(),
        "{name}"
    );
    assert_eq!(
        s.query_length as u64,
        r["query_length"].as_u64().unwrap(),
        "{name}"
    );
    assert_eq!(
        s.document_length as u64,
        r["document_length"].as_u64().unwrap(),
        "{name}"
    );
    assert_eq!(
        s.do_query_expansion,
        r["do_query_expansion"].as_bool().unwrap(),
        "{name}"
    );
    assert_eq!(
        s.attend_to_expansion_tokens,
        r["attend_to_expansion_tokens"].as_bool().unwrap(),
        "{name}"
    );
    assert_eq!(
        c.model.query_prefix_id().map(u64::from),
        r["query_prefix_id"].as_u64(),
        "{name}"
    );
    assert_eq!(
        c.model.document_prefix_id().map(u64::from),
        r["document_prefix_id"].as_u64(),
        "{name}"
    );
    let skip: HashSet<u32> = r["skiplist"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(c.model.skiplist(), &skip, "{name}: skiplist ids");
    assert_eq!(
        c.model.pad_id() as u64,
        r["pad_token_id"].as_u64().unwrap(),
        "{name}: pad id"
    );
    assert_eq!(
        c.model.transformer.tokenizer_len() as u64,
        r["tokenizer_len"].as_u64().unwrap(),
        "{name}: len(tokenizer)"
    );
    assert_eq!(
        c.model.transformer.embedding_rows() as u64,
        r["embedding_rows"].as_u64().unwrap(),
        "{name}: embedding rows"
    );
}

fn check_modules(name: &str, c: &Case) {
    let mods = c.json["modules"].as_array().unwrap();
    assert_eq!(c.model.len(), mods.len(), "{name}: module count");
    for (d, m) in c.model.denses.iter().zip(&mods[1..]) {
        let cfg = d.config();
        assert_eq!(
            cfg.in_features as u64,
            m["in_features"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            cfg.out_features as u64,
            m["out_features"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(cfg.bias, m["bias"].as_bool().unwrap(), "{name}");
        assert_eq!(
            cfg.activation_function,
            m["activation_function"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            cfg.use_residual,
            m["use_residual"].as_bool().unwrap(),
            "{name}"
        );
    }
    // The Display lists the same modules as PyLate's repr (max_seq_length aside, which PyLate mutates).
    let ours = c.model.to_string();
    let theirs: &str = c.json["repr"].as_str().unwrap();
    let strip = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l: &str| match l.find("'max_seq_length'") {
                Some(i) => {
                    let rest: &str = &l[i..];
                    let tail: &str = rest.find(',').map(|j| &rest[j..]).unwrap_or("");
                    format!("{}{}", &l[..i], tail)
                }
                None => l.to_string(),
            })
            .collect()
    };
    assert_eq!(strip(&ours), strip(theirs), "{name}: repr");
}

fn check_ids(name: &str, c: &Case) {
    for (key, is_query) in [("queries", true), ("documents", false)] {
        let texts = texts(&c.json[key]);
        let toks = c.model.tokenize(&texts, is_query).unwrap();
        let p = if is_query { "query" } else { "doc" };
        for (i, t) in toks.iter().enumerate() {
            assert_eq!(
                t.ids,
                ids(&c.tensors[&format!("{p}_ids.{i}")]),
                "{name}: {p} {i} ids ({:?})",
                texts[i]
            );
            assert_eq!(
                t.mask,
                ids(&c.tensors[&format!("{p}_mask.{i}")]),
                "{name}: {p} {i} mask"
            );
        }
    }
}

/// The `prompt_name` the fixture encoded queries or documents with.
fn prompt_name(c: &Case, is_query: bool) -> Option<String> {
    let key = if is_query {
        "query_encode_kwargs"
    } else {
        "doc_encode_kwargs"
    };
    c.json
        .get(key)
        .and_then(|k| k.get("prompt_name"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

fn check_embeddings(name: &str, c: &Case) {
    let tol = tolerance(name);
    let mut worst = 0f32;
    for (key, is_query) in [("queries", true), ("documents", false)] {
        let opts = EncodeOptions {
            batch_size: 3,
            show_progress: Some(false),
            prompt_name: prompt_name(c, is_query),
            ..Default::default()
        };
        let texts = texts(&c.json[key]);
        let embs = c.model.encode(&texts, is_query, &opts).unwrap();
        let p = if is_query { "query" } else { "doc" };
        for (i, e) in embs.iter().enumerate() {
            let want = &c.tensors[&format!("{p}_emb.{i}")];
            let dims = want.dims();
            let (rows, cols) = if dims.len() == 2 {
                (dims[0], dims[1])
            } else {
                (0, e.cols)
            };
            assert_eq!(
                (e.rows, e.cols),
                (rows, cols),
                "{name}: {p} {i} shape ({:?})",
                texts[i]
            );
            if rows == 0 {
                continue;
            }
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let diff = e
                .data
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst = worst.max(diff);
            assert!(
                diff <= tol,
                "{name}: {p} {i} max abs diff {diff} ({:?})",
                texts[i]
            );
        }
    }
    eprintln!("{name}: max abs diff {worst:e}");
}

fn run(name: &str) {
    let c = load_case(name);
    check_settings(name, &c);
    check_modules(name, &c);
    check_ids(name, &c);
    if c.json["exact"].as_bool().unwrap() {
        check_embeddings(name, &c);
    } else {
        // Random parts differ by construction; shapes must still agree.
        let texts = texts(&c.json["documents"]);
        let embs = c
            .model
            .encode(&texts, false, &EncodeOptions::default())
            .unwrap();
        for (i, e) in embs.iter().enumerate() {
            let want = c.tensors[&format!("doc_emb.{i}")].dims().to_vec();
            assert_eq!(vec![e.rows, e.cols], want, "{name}: doc {i} shape");
        }
    }
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { run(stringify!($name)); } )* };
}

cases!(
    bert_pylate,
    bert_pylate_noexp,
    bert_pylate_attend,
    bert_dense_chain,
    bert_dense_acts,
    bert_st_dense,
    bert_st_dense_default,
    bert_plain_hf,
    bert_plain_hf_inv,
    bert_stanford_st,
    bert_stanford_bin,
    bert_f16_sharded,
    bert_bin,
    modernbert_pylate,
    modernbert_noexp,
    xlmr_pylate,
    jina_flash,
    gemma_st,
    gemma_prompts,
    gemma_noprompt,
);

#[test]
fn every_fixture_case_is_tested() {
    let listed: HashSet<&str> = [
        "bert_pylate",
        "bert_pylate_noexp",
        "bert_pylate_attend",
        "bert_dense_chain",
        "bert_dense_acts",
        "bert_st_dense",
        "bert_st_dense_default",
        "bert_plain_hf",
        "bert_plain_hf_inv",
        "bert_stanford_st",
        "bert_stanford_bin",
        "bert_f16_sharded",
        "bert_bin",
        "modernbert_pylate",
        "modernbert_noexp",
        "xlmr_pylate",
        "jina_flash",
        "gemma_st",
        "gemma_prompts",
        "gemma_noprompt",
    ]
    .into_iter()
    .collect();
    for e in std::fs::read_dir(fixtures().join("expected")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            assert!(listed.contains(stem.as_str()), "fixture {stem} has no test");
        }
    }
}

/// `truncate_dim` keeps the first dimensions of PyLate's vectors and re-normalises them.
#[test]
fn jina_flash_truncate_dim() {
    let mut c = load_case("jina_flash");
    c.model.set_truncate_dim(Some(8)).unwrap();
    assert_eq!(c.model.output_dim(), 8);
    let opts = EncodeOptions {
        batch_size: 3,
        show_progress: Some(false),
        ..Default::default()
    };
    for (key, is_query) in [("queries", true), ("documents", false)] {
        let texts = texts(&c.json[key]);
        let embs = c.model.encode(&texts, is_query, &opts).unwrap();
        let p = if is_query { "query" } else { "doc" };
        for (i, e) in embs.iter().enumerate() {
            let want = &c.tensors[&format!("{p}_emb.{i}")];
            if want.dims().len() != 2 {
                assert_eq!(e.rows, 0);
                continue;
            }
            let full: Vec<Vec<f32>> = want.to_vec2().unwrap();
            assert_eq!((e.rows, e.cols), (full.len(), 8), "{p} {i}");
            for (r, row) in full.iter().enumerate() {
                let head = &row[..8];
                let norm = head.iter().map(|v| v * v).sum::<f32>().sqrt();
                for (a, b) in e.row(r).iter().zip(head) {
                    assert!((a - b / norm).abs() <= BACKBONE_TOL, "{p} {i} row {r}");
                }
            }
        }
    }
    assert!(c.model.set_truncate_dim(Some(17)).is_err());
    assert!(c.model.set_truncate_dim(Some(0)).is_err());
}

/// Prompts are looked up by name; an unknown name is an error naming the known ones.
#[test]
fn gemma_prompt_names() {
    let c = load_case("gemma_prompts");
    assert_eq!(
        c.model.prompt("query").unwrap(),
        "task: search result | query: "
    );
    let err = c.model.prompt("nope").unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("document"), "{err}");
    let opts = EncodeOptions {
        prompt_name: Some("nope".into()),
        show_progress: Some(false),
        ..Default::default()
    };
    assert!(c.model.encode(&["x".to_string()], true, &opts).is_err());
    // An explicit prompt wins over the name; no prompt at all differs from the named one.
    let with = |o: EncodeOptions| c.model.encode(&["borrow".to_string()], false, &o).unwrap();
    let named = with(EncodeOptions {
        prompt_name: Some("document".into()),
        show_progress: Some(false),
        ..Default::default()
    });
    let explicit = with(EncodeOptions {
        prompt: Some("title: none | text: ".into()),
        prompt_name: Some("nope".into()),
        show_progress: Some(false),
        ..Default::default()
    });
    let none = with(EncodeOptions {
        show_progress: Some(false),
        ..Default::default()
    });
    assert_eq!(named, explicit);
    assert_ne!(named[0].rows, none[0].rows);
}

//! Loading edge cases: the Hub cache layout and offline mode, clear errors for bad input, building a
//! model from modules, and save → load round trips.

use std::path::{Path, PathBuf};

use latte_models::{
    Activation, ColBERT, Dense, DenseConfig, EncodeOptions, Error, HubOptions, LoadOptions,
    PartialSettings, Transformer,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn docs() -> Vec<String> {
    vec![
        "Ownership is Rust's most unique feature.".into(),
        "".into(),
        "Traits define shared behavior!".into(),
    ]
}

fn quiet() -> EncodeOptions {
    EncodeOptions {
        show_progress: Some(false),
        ..Default::default()
    }
}

#[test]
fn hub_id_resolves_from_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--acme--tiny-colbert");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(
        &fixture("bert_pylate"),
        &repo.join("snapshots").join(commit),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let opts = LoadOptions {
        hub: HubOptions {
            cache_dir: Some(cache.path().to_path_buf()),
            offline: Some(true),
            ..Default::default()
        },
        ..Default::default()
    };
    let from_hub = ColBERT::load("acme/tiny-colbert", &opts).unwrap();
    let local = ColBERT::load(
        fixture("bert_pylate").to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let a = from_hub.encode(&docs(), false, &quiet()).unwrap();
    let b = local.encode(&docs(), false, &quiet()).unwrap();
    assert_eq!(a, b);
    // A commit hash works as a revision too.
    let by_commit = LoadOptions {
        hub: HubOptions {
            revision: Some(commit.into()),
            ..opts.hub.clone()
        },
        ..Default::default()
    };
    assert!(ColBERT::load("acme/tiny-colbert", &by_commit).is_ok());
    // Unknown repository, offline: a clear error naming the cache.
    let err = ColBERT::load("acme/missing", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("acme/missing") && err.contains("offline"),
        "{err}"
    );
}

#[test]
fn missing_weights_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("bert_plain_hf"), dir.path());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = ColBERT::load_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("model weights"),
        "{msg}"
    );
}

#[test]
fn missing_config_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = ColBERT::load_dir(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("transformer configuration"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_lists_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("bert_plain_hf"), dir.path());
    let cfg = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["model_type"] = "gpt_neox".into();
    v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let err = ColBERT::load_dir(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gpt_neox") && err.contains("bert, modernbert"),
        "{err}"
    );
}

#[test]
fn dense_weights_that_do_not_match_config_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("bert_pylate"), dir.path());
    let cfg = dir.path().join("1_Dense/config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"out_features\": 16", "\"out_features\": 20");
    std::fs::write(&cfg, text).unwrap();
    let err = ColBERT::load_dir(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1_Dense") && err.contains("do not match"),
        "{err}"
    );
}

#[test]
fn unknown_activation_is_a_clear_error() {
    let err = Activation::from_torch_name("torch.nn.modules.activation.Frobnicate")
        .unwrap_err()
        .to_string();
    assert!(err.contains("Frobnicate") && err.contains("Tanh"), "{err}");
    for name in [
        "torch.nn.modules.activation.GELU",
        "torch.nn.Tanh",
        "Identity",
    ] {
        let a = Activation::from_torch_name(name).unwrap();
        assert_eq!(Activation::from_torch_name(a.torch_name()).unwrap(), a);
    }
}

#[test]
fn build_append_remove_and_display() {
    let dev = candle_core::Device::Cpu;
    let t = Transformer::load(&fixture("bert_plain_hf"), &dev).unwrap();
    let d1 = Dense::random(
        &DenseConfig {
            in_features: 32,
            out_features: 48,
            bias: true,
            activation_function: "torch.nn.modules.activation.GELU".into(),
            use_residual: false,
        },
        1,
        &dev,
    )
    .unwrap();
    let d2 = Dense::random(
        &DenseConfig {
            in_features: 48,
            out_features: 16,
            bias: false,
            activation_function: "torch.nn.modules.activation.Tanh".into(),
            use_residual: true,
        },
        2,
        &dev,
    )
    .unwrap();
    let settings = PartialSettings {
        query_length: Some(10),
        document_length: Some(20),
        ..Default::default()
    };
    let mut m = ColBERT::from_modules(t, vec![d1, d2], settings).unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!(m.embedding_dim(), 16);
    let shown = m.to_string();
    assert!(
        shown.starts_with("ColBERT(\n  (0): Transformer("),
        "{shown}"
    );
    assert!(shown.contains("(2): Dense({'in_features': 48, 'out_features': 16, 'bias': False, 'activation_function': 'torch.nn.modules.activation.Tanh', 'use_residual': True})"), "{shown}");
    let q = m
        .encode(&["what is a trait".into()], true, &quiet())
        .unwrap();
    assert_eq!((q[0].rows, q[0].cols), (10, 16));
    // Appending a layer with the wrong input size is refused; the right one works.
    let wrong = Dense::random(
        &DenseConfig {
            in_features: 8,
            out_features: 4,
            bias: false,
            activation_function: "Identity".into(),
            use_residual: false,
        },
        3,
        &dev,
    )
    .unwrap();
    assert!(matches!(m.push_dense(wrong), Err(Error::Shape { .. })));
    let right = Dense::random(
        &DenseConfig {
            in_features: 16,
            out_features: 8,
            bias: false,
            activation_function: "Identity".into(),
            use_residual: false,
        },
        4,
        &dev,
    )
    .unwrap();
    m.push_dense(right).unwrap();
    assert_eq!(m.embedding_dim(), 8);
    // Removing the middle layer would break the chain (48 → 16 expects 48 inputs from 32): refused, unchanged.
    assert!(m.remove_module(1).is_err());
    assert_eq!(m.len(), 4);
    assert!(m.remove_module(0).is_err());
    let last = m.remove_module(3).unwrap();
    assert_eq!(last.out_features(), 8);
    assert_eq!(m.embedding_dim(), 16);
}

#[test]
fn save_then_load_gives_identical_embeddings_for_every_path() {
    for name in [
        "bert_stanford_st",
        "bert_stanford_bin",
        "bert_st_dense",
        "bert_dense_acts",
        "modernbert_pylate",
        "bert_f16_sharded",
        "bert_plain_hf",
        "xlmr_pylate",
        "jina_flash",
        "gemma_st",
    ] {
        let m = ColBERT::load_dir(&fixture(name), &LoadOptions::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("saved");
        m.save(&target).unwrap();
        for f in [
            "modules.json",
            "config_sentence_transformers.json",
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "1_Dense/config.json",
            "1_Dense/model.safetensors",
        ] {
            assert!(target.join(f).is_file(), "{name}: {f} missing");
        }
        let back = ColBERT::load_dir(&target, &LoadOptions::default()).unwrap();
        assert_eq!(back.settings(), m.settings(), "{name}");
        assert_eq!(back.len(), m.len(), "{name}");
        for is_query in [true, false] {
            let a = m.encode(&docs(), is_query, &quiet()).unwrap();
            let b = back.encode(&docs(), is_query, &quiet()).unwrap();
            assert_eq!(a, b, "{name}: is_query={is_query}");
        }
        // Saving over an existing folder replaces it.
        m.save(&target).unwrap();
        assert!(ColBERT::load_dir(&target, &LoadOptions::default()).is_ok());
    }
}

#[test]
fn embedding_size_appends_a_projection() {
    let opts = LoadOptions {
        embedding_size: Some(8),
        ..Default::default()
    };
    let m = ColBERT::load_dir(&fixture("bert_pylate"), &opts).unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!(m.embedding_dim(), 8);
    let e = m.encode(&docs(), false, &quiet()).unwrap();
    assert_eq!(e[0].cols, 8);
    // Every kept vector is unit-norm.
    for r in 0..e[0].rows {
        let n: f32 = e[0].row(r).iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-5);
    }
}

#[test]
fn training_view_shares_the_forward_code_and_gets_gradients() {
    let m = ColBERT::load_dir(&fixture("modernbert_pylate"), &LoadOptions::default()).unwrap();
    let varmap = candle_nn::VarMap::new();
    let t = m.transformer.to_trainable(&varmap, "").unwrap();
    let toks = m.tokenize(&docs(), false).unwrap();
    let (frozen, ids, mask) = m.forward_tokens(&toks, latte_models::Mode::Infer).unwrap();
    let hidden = t.forward(&ids, &mask, latte_models::Mode::Train).unwrap();
    let mut x = hidden;
    for d in &m.denses {
        x = d.forward(&x).unwrap();
    }
    let diff = (&x - &frozen)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff < 1e-4,
        "train-mode forward differs from inference by {diff}"
    );
    let loss = x.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let vars = varmap.all_vars();
    assert!(!vars.is_empty());
    let tok_key = "embeddings.tok_embeddings.weight";
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0 || name == tok_key, "zero gradient for {name}");
    }
}

#[test]
fn unknown_remote_code_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("bert_plain_hf"), dir.path());
    let cfg = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["model_type"] = "jina_bert".into();
    v["architectures"] = serde_json::json!(["JinaBertModel"]);
    v["auto_map"] = serde_json::json!({"AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel"});
    std::fs::write(&cfg, v.to_string()).unwrap();
    let err = ColBERT::load_dir(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("jina_bert") && err.contains("remote code") && err.contains("xlm-roberta"),
        "{err}"
    );
}

#[test]
fn truncate_dim_is_a_load_option() {
    let opts = LoadOptions {
        truncate_dim: Some(12),
        ..Default::default()
    };
    let m = ColBERT::load_dir(&fixture("jina_flash"), &opts).unwrap();
    assert_eq!(
        (m.truncate_dim(), m.output_dim(), m.embedding_dim()),
        (Some(12), 12, 16)
    );
    let e = m.encode(&docs(), false, &quiet()).unwrap();
    assert_eq!(e[0].cols, 12);
    for r in 0..e[0].rows {
        let n: f32 = e[0].row(r).iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-5);
    }
    let too_big = LoadOptions {
        truncate_dim: Some(64),
        ..Default::default()
    };
    let err = ColBERT::load_dir(&fixture("jina_flash"), &too_big)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncate_dim 64"), "{err}");
}

/// The new backbones train through the same code: train-mode forward equals inference, and every used
/// weight gets a gradient.
#[test]
fn xlmr_flash_and_gemma_train_mode_matches_and_has_gradients() {
    for name in ["jina_flash", "gemma_st", "xlmr_pylate"] {
        let m = ColBERT::load_dir(&fixture(name), &LoadOptions::default()).unwrap();
        let varmap = candle_nn::VarMap::new();
        let t = m.transformer.to_trainable(&varmap, "").unwrap();
        let toks = m.tokenize(&docs(), true).unwrap();
        let (frozen, ids, mask) = m.forward_tokens(&toks, latte_models::Mode::Infer).unwrap();
        let mut x = t.forward(&ids, &mask, latte_models::Mode::Train).unwrap();
        for d in &m.denses {
            x = d.forward(&x).unwrap();
        }
        let diff = (&x - &frozen)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{name}: train-mode forward differs by {diff}");
        let loss = x.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (wname, var) in varmap.data().lock().unwrap().iter() {
            if wname.starts_with("pooler.") {
                continue;
            }
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {wname}"));
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{name}: zero gradient for {wname}");
        }
    }
}

/// A PyLate folder that lost its `modules.json` must not load as a bare encoder with a random projection.
#[test]
fn lost_modules_json_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("bert_pylate"), dir.path());
    std::fs::remove_file(dir.path().join("modules.json")).unwrap();
    let err = ColBERT::load_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    match &err {
        Error::MissingFile { path, .. } => assert_eq!(path, &dir.path().join("modules.json")),
        other => panic!("expected MissingFile, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("modules.json"), "{msg}");
    assert!(msg.contains("config_sentence_transformers.json"), "{msg}");
    assert!(msg.contains("1_Dense/"), "{msg}");

    // A Dense folder alone is enough to refuse.
    std::fs::remove_file(dir.path().join("config_sentence_transformers.json")).unwrap();
    let msg = ColBERT::load_dir(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("modules.json") && msg.contains("1_Dense/"),
        "{msg}"
    );
    assert!(!msg.contains("config_sentence_transformers.json"), "{msg}");

    // The config alone too.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("bert_plain_hf"), dir.path());
    std::fs::write(dir.path().join("config_sentence_transformers.json"), "{}").unwrap();
    let msg = ColBERT::load_dir(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("modules.json") && msg.contains("config_sentence_transformers.json"),
        "{msg}"
    );

    // A bare encoder (no sentence-transformers files) still loads with a new projection.
    let model = ColBERT::load_dir(&fixture("bert_plain_hf"), &LoadOptions::default()).unwrap();
    assert_eq!(model.embedding_dim(), 128);
}

/// Without tokenizer_config.json a BERT model gets BertTokenizerFast's special tokens, as transformers'
/// AutoTokenizer gives it (so PyLate loads it): same embeddings as with the file.
#[test]
fn missing_tokenizer_config_uses_the_model_types_defaults() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("bert_pylate"), dir.path());
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let want = ColBERT::load_dir(&fixture("bert_pylate"), &LoadOptions::default()).unwrap();
    let got = ColBERT::load_dir(dir.path(), &LoadOptions::default()).unwrap();
    for is_query in [true, false] {
        let a = want.encode(&docs(), is_query, &quiet()).unwrap();
        let b = got.encode(&docs(), is_query, &quiet()).unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((x.rows, x.cols), (y.rows, y.cols));
            let diff = x
                .data
                .iter()
                .zip(&y.data)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-6, "max abs diff {diff}");
        }
    }
}

/// A model type without default special tokens (ModernBERT) and no tokenizer_config.json: an error
/// naming that file and its folder.
#[test]
fn missing_tokenizer_config_without_defaults_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("modernbert_pylate"), dir.path());
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let err = ColBERT::load_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    match &err {
        Error::MissingFile { path, .. } => {
            assert_eq!(path, &dir.path().join("tokenizer_config.json"))
        }
        other => panic!("expected MissingFile, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("tokenizer_config.json"), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
}

#[test]
fn unknown_hidden_act_is_a_load_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("bert_plain_hf");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["hidden_act"] = "gelu_frobnicate".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let Err(err) = Transformer::load(dir.path(), &candle_core::Device::Cpu) else {
        panic!("an unknown activation must not load");
    };
    let err = err.to_string();
    assert!(
        err.contains("gelu_frobnicate") && err.contains("invalid backbone config"),
        "{err}"
    );
}

/// The tokenizer keeps one truncating copy per maximum length (a clone of the vocabulary per call cost more
/// than encoding a query): every length, used in any order, truncates exactly as a fresh tokenizer does.
#[test]
fn the_tokenizer_truncates_each_length_as_a_fresh_one_in_any_order() {
    let m = ColBERT::load_dir(&fixture("bert_pylate"), &LoadOptions::default()).unwrap();
    let t = m.tokenizer();
    let fresh = |len: usize| {
        latte_models::ColbertTokenizer::new(t.tokenizer.clone(), t.do_lower_case, t.pad_id)
            .encode(&docs(), len, None)
            .unwrap()
    };
    let mut lengths = Vec::new();
    for len in [5, 12, 5, 3, 40, 12, 3] {
        let got = t.encode(&docs(), len, None).unwrap();
        assert_eq!(got, fresh(len), "max_len {len}");
        assert!(got.iter().all(|x| x.ids.len() <= len), "max_len {len}");
        lengths.push(got.iter().map(|x| x.ids.len()).max().unwrap());
    }
    // The lengths really differ (the texts are longer than the short limits).
    assert!(
        lengths[0] < lengths[1] && lengths[3] < lengths[0],
        "{lengths:?}"
    );
}

//! One optimisation step against PyLate 1.6.0 / sentence-transformers (fixtures from
//! `scripts/make_train_fixtures.py`): loss, gradient norm of every parameter, and every parameter after
//! clipping and one AdamW step, to 1e-4.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_nn::VarMap;
use latte_models::{ColBERT, LoadOptions};
use latte_train::data::TrainingData;
use latte_train::optim::{clip_grad_norm, learning_rate, AdamW, AdamWConfig, Schedule};
use latte_train::{Batch, CachedContrastive, Contrastive, Distillation, Loss};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn batch_of(name: &str) -> Batch {
    let data =
        TrainingData::load(&fixtures().join(format!("expected/{name}.train.jsonl"))).unwrap();
    let all: Vec<usize> = (0..data.len()).collect();
    data.batch(&all)
}

fn run_case(name: &str) {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("expected/{name}.json"))).unwrap(),
    )
    .unwrap();
    let expected = candle_core::safetensors::load(
        fixtures().join(format!("expected/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let model_dir = fixtures()
        .join("models")
        .join(meta["model"].as_str().unwrap());
    let model = ColBERT::load_dir(&model_dir, &LoadOptions::default()).unwrap();
    let varmap = VarMap::new();
    let model = model.to_trainable(&varmap).unwrap();
    let data = varmap.data().lock().unwrap().clone();
    let mut params: Vec<(String, candle_core::Var)> = data.into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));

    let args = &meta["loss_args"];
    let temperature = args["temperature"].as_f64().unwrap_or(1.0);
    let contrastive = Contrastive {
        temperature,
        size_average: true,
    };
    let loss: Box<dyn Loss> = match meta["loss"].as_str().unwrap() {
        "contrastive" => Box::new(contrastive),
        "cached-contrastive" => Box::new(CachedContrastive {
            contrastive,
            mini_batch_size: args["mini_batch_size"].as_u64().unwrap() as usize,
        }),
        "distillation" => Box::new(Distillation::default()),
        o => panic!("{o}"),
    };
    let before = params
        .iter()
        .find(|(n, _)| n == "1.linear.weight")
        .unwrap()
        .1
        .as_tensor()
        .copy()
        .unwrap();
    let batch = batch_of(name);
    let out = loss.forward_backward(&model, &batch, &params).unwrap();
    let want_loss = meta["expected_loss"].as_f64().unwrap();
    assert!(
        (out.loss as f64 - want_loss).abs() < 1e-4,
        "{name}: loss {} vs PyLate {want_loss}",
        out.loss
    );

    // Gradient norms (PyLate's CachedContrastive gradients are batch_size x the true ones).
    let scale = meta["pylate_grad_scale"].as_f64().unwrap();
    let noise: Vec<&str> = meta["noise_grad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut checked = 0;
    for ((pname, _), g) in params.iter().zip(&out.grads) {
        let key = format!("grad_norm.{pname}");
        match (expected.get(&key), g) {
            (Some(want), Some(g)) => {
                let want = want.to_scalar::<f32>().unwrap() as f64 / scale;
                let got = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt() as f64;
                if noise.contains(&pname.as_str()) {
                    assert!(
                        got < 1e-5,
                        "{name}: {pname} should have a ~0 gradient, got {got}"
                    );
                } else {
                    assert!(
                        (got - want).abs() <= 1e-4 * want.max(1.0),
                        "{name}: grad norm of {pname}: {got} vs PyLate {want}"
                    );
                }
                checked += 1;
            }
            (None, None) => {}
            (Some(want), None) => {
                let w = want.to_scalar::<f32>().unwrap();
                assert!(
                    w == 0.0,
                    "{name}: {pname} got no gradient, PyLate's norm is {w}"
                );
            }
            (None, Some(_)) => panic!("{name}: {pname} has a gradient in latte but not in PyLate"),
        }
    }
    assert!(checked > 10, "{name}: only {checked} gradients compared");

    // Clip + one AdamW step.
    let hyper = &meta["hyper"];
    let mut grads = out.grads;
    let total = clip_grad_norm(&mut grads, hyper["max_grad_norm"].as_f64().unwrap()).unwrap();
    let want_total = meta["expected_total_grad_norm"].as_f64().unwrap() / scale;
    assert!(
        (total - want_total).abs() <= 1e-4 * want_total.max(1.0),
        "{name}: total grad norm {total} vs {want_total}"
    );
    let mut opt = AdamW::new(AdamWConfig {
        beta1: hyper["betas"][0].as_f64().unwrap(),
        beta2: hyper["betas"][1].as_f64().unwrap(),
        eps: hyper["eps"].as_f64().unwrap(),
        weight_decay: hyper["weight_decay"].as_f64().unwrap(),
    });
    let lr = learning_rate(hyper["lr"].as_f64().unwrap(), Schedule::Linear, 0, 0, 1);
    opt.step(&params, &grads, lr).unwrap();
    let bound = hyper["lr"].as_f64().unwrap() * 1.05;
    let mut worst = 0f32;
    let mut compared = 0;
    let by_name: HashMap<&str, &candle_core::Var> =
        params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    for (key, want) in &expected {
        let Some(pname) = key.strip_prefix("updated.") else {
            continue;
        };
        let got = by_name
            .get(pname)
            .unwrap_or_else(|| panic!("{name}: no latte parameter {pname}"))
            .as_tensor();
        let d = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if noise.contains(&pname) {
            assert!(d as f64 <= 2.0 * bound, "{name}: {pname} moved by {d}");
            continue;
        }
        worst = worst.max(d);
        assert!(d <= 1e-4, "{name}: updated {pname} differs by {d}");
        compared += 1;
    }
    assert!(compared > 10);
    eprintln!(
        "{name}: loss {} (PyLate {want_loss}), worst updated-weight diff {worst:e}",
        out.loss
    );
    // The step really moved the weights (the comparison above is not vacuous).
    let moved = (by_name["1.linear.weight"].as_tensor() - &before)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        moved > 1e-4,
        "{name}: the step did not move the weights ({moved})"
    );
}

#[test]
fn bert_contrastive_step_matches_pylate() {
    run_case("bert_contrastive");
}

#[test]
fn bert_cached_contrastive_step_matches_pylate() {
    run_case("bert_cached_contrastive");
}

#[test]
fn dense_chain_distillation_step_matches_pylate() {
    run_case("bert_chain_distillation");
}

#[test]
fn modernbert_contrastive_without_expansion_matches_pylate() {
    run_case("modernbert_noexp_contrastive");
}

//! The fused training layers against the elementary ops (outputs and every gradient) and, with dropout
//! on, against central differences; on the portable kernels and, where the CPU has it, on AVX-512. (Here
//! rather than beside the ops because the reference is the layers' elementary path.)

use candle_core::{DType, Tensor};
use candle_core::{Device, Var};

use crate::nn::{attention_dropout, qkv_heads, HiddenAct, LayerNorm, Linear, Mode};
use crate::ops::dropout::with_dropout;
use crate::ops::train::{
    bert_layer_on, with_fused_layers, BertLayerParams, Kernels, LayerDropout, QkvParams,
    FORCE_PORTABLE,
};

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = crate::ops::dropout::splitmix(s);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

struct Layer {
    vars: Vec<Var>,
    lin: Vec<Linear>,
    norms: Vec<LayerNorm>,
}

fn layer(h: usize, f: usize, seed: u64) -> Layer {
    let dev = Device::Cpu;
    let mut vars = Vec::new();
    let mut var = |shape: &[usize], scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = values(n, seed + vars.len() as u64, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        let t = Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap();
        vars.push(t.clone());
        t.as_tensor().clone()
    };
    let mut lin = Vec::new();
    for (n, k) in [(h, h), (h, h), (h, h), (h, h), (f, h), (h, f)] {
        let w = var(&[n, k], 2.0 / (k as f32).sqrt(), 0.0);
        let b = var(&[n], 0.2, 0.0);
        lin.push(Linear::new(w, Some(b)));
    }
    let mut norms = Vec::new();
    for _ in 0..2 {
        let w = var(&[h], 0.4, 1.0);
        let b = var(&[h], 0.2, 0.0);
        norms.push(LayerNorm {
            weight: w,
            bias: Some(b),
            eps: 1e-12,
        });
    }
    Layer { vars, lin, norms }
}

fn params(l: &Layer) -> BertLayerParams<'_> {
    BertLayerParams {
        qkv: QkvParams::Separate {
            query: &l.lin[0],
            key: &l.lin[1],
            value: &l.lin[2],
        },
        attn_out: &l.lin[3],
        attn_norm: &l.norms[0],
        inter: &l.lin[4],
        out: &l.lin[5],
        out_norm: &l.norms[1],
        rotary: None,
    }
}

/// The layer written with the elementary training ops (as `Bert::forward` runs it without the fused
/// op), dropout off.
fn reference(l: &Layer, x: &Tensor, bias: &Tensor, heads: usize) -> Tensor {
    let (b, n, h) = x.dims3().unwrap();
    let m = Mode::Train;
    let cache = std::sync::OnceLock::new();
    let (q, k, v) = qkv_heads([&l.lin[0], &l.lin[1], &l.lin[2]], &cache, x, heads, m).unwrap();
    let scale = 1.0 / ((h / heads) as f64).sqrt();
    let bias4 = bias.reshape((b, 1, 1, n)).unwrap();
    let ctx = attention_dropout(&q, &k, &v, scale, &bias4, m, 0.0).unwrap();
    let ctx = ctx.transpose(1, 2).unwrap().reshape((b, n, h)).unwrap();
    let attn = l.lin[3].run(&ctx, m).unwrap();
    let a = l.norms[0].forward(&(attn + x).unwrap(), m).unwrap();
    let i = HiddenAct::Gelu
        .apply(&l.lin[4].run(&a, m).unwrap(), m)
        .unwrap();
    let o = l.lin[5].run(&i, m).unwrap();
    l.norms[1].forward(&(o + a).unwrap(), m).unwrap()
}

fn inputs(b: usize, n: usize, h: usize, lens: &[usize]) -> (Var, Tensor, Tensor) {
    let dev = Device::Cpu;
    let x =
        Var::from_tensor(&Tensor::from_vec(values(b * n * h, 99, 2.0), (b, n, h), &dev).unwrap())
            .unwrap();
    let mut bias = vec![0f32; b * n];
    for (s, &len) in lens.iter().enumerate() {
        for j in len..n {
            bias[s * n + j] = -f32::MAX;
        }
    }
    let bias = Tensor::from_vec(bias, (b, n), &dev).unwrap();
    let r = Tensor::from_vec(values(b * n * h, 5, 2.0), (b, n, h), &dev).unwrap();
    (x, bias, r)
}

fn max_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let m = b.iter().map(|v| v.abs()).fold(0f32, f32::max);
    (d, m)
}

/// Every kernel set this CPU runs.
fn kernels() -> Vec<Kernels> {
    latte_kernels::cpu::levels_here()
        .into_iter()
        .filter(|&l| l <= latte_kernels::Level::Avx512)
        .map(Kernels::f32)
        .collect()
}

const NO_DROPOUT: LayerDropout = LayerDropout {
    attention: 0.0,
    hidden: 0.0,
};

/// How far the fused layer may be from the elementary reference.
struct Tolerance {
    /// Products in bf16 (`latte train --dtype bf16`) instead of f32.
    bf16: bool,
    /// Largest |fused - reference| of the output, relative to its largest magnitude (at least 1).
    output: f32,
    /// The same for every gradient.
    gradient: f32,
    /// Relative error of each gradient as a whole (‖fused - reference‖ / ‖reference‖), where checked.
    gradient_norm: Option<f32>,
}

const F32_EXACT: Tolerance = Tolerance {
    bf16: false,
    output: 1e-4,
    gradient: 2e-4,
    gradient_norm: None,
};

fn check_against_reference(b: usize, n: usize, h: usize, heads: usize, f: usize, lens: &[usize]) {
    compare_with_reference(b, n, h, heads, f, lens, 11, &F32_EXACT)
}

/// The fused layer on every kernel set this CPU runs against the elementary ops: output and the gradient
/// of every input and weight. With bf16 products the output must also differ from f32 (they really ran).
#[allow(clippy::too_many_arguments)]
fn compare_with_reference(
    b: usize,
    n: usize,
    h: usize,
    heads: usize,
    f: usize,
    lens: &[usize],
    seed: u64,
    tol: &Tolerance,
) {
    let l = layer(h, f, seed);
    let (x, bias, r) = inputs(b, n, h, lens);
    let want = reference(&l, x.as_tensor(), &bias, heads);
    let g_want = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for kern in kernels() {
        let kern = if tol.bf16 {
            Kernels::bf16(kern.level)
        } else {
            kern
        };
        let fused = bert_layer_on(
            kern,
            x.as_tensor(),
            &bias,
            &params(&l),
            heads,
            HiddenAct::Gelu,
            NO_DROPOUT,
        )
        .unwrap()
        .expect("the fused op applies");
        let (d, m) = max_diff(&fused, &want);
        assert!(
            d <= tol.output * m.max(1.0) && (!tol.bf16 || d > 0.0),
            "{kern:?}: output differs by {d} (max {m})"
        );
        let g_fused = (&fused * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut all = vec![x.clone()];
        all.extend(l.vars.iter().cloned());
        for (i, v) in all.iter().enumerate() {
            let gf = g_fused.get(v.as_tensor()).expect("fused gradient");
            let gw = g_want.get(v.as_tensor()).expect("reference gradient");
            let (d, m) = max_diff(gf, gw);
            assert!(
                d <= tol.gradient * m.max(1.0),
                "{kern:?}: gradient of tensor {i} {:?} differs by {d} (max {m})",
                v.dims()
            );
            let Some(rel) = tol.gradient_norm else {
                continue;
            };
            // Relative error over the whole gradient (a norm, so one small entry cannot dominate).
            let (a, w) = (
                gf.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                gw.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let num: f32 = a.iter().zip(&w).map(|(a, w)| (a - w) * (a - w)).sum();
            let den: f32 = w.iter().map(|w| w * w).sum();
            if den.sqrt() < 1e-3 * (w.len() as f32).sqrt() {
                // Zero in exact arithmetic (the key bias: softmax ignores a per-row constant); the
                // absolute check above holds it.
                continue;
            }
            assert!(
                num.sqrt() <= rel * den.sqrt().max(1e-6),
                "{kern:?}: gradient of tensor {i} relative error {}",
                num.sqrt() / den.sqrt()
            );
        }
    }
}

#[test]
fn matches_the_elementary_ops_on_a_tiny_layer() {
    // d = 4 (a part of one panel), a padded sequence, rows not a multiple of the tile.
    check_against_reference(2, 5, 8, 2, 12, &[5, 3]);
}

#[test]
fn matches_the_elementary_ops_across_panels_and_depth_blocks() {
    // d = 40 (two panels), f = 72, 3 × 100 tokens: the weight-gradient products run over more than
    // one depth block (KC = 256).
    check_against_reference(3, 100, 80, 2, 72, &[100, 37, 1]);
}

#[test]
fn bf16_products_stay_within_bf16_rounding_of_the_f32_layer() {
    // `latte train --dtype bf16`: the same layer with its six products (forward, input gradient, weight
    // gradient) in bf16 with f32 accumulation; outputs and every gradient within bf16's rounding of the
    // f32 reference, and not the f32 values themselves (the bf16 products really ran).
    let tol = Tolerance {
        bf16: true,
        output: 3e-2,
        gradient: 3e-2,
        gradient_norm: Some(2e-2),
    };
    compare_with_reference(3, 40, 48, 2, 72, &[40, 17, 1], 21, &tol);
}

#[test]
fn dropout_is_deterministic_and_differentiated_through() {
    for kern in kernels() {
        dropout_case(kern);
    }
}

fn dropout_case(kern: Kernels) {
    let (h, heads, f) = (16, 2, 24);
    let l = layer(h, f, 3);
    let (x, bias, r) = inputs(2, 6, h, &[6, 4]);
    let drop = LayerDropout {
        attention: 0.2,
        hidden: 0.3,
    };
    let loss = |seed: u64| -> Tensor {
        with_dropout(Some(seed), || {
            let y = bert_layer_on(
                kern,
                x.as_tensor(),
                &bias,
                &params(&l),
                heads,
                HiddenAct::Gelu,
                drop,
            )
            .unwrap()
            .unwrap();
            (y * &r).unwrap().sum_all().unwrap()
        })
    };
    let value = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    let l7 = loss(7);
    assert_eq!(value(&l7), value(&loss(7)), "same seed, same masks");
    assert_ne!(value(&l7), value(&loss(8)), "another seed, other masks");
    let no_drop = bert_layer_on(
        kern,
        x.as_tensor(),
        &bias,
        &params(&l),
        heads,
        HiddenAct::Gelu,
        drop,
    )
    .unwrap()
    .unwrap();
    let plain = value(&(no_drop * &r).unwrap().sum_all().unwrap());
    assert_ne!(
        plain,
        value(&l7),
        "dropout changes the output inside with_dropout"
    );
    // Directional derivative along a random direction of every parameter, against a central
    // difference with the same masks.
    let grads = l7.backward().unwrap();
    let mut all = vec![x.clone()];
    all.extend(l.vars.iter().cloned());
    let dirs: Vec<Tensor> = all
        .iter()
        .enumerate()
        .map(|(i, v)| {
            Tensor::from_vec(
                values(v.elem_count(), 1000 + i as u64, 2.0),
                v.shape(),
                &Device::Cpu,
            )
            .unwrap()
        })
        .collect();
    let mut analytic = 0f64;
    for (v, dir) in all.iter().zip(&dirs) {
        let g = grads
            .get(v.as_tensor())
            .expect("every tensor gets a gradient");
        analytic += (g * dir)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
    }
    let base: Vec<Tensor> = all.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let eps = 1e-3;
    let at = |sign: f64| -> f64 {
        for ((v, b), dir) in all.iter().zip(&base).zip(&dirs) {
            v.set(&(b + (dir * (sign * eps)).unwrap()).unwrap())
                .unwrap();
        }
        value(&loss(7)) as f64
    };
    let numeric = (at(1.0) - at(-1.0)) / (2.0 * eps);
    let rel = (numeric - analytic).abs() / analytic.abs().max(1.0);
    assert!(
        rel < 1e-2,
        "directional derivative {analytic} vs central difference {numeric}"
    );
}

fn modernbert_case(biases: bool, dropout: f64) {
    use crate::backbone::modernbert::{ModernBert, ModernBertConfig};
    let config: ModernBertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
        "intermediate_size": 24, "local_attention": 4, "global_attn_every_n_layers": 3,
        "norm_bias": biases, "attention_bias": biases, "mlp_bias": biases,
        "attention_dropout": dropout, "mlp_dropout": dropout, "norm_eps": 1e-5
    }))
    .unwrap();
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = ModernBert::load(vb, &config).unwrap();
    let mut names: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (name, v)) in names.iter().enumerate() {
        let (scale, offset) = if name.contains("norm") && name.ends_with("weight") {
            (0.4, 1.0)
        } else {
            (1.0, 0.0)
        };
        let vals: Vec<f32> = values(v.elem_count(), 500 + i as u64, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &dev).unwrap())
            .unwrap();
    }
    let (b, l) = (2, 12);
    let ids: Vec<u32> = (0..b * l).map(|i| ((i * 7 + 3) % 50) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, l), &dev).unwrap();
    // The second sequence has three tokens: its queries past position 4 see no key in their window.
    let mask: Vec<u32> = (0..b * l).map(|i| u32::from(i < l || i % l < 3)).collect();
    let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
    let r = Tensor::from_vec(values(b * l * 16, 77, 2.0), (b, l, 16), &dev).unwrap();
    let run = |fused: bool| {
        with_fused_layers(fused, || {
            with_dropout((dropout > 0.0).then_some(5), || {
                let y = model.forward(&ids, &mask, Mode::Train).unwrap();
                let loss = (&y * &r).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                (y, loss, g)
            })
        })
    };
    let (y_f, loss_f, g_f) = run(true);
    if dropout == 0.0 {
        let (y_e, _, g_e) = run(false);
        let (d, m) = max_diff(&y_f, &y_e);
        assert!(
            d <= 1e-4 * m.max(1.0),
            "biases {biases}: output differs by {d} (max {m})"
        );
        for (name, v) in &names {
            let gf = g_f
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no fused gradient for {name}"));
            let ge = g_e.get(v.as_tensor()).expect("reference gradient");
            let (d, m) = max_diff(gf, ge);
            assert!(
                d <= 2e-4 * m.max(1.0),
                "biases {biases}: gradient of {name} differs by {d} (max {m})"
            );
        }
        return;
    }
    // With dropout: the same masks on a replay, and the gradient along a random direction against a
    // central difference.
    let (_, loss_again, _) = run(true);
    let value = |t: &Tensor| t.to_scalar::<f32>().unwrap() as f64;
    assert_eq!(value(&loss_f), value(&loss_again));
    let dirs: Vec<Tensor> = names
        .iter()
        .enumerate()
        .map(|(i, (_, v))| {
            Tensor::from_vec(values(v.elem_count(), 900 + i as u64, 1.0), v.shape(), &dev).unwrap()
        })
        .collect();
    let mut analytic = 0f64;
    for ((name, v), dir) in names.iter().zip(&dirs) {
        let g = g_f
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        analytic += value(&(g * dir).unwrap().sum_all().unwrap());
    }
    let base: Vec<Tensor> = names
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let eps = 1e-3;
    let at = |sign: f64| -> f64 {
        for (((_, v), b), dir) in names.iter().zip(&base).zip(&dirs) {
            v.set(&(b + (dir * (sign * eps)).unwrap()).unwrap())
                .unwrap();
        }
        value(&run(true).1)
    };
    let numeric = (at(1.0) - at(-1.0)) / (2.0 * eps);
    let rel = (numeric - analytic).abs() / analytic.abs().max(1.0);
    assert!(
        rel < 1e-2,
        "directional derivative {analytic} vs central difference {numeric}"
    );
}

#[test]
fn modernbert_layers_match_the_elementary_ops() {
    // Layer 0 without an attention norm, global and sliding-window layers, queries without a key in
    // their window; without and with biases; on every kernel set.
    for portable in [false, true] {
        FORCE_PORTABLE.with(|c| c.set(portable));
        modernbert_case(false, 0.0);
        modernbert_case(true, 0.0);
    }
    FORCE_PORTABLE.with(|c| c.set(false));
}

#[test]
fn modernbert_dropout_is_replayed_and_differentiated_through() {
    for portable in [false, true] {
        FORCE_PORTABLE.with(|c| c.set(portable));
        modernbert_case(false, 0.2);
    }
    FORCE_PORTABLE.with(|c| c.set(false));
}

#[test]
fn jina_flash_layers_with_rotary_match_the_elementary_ops() {
    use crate::backbone::xlm_roberta::{XlmRobertaFlash, XlmRobertaFlashConfig};
    let dev = Device::Cpu;
    for portable in [false, true] {
        FORCE_PORTABLE.with(|c| c.set(portable));
        let config: XlmRobertaFlashConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 20, "max_position_embeddings": 64
        }))
        .unwrap();
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model = XlmRobertaFlash::load(vb, &config).unwrap();
        let mut names: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, v)) in names.iter().enumerate() {
            let offset = if name.contains("norm") || name.contains("ln") {
                if name.ends_with("weight") {
                    1.0
                } else {
                    0.0
                }
            } else {
                0.0
            };
            let vals: Vec<f32> = values(v.elem_count(), 700 + i as u64, 1.0)
                .into_iter()
                .map(|x| x + offset)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &dev).unwrap())
                .unwrap();
        }
        let (b, l) = (2, 9);
        let ids: Vec<u32> = (0..b * l).map(|i| ((i * 5 + 2) % 40) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, l), &dev).unwrap();
        let mask: Vec<u32> = (0..b * l).map(|i| u32::from(i < l || i % l < 4)).collect();
        let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
        let r = Tensor::from_vec(values(b * l * 16, 31, 2.0), (b, l, 16), &dev).unwrap();
        let run = |fused: bool| {
            with_fused_layers(fused, || {
                let y = model.forward(&ids, &mask, Mode::Train).unwrap();
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g)
            })
        };
        let (y_f, g_f) = run(true);
        let (y_e, g_e) = run(false);
        let (d, m) = max_diff(&y_f, &y_e);
        assert!(d <= 1e-4 * m.max(1.0), "output differs by {d} (max {m})");
        for (name, v) in &names {
            let gf = g_f
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no fused gradient for {name}"));
            let ge = g_e.get(v.as_tensor()).expect("reference gradient");
            let (d, m) = max_diff(gf, ge);
            assert!(
                d <= 2e-4 * m.max(1.0),
                "gradient of {name} differs by {d} (max {m})"
            );
        }
    }
    FORCE_PORTABLE.with(|c| c.set(false));
}

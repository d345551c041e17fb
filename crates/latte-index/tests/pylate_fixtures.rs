//! Parity with PyLate 1.6.0: outputs recorded by `scripts/make_index_fixtures.py` in `tests/fixtures/`.

use latte_index::pool::pool_embeddings_hierarchical;
use latte_index::scores::{colbert_kd_scores, colbert_scores, colbert_scores_pairwise};
use latte_index::{rerank, EmbRef};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn shape<const N: usize>(v: &Value) -> [usize; N] {
    let s: Vec<usize> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    s.try_into().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: got {g}, PyLate {w}"
        );
    }
}

#[test]
fn colbert_scores_match_pylate() {
    let f = load("scores.json");
    let (q, d) = (floats(&f["q"]), floats(&f["d"]));
    let (qs, ds) = (shape::<3>(&f["q_shape"]), shape::<3>(&f["d_shape"]));
    let plain = colbert_scores(&q, qs, &d, ds, None, None).unwrap();
    assert_close(&plain, &floats(&f["plain"]), 1e-5, "plain");
    let (qm, dm) = (floats(&f["queries_mask"]), floats(&f["documents_mask"]));
    let masked = colbert_scores(&q, qs, &d, ds, Some(&qm), Some(&dm)).unwrap();
    assert_close(&masked, &floats(&f["masked"]), 1e-5, "masked");
    assert_ne!(plain, masked);
}

#[test]
fn pairwise_scores_match_pylate() {
    let f = &load("scores.json")["pairwise"];
    let qs: Vec<Vec<f32>> = f["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let ds: Vec<Vec<f32>> = f["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let qr: Vec<EmbRef> = qs.iter().map(|x| EmbRef::new(x, 8).unwrap()).collect();
    let dr: Vec<EmbRef> = ds.iter().map(|x| EmbRef::new(x, 8).unwrap()).collect();
    let got = colbert_scores_pairwise(&qr, &dr).unwrap();
    assert_close(&got, &floats(&f["scores"]), 1e-5, "pairwise");
    assert!(colbert_scores_pairwise(&qr, &dr[..2]).is_err());
}

#[test]
fn kd_scores_match_pylate() {
    let f = &load("scores.json")["kd"];
    let (q, d) = (floats(&f["q"]), floats(&f["d"]));
    let (qs, ds) = (shape::<3>(&f["q_shape"]), shape::<4>(&f["d_shape"]));
    let plain = colbert_kd_scores(&q, qs, &d, ds, None, None).unwrap();
    assert_close(&plain, &floats(&f["plain"]), 1e-5, "kd plain");
    let (qm, dm) = (floats(&f["queries_mask"]), floats(&f["documents_mask"]));
    let masked = colbert_kd_scores(&q, qs, &d, ds, Some(&qm), Some(&dm)).unwrap();
    assert_close(&masked, &floats(&f["masked"]), 1e-5, "kd masked");
}

#[test]
fn rerank_matches_pylate_order_and_scores() {
    let f = load("rerank.json");
    let qs: Vec<Vec<f32>> = f["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let docs: Vec<Vec<Vec<f32>>> = f["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_array().unwrap().iter().map(floats).collect())
        .collect();
    let ids: Vec<Vec<String>> = f["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        })
        .collect();
    let qr: Vec<EmbRef> = qs.iter().map(|x| EmbRef::new(x, 8).unwrap()).collect();
    let dr: Vec<Vec<EmbRef>> = docs
        .iter()
        .map(|c| c.iter().map(|x| EmbRef::new(x, 8).unwrap()).collect())
        .collect();
    let got = rerank(&ids, &qr, &dr).unwrap();
    for (g, w) in got.iter().zip(f["expected"].as_array().unwrap()) {
        let w = w.as_array().unwrap();
        assert_eq!(g.len(), w.len());
        for (gr, wr) in g.iter().zip(w) {
            assert_eq!(gr.id, wr["id"].as_str().unwrap());
            assert!(
                (gr.score - wr["score"].as_f64().unwrap() as f32).abs() < 1e-5,
                "{gr:?} vs {wr}"
            );
        }
    }
}

#[test]
fn pooling_matches_pylate() {
    let f = load("pool.json");
    let dim = f["dim"].as_u64().unwrap() as usize;
    let docs: Vec<Vec<f32>> = f["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    for factor in [2usize, 3] {
        let want: Vec<Vec<f32>> = f[format!("pool_factor_{factor}")]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        for (i, (d, w)) in docs.iter().zip(&want).enumerate() {
            let got = pool_embeddings_hierarchical(d, dim, factor, 1).unwrap();
            assert_close(
                &got,
                w,
                1e-5,
                &format!("pool_factor {factor}, document {i}"),
            );
        }
    }
}

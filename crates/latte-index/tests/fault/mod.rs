//! Shared helpers of the fault-injection tests (`crash.rs`, `corruption.rs`, `malformed.rs`): a deterministic
//! corpus, the expected MaxSim of a document against itself as the index stores it, and a state summary.
#![allow(dead_code)]

use std::collections::BTreeSet;

use latte_index::{EmbRef, IndexConfig, PlaidIndex, SearchParams, VecSource};

pub const DIM: usize = 32;

/// Deterministic pseudo-random numbers (xorshift64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn sym(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

/// A document collection: ids and their token embeddings (`tokens × DIM`, unit rows).
#[derive(Clone)]
pub struct Docs {
    pub ids: Vec<String>,
    pub embs: Vec<Vec<f32>>,
}

impl Docs {
    pub fn source(&self) -> VecSource {
        let mut s = VecSource::new(DIM);
        for (id, e) in self.ids.iter().zip(&self.embs) {
            s.push(id.clone(), e.clone()).unwrap();
        }
        s
    }
    pub fn get(&self, id: &str) -> Option<&[f32]> {
        self.ids
            .iter()
            .position(|x| x == id)
            .map(|i| self.embs[i].as_slice())
    }
    pub fn tokens(&self) -> u64 {
        self.embs.iter().map(|e| (e.len() / DIM) as u64).sum()
    }
}

/// `n` documents `{prefix}{i}` of 3–14 unit tokens scattered around 16 topic directions.
pub fn corpus(n: usize, seed: u64, prefix: &str) -> Docs {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut topics = Rng(0x5EED);
    let centers: Vec<Vec<f32>> = (0..16)
        .map(|_| {
            let mut c: Vec<f32> = (0..DIM).map(|_| topics.sym()).collect();
            normalize(&mut c);
            c
        })
        .collect();
    let mut ids = Vec::with_capacity(n);
    let mut embs = Vec::with_capacity(n);
    for i in 0..n {
        let len = 3 + (rng.next_u64() % 12) as usize;
        let mut d = Vec::with_capacity(len * DIM);
        for _ in 0..len {
            let c = &centers[(rng.next_u64() % 16) as usize];
            let mut t: Vec<f32> = c.iter().map(|x| x + 0.5 * rng.sym()).collect();
            normalize(&mut t);
            d.extend_from_slice(&t);
        }
        ids.push(format!("{prefix}{i}"));
        embs.push(d);
    }
    Docs { ids, embs }
}

pub fn config() -> IndexConfig {
    IndexConfig {
        num_centroids: Some(32),
        kmeans_iters: 2,
        ..IndexConfig::default()
    }
}

/// MaxSim of `q` against `d` rounded to half precision (what the index's full-precision copy holds).
pub fn maxsim_f16(q: &[f32], d: &[f32]) -> f32 {
    let d16: Vec<f32> = d.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    q.chunks_exact(DIM)
        .map(|qt| {
            d16.chunks_exact(DIM)
                .map(|dt| qt.iter().zip(dt).map(|(a, b)| a * b).sum::<f32>())
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .sum()
}

/// The live ids of an open index, checked through `contains` against a candidate universe.
pub fn live_ids(index: &PlaidIndex, universe: &[String]) -> BTreeSet<String> {
    universe
        .iter()
        .filter(|id| index.contains(id))
        .cloned()
        .collect()
}

/// Checks that every document of `docs` is stored with its own vectors: its exact score against its own
/// embeddings (the search restricted to it) matches the expected half-precision MaxSim. Returns a description
/// of the first mismatch.
pub fn check_vectors(
    index: &PlaidIndex,
    docs: &Docs,
    ids: &BTreeSet<String>,
) -> Result<(), String> {
    for id in ids {
        let emb = docs
            .get(id)
            .ok_or_else(|| format!("the index holds {id:?}, which no source has"))?;
        let subset = [id.clone()];
        let hits = index
            .search_exact(EmbRef::new(emb, DIM).unwrap(), 1, Some(&subset))
            .map_err(|e| format!("search_exact for {id:?}: {e}"))?;
        let [hit] = hits.as_slice() else {
            return Err(format!("search_exact for {id:?} gave {hits:?}"));
        };
        let want = maxsim_f16(emb, emb);
        if hit.id != *id || (hit.score - want).abs() > 1e-3 * want.abs().max(1.0) {
            return Err(format!(
                "document {id:?}: stored vectors score {} against the source, expected {want}",
                hit.score
            ));
        }
    }
    Ok(())
}

/// A few PLAID searches with documents' own embeddings: each must find its document first.
pub fn check_search(
    index: &PlaidIndex,
    docs: &Docs,
    ids: &BTreeSet<String>,
    n: usize,
) -> Result<(), String> {
    for id in ids.iter().step_by((ids.len() / n.max(1)).max(1)).take(n) {
        let emb = docs.get(id).unwrap();
        let hits = index
            .search(
                EmbRef::new(emb, DIM).unwrap(),
                &SearchParams::for_k(3),
                None,
            )
            .map_err(|e| format!("search for {id:?}: {e}"))?;
        if hits.first().map(|h| h.id.as_str()) != Some(id.as_str()) {
            return Err(format!("searching with {id:?}'s embeddings gave {hits:?}"));
        }
    }
    Ok(())
}

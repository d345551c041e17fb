//! A synthetic clustered corpus generated on the fly, for scale benchmarks: [`SyntheticSource`].
//!
//! A fixed set of topics drawn from the seed, each a unit centre plus `topic_rank` random unit directions (its
//! subspace: tokens vary mostly along a few directions, as real token embeddings do). Document `i` draws, from
//! `(seed, i)` alone, its length (uniform in `[mean/2, 3·mean/2]`), 1 to `max_topics_per_doc` topics (Zipf-like
//! popularity, `P(t) ∝ 1/(t + 1)`, like word frequencies) and for each a document-topic centre
//! `normalize(topic + doc_spread·s)`; each of its tokens is `normalize(centre + token_noise·s + iso_noise·g)`
//! around one of them (`s`: a fresh approximately Gaussian vector in the topic's subspace, `g`: one in the whole
//! space, both of expected norm 1). Any document can be computed alone, so a build streams the corpus in
//! parallel without storing it. Queries are noisy copies of tokens of a chosen document, so exact search has a
//! meaningful answer to recall.
//!
//! The generator is this module's own (SplitMix64), so a given seed gives the same corpus on every platform
//! and with every version of the `rand` crate.

use std::borrow::Cow;

use crate::plaid::DocumentSource;
use crate::{Error, Result};

/// Parameters of a [`SyntheticSource`].
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Number of documents.
    pub docs: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Mean tokens per document (lengths are uniform in `[mean/2, 3·mean/2]`, at least 1).
    pub mean_tokens: usize,
    /// Number of topic centres.
    pub topics: usize,
    /// Each document is about 1 to this many topics.
    pub max_topics_per_doc: usize,
    /// Random directions spanning each topic's subspace.
    pub topic_rank: usize,
    /// Spread of a document's centres around their topics, in the topic's subspace (norm of the offset, before
    /// normalising).
    pub doc_spread: f32,
    /// Spread of tokens around their document centre, in the topic's subspace.
    pub token_noise: f32,
    /// Spread of tokens around their document centre in every direction.
    pub iso_noise: f32,
    /// Noise added to document tokens to make query tokens.
    pub query_noise: f32,
    /// Seed of everything.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            docs: 1000,
            dim: 128,
            mean_tokens: 100,
            topics: 8192,
            max_topics_per_doc: 4,
            topic_rank: 8,
            doc_spread: 0.5,
            token_noise: 0.35,
            iso_noise: 0.1,
            query_noise: 0.3,
            seed: 1,
        }
    }
}

/// A deterministic synthetic [`DocumentSource`]: clustered unit-norm token embeddings computed on demand from
/// `(seed, document index)`. Document ids are `"0"`, `"1"`, ….
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    config: SynthConfig,
    /// Topic centres, `topics × dim`, unit norm.
    topics: Vec<f32>,
    /// Directions of each topic's subspace, `topics × topic_rank × dim`, unit norm.
    bases: Vec<f32>,
}

const TOPIC_SALT: u64 = 0x746f_7069_6373_0001;
const DOC_SALT: u64 = 0x646f_6373_0000_0002;
const QUERY_SALT: u64 = 0x7175_6572_7900_0003;

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for test data.
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64, salt: u64, index: u64) -> Self {
        let mut s = SplitMix(seed ^ salt);
        let a = s.next_u64();
        SplitMix(a ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Adds `scale ·` an approximately standard normal value (Irwin–Hall of four 16-bit uniforms, rescaled) to
    /// every element of `out`.
    fn add_noise(&mut self, out: &mut [f32], scale: f32) {
        // Four 16-bit uniforms: mean 4 · 32767.5, variance ≈ 4 · 65536² / 12.
        let s = scale * 3f32.sqrt() / 65536.0;
        let offset = 4.0 * 32767.5;
        for o in out.iter_mut() {
            let r = self.next_u64();
            let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
            *o += (sum as f32 - offset) * s;
        }
    }
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        let inv = 1.0 / n;
        v.iter_mut().for_each(|x| *x *= inv);
    }
}

impl SyntheticSource {
    /// A source with these parameters (checked: every count positive, noise levels finite and non-negative).
    pub fn new(config: SynthConfig) -> Result<Self> {
        let c = &config;
        if c.dim == 0
            || c.mean_tokens == 0
            || c.topics == 0
            || c.max_topics_per_doc == 0
            || c.topic_rank == 0
        {
            return Err(Error::InvalidArgument(
                "synthetic corpus: dim, mean_tokens, topics, max_topics_per_doc and topic_rank must be positive"
                    .into(),
            ));
        }
        if [c.doc_spread, c.token_noise, c.iso_noise, c.query_noise]
            .iter()
            .any(|v| !v.is_finite() || *v < 0.0)
        {
            return Err(Error::InvalidArgument(
                "synthetic corpus: noise levels must be finite and non-negative".into(),
            ));
        }
        let dim = c.dim;
        let mut rng = SplitMix::new(c.seed, TOPIC_SALT, 0);
        let mut topics = vec![0f32; c.topics * dim];
        for t in topics.chunks_exact_mut(dim) {
            rng.add_noise(t, 1.0);
            normalize(t);
        }
        let mut bases = vec![0f32; c.topics * c.topic_rank * dim];
        for b in bases.chunks_exact_mut(dim) {
            rng.add_noise(b, 1.0);
            normalize(b);
        }
        Ok(Self {
            config,
            topics,
            bases,
        })
    }

    /// The parameters.
    pub fn config(&self) -> &SynthConfig {
        &self.config
    }

    /// Noise scale per component so that the noise vector's expected norm is `level`.
    fn per_dim(&self, level: f32) -> f32 {
        level / (self.config.dim as f32).sqrt()
    }

    /// Adds `level ·` a random vector of topic `t`'s subspace (expected norm `level`) to `out`.
    fn add_topic_noise(&self, rng: &mut SplitMix, t: usize, level: f32, out: &mut [f32]) {
        let (dim, r) = (self.config.dim, self.config.topic_rank);
        let mut coef = vec![0f32; r];
        rng.add_noise(&mut coef, level / (r as f32).sqrt());
        for (b, &a) in self.bases[t * r * dim..(t + 1) * r * dim]
            .chunks_exact(dim)
            .zip(&coef)
        {
            for (o, &v) in out.iter_mut().zip(b) {
                *o += a * v;
            }
        }
    }

    /// A topic with Zipf-like popularity: `P(t) ∝ 1 / (t + 1)` (log-uniform rank), like word frequencies.
    fn pick_topic(&self, rng: &mut SplitMix) -> usize {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let n = self.config.topics as f64;
        (((n + 1.0).ln() * u).exp() - 1.0)
            .floor()
            .clamp(0.0, n - 1.0) as usize
    }

    fn doc_rng(&self, i: usize) -> (SplitMix, usize) {
        let mut rng = SplitMix::new(self.config.seed, DOC_SALT, i as u64);
        let mean = self.config.mean_tokens;
        let len = (mean / 2 + rng.below(mean + 1)).max(1);
        (rng, len)
    }

    /// Number of tokens of document `i`.
    pub fn doc_len(&self, i: usize) -> usize {
        self.doc_rng(i).1
    }

    /// Total number of tokens (computed document by document).
    pub fn total_tokens(&self) -> u64 {
        (0..self.config.docs).map(|i| self.doc_len(i) as u64).sum()
    }

    /// Token embeddings of document `i` (`doc_len(i) × dim`, unit rows).
    pub fn document(&self, i: usize) -> Vec<f32> {
        let dim = self.config.dim;
        let (mut rng, len) = self.doc_rng(i);
        let n_topics = 1 + rng.below(self.config.max_topics_per_doc);
        let mut centres = vec![0f32; n_topics * dim];
        let mut which = vec![0usize; n_topics];
        for (c, w) in centres.chunks_exact_mut(dim).zip(which.iter_mut()) {
            let t = self.pick_topic(&mut rng);
            *w = t;
            c.copy_from_slice(&self.topics[t * dim..(t + 1) * dim]);
            self.add_topic_noise(&mut rng, t, self.config.doc_spread, c);
            normalize(c);
        }
        let iso = self.per_dim(self.config.iso_noise);
        let mut out = vec![0f32; len * dim];
        for row in out.chunks_exact_mut(dim) {
            let c = rng.below(n_topics);
            row.copy_from_slice(&centres[c * dim..(c + 1) * dim]);
            self.add_topic_noise(&mut rng, which[c], self.config.token_noise, row);
            rng.add_noise(row, iso);
            normalize(row);
        }
        out
    }

    /// Query `q` (`tokens × dim`, unit rows) and the document it was drawn from: noisy copies of `tokens` distinct
    /// tokens of that document (with repeats only when the document is shorter).
    pub fn query(&self, q: usize, tokens: usize) -> (Vec<f32>, usize) {
        let dim = self.config.dim;
        let mut rng = SplitMix::new(self.config.seed, QUERY_SALT, q as u64);
        let doc = rng.below(self.config.docs.max(1));
        let d = self.document(doc);
        let len = d.len() / dim;
        let mut order: Vec<usize> = (0..len).collect();
        let noise = self.per_dim(self.config.query_noise);
        let mut out = vec![0f32; tokens * dim];
        for (j, row) in out.chunks_exact_mut(dim).enumerate() {
            let t = if tokens <= len {
                // Partial Fisher–Yates: distinct tokens.
                let s = j + rng.below(len - j);
                order.swap(j, s);
                order[j]
            } else {
                rng.below(len)
            };
            row.copy_from_slice(&d[t * dim..(t + 1) * dim]);
            rng.add_noise(row, noise);
            normalize(row);
        }
        (out, doc)
    }
}

impl DocumentSource for SyntheticSource {
    fn len(&self) -> usize {
        self.config.docs
    }
    fn dim(&self) -> usize {
        self.config.dim
    }
    fn id(&self, i: usize) -> String {
        i.to_string()
    }
    fn embeddings(&self, i: usize) -> Result<Cow<'_, [f32]>> {
        if i >= self.config.docs {
            return Err(Error::InvalidArgument(format!(
                "document {i} of a synthetic corpus of {}",
                self.config.docs
            )));
        }
        Ok(Cow::Owned(self.document(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scores::{maxsim, EmbRef};

    fn source(docs: usize, seed: u64) -> SyntheticSource {
        SyntheticSource::new(SynthConfig {
            docs,
            seed,
            topics: 64,
            ..SynthConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn deterministic_and_shaped() {
        let a = source(500, 7);
        let b = source(500, 7);
        let c = source(500, 8);
        let dim = 128;
        let mut total = 0;
        for i in [0usize, 1, 17, 499] {
            let d = a.embeddings(i).unwrap();
            assert_eq!(d.as_ref(), a.embeddings(i).unwrap().as_ref(), "doc {i}");
            assert_eq!(d.as_ref(), b.document(i).as_slice(), "doc {i}");
            assert_ne!(d.as_ref(), c.document(i).as_slice(), "doc {i}");
            assert_eq!(d.len(), a.doc_len(i) * dim);
            for row in d.chunks_exact(dim) {
                let n: f32 = row.iter().map(|x| x * x).sum();
                assert!((n - 1.0).abs() < 1e-4);
            }
        }
        for i in 0..500 {
            let l = a.doc_len(i);
            assert!((50..=150).contains(&l), "length {l}");
            total += l;
        }
        assert_eq!(a.total_tokens(), total as u64);
        let mean = total as f64 / 500.0;
        assert!((mean - 100.0).abs() < 5.0, "mean length {mean}");
        assert_eq!(a.len(), 500);
        assert_eq!(a.dim(), dim);
        assert_eq!(a.id(3), "3");
        assert!(a.embeddings(500).is_err());
        let (q, doc) = a.query(3, 32);
        assert_eq!(q.len(), 32 * dim);
        assert_eq!(a.query(3, 32), (q.clone(), doc));
        assert_ne!(a.query(4, 32).0, q);
    }

    #[test]
    fn queries_match_their_document() {
        let src = source(300, 3);
        let dim = 128;
        let mut wins = 0;
        for qi in 0..20 {
            let (q, doc) = src.query(qi, 32);
            let q = EmbRef::new(&q, dim).unwrap();
            let own = maxsim(q, EmbRef::new(&src.document(doc), dim).unwrap()).unwrap();
            let best_other = (0..300)
                .filter(|&d| d != doc)
                .map(|d| maxsim(q, EmbRef::new(&src.document(d), dim).unwrap()).unwrap())
                .fold(f32::NEG_INFINITY, f32::max);
            if own > best_other {
                wins += 1;
            }
        }
        assert!(
            wins >= 19,
            "the source document scored best for {wins}/20 queries"
        );
        assert!(SyntheticSource::new(SynthConfig {
            topics: 0,
            ..SynthConfig::default()
        })
        .is_err());
    }
}

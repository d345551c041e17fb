//! Evaluators run during training on a frozen snapshot of the model (PyLate's `ColBERTTripletEvaluator`,
//! `ColBERTDistillationEvaluator` and `PyLateInformationRetrievalEvaluator`).

use latte_eval::{BeirDataset, Metric, Run};
use latte_index::scores::EmbRef;
use latte_index::ExactIndex;
use latte_models::{ColBERT, Embedding, EncodeOptions};

use crate::data::TrainingData;
use crate::{Error, Result};

/// Something that scores a model: metric name → value, the first being the primary metric.
pub trait Evaluator: Send + Sync {
    /// A name prefixed to the metric names (`dev`, `rustbooks`, ...).
    fn name(&self) -> &str;
    /// Evaluates `model` (a frozen snapshot: run it in inference mode).
    fn evaluate(&self, model: &ColBERT) -> Result<Vec<(String, f64)>>;
}

fn encode(
    model: &ColBERT,
    texts: &[String],
    is_query: bool,
    batch_size: usize,
) -> Result<Vec<Embedding>> {
    let opts = EncodeOptions {
        batch_size,
        show_progress: Some(false),
        ..Default::default()
    };
    Ok(model.encode(texts, is_query, &opts)?)
}

fn emb(e: &Embedding) -> EmbRef<'_> {
    EmbRef::new(&e.data, e.cols).expect("embedding rows are whole")
}

/// Unmasked MaxSim of one query and one document (`colbert_scores_pairwise`), with an optional floor of
/// 0 for zero-padded documents.
fn maxsim(q: &Embedding, d: &Embedding, zero_candidate: bool) -> f32 {
    let mut total = 0f32;
    for i in 0..q.rows {
        let qr = q.row(i);
        let mut best = if zero_candidate || d.rows == 0 {
            0f32
        } else {
            f32::NEG_INFINITY
        };
        for j in 0..d.rows {
            let s: f32 = qr.iter().zip(d.row(j)).map(|(a, b)| a * b).sum();
            best = best.max(s);
        }
        total += best;
    }
    total
}

/// Triplet accuracy: the share of (query, positive, negative) triplets where the positive scores higher.
#[derive(Debug, Clone)]
pub struct TripletEvaluator {
    /// Name prefix.
    pub name: String,
    /// Queries.
    pub anchors: Vec<String>,
    /// Their positives.
    pub positives: Vec<String>,
    /// Their negatives.
    pub negatives: Vec<String>,
    /// Encoding batch size.
    pub batch_size: usize,
}

impl TripletEvaluator {
    /// From a table with a query, a positive and at least one negative column (the first negative is
    /// used, as PyLate's evaluator takes one).
    pub fn from_data(name: &str, data: &TrainingData) -> Result<Self> {
        if data.text_columns.len() < 3 || data.list_columns.iter().any(|&l| l) {
            return Err(Error::Invalid(format!(
                "a triplet evaluation set needs query, positive and negative text columns, got {:?}",
                data.text_columns
            )));
        }
        let col = |c: usize| data.rows.iter().map(|r| r.texts[c][0].clone()).collect();
        Ok(Self {
            name: name.to_string(),
            anchors: col(0),
            positives: col(1),
            negatives: col(2),
            batch_size: 32,
        })
    }
}

impl Evaluator for TripletEvaluator {
    fn name(&self) -> &str {
        &self.name
    }

    fn evaluate(&self, model: &ColBERT) -> Result<Vec<(String, f64)>> {
        let q = encode(model, &self.anchors, true, self.batch_size)?;
        let p = encode(model, &self.positives, false, self.batch_size)?;
        let n = encode(model, &self.negatives, false, self.batch_size)?;
        let wins = (0..q.len())
            .filter(|&i| maxsim(&q[i], &p[i], false) > maxsim(&q[i], &n[i], false))
            .count();
        Ok(vec![(
            "accuracy".into(),
            wins as f64 / q.len().max(1) as f64,
        )])
    }
}

/// KL divergence between the teacher's scores and the model's (min-max normalised) MaxSim scores.
#[derive(Debug, Clone)]
pub struct DistillationEvaluator {
    /// Name prefix.
    pub name: String,
    /// Queries.
    pub queries: Vec<String>,
    /// Each query's documents (the same number for every query).
    pub documents: Vec<Vec<String>>,
    /// Teacher scores, one per document.
    pub scores: Vec<Vec<f32>>,
    /// Min-max normalise the model's scores per query (PyLate default true).
    pub normalize_scores: bool,
    /// Encoding batch size.
    pub batch_size: usize,
}

impl DistillationEvaluator {
    /// From distillation data (a query column, a list of documents, scores).
    pub fn from_data(name: &str, data: &TrainingData) -> Result<Self> {
        if data.text_columns.len() != 2 || data.label_column.is_none() {
            return Err(Error::Invalid(format!(
                "a distillation evaluation set needs a query column, a documents column and scores, got {:?}",
                data.text_columns
            )));
        }
        Ok(Self {
            name: name.to_string(),
            queries: data.rows.iter().map(|r| r.texts[0][0].clone()).collect(),
            documents: data.rows.iter().map(|r| r.texts[1].clone()).collect(),
            scores: data
                .rows
                .iter()
                .map(|r| r.label.clone().unwrap_or_default())
                .collect(),
            normalize_scores: true,
            batch_size: 16,
        })
    }
}

fn log_softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = x.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|v| v - lse).collect()
}

impl Evaluator for DistillationEvaluator {
    fn name(&self) -> &str {
        &self.name
    }

    fn evaluate(&self, model: &ColBERT) -> Result<Vec<(String, f64)>> {
        let q = encode(model, &self.queries, true, self.batch_size)?;
        let flat: Vec<String> = self.documents.iter().flatten().cloned().collect();
        let d = encode(model, &flat, false, self.batch_size)?;
        // PyLate zero-pads all documents to the longest: a shorter one has a similarity-0 candidate.
        let longest = d.iter().map(|e| e.rows).max().unwrap_or(0);
        let mut kl = 0f64;
        let mut at = 0;
        for (i, qe) in q.iter().enumerate() {
            let n = self.documents[i].len();
            let mut s: Vec<f64> = (0..n)
                .map(|j| maxsim(qe, &d[at + j], d[at + j].rows < longest) as f64)
                .collect();
            at += n;
            if self.normalize_scores {
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let min = s.iter().cloned().fold(f64::INFINITY, f64::min);
                s.iter_mut()
                    .for_each(|v| *v = (*v - min) / (max - min + 1e-8));
            }
            let teacher: Vec<f64> = self.scores[i].iter().map(|&v| v as f64).collect();
            let (ls, lt) = (log_softmax(&s), log_softmax(&teacher));
            kl += lt
                .iter()
                .zip(&ls)
                .map(|(t, s)| t.exp() * (t - s))
                .sum::<f64>();
        }
        Ok(vec![("kl_divergence".into(), kl / q.len().max(1) as f64)])
    }
}

/// Retrieval metrics on a BEIR folder: the corpus and the split's queries are encoded, searched exactly
/// (MaxSim over every document) and scored with `latte-eval` (ranx's definitions).
#[derive(Debug, Clone)]
pub struct IrEvaluator {
    /// Name prefix.
    pub name: String,
    /// The data.
    pub dataset: BeirDataset,
    /// Metrics; the first is the primary one.
    pub metrics: Vec<Metric>,
    /// Documents retrieved per query.
    pub k: usize,
    /// Encoding batch size.
    pub batch_size: usize,
}

impl IrEvaluator {
    /// nDCG@10 (primary), MRR@10, recall@10, recall@100, MAP@100 at k = 100.
    pub fn new(name: &str, dataset: BeirDataset) -> Result<Self> {
        let metrics = Metric::parse_list("ndcg@10,mrr@10,recall@10,recall@100,map@100")
            .map_err(|e| Error::Eval(e.to_string()))?;
        Ok(Self {
            name: name.to_string(),
            dataset,
            metrics,
            k: 100,
            batch_size: 32,
        })
    }
}

impl Evaluator for IrEvaluator {
    fn name(&self) -> &str {
        &self.name
    }

    fn evaluate(&self, model: &ColBERT) -> Result<Vec<(String, f64)>> {
        let docs: Vec<String> = self.dataset.corpus.iter().map(|d| d.text.clone()).collect();
        let queries: Vec<String> = self
            .dataset
            .queries
            .iter()
            .map(|q| q.text.clone())
            .collect();
        let d = encode(model, &docs, false, self.batch_size)?;
        let q = encode(model, &queries, true, self.batch_size)?;
        let ev = |e: latte_index::Error| Error::Eval(e.to_string());
        let mut index = ExactIndex::new(model.output_dim()).map_err(ev)?;
        for (doc, e) in self.dataset.corpus.iter().zip(&d) {
            index.add(doc.id.clone(), emb(e)).map_err(ev)?;
        }
        let refs: Vec<EmbRef<'_>> = q.iter().map(emb).collect();
        let hits = index.search_batch(&refs, self.k).map_err(ev)?;
        let mut run = Run::new();
        for (query, hs) in self.dataset.queries.iter().zip(hits) {
            if hs.is_empty() {
                run.insert_empty_query(&query.id);
            }
            for h in hs {
                run.insert(&query.id, &h.id, h.score as f64)
                    .map_err(|e| Error::Eval(e.to_string()))?;
            }
        }
        let report = latte_eval::evaluate(&run, &self.dataset.qrels, &self.metrics);
        Ok(report.means().map(|(m, v)| (m.to_string(), v)).collect())
    }
}

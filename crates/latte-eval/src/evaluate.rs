//! Evaluating a run against qrels: per-query values and means, per dataset and across datasets.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use crate::error::{EvalError, Result};
use crate::metric::Metric;
use crate::qrels::Qrels;
use crate::run::{Run, TieBreak};

/// Options for [`evaluate_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvalOptions {
    /// Order among equal scores (default: input order, as ranx).
    pub tie_break: TieBreak,
}

/// Metric values for every query of the qrels, and their means.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    metrics: Vec<Metric>,
    query_ids: Vec<String>,
    /// `values[m][q]`: metric `m` for query `q`.
    values: Vec<Vec<f64>>,
    means: Vec<f64>,
    missing_from_run: usize,
    not_in_qrels: usize,
}

/// Evaluates `run` against `qrels` with ranx semantics (see [`evaluate_with`]), ties in
/// input order.
pub fn evaluate(run: &Run, qrels: &Qrels, metrics: &[Metric]) -> Report {
    evaluate_with(run, qrels, metrics, &EvalOptions::default())
}

/// Evaluates `run` against `qrels`.
///
/// Semantics (those of `ranx.evaluate(..., make_comparable=True)`, which PyLate uses):
/// - the queries evaluated, and averaged over, are exactly the qrels' queries; a query of
///   the qrels that the run lacks scores 0 on every metric and counts in the mean; run
///   queries absent from the qrels are ignored (their number is reported);
/// - a query whose judgments are all below the relevance level (e.g. only 0 or negative)
///   scores 0 on every metric and counts in the mean;
/// - retrieved documents without a judgment are not relevant;
/// - each query's results are ranked by decreasing score, ties by `options.tie_break`.
///
/// The mean over zero queries is 0.
pub fn evaluate_with(
    run: &Run,
    qrels: &Qrels,
    metrics: &[Metric],
    options: &EvalOptions,
) -> Report {
    let query_ids: Vec<String> = qrels.query_ids().map(str::to_string).collect();
    let mut values = vec![Vec::with_capacity(query_ids.len()); metrics.len()];
    let mut missing_from_run = 0;
    let mut ranked_rels = Vec::new();
    for (query_id, judgments) in qrels.iter() {
        if !run.contains_query(query_id) {
            missing_from_run += 1;
        }
        ranked_rels.clear();
        ranked_rels.extend(
            run.ranked(query_id, options.tie_break)
                .iter()
                .map(|r| judgments.get(r.doc_id).copied()),
        );
        let judged: Vec<i32> = judgments.values().copied().collect();
        for (m, metric) in metrics.iter().enumerate() {
            values[m].push(metric.compute(&ranked_rels, &judged));
        }
    }
    let not_in_qrels = run.query_ids().filter(|q| !qrels.contains_query(q)).count();
    let means = values.iter().map(|v| mean(v)).collect();
    Report {
        metrics: metrics.to_vec(),
        query_ids,
        values,
        means,
        missing_from_run,
        not_in_qrels,
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

impl Report {
    /// The metrics, in the order asked for.
    pub fn metrics(&self) -> &[Metric] {
        &self.metrics
    }

    /// Number of queries evaluated (the qrels' queries).
    pub fn num_queries(&self) -> usize {
        self.query_ids.len()
    }

    /// The queries evaluated, in qrels order.
    pub fn query_ids(&self) -> &[String] {
        &self.query_ids
    }

    /// Mean of a metric over the queries.
    pub fn mean(&self, metric: &Metric) -> Option<f64> {
        let m = self.metrics.iter().position(|x| x == metric)?;
        Some(self.means[m])
    }

    /// (metric, mean) pairs in metric order.
    pub fn means(&self) -> impl Iterator<Item = (&Metric, f64)> {
        self.metrics.iter().zip(self.means.iter().copied())
    }

    /// Per-query values of a metric, aligned with [`Report::query_ids`].
    pub fn per_query(&self, metric: &Metric) -> Option<&[f64]> {
        let m = self.metrics.iter().position(|x| x == metric)?;
        Some(&self.values[m])
    }

    /// One query's value of one metric.
    pub fn value(&self, metric: &Metric, query_id: &str) -> Option<f64> {
        let q = self.query_ids.iter().position(|x| x == query_id)?;
        Some(self.per_query(metric)?[q])
    }

    /// Queries of the qrels with no entry in the run (they score 0).
    pub fn queries_missing_from_run(&self) -> usize {
        self.missing_from_run
    }

    /// Queries of the run absent from the qrels (ignored).
    pub fn run_queries_not_in_qrels(&self) -> usize {
        self.not_in_qrels
    }

    /// Machine-readable form: `{"num_queries", "queries_missing_from_run",
    /// "run_queries_not_in_qrels", "metrics": {name: mean}}`, plus
    /// `"per_query": {name: {query: value}}` when asked.
    pub fn to_json(&self, per_query: bool) -> Value {
        let mut metrics = Map::new();
        for (m, v) in self.means() {
            metrics.insert(m.to_string(), json!(v));
        }
        let mut out = json!({
            "num_queries": self.num_queries(),
            "queries_missing_from_run": self.missing_from_run,
            "run_queries_not_in_qrels": self.not_in_qrels,
            "metrics": metrics,
        });
        if per_query {
            let mut pq = Map::new();
            for (m, metric) in self.metrics.iter().enumerate() {
                let by_query: Map<String, Value> = self
                    .query_ids
                    .iter()
                    .zip(&self.values[m])
                    .map(|(q, v)| (q.clone(), json!(v)))
                    .collect();
                pq.insert(metric.to_string(), Value::Object(by_query));
            }
            out["per_query"] = Value::Object(pq);
        }
        out
    }

    /// Human-readable table: one row per metric with its mean, then the query counts.
    pub fn to_table(&self) -> String {
        let names: Vec<String> = self.metrics.iter().map(Metric::to_string).collect();
        let width = names
            .iter()
            .map(String::len)
            .chain(["metric".len()])
            .max()
            .unwrap_or(6);
        let mut out = String::new();
        let _ = writeln!(out, "{:<width$}  {:>8}", "metric", "mean");
        for (name, v) in names.iter().zip(&self.means) {
            let _ = writeln!(out, "{name:<width$}  {v:>8.4}");
        }
        let _ = write!(out, "queries: {}", self.num_queries());
        if self.missing_from_run > 0 {
            let _ = write!(
                out,
                " ({} with no results in the run, scored 0)",
                self.missing_from_run
            );
        }
        out.push('\n');
        if self.not_in_qrels > 0 {
            let _ = writeln!(
                out,
                "ignored: {} run queries without judgments",
                self.not_in_qrels
            );
        }
        out
    }
}

/// Reports for several datasets and their unweighted mean per metric (each dataset counts
/// once, whatever its number of queries), as NanoBEIR reports.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionReport {
    datasets: Vec<(String, Report)>,
    metrics: Vec<Metric>,
    means: Vec<f64>,
}

impl CollectionReport {
    /// Combines per-dataset reports. They must all have the same metrics, and there must be
    /// at least one.
    pub fn new(datasets: Vec<(String, Report)>) -> Result<Self> {
        let Some((_, first)) = datasets.first() else {
            return Err(EvalError::Invalid {
                what: "collection report",
                message: "no dataset reports".to_string(),
            });
        };
        let metrics = first.metrics.clone();
        if let Some((name, _)) = datasets.iter().find(|(_, r)| r.metrics != metrics) {
            return Err(EvalError::Invalid {
                what: "collection report",
                message: format!("dataset {name:?} was evaluated with different metrics"),
            });
        }
        let means = (0..metrics.len())
            .map(|m| datasets.iter().map(|(_, r)| r.means[m]).sum::<f64>() / datasets.len() as f64)
            .collect();
        Ok(CollectionReport {
            datasets,
            metrics,
            means,
        })
    }

    /// The per-dataset reports, in the order given.
    pub fn datasets(&self) -> &[(String, Report)] {
        &self.datasets
    }

    /// The metrics.
    pub fn metrics(&self) -> &[Metric] {
        &self.metrics
    }

    /// Mean over datasets of a metric's per-dataset mean.
    pub fn mean(&self, metric: &Metric) -> Option<f64> {
        let m = self.metrics.iter().position(|x| x == metric)?;
        Some(self.means[m])
    }

    /// `{"datasets": {name: report json}, "mean": {metric: value}}`.
    pub fn to_json(&self, per_query: bool) -> Value {
        let datasets: Map<String, Value> = self
            .datasets
            .iter()
            .map(|(n, r)| (n.clone(), r.to_json(per_query)))
            .collect();
        let mean: Map<String, Value> = self
            .metrics
            .iter()
            .zip(&self.means)
            .map(|(m, v)| (m.to_string(), json!(v)))
            .collect();
        json!({ "datasets": datasets, "mean": mean })
    }

    /// Table with one row per dataset (its number of queries and metric means) and a final
    /// `mean` row.
    pub fn to_table(&self) -> String {
        let names: Vec<String> = self.metrics.iter().map(Metric::to_string).collect();
        let name_width = self
            .datasets
            .iter()
            .map(|(n, _)| n.len())
            .chain(["dataset".len(), "mean".len()])
            .max()
            .unwrap_or(7);
        let col = |n: &String| n.len().max(8);
        let mut out = String::new();
        let _ = write!(out, "{:<name_width$}  {:>7}", "dataset", "queries");
        for n in &names {
            let _ = write!(out, "  {n:>w$}", w = col(n));
        }
        out.push('\n');
        for (dataset, report) in &self.datasets {
            let _ = write!(out, "{dataset:<name_width$}  {:>7}", report.num_queries());
            for (n, v) in names.iter().zip(&report.means) {
                let _ = write!(out, "  {v:>w$.4}", w = col(n));
            }
            out.push('\n');
        }
        let _ = write!(out, "{:<name_width$}  {:>7}", "mean", "");
        for (n, v) in names.iter().zip(&self.means) {
            let _ = write!(out, "  {v:>w$.4}", w = col(n));
        }
        out.push('\n');
        out
    }
}

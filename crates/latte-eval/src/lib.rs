//! Evaluation for latte: BEIR datasets, TREC run and qrels files, and IR metrics.
//!
//! - [`BeirDataset::load`] reads one split of a BEIR folder (`corpus.jsonl`, `queries.jsonl`,
//!   `qrels/{split}.tsv`) and keeps only the queries judged in that split, as BEIR does;
//!   [`load_collection`] reads every BEIR folder under a parent folder (e.g. NanoBEIR).
//! - [`Run`] holds retrieval results and reads/writes TREC run files; [`Qrels`] holds graded
//!   judgments and reads BEIR tsv or TREC qrels (detected).
//! - [`evaluate`] computes [`Metric`]s (`ndcg@10`, `mrr@10`, `recall@100`, `precision@k`,
//!   `map@k`, `hits@k`, `hit_rate@k`) per query and their mean, with the definitions of
//!   ranx (`evaluate(..., make_comparable=True)`, as PyLate uses); [`CollectionReport`]
//!   averages per-dataset results.
//!
//! # Semantics (checked against ranx 0.3.21 and trec_eval via pytrec_eval)
//!
//! - nDCG uses linear gain (ranx `ndcg`, trec_eval `ndcg_cut`), not ranx's `ndcg_burges`
//!   (2^rel − 1); the ideal ranking is the query's judged relevances sorted, cut at k.
//! - Documents are ranked by decreasing score; the rank column of a run file is ignored.
//!   Equal scores: ranx keeps insertion order for queries with at most 15 results (numba's
//!   insertion sort) and scrambles them beyond that (numba's unstable quicksort); trec_eval
//!   orders them by decreasing document id. Latte defaults to insertion order
//!   ([`TieBreak::InputOrder`]) and offers trec_eval's rule ([`TieBreak::DocIdDescending`]).
//! - The mean is over the qrels' queries (ranx with `make_comparable=True`): a judged query
//!   missing from the run scores 0 and counts; trec_eval instead skips it unless run with `-c`.
//!   Run queries without judgments are ignored by both.
//! - A query whose judgments are all below the relevance level (0 or negative) scores 0 on
//!   every metric and counts in the mean (both tools). Negative relevance is simply not
//!   relevant; it contributes no negative gain.
//! - Unjudged retrieved documents are not relevant. precision@k divides by k even when fewer
//!   than k documents were retrieved; MAP@k divides by the number of relevant documents.
//!
//! ```
//! use latte_eval::{evaluate, Metric, Qrels, Run};
//!
//! let mut qrels = Qrels::new();
//! qrels.insert("q1", "d1", 1)?;
//! let mut run = Run::new();
//! run.insert("q1", "d2", 0.9)?;
//! run.insert("q1", "d1", 0.8)?;
//! let mrr: Metric = "mrr@10".parse()?;
//! let report = evaluate(&run, &qrels, &[mrr]);
//! assert_eq!(report.mean(&mrr), Some(0.5));
//! # Ok::<(), latte_eval::EvalError>(())
//! ```
#![forbid(unsafe_code)]

mod beir;
mod error;
mod evaluate;
mod io_util;
mod metric;
mod qrels;
mod run;

pub use beir::{
    available_splits, is_beir_dir, load_collection, read_corpus, read_queries, BeirDataset,
    Document, LoadOptions, NamedDataset, Query, UnknownDocuments,
};
pub use error::{EvalError, Result};
pub use evaluate::{evaluate, evaluate_with, CollectionReport, EvalOptions, Report};
pub use metric::{Metric, MetricKind};
pub use qrels::{Qrels, QrelsFormat};
pub use run::{Ranked, Run, TieBreak};

//! Metric values against ranx and trec_eval, from fixtures written by
//! `scripts/make_eval_fixtures.py`.

use std::path::PathBuf;

use latte_eval::{evaluate, evaluate_with, EvalOptions, Metric, Qrels, QrelsFormat, Run, TieBreak};
use serde_json::Value;

const TOL: f64 = 1e-6;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

fn load_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn metrics_of(expected: &Value) -> Vec<Metric> {
    expected["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn both_qrels_formats_read_the_same_judgments() {
    let trec = Qrels::read(fixture("qrels.trec")).unwrap();
    let tsv = Qrels::read(fixture("qrels.tsv")).unwrap();
    assert_eq!(trec, tsv);
    assert_eq!(
        Qrels::read_format(fixture("qrels.tsv"), QrelsFormat::BeirTsv).unwrap(),
        tsv
    );
    assert_eq!(trec.relevance("q_graded", "d1"), Some(3));
    assert_eq!(trec.relevance("q_negative", "n"), Some(-1));
}

#[test]
fn means_and_per_query_values_match_ranx() {
    let expected = load_json("ranx_expected.json");
    let metrics = metrics_of(&expected);
    assert!(metrics.len() > 20);
    let qrels = Qrels::read(fixture("qrels.tsv")).unwrap();
    let run = Run::read_trec(fixture("run.trec")).unwrap();
    let report = evaluate(&run, &qrels, &metrics);

    assert_eq!(
        report.num_queries() as u64,
        expected["num_queries"].as_u64().unwrap()
    );
    assert_eq!(report.queries_missing_from_run(), 1, "q_missing");
    assert_eq!(report.run_queries_not_in_qrels(), 1, "q_extra");

    let mut checked = 0;
    for metric in &metrics {
        let name = metric.to_string();
        let want_mean = expected["mean"][&name].as_f64().unwrap();
        let got_mean = report.mean(metric).unwrap();
        assert!(
            (got_mean - want_mean).abs() < TOL,
            "{name}: mean {got_mean} vs ranx {want_mean}"
        );
        let per_query = expected["per_query"][&name].as_object().unwrap();
        assert_eq!(per_query.len(), report.num_queries());
        for (query, want) in per_query {
            let want = want.as_f64().unwrap();
            let got = report.value(metric, query).unwrap();
            assert!(
                (got - want).abs() < TOL,
                "{name} for {query}: {got} vs ranx {want}"
            );
            checked += 1;
        }
    }
    assert!(checked > 1000);
}

#[test]
fn edge_cases_have_the_documented_values() {
    let qrels = Qrels::read(fixture("qrels.trec")).unwrap();
    let run = Run::read_trec(fixture("run.trec")).unwrap();
    let m = |s: &str| s.parse::<Metric>().unwrap();
    let metrics = [
        m("ndcg@10"),
        m("precision@10"),
        m("recall@100"),
        m("mrr@10"),
    ];
    let report = evaluate(&run, &qrels, &metrics);
    for q in ["q_zero", "q_all_negative", "q_missing"] {
        for metric in &metrics {
            assert_eq!(report.value(metric, q), Some(0.0), "{metric} {q}");
        }
    }
    // Three retrieved, one relevant at rank 2: precision@10 divides by k, not by 3.
    assert!((report.value(&m("precision@10"), "q_short").unwrap() - 0.1).abs() < 1e-12);
    assert!((report.value(&m("recall@100"), "q_short").unwrap() - 1.0 / 3.0).abs() < 1e-12);
    // Ties keep file order: n1, r1, n2 at 1.0 -> first relevant at rank 2.
    assert_eq!(report.value(&m("mrr@10"), "q_ties"), Some(0.5));
    assert_eq!(report.value(&m("mrr@10"), "q_extra"), None);
}

#[test]
fn doc_id_descending_ties_match_trec_eval() {
    let expected = load_json("trec_eval_expected.json");
    let qrels = Qrels::read(fixture("ties_qrels.trec")).unwrap();
    let run = Run::read_trec(fixture("ties_run.trec")).unwrap();
    let per_query = expected["per_query"].as_object().unwrap();
    let metrics: Vec<Metric> = per_query.keys().map(|k| k.parse().unwrap()).collect();
    let options = EvalOptions {
        tie_break: TieBreak::DocIdDescending,
    };
    let report = evaluate_with(&run, &qrels, &metrics, &options);
    for metric in &metrics {
        for (query, want) in per_query[&metric.to_string()].as_object().unwrap() {
            let want = want.as_f64().unwrap();
            let got = report.value(metric, query).unwrap();
            assert!(
                (got - want).abs() < TOL,
                "{metric} for {query}: {got} vs trec_eval {want}"
            );
        }
    }
    // t3 ties m00..m19: in input order the first relevant (m05) is sixth; trec_eval ranks
    // m19 first, so its first relevant (m11) is ninth.
    let mrr: Metric = "mrr".parse().unwrap();
    let default = evaluate(&run, &qrels, &[mrr]);
    assert_eq!(default.value(&mrr, "t3"), Some(1.0 / 6.0));
    assert!((report.value(&mrr, "t3").unwrap() - 1.0 / 9.0).abs() < 1e-12);
}

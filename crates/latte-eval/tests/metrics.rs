//! Metric names, hand-computed values and report rendering.

use latte_eval::{evaluate, EvalError, Metric, MetricKind, Qrels, Run};

fn m(s: &str) -> Metric {
    s.parse().unwrap()
}

#[test]
fn metric_names_parse_and_print_in_ranx_syntax() {
    assert_eq!(m("ndcg@10"), Metric::new(MetricKind::Ndcg, Some(10)));
    assert_eq!(m("MRR"), Metric::new(MetricKind::Mrr, None));
    assert_eq!(m("p@5"), Metric::new(MetricKind::Precision, Some(5)));
    assert_eq!(m("success@3").kind, MetricKind::HitRate);
    assert_eq!(m("map@100-l2").rel_level, 2);
    for s in [
        "ndcg@10",
        "mrr",
        "recall@100",
        "precision@1",
        "map@5-l3",
        "hits@10",
        "hit_rate@5",
    ] {
        assert_eq!(m(s).to_string(), s);
    }
    let list = Metric::parse_list(" ndcg@10, mrr@10 ,recall@100,").unwrap();
    assert_eq!(list, [m("ndcg@10"), m("mrr@10"), m("recall@100")]);

    for (bad, needle) in [
        ("ndgc@10", "unknown metric"),
        ("ndcg@0", "at least 1"),
        ("ndcg@ten", "not a positive integer"),
        ("ndcg@10-l0", "at least 1"),
        ("ndcg@10-lx", "not an integer"),
    ] {
        let err = bad.parse::<Metric>().unwrap_err();
        assert!(matches!(err, EvalError::InvalidMetric { .. }));
        assert!(err.to_string().contains(needle), "{bad}: {err}");
    }
    assert!(Metric::parse_list(" , ").is_err());
}

#[test]
fn hand_computed_values() {
    // Ranked: d9 (unjudged), d1 (rel 2), d2 (rel 0), d3 (rel 1); d4 (rel 3) not retrieved.
    let ranked = [None, Some(2), Some(0), Some(1)];
    let judged = [2, 0, 1, 3];
    let log2 = |x: f64| x.log2();
    let dcg = 2.0 / log2(3.0) + 1.0 / log2(5.0);
    let idcg = 3.0 + 2.0 / log2(3.0) + 1.0 / log2(4.0);
    let cases = [
        ("ndcg", dcg / idcg),
        ("ndcg@2", (2.0 / log2(3.0)) / (3.0 + 2.0 / log2(3.0))),
        ("mrr", 0.5),
        ("mrr@1", 0.0),
        ("recall@4", 2.0 / 3.0),
        ("precision@10", 0.2),
        ("precision", 0.5),
        ("map", (1.0 / 2.0 + 2.0 / 4.0) / 3.0),
        ("hits@4", 2.0),
        ("hit_rate@1", 0.0),
        ("hit_rate@2", 1.0),
        ("recall@4-l2", 0.5),
        ("ndcg@3-l2", (2.0 / log2(3.0)) / (3.0 + 2.0 / log2(3.0))),
    ];
    for (name, want) in cases {
        let got = m(name).compute(&ranked, &judged);
        assert!((got - want).abs() < 1e-12, "{name}: {got} vs {want}");
    }
    // Nothing relevant judged: 0 everywhere, including precision.
    assert_eq!(m("precision@1").compute(&[Some(0)], &[0, -1]), 0.0);
    assert_eq!(m("ndcg@10").compute(&[], &[1]), 0.0);
    assert_eq!(m("precision").compute(&[], &[1]), 0.0);
}

fn small() -> (Run, Qrels) {
    let mut qrels = Qrels::new();
    qrels.insert("q1", "a", 1).unwrap();
    qrels.insert("q2", "b", 1).unwrap();
    let mut run = Run::new();
    run.extend_query("q1", [("x", 2.0), ("a", 1.0)]).unwrap();
    run.extend_query("other", [("b", 1.0)]).unwrap();
    (run, qrels)
}

#[test]
fn report_exposes_per_query_values_and_counts() {
    let (run, qrels) = small();
    let metrics = [m("mrr@10"), m("recall@1")];
    let report = evaluate(&run, &qrels, &metrics);
    assert_eq!(report.query_ids(), ["q1", "q2"]);
    assert_eq!(report.per_query(&metrics[0]), Some(&[0.5, 0.0][..]));
    assert_eq!(report.mean(&metrics[0]), Some(0.25));
    assert_eq!(report.mean(&m("ndcg@10")), None);
    assert_eq!(report.queries_missing_from_run(), 1);
    assert_eq!(report.run_queries_not_in_qrels(), 1);
    let means: Vec<(String, f64)> = report.means().map(|(m, v)| (m.to_string(), v)).collect();
    assert_eq!(
        means,
        [("mrr@10".to_string(), 0.25), ("recall@1".to_string(), 0.0)]
    );
}

#[test]
fn report_renders_a_table_and_json() {
    let (run, qrels) = small();
    let report = evaluate(&run, &qrels, &[m("mrr@10"), m("recall@100")]);
    let table = report.to_table();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["metric", "mean"]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["mrr@10", "0.2500"]
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["recall@100", "0.5000"]
    );
    assert_eq!(
        lines[3],
        "queries: 2 (1 with no results in the run, scored 0)"
    );
    assert_eq!(lines[4], "ignored: 1 run queries without judgments");

    let json = report.to_json(false);
    assert_eq!(json["num_queries"], 2);
    assert_eq!(json["metrics"]["mrr@10"], 0.25);
    assert_eq!(json["queries_missing_from_run"], 1);
    assert!(json.get("per_query").is_none());
    let json = report.to_json(true);
    assert_eq!(json["per_query"]["recall@100"]["q1"], 1.0);
    assert_eq!(json["per_query"]["recall@100"]["q2"], 0.0);

    let empty = evaluate(&run, &Qrels::new(), &[m("mrr")]);
    assert_eq!(empty.num_queries(), 0);
    assert_eq!(empty.mean(&m("mrr")), Some(0.0));
}

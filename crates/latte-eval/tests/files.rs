//! Reading and writing qrels and runs: formats, round trips and error messages.

use std::path::Path;

use latte_eval::{EvalError, Qrels, QrelsFormat, Run, TieBreak};

#[test]
fn qrels_format_is_detected() {
    assert_eq!(
        Qrels::detect_format("query-id\tcorpus-id\tscore\nq\td\t1\n"),
        Some(QrelsFormat::BeirTsv)
    );
    assert_eq!(Qrels::detect_format("\nq 0 d 1\n"), Some(QrelsFormat::Trec));
    assert_eq!(Qrels::detect_format("q\t0\td\t1"), Some(QrelsFormat::Trec));
    assert_eq!(Qrels::detect_format("q d"), None);
    assert_eq!(Qrels::detect_format("  \n"), None);
}

#[test]
fn beir_qrels_with_and_without_header() {
    let p = Path::new("x.tsv");
    let with = Qrels::parse(
        "query-id\tcorpus-id\tscore\nq1\td 1\t2\nq1\td2\t0\n",
        p,
        None,
    )
    .unwrap();
    let without = Qrels::parse("q1\td 1\t2\r\nq1\td2\t0\r\n", p, None).unwrap();
    assert_eq!(with, without);
    assert_eq!(with.relevance("q1", "d 1"), Some(2));
    assert_eq!(with.num_judgments(), 2);
    assert_eq!(with.len(), 1);
}

#[test]
fn qrels_errors_name_file_and_line() {
    let p = Path::new("qrels/test.tsv");
    let err = Qrels::parse("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\n", p, None).unwrap_err();
    assert!(matches!(err, EvalError::Parse { line: 3, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("qrels/test.tsv:3:"), "{msg}");
    assert!(msg.contains("found 2"), "{msg}");

    let err = Qrels::parse("q1\td1\tyes\nq1\td2\tmaybe\n", p, None).unwrap_err();
    assert!(
        err.to_string()
            .contains(":2: relevance \"maybe\" is not an integer"),
        "{err}"
    );

    let err = Qrels::parse("q1 0 d1 1\nq1 0 d1 2\n", p, None).unwrap_err();
    assert!(matches!(err, EvalError::Parse { line: 2, .. }), "{err:?}");
    assert!(
        err.to_string().contains("different relevance (1 and 2)"),
        "{err}"
    );

    // An identical repeated judgment is harmless.
    let q = Qrels::parse("q1 0 d1 1\nq1 0 d1 1\n", p, None).unwrap();
    assert_eq!(q.num_judgments(), 1);

    let err = Qrels::parse("query-id\tcorpus-id\tscore\n", p, None).unwrap_err();
    assert!(err.to_string().contains("no judgments"), "{err}");

    let err = Qrels::parse("just one field\n", p, None).unwrap_err();
    assert!(
        err.to_string().contains("unrecognised qrels format"),
        "{err}"
    );

    let err = Qrels::parse("q1 0 d1 1\nq1 d2 1\n", p, Some(QrelsFormat::Trec)).unwrap_err();
    assert!(matches!(err, EvalError::Parse { line: 2, .. }), "{err:?}");
}

#[test]
fn missing_files_name_the_path_and_the_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.tsv");
    let err = Qrels::read(&missing).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("nope.tsv") && msg.contains("qrels file"),
        "{msg}"
    );
    let err = Run::read_trec(dir.path().join("run.trec")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("run.trec") && msg.contains("qid Q0 docid rank score tag"),
        "{msg}"
    );
}

#[test]
fn qrels_round_trip_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let mut qrels = Qrels::new();
    qrels.insert("q1", "d1", 2).unwrap();
    qrels.insert("q1", "d2", -1).unwrap();
    qrels.insert("q2", "d1", 0).unwrap();
    for (format, name) in [
        (QrelsFormat::Trec, "q.trec"),
        (QrelsFormat::BeirTsv, "q.tsv"),
    ] {
        let path = dir.path().join(name);
        qrels.write(&path, format).unwrap();
        assert_eq!(Qrels::read(&path).unwrap(), qrels, "{format:?}");
    }
    let mut spaced = Qrels::new();
    spaced.insert("q 1", "d1", 1).unwrap();
    assert!(spaced.to_string_format(QrelsFormat::Trec).is_err());
    assert!(spaced.to_string_format(QrelsFormat::BeirTsv).is_ok());
    assert!(qrels.insert("q1", "d1", 3).is_err());
}

#[test]
fn run_parse_errors_give_line_numbers() {
    let p = Path::new("run.trec");
    let cases = [
        ("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 0.4\n", 2, "found 5"),
        ("q1 Q0 d1 1 high tag\n", 1, "score \"high\" is not a number"),
        (
            "q1 Q0 d1 first 0.5 tag\n",
            1,
            "rank \"first\" is not an integer",
        ),
        ("q1 Q0 d1 1 0.5 t\n\nq1 Q0 d1 2 0.4 t\n", 3, "appears twice"),
        ("q1 Q0 d1 1 NaN t\n", 1, "not finite"),
    ];
    for (text, line, needle) in cases {
        let err = Run::parse_trec(text, p).unwrap_err();
        match &err {
            EvalError::Parse { line: l, .. } => assert_eq!(*l, line, "{err}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    }
    assert!(Run::parse_trec("\n\n", p)
        .unwrap_err()
        .to_string()
        .contains("no results"));
}

#[test]
fn run_ranks_by_score_with_both_tie_breaks() {
    let mut run = Run::new();
    run.extend_query(
        "q",
        [("b", 1.0), ("c", 2.0), ("a", 1.0), ("d", -0.0), ("e", 0.0)],
    )
    .unwrap();
    let ids = |t| -> Vec<String> {
        run.ranked("q", t)
            .iter()
            .map(|r| r.doc_id.to_string())
            .collect()
    };
    assert_eq!(ids(TieBreak::InputOrder), ["c", "b", "a", "d", "e"]);
    assert_eq!(ids(TieBreak::DocIdDescending), ["c", "b", "a", "e", "d"]);
    assert!(run.ranked("unknown", TieBreak::InputOrder).is_empty());
    assert!(run.insert("q", "a", 3.0).is_err());
    assert!(run.insert("q", "z", f64::INFINITY).is_err());
}

#[test]
fn run_round_trips_through_trec_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::with_name("colbert");
    run.extend_query("q2", [("x", 0.1), ("y", 0.30000000000000004)])
        .unwrap();
    run.extend_query("q1", [("z", -2.5e-9)]).unwrap();
    let path = dir.path().join("run.trec");
    run.write_trec(&path, TieBreak::InputOrder, None).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let first = text.lines().next().unwrap();
    assert_eq!(first, "q2 Q0 y 1 0.30000000000000004 colbert");
    let back = Run::read_trec(&path).unwrap();
    assert_eq!(back.name(), Some("colbert"));
    assert_eq!(back.query_ids().collect::<Vec<_>>(), ["q2", "q1"]);
    for q in ["q1", "q2"] {
        assert_eq!(
            back.ranked(q, TieBreak::InputOrder),
            run.ranked(q, TieBreak::InputOrder)
        );
    }
    let tagged = run
        .to_trec_string(TieBreak::InputOrder, Some("mytag"))
        .unwrap();
    assert_eq!(tagged.lines().count(), 3);
    assert!(tagged.lines().all(|l| l.ends_with(" mytag")));
    assert!(run
        .to_trec_string(TieBreak::InputOrder, Some("my tag"))
        .is_err());

    let mut bad = Run::new();
    bad.insert("q", "doc with space", 1.0).unwrap();
    assert!(bad.to_trec_string(TieBreak::InputOrder, None).is_err());
}

//! `latte eval`: score a TREC run against qrels.

use std::path::PathBuf;

use anyhow::Context;
use latte_eval::{evaluate_with, EvalOptions, Metric, Qrels, Run, TieBreak};

/// Evaluate a TREC run file against relevance judgments.
///
/// Metrics follow ranx (as PyLate uses it): the mean is over the qrels' queries; a judged
/// query absent from the run scores 0; run queries without judgments are ignored.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// TREC run file: `qid Q0 docid rank score tag` per line.
    #[arg(long, value_name = "FILE")]
    pub run: PathBuf,

    /// Relevance judgments: BEIR tsv (e.g. qrels/test.tsv) or TREC qrels (`qid 0 docid rel`);
    /// the format is detected.
    #[arg(long, value_name = "FILE")]
    pub qrels: PathBuf,

    /// Comma-separated metrics in ranx syntax: ndcg, mrr, recall, precision, map, hits,
    /// hit_rate, each with an optional @k cutoff and -lN relevance level (e.g. map@100-l2).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ndcg@10,mrr@10,recall@100",
        value_name = "LIST"
    )]
    pub metrics: Vec<Metric>,

    /// Print JSON (means, query counts) instead of a table.
    #[arg(long)]
    pub json: bool,

    /// With --json, also print every query's value of every metric.
    #[arg(long, requires = "json")]
    pub per_query: bool,

    /// Order of documents with equal scores: `input` keeps run-file order (as ranx),
    /// `trec-eval` sorts them by decreasing document id (as trec_eval).
    #[arg(long, value_enum, default_value_t = Ties::Input)]
    pub ties: Ties,
}

/// Tie-breaking choices on the command line.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ties {
    /// Keep run-file order among equal scores (ranx).
    Input,
    /// Decreasing document id among equal scores (trec_eval).
    TrecEval,
}

/// Runs `latte eval`: prints the report on stdout.
pub fn run(args: Args) -> anyhow::Result<()> {
    print!("{}", render(&args)?);
    Ok(())
}

/// Reads the files named by `args`, evaluates, and returns the text `latte eval` prints.
pub fn render(args: &Args) -> anyhow::Result<String> {
    let run = Run::read_trec(&args.run).context("reading the run")?;
    let qrels = Qrels::read(&args.qrels).context("reading the qrels")?;
    let options = EvalOptions {
        tie_break: match args.ties {
            Ties::Input => TieBreak::InputOrder,
            Ties::TrecEval => TieBreak::DocIdDescending,
        },
    };
    let report = evaluate_with(&run, &qrels, &args.metrics, &options);
    if report.queries_missing_from_run() == report.num_queries() {
        tracing::warn!(
            "no query of {} appears in {}: every metric is 0 (do the query ids match?)",
            args.qrels.display(),
            args.run.display()
        );
    }
    Ok(if args.json {
        let mut text = serde_json::to_string_pretty(&report.to_json(args.per_query))?;
        text.push('\n');
        text
    } else {
        report.to_table()
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn files() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run.trec");
        let qrels = dir.path().join("test.tsv");
        std::fs::write(
            &run,
            "q1 Q0 b 1 1.0 t\nq1 Q0 a 2 1.0 t\nq2 Q0 c 1 0.5 t\nq9 Q0 a 1 0.1 t\n",
        )
        .unwrap();
        std::fs::write(
            &qrels,
            "query-id\tcorpus-id\tscore\nq1\ta\t1\nq2\tc\t2\nq3\ta\t1\n",
        )
        .unwrap();
        (dir, run, qrels)
    }

    fn parse(extra: &[&str], run: &std::path::Path, qrels: &std::path::Path) -> Args {
        let mut argv = vec![
            "eval".to_string(),
            "--run".into(),
            run.display().to_string(),
        ];
        argv.extend(["--qrels".to_string(), qrels.display().to_string()]);
        argv.extend(extra.iter().map(|s| s.to_string()));
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn defaults_and_table() {
        let (_dir, run, qrels) = files();
        let args = parse(&[], &run, &qrels);
        let names: Vec<String> = args.metrics.iter().map(Metric::to_string).collect();
        assert_eq!(names, ["ndcg@10", "mrr@10", "recall@100"]);
        let text = render(&args).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // q1: relevant a ranked 2nd (tie kept in file order) -> mrr 0.5; q2: 1; q3: missing -> 0.
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["mrr@10", "0.5000"]
        );
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["recall@100", "0.6667"]
        );
        assert_eq!(
            lines[4],
            "queries: 3 (1 with no results in the run, scored 0)"
        );
        assert_eq!(lines[5], "ignored: 1 run queries without judgments");
    }

    #[test]
    fn json_with_trec_eval_ties() {
        let (_dir, run, qrels) = files();
        let args = parse(
            &[
                "--metrics",
                "mrr,hits@1",
                "--json",
                "--per-query",
                "--ties",
                "trec-eval",
            ],
            &run,
            &qrels,
        );
        let value: serde_json::Value = serde_json::from_str(&render(&args).unwrap()).unwrap();
        assert_eq!(value["num_queries"], 3);
        // Doc id descending puts b before a: q1's relevant document is still second.
        assert_eq!(value["per_query"]["mrr"]["q1"], 0.5);
        assert_eq!(value["per_query"]["hits@1"]["q2"], 1.0);
        assert!((value["metrics"]["mrr"].as_f64().unwrap() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn bad_input_is_reported() {
        let (dir, run, qrels) = files();
        assert!(Cli::try_parse_from([
            "eval",
            "--run",
            "r",
            "--qrels",
            "q",
            "--metrics",
            "ndgc@10"
        ])
        .is_err());
        let missing = dir.path().join("missing.trec");
        let err = render(&parse(&[], &missing, &qrels)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("reading the run") && msg.contains("missing.trec"),
            "{msg}"
        );
        std::fs::write(&run, "q1 Q0 a 1 x t\n").unwrap();
        let msg = format!("{:#}", render(&parse(&[], &run, &qrels)).unwrap_err());
        assert!(
            msg.contains("run.trec:1: score \"x\" is not a number"),
            "{msg}"
        );
    }
}

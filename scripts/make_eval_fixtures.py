#!/usr/bin/env python3
"""Write the latte-eval metric fixtures: small qrels and runs, and the values ranx computes.

Run by hand, never in CI:

    $WORK/venv/bin/python scripts/make_eval_fixtures.py            # ranx expectations
    <python with pytrec_eval> scripts/make_eval_fixtures.py --trec-eval   # trec_eval ties

Outputs under crates/latte-eval/tests/fixtures/:
  qrels.trec, qrels.tsv   the same judgments in TREC and BEIR formats
  run.trec                a TREC run (lines in insertion order; ranx and latte rank by score)
  ranx_expected.json      {"ranx_version", "metrics", "num_queries", "mean": {m: v},
                           "per_query": {m: {qid: v}}} from ranx.evaluate(make_comparable=True)
  ties_qrels.trec, ties_run.trec, trec_eval_expected.json
                          a tie-heavy case scored by trec_eval (pytrec_eval), which orders equal
                          scores by decreasing document id
"""

import json
import random
import sys
from collections import OrderedDict
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "crates" / "latte-eval" / "tests" / "fixtures"

METRICS = [
    "ndcg", "ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "ndcg@100",
    "mrr", "mrr@1", "mrr@10",
    "recall@1", "recall@5", "recall@10", "recall@100",
    "precision@1", "precision@5", "precision@10", "precision@100",
    "map", "map@5", "map@100",
    "hits@1", "hits@5", "hits@10",
    "hit_rate@1", "hit_rate@5",
    "ndcg@10-l2", "recall@10-l2", "map@10-l2", "mrr@10-l2",
    "precision@5-l2", "hits@10-l2", "hit_rate@10-l2",
]


def build():
    """Return (qrels, run) as ordered dicts; each case is commented."""
    qrels = OrderedDict()
    run = OrderedDict()

    # Graded judgments, distinct scores, run listed best first.
    qrels["q_graded"] = {"d1": 3, "d2": 2, "d3": 1, "d4": 0}
    run["q_graded"] = {"d2": 0.9, "d9": 0.8, "d1": 0.7, "d4": 0.6, "d3": 0.5}

    # Ties: equal scores keep insertion order in ranx (stable insertion sort for <= 15 results).
    qrels["q_ties"] = {"r1": 1, "r2": 2}
    run["q_ties"] = {"n1": 1.0, "r1": 1.0, "n2": 1.0, "r2": 0.5, "n3": 0.5}

    # Ties where the relevant document comes first among equals.
    qrels["q_ties2"] = {"a": 1}
    run["q_ties2"] = {"a": 2.0, "b": 2.0, "c": 2.0}

    # Run lines not sorted by score: ranking is by score, not file order.
    qrels["q_unsorted"] = {"x1": 1, "x2": 1}
    run["q_unsorted"] = {"y": 0.1, "x1": 0.3, "x2": 0.05, "z": 0.2}

    # Only non-relevant judgments (0): every metric is 0, the query counts in the mean.
    qrels["q_zero"] = {"z1": 0, "z2": 0}
    run["q_zero"] = {"z1": 1.0, "z2": 0.5}

    # Negative relevance is not relevant (and has no negative gain).
    qrels["q_negative"] = {"n": -1, "p": 2, "o": 0}
    run["q_negative"] = {"n": 3.0, "p": 2.0, "o": 1.0}

    # Only negative judgments.
    qrels["q_all_negative"] = {"m": -2}
    run["q_all_negative"] = {"m": 1.0}

    # In the qrels, missing from the run: scores 0, counts in the mean.
    qrels["q_missing"] = {"w": 1}

    # Retrieved documents absent from the qrels, and k far beyond the run's length.
    qrels["q_short"] = {"s1": 1, "s2": 1, "s3": 2}
    run["q_short"] = {"u1": 0.9, "s1": 0.8, "u2": 0.7}

    # Relevant document retrieved at rank 1 only.
    qrels["q_perfect"] = {"p1": 1}
    run["q_perfect"] = {"p1": 5.0}

    # Negative scores.
    qrels["q_negscore"] = {"a": 1, "b": 1}
    run["q_negscore"] = {"a": -1.5, "c": -0.5, "b": -3.0}

    # In the run, not in the qrels: ignored.
    run["q_extra"] = {"e": 1.0}

    # Random graded queries, distinct scores, up to 120 results (beyond ranx's 15-result
    # stable-sort regime, so no ties there).
    rng = random.Random(20260101)
    for i in range(40):
        q = f"r{i:02d}"
        n_docs = rng.randint(20, 150)
        docs = [f"doc{j}" for j in rng.sample(range(400), n_docs)]
        judged = rng.sample(docs + [f"unret{j}" for j in range(5)], rng.randint(1, 12))
        qrels[q] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        n_ret = rng.randint(1, min(120, n_docs))
        scores = rng.sample(range(1, 100000), n_ret)
        run[q] = {d: s / 1000.0 - 20.0 for d, s in zip(docs[:n_ret], scores)}
    return qrels, run


def write_qrels(qrels, trec_path, tsv_path=None):
    with open(trec_path, "w") as f:
        for q, docs in qrels.items():
            for d, r in docs.items():
                f.write(f"{q} 0 {d} {r}\n")
    if tsv_path:
        with open(tsv_path, "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q, docs in qrels.items():
                for d, r in docs.items():
                    f.write(f"{q}\t{d}\t{r}\n")


def write_run(run, path):
    with open(path, "w") as f:
        for q, docs in run.items():
            for rank, (d, s) in enumerate(docs.items(), start=1):
                f.write(f"{q} Q0 {d} {rank} {s!r} fixture\n")


def ranx_fixtures():
    from importlib.metadata import version

    from ranx import Qrels, Run, evaluate

    qrels, run = build()
    OUT.mkdir(parents=True, exist_ok=True)
    write_qrels(qrels, OUT / "qrels.trec", OUT / "qrels.tsv")
    write_run(run, OUT / "run.trec")

    r_qrels = Qrels(dict(qrels))
    r_run = Run(dict(run))
    means = evaluate(r_qrels, r_run, METRICS, make_comparable=True)
    per_query = {m: {q: float(v) for q, v in r_run.scores[m].items()} for m in METRICS}
    assert set(per_query["ndcg@10"]) == set(qrels), "ranx evaluates exactly the qrels' queries"

    # The files read back by ranx give the same numbers.
    f_run = Run.from_file(str(OUT / "run.trec"), kind="trec")
    f_qrels = Qrels.from_file(str(OUT / "qrels.trec"), kind="trec")
    from_files = evaluate(f_qrels, f_run, METRICS, make_comparable=True)
    for m in METRICS:
        assert abs(from_files[m] - means[m]) < 1e-12, m

    expected = {
        "ranx_version": version("ranx"),
        "metrics": METRICS,
        "num_queries": len(qrels),
        "mean": {m: float(v) for m, v in means.items()},
        "per_query": per_query,
    }
    (OUT / "ranx_expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote ranx fixtures to {OUT}")


def trec_eval_fixtures():
    import pytrec_eval

    qrels = {
        "t1": {"d3": 1},
        "t2": {"a": 1, "c": 2},
        "t3": {"m05": 1, "m11": 1},
    }
    run = {
        # All equal: trec_eval ranks d5, d4, d3, d2, d1.
        "t1": {f"d{i}": 1.0 for i in range(1, 6)},
        "t2": {"a": 0.5, "b": 0.5, "c": 0.5, "z": 0.9},
        # 20 equal scores: beyond ranx's stable regime; trec_eval is still deterministic.
        "t3": {f"m{i:02d}": 0.25 for i in range(20)},
    }
    write_qrels(qrels, OUT / "ties_qrels.trec")
    write_run(run, OUT / "ties_run.trec")
    measures = {"recip_rank", "ndcg_cut.10", "map", "P.5", "recall.5"}
    res = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    names = {
        "recip_rank": "mrr",
        "ndcg_cut_10": "ndcg@10",
        "map": "map",
        "P_5": "precision@5",
        "recall_5": "recall@5",
    }
    per_query = {names[k]: {q: res[q][k] for q in res} for k in names}
    (OUT / "trec_eval_expected.json").write_text(
        json.dumps({"per_query": per_query}, indent=1, sort_keys=True) + "\n"
    )
    print(f"wrote trec_eval fixtures to {OUT}")


if __name__ == "__main__":
    if "--trec-eval" in sys.argv:
        trec_eval_fixtures()
    else:
        ranx_fixtures()

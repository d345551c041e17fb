"""PyLate's ``evaluation`` utilities on latte's engine: BEIR folders and IR metrics (ranx definitions)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from latte import _latte

__all__ = ["evaluate", "load_beir_folder", "load_custom_dataset", "get_run"]

DEFAULT_METRICS = ["ndcg@10", "hits@1", "hits@2", "hits@3", "hits@4", "hits@5", "hits@10"]


def get_run(scores: List[List[Dict[str, Any]]], queries: List[str]) -> Dict[str, Dict[str, float]]:
    """PyLate's run: ``{query: {str(document id): score}}`` (the first of duplicated queries wins)."""
    if len(scores) != len(queries):
        raise ValueError(f"{len(scores)} result lists for {len(queries)} queries: they must match")
    run: Dict[str, Dict[str, float]] = {}
    for query, results in zip(queries, scores):
        if query in run:
            continue
        run[query] = {str(r["id"]): float(r["score"]) for r in results}
    return run


def evaluate(
    scores: List[List[Dict[str, Any]]],
    qrels: Dict[str, Dict[str, int]],
    queries: List[str],
    metrics: Optional[List[str]] = None,
) -> Dict[str, float]:
    """PyLate's ``evaluate``: metric means with ranx's definitions (``make_comparable=True``).

    ``scores`` holds per query the ``{"id", "score"}`` results, ``queries`` the query keys of ``qrels``
    (PyLate keys qrels by query text), ``qrels`` maps each query to ``{document id: relevance}``. Default
    metrics: ``ndcg@10`` and ``hits@1…5``, ``hits@10``. Returns ``{metric: mean}``.
    """
    metrics = list(metrics) if metrics else list(DEFAULT_METRICS)
    run = get_run(scores, queries)
    run_list = [(q, list(d.items())) for q, d in run.items()]
    qrels_list = [(str(q), [(str(d), int(r)) for d, r in docs.items()]) for q, docs in qrels.items()]
    return dict(_latte.evaluate(run_list, qrels_list, metrics))


def load_beir_folder(
    path: str, split: str = "test"
) -> Tuple[List[Dict[str, str]], List[str], Dict[str, Dict[str, int]]]:
    """Reads a local BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/{split}.tsv``) as PyLate's
    ``load_beir`` returns a dataset: ``documents`` as ``[{"id", "text"}]`` (``"{title} {text}".strip()``),
    ``queries`` as the texts of the queries judged in the split, ``qrels`` keyed by query text.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no BEIR folder at {path}")
    documents, queries, judgments = _latte.load_beir(path, split)
    text_of = dict(queries)
    qrels: Dict[str, Dict[str, int]] = {}
    for qid, docs in judgments:
        if qid in text_of:
            qrels.setdefault(text_of[qid], {}).update(dict(docs))
    return (
        [{"id": i, "text": t} for i, t in documents],
        [t for _, t in queries],
        qrels,
    )


load_custom_dataset = load_beir_folder

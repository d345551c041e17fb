"""latte.rank.rerank, latte.scores.colbert_scores and latte.evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from latte import evaluation, rank, scores
from conftest import EVAL_FIXTURES, ROOT, maxsim, random_docs


def test_rerank_orders_by_maxsim_and_keeps_ids(rng):
    queries = random_docs(rng, 2, lo=4, hi=5)
    cands = [random_docs(rng, 6, lo=5, hi=6), random_docs(rng, 4, lo=5, hi=6)]
    ids = [[10, 11, 12, 13, 14, 15], ["a", "b", "c", "d"]]
    out = rank.rerank(documents_ids=ids, queries_embeddings=queries, documents_embeddings=cands)
    for q, c, i, r in zip(queries, cands, ids, out):
        want = sorted(zip(i, [maxsim(q, d) for d in c]), key=lambda t: -t[1])
        assert [h["id"] for h in r] == [w[0] for w in want]
        assert np.allclose([h["score"] for h in r], [w[1] for w in want], atol=1e-5)
    with pytest.raises(ValueError):
        rank.rerank(documents_ids=[[1]], queries_embeddings=queries, documents_embeddings=cands)


def test_colbert_scores_match_numpy(rng):
    q = rng.standard_normal((3, 5, 8)).astype(np.float32)
    d = rng.standard_normal((4, 7, 8)).astype(np.float32)
    qm = (rng.random((3, 5)) > 0.3).astype(np.float32)
    dm = (rng.random((4, 7)) > 0.3).astype(np.float32)
    s = np.einsum("ash,bth->abst", q, d) * qm[:, None, :, None] * dm[None, :, None, :]
    want = s.max(-1).sum(-1)
    got = scores.colbert_scores(q, d, qm, dm)
    assert got.shape == (3, 4) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4
    plain = np.einsum("ash,bth->abst", q, d).max(-1).sum(-1)
    assert np.abs(scores.colbert_scores(q, d) - plain).max() <= 1e-4
    pair = scores.colbert_scores_pairwise(list(q[:3]), list(d[:3]))
    assert np.allclose(pair, np.diag(plain[:, :3]), atol=1e-4)
    with pytest.raises(ValueError):
        scores.colbert_scores(q, rng.standard_normal((2, 3, 4)).astype(np.float32))


def _read_trec(path):
    run = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 6:
            run.setdefault(parts[0], []).append({"id": parts[2], "score": float(parts[4])})
    return run


def test_evaluate_matches_ranx_fixtures():
    expected = json.loads((EVAL_FIXTURES / "ranx_expected.json").read_text())
    run = _read_trec(EVAL_FIXTURES / "run.trec")
    qrels = {}
    for line in (EVAL_FIXTURES / "qrels.tsv").read_text().splitlines()[1:]:
        q, d, r = line.split("\t")
        qrels.setdefault(q, {})[d] = int(r)
    queries = list(run)
    got = evaluation.evaluate(
        scores=[run[q] for q in queries], qrels=qrels, queries=queries, metrics=expected["metrics"]
    )
    for metric, value in expected["mean"].items():
        assert got[metric] == pytest.approx(value, abs=1e-6), metric
    default = evaluation.evaluate(scores=[run[q] for q in queries], qrels=qrels, queries=queries)
    assert set(default) == {"ndcg@10", "hits@1", "hits@2", "hits@3", "hits@4", "hits@5", "hits@10"}
    with pytest.raises(ValueError):
        evaluation.evaluate(scores=[], qrels=qrels, queries=[], metrics=["nonsense@3"])


def test_load_beir_folder_as_pylate():
    documents, queries, qrels = evaluation.load_beir_folder(str(ROOT / "data" / "demo"), split="test")
    assert documents and set(documents[0]) == {"id", "text"}
    assert queries and all(isinstance(q, str) for q in queries)
    assert set(qrels) == set(queries)
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        evaluation.load_beir_folder(str(ROOT / "missing-dir"))
    with pytest.raises(FileNotFoundError, match="nosplit"):
        evaluation.load_beir_folder(str(ROOT / "data" / "demo"), split="nosplit")

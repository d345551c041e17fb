"""Writes PyLate reference outputs for latte-index's tests (run by hand, never in CI):

    $WORK/venv/bin/python scripts/make_index_fixtures.py crates/latte-index/tests/fixtures

pylate==1.6.0. Inputs are small random arrays (seeded); outputs are PyLate's colbert_scores (with and without
masks), colbert_scores_pairwise, colbert_kd_scores, rank.rerank and pool_embeddings_hierarchical.
"""
import json
import os
import sys

import numpy as np
import torch
from pylate import models, rank
from pylate.scores import colbert_kd_scores, colbert_scores, colbert_scores_pairwise

out = sys.argv[1]
rng = np.random.default_rng(1234)


def unit(*shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def flat(x):
    return [float(v) for v in np.asarray(x, dtype=np.float32).ravel()]


# colbert_scores: raw (not unit) values so negative similarities occur.
Q = rng.standard_normal((2, 4, 8)).astype(np.float32)
D = rng.standard_normal((3, 5, 8)).astype(np.float32)
qm = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=np.float32)
dm = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=np.float32)
scores = {
    "q": flat(Q), "q_shape": list(Q.shape), "d": flat(D), "d_shape": list(D.shape),
    "queries_mask": flat(qm), "documents_mask": flat(dm),
    "plain": flat(colbert_scores(t(Q), t(D))),
    "masked": flat(colbert_scores(t(Q), t(D), t(qm), t(dm))),
}
# pairwise on ragged unit vectors
pq = [unit(n, 8) for n in (3, 5, 2)]
pd = [unit(n, 8) for n in (4, 1, 6)]
scores["pairwise"] = {
    "queries": [flat(x) for x in pq], "documents": [flat(x) for x in pd],
    "scores": flat(colbert_scores_pairwise([t(x) for x in pq], [t(x) for x in pd])),
}
KQ = rng.standard_normal((2, 3, 8)).astype(np.float32)
KD = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
kqm = np.array([[1, 1, 0], [1, 1, 1]], dtype=np.float32)
kdm = (rng.random((2, 3, 4)) > 0.3).astype(np.float32)
kdm[..., 0] = 1
scores["kd"] = {
    "q": flat(KQ), "q_shape": list(KQ.shape), "d": flat(KD), "d_shape": list(KD.shape),
    "queries_mask": flat(kqm), "documents_mask": flat(kdm),
    "plain": flat(colbert_kd_scores(t(KQ), t(KD))),
    "masked": flat(colbert_kd_scores(t(KQ), t(KD), t(kqm), t(kdm))),
}
with open(os.path.join(out, "scores.json"), "w") as f:
    json.dump(scores, f)

# rerank: per query, candidates of different lengths.
queries = [unit(4, 8), unit(3, 8)]
cands = [[unit(n, 8) for n in (2, 5, 3, 5)], [unit(n, 8) for n in (1, 4, 2)]]
ids = [["a", "b", "c", "d"], ["x", "y", "z"]]
res = rank.rerank(documents_ids=ids, queries_embeddings=queries, documents_embeddings=cands)
with open(os.path.join(out, "rerank.json"), "w") as f:
    json.dump({
        "queries": [flat(q) for q in queries],
        "documents": [[flat(d) for d in c] for c in cands],
        "ids": ids,
        "expected": [[{"id": r["id"], "score": float(r["score"])} for r in rr] for rr in res],
    }, f)

# pooling
docs = [unit(n, 16) for n in (9, 17, 30, 2)]
pool = {"dim": 16, "documents": [flat(d) for d in docs]}
for factor in (2, 3):
    pooled = models.ColBERT.pool_embeddings_hierarchical(None, [t(d) for d in docs], pool_factor=factor)
    pool[f"pool_factor_{factor}"] = [flat(p.numpy()) for p in pooled]
with open(os.path.join(out, "pool.json"), "w") as f:
    json.dump(pool, f)
print("wrote fixtures to", out)

"""PyLate's own evaluation pipeline on a BEIR folder, as the reference for `latte evaluate`.

PyLate encode (corpus + queries, or reuse .npz files written by scripts/encode_rustbooks.py) + exact
MaxSim (`pylate.scores.colbert_scores`, documents zero-padded as `rank.rerank` does) + ranx metrics.
Run by hand (never in CI):

    HF_HUB_OFFLINE=1 venv/bin/python scripts/pylate_eval_rustbooks.py DATA_DIR DOCS.npz DOC_IDS QUERIES.npz QUERY_IDS [K]
"""

import sys
import time

import numpy as np
import torch
from pylate.scores import colbert_scores
from ranx import Qrels, Run, evaluate

data_dir, docs_npz, doc_ids, q_npz, q_ids = sys.argv[1:6]
k = int(sys.argv[6]) if len(sys.argv) > 6 else 100
torch.set_num_threads(2)
t0 = time.time()
d = np.load(docs_npz)
docs = [torch.from_numpy(d[f"arr_{i}"]) for i in range(len(d.files))]
dids = open(doc_ids).read().split()
q = np.load(q_npz)
queries = torch.stack([torch.from_numpy(q[f"arr_{i}"]) for i in range(len(q.files))])
qids = open(q_ids).read().split()
qrels = {}
for i, line in enumerate(open(f"{data_dir}/qrels/test.tsv")):
    if i == 0:
        continue
    a, b, s = line.split("\t")
    qrels.setdefault(a, {})[b] = int(s)
scores = torch.zeros(len(qids), len(dids))
order = sorted(range(len(docs)), key=lambda i: docs[i].shape[0])
with torch.no_grad():
    for s in range(0, len(order), 512):
        idx = order[s : s + 512]
        batch = torch.nn.utils.rnn.pad_sequence([docs[i] for i in idx], batch_first=True)
        scores[:, idx] = colbert_scores(queries, batch)
top = torch.topk(scores, k, dim=1)
run = {
    qid: {dids[j]: float(v) for v, j in zip(top.values[r].tolist(), top.indices[r].tolist())}
    for r, qid in enumerate(qids)
    if qid in qrels
}
res = evaluate(Qrels(qrels), Run(run), ["ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100"], make_comparable=True)
print({m: round(v, 4) for m, v in res.items()}, f"scoring+metrics {time.time() - t0:.1f}s")

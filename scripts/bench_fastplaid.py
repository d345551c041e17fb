"""PyLate PLAID (fast-plaid backend, defaults) on the same embeddings as `bench` (run by hand, never in CI).

    $WORK/venv/bin/python scripts/bench_fastplaid.py $WORK/bench/rustbooks_docs.npz \
        $WORK/bench/rustbooks_queries.npz $WORK/bench/truth500.txt /tmp/fp_index 200

Prints build seconds, peak RSS, single-query p50/p95 and recall@10 against the exact top-10 in TRUTH (document ids
are positions, as written by `bench truth`).
"""
import resource
import sys
import time

import numpy as np
import torch
from pylate import indexes, retrieve

docs_path, queries_path, truth_path, folder, nq = sys.argv[1:6]
nq = int(nq)
torch.set_num_threads(2)
docs = np.load(docs_path)
docs = [docs[f"arr_{i}"] for i in range(len(docs.files))]
queries = np.load(queries_path)
queries = [queries[f"arr_{i}"] for i in range(min(nq, len(queries.files)))]
truth = [line.split() for line in open(truth_path)]

t = time.time()
index = indexes.PLAID(index_folder=folder, index_name="rustbooks", override=True, show_progress=False)
index.add_documents(documents_ids=[str(i) for i in range(len(docs))], documents_embeddings=docs)
build = time.time() - t
retriever = retrieve.ColBERT(index=index)
lat, rec = [], 0.0
for i, q in enumerate(queries):
    t = time.time()
    res = retriever.retrieve(queries_embeddings=[q], k=10)[0]
    lat.append((time.time() - t) * 1e3)
    rec += len({r["id"] for r in res} & set(truth[i][:10])) / 10
lat.sort()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"fast-plaid: build {build:.1f}s peak_rss {peak:.0f} MB; {len(queries)} queries recall@10 {rec / len(queries):.4f} "
      f"p50 {lat[len(lat) // 2]:.1f} ms p95 {lat[len(lat) * 95 // 100]:.1f} ms")

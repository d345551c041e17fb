#!/usr/bin/env python3
"""One PyLate pipeline, run on PyLate or on latte by changing the import line only.

encode the documents -> PLAID index -> encode the queries -> retrieve the top 10 -> rerank -> evaluate
(nDCG@10 against the qrels), on a BEIR folder, printing documents/s of encoding and the seconds of each step.

    python scripts/pipeline.py pylate MODEL BEIR_DIR [N_DOCS]     # import pylate
    python scripts/pipeline.py latte  MODEL BEIR_DIR [N_DOCS]     # import latte (the same code below)

The first N_DOCS documents (default all) are indexed; the queries are those of qrels/test.tsv with at least
one judged document among them. Data is read here with the json module, the same for both backends.
"""
import json
import os
import sys
import tempfile
import time

t_start = time.perf_counter()
backend = sys.argv[1]
if backend == "pylate":
    from pylate import evaluation, indexes, models, rank, retrieve
elif backend == "latte":
    from latte import evaluation, indexes, models, rank, retrieve  # the one line that changes
else:
    sys.exit("usage: pipeline.py pylate|latte MODEL BEIR_DIR [N_DOCS]")
t_import = time.perf_counter() - t_start

model_path, beir = sys.argv[2], sys.argv[3]
n_docs = int(sys.argv[4]) if len(sys.argv) > 4 else None

documents = []
with open(os.path.join(beir, "corpus.jsonl"), encoding="utf-8") as f:
    for line in f:
        d = json.loads(line)
        documents.append((str(d["_id"]), (d.get("title", "") + " " + d["text"]).strip()))
documents = documents[:n_docs] if n_docs else documents
kept = {i for i, _ in documents}
query_text = {}
with open(os.path.join(beir, "queries.jsonl"), encoding="utf-8") as f:
    for line in f:
        q = json.loads(line)
        query_text[str(q["_id"])] = q["text"]
qrels = {}
with open(os.path.join(beir, "qrels", "test.tsv"), encoding="utf-8") as f:
    next(f)
    for line in f:
        qid, did, rel = line.rstrip("\n").split("\t")
        if did in kept and int(rel) > 0:
            qrels.setdefault(query_text[qid], {})[did] = int(rel)
queries = list(qrels)

timings = {}
t = time.perf_counter()
model = models.ColBERT(model_name_or_path=model_path)
timings["load model"] = time.perf_counter() - t

t = time.perf_counter()
documents_embeddings = model.encode(
    [text for _, text in documents], batch_size=32, is_query=False, show_progress_bar=False
)
timings["encode documents"] = time.perf_counter() - t

with tempfile.TemporaryDirectory() as folder:
    t = time.perf_counter()
    index = indexes.PLAID(index_folder=folder, index_name="pipeline", override=True)
    index.add_documents(
        documents_ids=[i for i, _ in documents], documents_embeddings=documents_embeddings
    )
    timings["index"] = time.perf_counter() - t

    t = time.perf_counter()
    queries_embeddings = model.encode(queries, batch_size=32, is_query=True, show_progress_bar=False)
    timings["encode queries"] = time.perf_counter() - t

    t = time.perf_counter()
    retriever = retrieve.ColBERT(index=index)
    scores = retriever.retrieve(queries_embeddings=queries_embeddings, k=10)
    timings["retrieve"] = time.perf_counter() - t

    t = time.perf_counter()
    position = {i: n for n, (i, _) in enumerate(documents)}
    candidates = [[hit["id"] for hit in hits] for hits in scores]
    reranked = rank.rerank(
        documents_ids=candidates,
        queries_embeddings=queries_embeddings,
        documents_embeddings=[[documents_embeddings[position[i]] for i in ids] for ids in candidates],
    )
    timings["rerank"] = time.perf_counter() - t

t = time.perf_counter()
metrics = evaluation.evaluate(scores=reranked, qrels=qrels, queries=queries, metrics=["ndcg@10"])
timings["evaluate"] = time.perf_counter() - t

total = time.perf_counter() - t_start
print(f"backend {backend}: {len(documents)} documents, {len(queries)} queries")
print(f"import {t_import:.2f} s")
for step, secs in timings.items():
    print(f"{step} {secs:.2f} s")
print(f"documents/s (encode) {len(documents) / timings['encode documents']:.1f}")
ndcg = metrics["ndcg@10"] if isinstance(metrics, dict) else float(metrics)  # ranx returns a bare float for one metric
print(f"nDCG@10 {ndcg:.4f}")
print(f"end to end {total:.2f} s")

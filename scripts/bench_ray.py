"""latte.ray benchmark (run by hand, never in CI): encode throughput with 1 and 2 Ray workers, and search latency
of a 2-shard ShardedIndex against one PLAID index on the same documents.

Starts a local Ray cluster of two nodes (separate processes, 1 CPU each). Each Ray worker, and this process,
run the engine on one thread (RAYON_NUM_THREADS=1), so that "2 workers" means two cores and the numbers compare.

    RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONPATH=<staged latte> \\
        python scripts/bench_ray.py --dataset data/demo --model MODEL [--docs N] [--out DIR] [--no-ray-encode]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import latte  # noqa: E402
import latte.ray as lray  # noqa: E402
from latte import indexes, models  # noqa: E402


def read_jsonl(path: Path, n: int | None = None) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if n is not None and len(rows) == n:
                    break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--docs", type=int, default=None, help="first N passages (default: all)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default=None, help="folder for the indexes (default: a temporary one)")
    ap.add_argument(
        "--no-ray-encode",
        action="store_true",
        help="skip the Ray encoding runs (the sharded index is built from the one-process embeddings)",
    )
    args = ap.parse_args()

    corpus = [
        {"_id": r["_id"], "text": f"{r.get('title', '')} {r['text']}".strip()}
        for r in read_jsonl(Path(args.dataset) / "corpus.jsonl", args.docs)
    ]
    queries = [q["text"] for q in read_jsonl(Path(args.dataset) / "queries.jsonl", args.queries)]
    out = Path(args.out or tempfile.mkdtemp(prefix="latte-bench-ray-"))
    print(f"{len(corpus)} passages, {len(queries)} queries, model {args.model}, indexes in {out}")

    node = {"num_cpus": 1, "object_store_memory": 512 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    package_root = str(Path(latte.__file__).resolve().parents[1])
    env = {"PYTHONPATH": package_root, "RAYON_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    # Encode: one process (no Ray), then Ray with 1 and 2 workers (each 1 CPU, one per node at 2).
    model = models.ColBERT(args.model)
    texts = [r["text"] for r in corpus]
    t = time.perf_counter()
    single = model.encode(texts, is_query=False, batch_size=32)
    secs = time.perf_counter() - t
    tokens = sum(e.shape[0] for e in single)
    print(f"encode, one process, no Ray:  {secs:7.2f} s  {len(texts) / secs:7.1f} passages/s  {tokens / secs:8.0f} tokens/s")
    encoded = None
    for workers in () if args.no_ray_encode else (1, 2):
        ds = ray.data.from_items(corpus, override_num_blocks=max(8, 4 * workers))
        t = time.perf_counter()
        encoded = lray.encode(ds, args.model, batch_size=32, concurrency=workers, num_cpus=1).materialize()
        secs = time.perf_counter() - t
        print(
            f"encode, Ray, {workers} worker(s):     {secs:7.2f} s  {len(texts) / secs:7.1f} passages/s  "
            f"{tokens / secs:8.0f} tokens/s  (model load and actor start included)"
        )
    if encoded is None:
        rows = [{"_id": r["_id"], "embeddings": e} for r, e in zip(corpus, single)]
        encoded = ray.data.from_items(rows, override_num_blocks=8)
        embeddings = {r["_id"]: e for r, e in zip(corpus, single)}
    else:
        embeddings = {str(r["_id"]): r["embeddings"] for r in encoded.take_all()}
        same = all(np.array_equal(embeddings[r["_id"]], e) for r, e in zip(corpus, single))
        print(f"Ray embeddings identical to the one-process ones: {same}")

    # Indexes: one PLAID index and a 2-shard index over the same documents.
    ids = sorted(embeddings)
    t = time.perf_counter()
    one = indexes.PLAID(index_folder=str(out), index_name="single", override=True)
    one.add_documents(ids, [embeddings[i] for i in ids])
    print(f"build, one index:   {time.perf_counter() - t:6.2f} s")
    t = time.perf_counter()
    lray.build_sharded(encoded, out / "sharded", num_shards=2, override=True, model=args.model)
    print(f"build, 2 shards:    {time.perf_counter() - t:6.2f} s (staging, one build task per node)")

    q = model.encode(queries, is_query=True)
    with lray.ShardedIndex(out / "sharded") as sharded:
        for name, search in (
            ("one index, in process", lambda batch: one(batch, k=10)),
            ("2 shards, Ray actors ", lambda batch: sharded.search(queries_embeddings=batch, k=10)),
        ):
            search(q[:5])  # warm: memory maps, actors
            lat = []
            for query in q:
                t = time.perf_counter()
                search([query])
                lat.append((time.perf_counter() - t) * 1000)
            lat.sort()
            t = time.perf_counter()
            search(q)
            batch_secs = time.perf_counter() - t
            print(
                f"search {name}: one query per call p50 {statistics.median(lat):6.2f} ms  "
                f"p95 {lat[int(0.95 * (len(lat) - 1))]:6.2f} ms;  batch of {len(q)}: {len(q) / batch_secs:7.1f} queries/s"
            )
        got = sharded.search(queries_embeddings=q, k=10)
    # One index built with the codec the shards share, and the exact top 10 (brute-force MaxSim).
    codec = indexes.Codec.from_index(str(out / "sharded" / "shard-00000"))
    shared = indexes.PLAID(index_folder=str(out), index_name="single-shared-codec", override=True, codec=codec)
    shared.add_documents(ids, [embeddings[i] for i in ids])
    exact = indexes.Exact()
    exact.add_documents(ids, [embeddings[i] for i in ids])
    truth = exact(q, k=10)

    def ids_of(res: list) -> list:
        return [[h["id"] for h in r] for r in res]

    def recall(res: list) -> float:
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids_of(res), ids_of(truth))]))

    own = one(q, k=10)
    same_codec = shared(q, k=10)
    for name, other in (("one index, its own codec", own), ("one index, the shards' codec", same_codec)):
        equal = sum(a == b for a, b in zip(ids_of(got), ids_of(other)))
        print(f"2 shards vs {name}: top-10 equal for {equal} of {len(q)} queries")
    diff = max(abs(a["score"] - b["score"]) for g, w in zip(got, same_codec) for a, b in zip(g, w))
    print(f"largest score difference, 2 shards vs one index with the shards' codec: {diff:.2e}")
    for name, res in (("one index, own codec", own), ("one index, shards' codec", same_codec), ("2 shards", got)):
        exact_top = sum(a == b for a, b in zip(ids_of(res), ids_of(truth)))
        print(f"{name}: recall@10 {recall(res):.4f}, top-10 exact for {exact_top} of {len(q)} queries")
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()

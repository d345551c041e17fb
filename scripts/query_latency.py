#!/usr/bin/env python3
"""Query encoding latency, the serving case: one query per `encode` call, on PyLate or on latte.

The same code runs on both backends; only the import changes. For each of the first N queries of a BEIR
queries.jsonl (after WARMUP calls that are not counted), it times `model.encode([query], is_query=True)` and
prints one JSON line with p50 / p95 / p99 / mean in milliseconds. Run each backend in its own process, in turn,
on the same threads (torch: `torch.set_num_threads`; latte: `RAYON_NUM_THREADS`), by hand, never in CI:

    RAYON_NUM_THREADS=2 python scripts/query_latency.py latte  MODEL QUERIES.jsonl [N] [--dtype bf16]
    python scripts/query_latency.py pylate MODEL QUERIES.jsonl [N] [--threads 2] [--autocast]
"""
import argparse
import json
import statistics
import time

parser = argparse.ArgumentParser()
parser.add_argument("backend", choices=["pylate", "latte"])
parser.add_argument("model")
parser.add_argument("queries")
parser.add_argument("n", nargs="?", type=int, default=500)
parser.add_argument("--warmup", type=int, default=20)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--dtype", default=None, help="latte only: f32, bf16 or int8")
parser.add_argument("--autocast", action="store_true", help="pylate only: torch.autocast('cpu', bfloat16)")
args = parser.parse_args()

texts = []
with open(args.queries, encoding="utf-8") as f:
    for line in f:
        texts.append(json.loads(line)["text"])
texts = texts[: args.n + args.warmup]

ctx = None
if args.backend == "pylate":
    import contextlib

    import torch
    from pylate import models

    torch.set_num_threads(args.threads)
    model = models.ColBERT(args.model, device="cpu")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext()
    ctx.__enter__()
    grad = torch.inference_mode()
    grad.__enter__()
else:
    from latte import models

    model = models.ColBERT(args.model, **({"dtype": args.dtype} if args.dtype else {}))

lat = []
for i, q in enumerate(texts):
    t = time.perf_counter()
    model.encode([q], is_query=True, show_progress_bar=False)
    if i >= args.warmup:
        lat.append((time.perf_counter() - t) * 1e3)

lat.sort()


def pct(p: float) -> float:
    return lat[min(len(lat) - 1, int(p * len(lat)))]


print(
    json.dumps(
        {
            "backend": args.backend,
            "dtype": args.dtype or ("bf16-autocast" if args.autocast else "f32"),
            "queries": len(lat),
            "p50_ms": round(pct(0.50), 3),
            "p95_ms": round(pct(0.95), 3),
            "p99_ms": round(pct(0.99), 3),
            "mean_ms": round(statistics.fmean(lat), 3),
        }
    )
)

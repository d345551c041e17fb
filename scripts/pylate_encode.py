"""PyLate 1.6.0 encoding job, the reference side of latte's encode benchmarks (run by hand, never in CI).

    HF_HUB_OFFLINE=1 venv/bin/python scripts/pylate_encode.py MODEL_DIR PASSAGES.jsonl [--autocast] [--queries]
        [--batch-size 32] [--threads 2] [--out OUT.npz]

Encodes the `text` of every line of PASSAGES.jsonl (documents, or queries with --queries) with
`models.ColBERT(MODEL_DIR).encode(..., batch_size=32)`, in fp32 or, with --autocast, inside
`torch.autocast("cpu", dtype=torch.bfloat16)` (the configuration a performance-minded PyLate user runs on a
CPU with bf16 units). Prints one JSON line: load and encode seconds, docs/s, tokens. With --out, saves the
embeddings (float32) as an .npz in the order of the input, for accuracy comparisons.
"""

import argparse
import json
import sys
import time

t0 = time.time()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pylate import models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("passages")
    ap.add_argument("--autocast", action="store_true")
    ap.add_argument("--queries", action="store_true")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = models.ColBERT(a.model, device="cpu")
    load = time.time() - t0
    texts = [json.loads(line)["text"] for line in open(a.passages) if line.strip()]
    start = time.time()
    if a.autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = model.encode(texts, is_query=a.queries, batch_size=a.batch_size, show_progress_bar=False)
    else:
        emb = model.encode(texts, is_query=a.queries, batch_size=a.batch_size, show_progress_bar=False)
    dt = time.time() - start
    emb = [np.asarray(e, dtype=np.float32) for e in emb]
    if a.out:
        np.savez(a.out, *emb)
    print(json.dumps({"load_s": round(load, 3), "encode_s": round(dt, 3), "docs_per_s": round(len(texts) / dt, 2),
                      "tokens": int(sum(e.shape[0] for e in emb)), "autocast_bf16": a.autocast}))


if __name__ == "__main__":
    sys.exit(main())

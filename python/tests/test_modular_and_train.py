"""latte.models' modular syntax (Transformer, Dense, ColBERT(modules=...)) and latte.train."""

from __future__ import annotations

import json

import numpy as np
import pytest

import latte
from latte import models
from conftest import MODEL_FIXTURES

BASE = MODEL_FIXTURES / "models" / "bert_pylate"  # a BERT body of hidden size 32

TEXTS = ["the cat sat on the mat", "rust makes fast retrieval engines", "a third, short one"]


def build():
    base = models.Transformer(str(BASE))
    dense_1 = models.Dense(32, 24, bias=False, activation_function="gelu", seed=1)
    dense_2 = models.Dense(24, 8, bias=True, activation_function="identity", use_residual=False, seed=2)
    return models.ColBERT(modules=[base, dense_1, dense_2], document_length=30, query_length=12)


def test_modular_build_save_reload_same_embeddings(tmp_path):
    model = build()
    assert len(model) == 3
    assert model.get_sentence_embedding_dimension() == 8
    assert (model.query_length, model.document_length) == (12, 30)
    docs = model.encode(TEXTS, is_query=False)
    queries = model.encode(TEXTS, is_query=True)
    assert queries[0].shape == (12, 8)
    model.save(str(tmp_path / "built"))
    assert json.loads((tmp_path / "built" / "1_Dense" / "config.json").read_text())["activation_function"] == (
        "torch.nn.modules.activation.GELU"
    )
    assert (tmp_path / "built" / "2_Dense" / "model.safetensors").is_file()
    again = models.ColBERT(str(tmp_path / "built"))
    assert len(again) == 3
    assert (again.query_length, again.document_length) == (12, 30)
    for a, b in zip(docs, again.encode(TEXTS, is_query=False)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(queries, again.encode(TEXTS, is_query=True)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_dense_seed_is_deterministic_and_matters():
    a = build().encode(TEXTS[:1], is_query=False)[0]
    b = build().encode(TEXTS[:1], is_query=False)[0]
    np.testing.assert_array_equal(a, b)
    base = models.Transformer(str(BASE))
    other = models.ColBERT(
        modules=[base, models.Dense(32, 24, bias=False, activation_function="gelu", seed=3),
                 models.Dense(24, 8, activation_function="identity", seed=2)],
        document_length=30, query_length=12,
    )
    assert not np.allclose(a, other.encode(TEXTS[:1], is_query=False)[0])


def test_print_lists_modules_as_pylate():
    model = build()
    text = str(model)
    assert text.startswith("ColBERT(\n  (0): Transformer(")
    assert (
        "  (1): Dense({'in_features': 32, 'out_features': 24, 'bias': False, "
        "'activation_function': 'torch.nn.modules.activation.GELU', 'use_residual': False})"
    ) in text
    assert (
        "  (2): Dense({'in_features': 24, 'out_features': 8, 'bias': True, "
        "'activation_function': 'torch.nn.modules.linear.Identity', 'use_residual': False})"
    ) in text
    assert repr(models.Dense(4, 2, bias=False, activation_function="torch.nn.modules.activation.Tanh")) == (
        "Dense({'in_features': 4, 'out_features': 2, 'bias': False, "
        "'activation_function': 'torch.nn.modules.activation.Tanh', 'use_residual': False})"
    )


def test_append_and_delete():
    model = build()
    model.append(models.Dense(8, 4, bias=False, activation_function="relu", use_residual=True))
    assert len(model) == 4
    assert model.get_sentence_embedding_dimension() == 4
    assert "(3): Dense({'in_features': 8, 'out_features': 4" in str(model)
    del model[3]
    assert len(model) == 3
    assert model.get_sentence_embedding_dimension() == 8
    with pytest.raises(ValueError, match="24"):
        model.append(models.Dense(24, 4))
    with pytest.raises(IndexError):
        del model[7]


def test_torch_activation_instance_if_torch_installed():
    torch = pytest.importorskip("torch")
    dense = models.Dense(32, 8, activation_function=torch.nn.GELU())
    assert dense.activation_function == "torch.nn.modules.activation.GELU"


def test_modular_errors():
    with pytest.raises(ValueError, match="activation_function"):
        models.Dense(4, 2, activation_function=object())
    with pytest.raises(ValueError, match="nosuch"):
        models.Dense(4, 2, activation_function="nosuch")
    with pytest.raises(ValueError, match="in_features"):
        models.Dense(0, 2)
    with pytest.raises(FileNotFoundError):
        models.Transformer("/nonexistent/folder/of/a/model")
    with pytest.raises(ValueError, match="Transformer"):
        models.ColBERT(modules=[models.Dense(32, 8)])
    with pytest.raises(ValueError, match="32"):
        models.ColBERT(modules=[models.Transformer(str(BASE)), models.Dense(16, 8)])


TRIPLETS = [
    ("what do cats sit on", "the cat sat on the mat", "rust makes fast retrieval engines"),
    ("which language is fast", "rust makes fast retrieval engines", "the cat sat on the mat"),
    ("where is paris", "paris is the capital of france", "bananas are yellow fruit"),
    ("colour of bananas", "bananas are yellow fruit", "paris is the capital of france"),
    ("late interaction", "colbert scores tokens with maxsim", "the weather is sunny today"),
    ("is it sunny", "the weather is sunny today", "colbert scores tokens with maxsim"),
]


def write_triplets(path):
    with open(path, "w", encoding="utf-8") as f:
        for q, p, n in TRIPLETS:
            f.write(json.dumps({"query": q, "positive": p, "negative": n}) + "\n")


def test_train_tiny_run(tmp_path):
    data = tmp_path / "train.jsonl"
    write_triplets(data)
    model = models.ColBERT(str(BASE))
    before = model.encode(TEXTS[:1], is_query=False)[0]
    out, metrics = latte.train(
        model=model, train=data, loss="contrastive", output=tmp_path / "out",
        batch_size=3, epochs=2, lr=1e-3, logging_steps=1, train_seed=7,
    )
    assert out == str(tmp_path / "out")
    assert metrics, "no metrics were logged"
    assert all(isinstance(m, dict) for m in metrics)
    assert any("loss" in m for m in metrics)
    trained = models.ColBERT(out)
    assert len(trained) == len(model)
    after = trained.encode(TEXTS[:1], is_query=False)[0]
    assert after.shape == before.shape
    assert not np.allclose(before, after), "training did not change the model"
    # The model passed in is left unchanged.
    np.testing.assert_array_equal(before, model.encode(TEXTS[:1], is_query=False)[0])


def test_train_bf16_runs_and_writes_float32(tmp_path):
    data = tmp_path / "train.jsonl"
    write_triplets(data)
    args = dict(train=data, loss="contrastive", batch_size=3, epochs=2, lr=1e-3, logging_steps=1,
                train_seed=7, no_dropout=True)
    out32, m32 = latte.train(model=str(BASE), output=tmp_path / "f32", **args)
    out16, m16 = latte.train(model=str(BASE), output=tmp_path / "bf16", dtype="bfloat16", **args)
    _, mflag = latte.train(model=str(BASE), output=tmp_path / "flag", bf16=True, **args)
    loss = lambda ms: [m["loss"] for m in ms if "loss" in m]
    assert len(loss(m16)) == len(loss(m32)) > 0
    np.testing.assert_allclose(loss(mflag), loss(m16), rtol=1e-4, err_msg="bf16=True is dtype='bfloat16'")
    for a, b in zip(loss(m32), loss(m16)):
        assert abs(a - b) <= 0.05 * max(abs(a), 0.05), (loss(m32), loss(m16))
    e32 = models.ColBERT(out32).encode(TEXTS[:1], is_query=False)[0]
    e16 = models.ColBERT(out16).encode(TEXTS[:1], is_query=False)[0]
    assert e16.dtype == np.float32
    assert not np.array_equal(e32, e16), "bf16 products did not run"
    cos = (e32 * e16).sum(axis=1) / (np.linalg.norm(e32, axis=1) * np.linalg.norm(e16, axis=1))
    assert cos.min() > 0.98, cos
    with pytest.raises(ValueError, match="int8"):
        latte.train(model=str(BASE), output=tmp_path / "i8", dtype="int8", **args)
    with pytest.raises(ValueError, match="dtype"):
        latte.train(model=str(BASE), output=tmp_path / "x", dtype="fp8", **args)


def test_train_errors(tmp_path):
    data = tmp_path / "train.jsonl"
    write_triplets(data)
    with pytest.raises(ValueError, match="no_such_option"):
        latte.train(model=str(BASE), train=data, output=tmp_path / "o", no_such_option=1)
    with pytest.raises(ValueError, match="loss"):
        latte.train(model=str(BASE), train=data, loss="hinge", output=tmp_path / "o")
    with pytest.raises(ValueError, match="output"):
        latte.train(model=str(BASE), train=data)
    with pytest.raises(FileNotFoundError):
        latte.train(model=str(BASE), train=tmp_path / "missing.jsonl", output=tmp_path / "o")
    with pytest.raises(ValueError, match="batch_size"):
        latte.train(model=str(BASE), train=data, output=tmp_path / "o", batch_size="eight")

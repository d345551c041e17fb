"""latte.models.ColBERT: PyLate's golden fixtures, the CLI's output, saving, errors and threads."""

from __future__ import annotations

import json
import subprocess
import threading

import numpy as np
import pytest

import latte
from latte.models import ColBERT
from conftest import MODEL_FIXTURES, latte_binary, read_safetensors

MODEL = MODEL_FIXTURES / "models" / "bert_pylate"

CASES = sorted(
    p.stem
    for p in (MODEL_FIXTURES / "expected").glob("*.json")
    if json.loads(p.read_text())["exact"]
)


def tolerance(case: str) -> float:
    return 1e-4 if case.startswith(("xlmr_", "jina_", "gemma_")) else 1e-5


@pytest.mark.parametrize("case", CASES)
def test_encode_matches_pylate_fixtures(case):
    meta = json.loads((MODEL_FIXTURES / "expected" / f"{case}.json").read_text())
    expected = read_safetensors(MODEL_FIXTURES / "expected" / f"{case}.safetensors")
    kwargs = dict(meta["kwargs"])
    model = ColBERT(str(MODEL_FIXTURES / meta["model"]), **kwargs)
    tol = tolerance(case)
    resolved = meta["resolved"]
    for key in ("query_prefix", "document_prefix", "query_length", "document_length"):
        assert getattr(model, key) == resolved[key], key
    queries = model.encode(
        meta["queries"], is_query=True, batch_size=3, **meta.get("query_encode_kwargs", {})
    )
    docs = model.encode(
        meta["documents"], is_query=False, batch_size=3, **meta.get("doc_encode_kwargs", {})
    )
    for i, q in enumerate(queries):
        want = expected[f"query_emb.{i}"]
        assert q.dtype == np.float32
        assert q.shape == want.shape, (case, "query", i)
        assert np.abs(q - want).max() <= tol, (case, "query", i)
    for i, d in enumerate(docs):
        want = expected[f"doc_emb.{i}"]
        assert d.shape == want.shape, (case, "document", i)
        assert np.abs(d - want).max() <= tol, (case, "document", i)
    if "doc_pool2.0" in expected and not meta.get("doc_encode_kwargs"):
        pooled = model.encode(meta["documents"], is_query=False, batch_size=3, pool_factor=2)
        for i, d in enumerate(pooled):
            want = expected[f"doc_pool2.{i}"]
            assert d.shape == want.shape, (case, "pooled", i)
            assert np.abs(d - want).max() <= tol, (case, "pooled", i)


def test_str_input_gives_one_array_and_list_gives_list():
    model = ColBERT(str(MODEL))
    one = model.encode("what is ownership?", is_query=True)
    assert isinstance(one, np.ndarray) and one.ndim == 2
    assert one.shape == (model.query_length, model.get_sentence_embedding_dimension())
    many = model.encode(["a", "b c d"], is_query=False)
    assert isinstance(many, list) and len(many) == 2
    nested = model.encode([["a"], ["b", "c"]], is_query=False)
    assert [len(g) for g in nested] == [1, 2]
    padded = model.encode(["a", "b c d e f"], is_query=False, padding=True)
    assert padded[0].shape == padded[1].shape and padded[0].shape[0] == 1


def test_encode_matches_latte_cli(tmp_path):
    binary = latte_binary()
    if not binary.exists():
        pytest.skip(f"the latte CLI is not built at {binary} (run cargo build or set LATTE_BIN)")
    texts = ["Ownership is a set of rules.", "Borrowing lets you refer to a value.", "x"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    model = ColBERT(str(MODEL))
    for is_query, flag in ((True, ["--queries"]), (False, [])):
        out = tmp_path / f"out_{is_query}.npz"
        subprocess.run(
            [str(binary), "encode", "--model", str(MODEL), "--input", str(tmp_path / "texts.txt"),
             "--output", str(out), *flag],
            check=True,
            capture_output=True,
        )
        cli = np.load(out)
        ours = model.encode(texts, is_query=is_query)
        for i, a in enumerate(ours):
            assert a.shape == cli[f"arr_{i}"].shape
            assert np.abs(a - cli[f"arr_{i}"]).max() <= 1e-6


def test_save_pretrained_round_trip(tmp_path):
    model = ColBERT(str(MODEL))
    texts = ["Rust has ownership.", "Lifetimes name regions of code."]
    before = model.encode(texts, is_query=False)
    model.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "modules.json").exists()
    again = ColBERT(str(tmp_path / "saved")).encode(texts, is_query=False)
    for a, b in zip(before, again):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6


def test_modules_len_del_and_print():
    model = ColBERT(str(MODEL_FIXTURES / "models" / "bert_dense_chain"))
    n = len(model)
    assert n >= 2
    text = str(model)
    assert text.startswith("ColBERT(") and "(0): Transformer" in text and "(1): Dense" in text
    with pytest.raises(IndexError):
        del model[n + 5]
    with pytest.raises(ValueError):
        del model[0]


def test_missing_model_path_is_file_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ColBERT(str(missing))


def test_model_folder_without_weights_is_file_not_found(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises((FileNotFoundError, latte.LatteError, ValueError)) as err:
        ColBERT(str(tmp_path / "broken"))
    assert "broken" in str(err.value)


def test_bad_arguments_are_value_errors():
    model = ColBERT(str(MODEL))
    with pytest.raises(ValueError):
        model.encode(["a"], batch_size=0)
    with pytest.raises(ValueError):
        model.encode([1, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        ColBERT(str(MODEL), query_length=0)


def test_two_threads_encoding_at_once_match_serial():
    model = ColBERT(str(MODEL))
    texts = [f"text number {i} about ownership and borrowing" * (1 + i % 3) for i in range(24)]
    serial_q = model.encode(texts, is_query=True, batch_size=4)
    serial_d = model.encode(texts, is_query=False, batch_size=4)
    results = {}
    barrier = threading.Barrier(2)

    def run(name, is_query):
        barrier.wait()
        results[name] = model.encode(texts, is_query=is_query, batch_size=4)

    threads = [
        threading.Thread(target=run, args=("q", True)),
        threading.Thread(target=run, args=("d", False)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial_q, results["q"]):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6
    for a, b in zip(serial_d, results["d"]):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6

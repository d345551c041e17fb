"""``ColBERT(dtype=...)`` and ``Transformer`` given a Hugging Face Hub id (from a local Hub cache, offline)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import latte
from latte import models
from conftest import MODEL_FIXTURES

MODEL = MODEL_FIXTURES / "models" / "bert_pylate"
TEXTS = ["Rust has ownership.", "Lifetimes name regions of code.", "a third, longer text about borrowing rules"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def encode(model, is_query=False):
    return model.encode(TEXTS, is_query=is_query, batch_size=2)


def test_dtype_names_and_aliases():
    f32 = encode(models.ColBERT(str(MODEL)))
    assert models.ColBERT(str(MODEL)).dtype == "float32"
    for name, alias, reported in (("float32", "f32", "float32"), ("bfloat16", "bf16", "bfloat16"), ("int8", "INT8", "int8")):
        model = models.ColBERT(str(MODEL), dtype=name)
        assert model.dtype == reported
        out = encode(model)
        again = encode(models.ColBERT(str(MODEL), dtype=alias))
        for a, b, ref in zip(out, again, f32):
            # The alias is the same setting; reduced precision stays close to float32.
            assert np.array_equal(a, b)
            assert a.shape == ref.shape and a.dtype == np.float32
            assert np.abs(a - ref).max() < 0.1, (name, np.abs(a - ref).max())
        if name == "float32":
            assert all(np.array_equal(a, r) for a, r in zip(out, f32))
    # bf16 really changes the arithmetic (the fixture's values are not all bf16-exact).
    bf16 = encode(models.ColBERT(str(MODEL), dtype="bfloat16"))
    assert any(not np.array_equal(a, r) for a, r in zip(bf16, f32))


def test_dtype_objects_and_bad_names():
    class FakeTorchDtype:  # what str(torch.bfloat16) looks like, without needing torch
        def __str__(self) -> str:
            return "torch.bfloat16"

    assert models.ColBERT(str(MODEL), dtype=FakeTorchDtype()).dtype == "bfloat16"
    assert models.ColBERT(str(MODEL), dtype=np.float32).dtype == "float32"
    for bad in ("float16", "fp8", ""):
        with pytest.raises(ValueError, match="bfloat16") as err:
            models.ColBERT(str(MODEL), dtype=bad)
        assert repr(bad) in str(err.value)


def test_dtype_with_modules():
    base = models.Transformer(str(MODEL))
    dense = models.Dense(32, 8, bias=False, seed=3)
    f32 = encode(models.ColBERT(modules=[base, dense]))
    model = models.ColBERT(modules=[base, models.Dense(32, 8, bias=False, seed=3)], dtype="int8")
    assert model.dtype == "int8"
    out = encode(model)
    assert any(not np.array_equal(a, r) for a, r in zip(out, f32))
    assert all(a.shape == r.shape for a, r in zip(out, f32))


@pytest.fixture
def hub_cache(tmp_path):
    """A Hugging Face Hub cache holding ``acme/tiny-colbert`` (the fixture model) at ``refs/main``."""
    repo = tmp_path / "hub" / "models--acme--tiny-colbert"
    shutil.copytree(MODEL, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hub"


def test_transformer_accepts_a_hub_id(hub_cache):
    base = models.Transformer("acme/tiny-colbert", cache_dir=str(hub_cache), local_files_only=True)
    assert base.model_name_or_path.endswith(COMMIT)
    assert base.get_word_embedding_dimension() == 32
    local = models.Transformer(str(MODEL))
    from_hub = encode(models.ColBERT(modules=[base, models.Dense(32, 8, seed=5)]))
    from_path = encode(models.ColBERT(modules=[local, models.Dense(32, 8, seed=5)]))
    for a, b in zip(from_hub, from_path):
        assert np.array_equal(a, b)
    # The same id, as ColBERT(name) takes it.
    whole = models.ColBERT("acme/tiny-colbert", cache_folder=str(hub_cache), local_files_only=True)
    for a, b in zip(encode(whole), encode(models.ColBERT(str(MODEL)))):
        assert np.array_equal(a, b)


def test_transformer_offline_and_path_errors_are_clear(hub_cache, tmp_path):
    with pytest.raises(latte.LatteError) as err:
        models.Transformer("acme/missing", cache_dir=str(hub_cache), local_files_only=True)
    message = str(err.value)
    assert "acme/missing" in message and "offline" in message and "local_files_only" in message
    assert str(hub_cache) in message
    with pytest.raises(FileNotFoundError, match="no model folder"):
        models.Transformer(str(tmp_path / "nowhere" / "model"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        models.Transformer(str(tmp_path / "weights.bin"))

"""latte.indexes (PLAID, Exact, PyLate's other names) and latte.retrieve.ColBERT."""

from __future__ import annotations

import numpy as np
import pytest

from latte import indexes, retrieve
from conftest import maxsim, random_docs


def exact_top(queries, docs, ids, k):
    out = []
    for q in queries:
        s = np.array([maxsim(q, d) for d in docs])
        order = np.argsort(-s, kind="stable")[:k]
        out.append([ids[i] for i in order])
    return out


def test_plaid_add_search_remove_round_trip(tmp_path, rng):
    docs = random_docs(rng, 60)
    ids = [f"doc{i}" for i in range(60)]
    index = indexes.PLAID(index_folder=str(tmp_path), index_name="idx", nbits=4)
    assert index.add_documents(documents_ids=ids[:40], documents_embeddings=docs[:40]) is index
    index.add_documents(documents_ids=ids[40:], documents_embeddings=docs[40:])
    assert len(index) == 60
    # A document as its own query comes first.
    queries = [docs[3], docs[45]]
    results = index(queries, k=5)
    assert len(results) == 2 and all(len(r) == 5 for r in results)
    assert results[0][0]["id"] == "doc3" and results[1][0]["id"] == "doc45"
    assert set(results[0][0]) == {"id", "score"}
    assert results[0][0]["score"] == pytest.approx(maxsim(docs[3], docs[3]), abs=1e-2)
    scores = [r["score"] for r in results[0]]
    assert scores == sorted(scores, reverse=True)

    index.remove_documents(["doc3", "not-there"])
    assert len(index) == 59
    assert all(r["id"] != "doc3" for r in index(queries, k=10)[0])

    # Reopened from disk, with override=False, it still holds the documents.
    again = indexes.PLAID(index_folder=str(tmp_path), index_name="idx")
    assert len(again) == 59
    assert again([docs[45]], k=1)[0][0]["id"] == "doc45"
    # override=True starts afresh.
    fresh = indexes.PLAID(index_folder=str(tmp_path), index_name="idx", override=True)
    assert not fresh.is_indexed
    with pytest.raises(ValueError):
        fresh([docs[0]], k=1)


def test_plaid_subset_update_and_id_types(tmp_path, rng):
    docs = random_docs(rng, 30)
    index = indexes.PLAID(index_folder=str(tmp_path), index_name="ints", nbits=2)
    index.add_documents(list(range(30)), docs)
    hits = index([docs[0], docs[1]], k=3, subset=[5, 6, 7])
    assert all({h["id"] for h in r} <= {5, 6, 7} for r in hits)
    per_query = index([docs[0], docs[1]], k=2, subset=[[0, 9], [1, 8]])
    assert per_query[0][0]["id"] == 0 and per_query[1][0]["id"] == 1
    assert {h["id"] for h in per_query[0]} <= {0, 9}
    index.update_documents([4], [docs[10]])
    top = index([docs[10]], k=2)[0]
    assert {h["id"] for h in top} == {4, 10}


def test_retrieve_shape_and_exact_agreement(tmp_path, rng):
    docs = random_docs(rng, 50)
    ids = [f"d{i}" for i in range(50)]
    queries = random_docs(rng, 4, lo=4, hi=6)
    exact = indexes.Exact()
    exact.add_documents(documents_ids=ids, documents_embeddings=docs)
    res = retrieve.ColBERT(index=exact).retrieve(queries_embeddings=queries, k=7)
    assert len(res) == 4 and all(len(r) == 7 for r in res)
    assert [[h["id"] for h in r] for r in res] == exact_top(queries, docs, ids, 7)
    for q, r in zip(queries, res):
        assert r[0]["score"] == pytest.approx(maxsim(q, docs[ids.index(r[0]["id"])]), abs=1e-4)
    sub = exact(queries, k=3, subset=["d1", "d2", "d3", "d4"])
    assert [[h["id"] for h in r] for r in sub] == exact_top(queries, docs[1:5], ids[1:5], 3)
    exact.remove_documents(["d1"])
    assert len(exact) == 49

    plaid = indexes.PLAID(index_folder=str(tmp_path), index_name="r")
    plaid.add_documents(ids, docs)
    got = retrieve.ColBERT(index=plaid).retrieve(queries_embeddings=queries, k=5)
    assert len(got) == 4 and all(len(r) == 5 for r in got)


@pytest.mark.parametrize("cls", [indexes.WARP, indexes.Voyager, indexes.TachiomIndex])
def test_pylate_index_names_run_on_latte(cls, tmp_path, rng):
    docs = random_docs(rng, 20)
    index = cls(index_folder=str(tmp_path), override=True)
    index.add_documents([f"x{i}" for i in range(20)], docs)
    assert index([docs[2]], k=1)[0][0]["id"] == "x2"


def test_scann_without_folder(rng):
    docs = random_docs(rng, 20)
    index = indexes.ScaNN(embedding_size=16)
    index.add_documents([f"x{i}" for i in range(20)], docs)
    assert index([docs[7]], k=1)[0][0]["id"] == "x7"


def test_bad_shapes_are_value_errors(tmp_path, rng):
    docs = random_docs(rng, 10)
    index = indexes.PLAID(index_folder=str(tmp_path), index_name="bad")
    with pytest.raises(ValueError, match="2-D"):
        index.add_documents(["a"], [np.zeros(16, dtype=np.float32)])
    with pytest.raises(ValueError, match="match"):
        index.add_documents(["a", "b"], docs[:1])
    index.add_documents([str(i) for i in range(10)], docs)
    with pytest.raises(ValueError, match="dimension"):
        index([np.ones((3, 8), dtype=np.float32)], k=2)
    # An id the index holds is replaced (its vectors; the index keeps 10 documents).
    index.add_documents(["1"], docs[:1])
    hits = index([docs[0]], k=10)[0]
    assert len(hits) == 10
    assert {h["id"] for h in hits[:2]} == {"0", "1"}
    exact = indexes.Exact()
    exact.add_documents(["a"], docs[:1])
    with pytest.raises(ValueError):
        exact.add_documents(["b"], [np.ones((2, 8), dtype=np.float32)])


def test_shared_codec_builds_indexes_that_encode_alike(tmp_path, rng):
    import pickle

    docs = random_docs(rng, 80)
    ids = [f"doc{i}" for i in range(80)]
    codec = indexes.train_codec(docs, nbits=2, num_centroids=16)
    assert (codec.nbits, codec.num_centroids, codec.dim) == (2, 16, docs[0].shape[1])
    assert codec.centroids.shape == (16, codec.dim) and codec.centroids.dtype == np.float32
    assert len(codec.cutoffs) == 3 and len(codec.weights) == 4
    # Through pickle (Ray's object store), a file, and an index built with it: the same codec.
    assert pickle.loads(pickle.dumps(codec)) == codec
    codec.save(str(tmp_path / "codec.lt"))
    assert indexes.Codec.load(str(tmp_path / "codec.lt")) == codec
    # nbits comes from the codec (PLAID's default is 4).
    a = indexes.PLAID(index_folder=str(tmp_path), index_name="a", codec=codec)
    a.add_documents(ids[:40], docs[:40])
    b = indexes.PLAID(index_folder=str(tmp_path), index_name="b", codec=codec)
    b.add_documents(ids[40:], docs[40:])
    for name in ("a", "b"):
        assert indexes.Codec.from_index(str(tmp_path / name)) == codec
    # An index built without a codec trains its own; training alone gives the same one.
    own = indexes.PLAID(index_folder=str(tmp_path), index_name="own", nbits=2)
    own.add_documents(ids, docs)
    assert indexes.Codec.from_index(str(tmp_path / "own")) == indexes.train_codec(docs, nbits=2)
    with pytest.raises(ValueError, match="cutoffs"):
        indexes.Codec(codec.centroids, [0.0], codec.weights, codec.cluster_threshold, 2)
    with pytest.raises(ValueError, match="codec"):
        indexes.PLAID(index_folder=str(tmp_path), index_name="c", codec="not a codec")

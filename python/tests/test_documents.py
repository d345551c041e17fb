"""latte.indexes.PLAID with documents: text and metadata, filters, BM25 and hybrid search, delete by filter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from latte import indexes, retrieve
from conftest import random_docs

WORDS = ["ferris", "borrow", "lifetime", "trait", "macro", "cargo", "async", "unsafe", "iterator", "closure"]


def corpus(rng, n=60):
    docs = random_docs(rng, n)
    ids = [f"d{i}" for i in range(n)]
    texts = [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 3 + 1) % len(WORDS)]} passage number {i}" for i in range(n)]
    metadata = [
        {"lang": "rust" if i % 3 == 0 else "python", "year": 2010 + i % 10, "tags": {"level": i % 2}}
        for i in range(n)
    ]
    return ids, docs, texts, metadata


@pytest.fixture
def filled(tmp_path, rng):
    ids, docs, texts, metadata = corpus(rng)
    index = indexes.PLAID(index_folder=str(tmp_path), index_name="docs", nbits=2)
    index.add_documents(ids, docs, documents_texts=texts, metadata=metadata)
    return index, ids, docs, texts, metadata


# Each filter with the same selection written out in Python (the ground truth, not the engine's).
FILTERS = [
    ({"lang": "rust"}, lambda m: m["lang"] == "rust"),
    ({"year": {"$gte": 2017}}, lambda m: m["year"] >= 2017),
    ({"tags.level": 1, "lang": {"$ne": "rust"}}, lambda m: m["tags"]["level"] == 1 and m["lang"] != "rust"),
    ({"$or": [{"year": {"$in": [2011, 2012]}}, {"lang": "rust"}]}, lambda m: m["year"] in (2011, 2012) or m["lang"] == "rust"),
    ({"$not": {"year": {"$lt": 2018}}}, lambda m: not m["year"] < 2018),
]


@pytest.mark.parametrize("case", range(len(FILTERS)))
def test_filtered_search_is_exact_maxsim_over_the_matching_documents(filled, case):
    index, ids, docs, _, metadata = filled
    flt, pred = FILTERS[case]
    allowed = [i for i, m in zip(ids, metadata) if pred(m)]
    assert 0 < len(allowed) < len(ids)
    queries = [docs[0], docs[7], docs[31]]
    got = index(queries, k=5, filter=flt)
    # The same filter as JSON text gives the same results.
    assert index(queries, k=5, filter=json.dumps(flt)) == got
    # Ground truth: exact MaxSim (on the index's half-precision copy) restricted to the matching ids.
    want = index._open().search(queries, 5, [allowed], exact=True)
    for g, w in zip(got, want):
        assert [(h["id"], h["score"]) for h in g] == [(i, pytest.approx(s, abs=1e-6)) for i, s in w]
        assert all(h["id"] in allowed for h in g)
    # A document that matches comes first for itself.
    own = next(j for j, m in enumerate(metadata) if pred(m))
    assert index([docs[own]], k=1, filter=flt)[0][0]["id"] == ids[own]
    # latte.retrieve passes the filter on.
    assert retrieve.ColBERT(index=index).retrieve(queries, k=5, filter=flt) == got


def test_filter_combines_with_subset_and_nothing_matching_gives_no_hits(filled):
    index, ids, docs, _, metadata = filled
    rust = {i for i, m in zip(ids, metadata) if m["lang"] == "rust"}
    subset = ids[:30]
    hits = index([docs[3], docs[4]], k=10, filter={"lang": "rust"}, subset=subset)
    for q in hits:
        assert {h["id"] for h in q} == rust & set(subset)
    assert index([docs[0]], k=3, filter={"lang": "cobol"}) == [[]]


def test_documents_are_stored_replaced_and_read_back(filled, tmp_path):
    index, ids, docs, texts, metadata = filled
    assert index.last_add_report == {"added": 60, "replaced": [], "created": True}
    got = index.get_documents(["d5", "nope", "d0"])
    assert got[0] == {"id": "d5", "title": None, "text": texts[5], "metadata": metadata[5]}
    assert got[1] is None and got[2]["metadata"] == metadata[0]
    # Adding ids the index holds replaces them (vectors, text and metadata together), reported.
    index.add_documents(
        ["d5", "new"], [docs[6], docs[7]], documents_texts=["replaced", None], documents_titles=["T", None],
        metadata=[{"lang": "go"}, None],
    )
    assert index.last_add_report == {"added": 2, "replaced": ["d5"], "created": False}
    assert len(index) == 61
    assert index.get_documents("d5") == [{"id": "d5", "title": "T", "text": "replaced", "metadata": {"lang": "go"}}]
    assert index.get_documents(["new"]) == [{"id": "new", "title": None, "text": None, "metadata": None}]
    assert index([docs[6]], k=2, filter={"lang": "go"})[0][0]["id"] == "d5"
    # Reopened from disk, the documents are still there.
    again = indexes.PLAID(index_folder=str(tmp_path), index_name="docs")
    assert again.get_documents(["d5"])[0]["metadata"] == {"lang": "go"}
    assert {h["id"] for h in again([docs[0]], k=100, filter={"lang": "go"})[0]} == {"d5"}


def test_bad_metadata_texts_and_filters_are_value_errors_naming_the_document(tmp_path, rng):
    ids, docs, texts, metadata = corpus(rng, 10)
    index = indexes.PLAID(index_folder=str(tmp_path), index_name="bad", nbits=2)
    bad = list(metadata)
    bad[3] = {"when": object()}
    with pytest.raises(ValueError, match=r"metadata\[3\] \(document 'd3'\)"):
        index.add_documents(ids, docs, metadata=bad)
    bad[3] = ["not", "a", "dict"]
    with pytest.raises(ValueError, match=r"metadata\[3\].*expected a dict"):
        index.add_documents(ids, docs, metadata=bad)
    bad[3] = {"x": float("nan")}
    with pytest.raises(ValueError, match=r"metadata\[3\]"):
        index.add_documents(ids, docs, metadata=bad)
    with pytest.raises(ValueError, match="metadata has 9 entries for 10 documents"):
        index.add_documents(ids, docs, metadata=metadata[:9])
    with pytest.raises(ValueError, match=r"documents_texts\[2\]"):
        index.add_documents(ids, docs, documents_texts=texts[:2] + [7] + texts[3:])
    assert not index.is_indexed  # nothing was written
    # numpy scalars are stored as their values.
    meta = [dict(m, score=np.float32(0.5), rank=np.int64(i)) for i, m in enumerate(metadata)]
    index.add_documents(ids, docs, metadata=meta)
    assert index.get_documents(["d2"])[0]["metadata"]["rank"] == 2
    with pytest.raises(ValueError, match=r"\$foo"):
        index([docs[0]], k=3, filter={"year": {"$foo": 1}})
    with pytest.raises(ValueError, match="filter: not valid JSON"):
        index([docs[0]], k=3, filter="{lang: rust}")
    with pytest.raises(ValueError, match="expected a dict or a JSON string"):
        index([docs[0]], k=3, filter=["lang"])


def test_remove_by_filter_and_update_keeps_fields_not_given(filled):
    index, ids, docs, texts, metadata = filled
    python = [i for i, m in zip(ids, metadata) if m["lang"] == "python"]
    with pytest.raises(ValueError, match="exactly one of documents_ids and filter"):
        index.remove_documents()
    index.remove_documents(filter={"lang": "python"})
    assert index.last_delete_report == {"deleted": len(python), "not_found": []}
    assert len(index) == len(ids) - len(python)
    assert all(d is None for d in index.get_documents(python))
    index.remove_documents(["d0", "gone"])
    assert index.last_delete_report == {"deleted": 1, "not_found": ["gone"]}
    # update_documents: new vectors; text and metadata kept unless given.
    index.update_documents(["d3"], [docs[4]])
    assert index.get_documents(["d3"])[0] == {"id": "d3", "title": None, "text": texts[3], "metadata": metadata[3]}
    assert index([docs[4]], k=1, filter={"lang": "rust"})[0][0]["id"] == "d3"
    index.update_documents(["d3"], [docs[4]], metadata=[{"lang": "c"}])
    assert index.get_documents(["d3"])[0]["metadata"] == {"lang": "c"}
    assert index.get_documents(["d3"])[0]["text"] == texts[3]


def rrf(lists, k=60.0):
    fused = {}
    for lst in lists:
        for rank, hit in enumerate(lst, start=1):
            fused[hit["id"]] = fused.get(hit["id"], 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))


def test_bm25_alone_and_hybrid_fusion(filled):
    index, ids, docs, texts, metadata = filled
    query = "ferris borrow"
    bm25 = index(queries_texts=[query], k=100)[0]
    both = {i for i, t in zip(ids, texts) if "ferris" in t.split() and "borrow" in t.split()}
    either = {i for i, t in zip(ids, texts) if {"ferris", "borrow"} & set(t.split())}
    assert both and {h["id"] for h in bm25} == either
    assert {h["id"] for h in bm25[: len(both)]} == both
    assert all(a["score"] >= b["score"] for a, b in zip(bm25, bm25[1:]))
    # BM25 under a filter, and the document's fields on request.
    rust = index(queries_texts=query, k=100, filter={"lang": "rust"}, return_documents=True)[0]
    assert rust and all(h["metadata"]["lang"] == "rust" for h in rust)
    assert set(rust[0]) == {"id", "score", "title", "text", "metadata"}
    # Hybrid (RRF, k = 60): the fusion of the MaxSim and BM25 lists, each 100 deep.
    q = docs[11]
    dense = index([q], k=100)[0]
    hybrid = index([q], k=10, queries_texts=[query])[0]
    want = rrf([dense, bm25])[:10]
    assert [h["id"] for h in hybrid] == [i for i, _ in want]
    assert [h["score"] for h in hybrid] == pytest.approx([s for _, s in want], abs=1e-6)
    # Linear fusion with all the weight on MaxSim ranks as MaxSim does.
    linear = index([q], k=10, queries_texts=[query], fusion="linear", alpha=1.0)[0]
    assert [h["id"] for h in linear] == [h["id"] for h in dense[:10]]
    # Hybrid under a filter keeps only matching documents.
    filtered = index([q], k=10, queries_texts=[query], filter={"year": {"$lt": 2013}}, return_documents=True)[0]
    assert filtered and all(h["metadata"]["year"] < 2013 for h in filtered)
    for kwargs, message in [
        (dict(fusion="max"), 'fusion must be "rrf" or "linear"'),
        (dict(fusion="rrf", alpha=0.3), "alpha applies to"),
        (dict(fusion="linear", alpha=1.5), r"alpha must be in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            index([q], k=3, queries_texts=[query], **kwargs)
    with pytest.raises(ValueError, match="queries_texts has 2 texts for 1 queries_embeddings"):
        index([q], k=3, queries_texts=[query, query])
    with pytest.raises(ValueError, match="apply to hybrid search"):
        index([q], k=3, alpha=0.5)
    # The default result shape stays PyLate's.
    assert all(set(h) == {"id", "score"} for h in index([q], k=3, filter={"lang": "rust"})[0])


def test_exact_keeps_no_store_and_says_so(rng):
    ids, docs, texts, metadata = corpus(rng, 5)
    exact = indexes.Exact()
    with pytest.raises(ValueError, match="Exact keeps no document store"):
        exact.add_documents(ids, docs, metadata=metadata)
    exact.add_documents(ids, docs)
    with pytest.raises(ValueError, match="Exact keeps no document store"):
        exact([docs[0]], k=2, filter={"lang": "rust"})
    with pytest.raises(ValueError, match="Exact keeps no document store"):
        exact.get_documents(ids)
    assert exact([docs[0]], k=1)[0][0]["id"] == "d0"

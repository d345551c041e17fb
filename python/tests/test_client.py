"""latte.Client against a real `latte serve` process: every method, results equal to the in-process API,
errors (wrong key, scopes, unknown names, invalid requests) as Python exceptions with the server's message."""

from __future__ import annotations

import re
import subprocess
import threading

import numpy as np
import pytest

import latte
from latte import client as lclient
from latte import indexes, models, rank
from conftest import MODEL_FIXTURES, latte_binary

MODEL = MODEL_FIXTURES / "models" / "bert_pylate"
ADMIN = "admin-key-0123456789abcdef"
READER = "reader-key-0123456789abcdef"

TEXTS = [
    "the borrow checker enforces ownership rules at compile time",
    "cargo builds the crate and downloads its dependencies",
    "a trait defines shared behaviour for several types",
    "lifetimes tell the compiler how long references are valid",
    "macros write code that writes other code",
    "async functions return futures that an executor polls",
    "unsafe blocks let you dereference raw pointers",
    "iterators are lazy and compose with adapters like map and filter",
    "closures capture values from the scope in which they are defined",
    "ferris the crab is the unofficial mascot of rust",
    "pattern matching with match must cover every case",
    "the standard library provides vectors strings and hash maps",
]
QUERIES = ["how does the borrow checker work", "what is a trait", "iterator adapters map filter"]


def metadata_of(i):
    return {"lang": "rust" if i % 2 == 0 else "python", "year": 2015 + i, "tags": {"level": i % 3}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`latte serve` on 127.0.0.1 (a free port chosen by the OS), a temporary data folder, the fixture
    model and two API keys; stopped at the end of the module."""
    root = tmp_path_factory.mktemp("serve")
    keys = root / "keys.txt"
    keys.write_text(f"# test keys\n{ADMIN} admin\n{READER} read\n")
    binary = latte_binary()
    assert binary.exists(), f"the latte binary is not at {binary}: build it (cargo build -p latte) or set LATTE_BIN"
    cmd = [
        str(binary), "serve", "--data", str(root / "data"), "--host", "127.0.0.1", "--port", "0",
        "--model", str(MODEL), "--api-keys", str(keys),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # A server that never says where it listens is stopped (and the test fails) after two minutes.
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    url, seen = None, []
    for line in proc.stderr:
        seen.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            url = found.group(1)
            break
    watchdog.cancel()
    if url is None:
        proc.kill()
        proc.wait()
        pytest.fail("latte serve did not start:\n" + "".join(seen))
    # Keep reading its log so that the pipe never fills.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    yield url, root
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def model():
    return models.ColBERT(str(MODEL))


def same_hits(got, want, tol=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [h["id"] for h in g] == [h["id"] for h in w]
        for a, b in zip(g, w):
            assert set(a) == set(b)
            assert a["score"] == pytest.approx(b["score"], abs=tol)
            for key in ("title", "text", "metadata"):
                assert a.get(key) == b.get(key)


def test_health_keys_and_scopes(server):
    url, _ = server
    health = latte.Client(url).health()  # /health needs no key
    assert health["status"] == "ok" and health["version"] == latte.__version__
    assert str(MODEL) in health["models"]
    with pytest.raises(lclient.AuthenticationError, match="Authorization: Bearer") as err:
        latte.Client(url).list_indexes()
    assert err.value.status == 401 and err.value.code == "unauthorized"
    wrong = "wrong-key-0123456789abcdef"
    bad = latte.Client(url, api_key=wrong)
    with pytest.raises(lclient.AuthenticationError, match="the API key is not valid") as err:
        bad.list_indexes()
    assert isinstance(err.value, latte.LatteError)
    assert wrong not in str(err.value) and wrong not in repr(err.value) and wrong not in repr(bad)
    assert ADMIN not in repr(latte.Client(url, api_key=ADMIN))
    with pytest.raises(lclient.AuthenticationError, match="needs a key of scope admin") as err:
        latte.Client(url, api_key=READER).create_index("nope")
    assert err.value.status == 403 and READER not in str(err.value)
    with pytest.raises(ValueError, match="url"):
        latte.Client("localhost:8080")
    # A server that is not there.
    with pytest.raises(lclient.UnreachableError) as err:
        latte.Client("http://127.0.0.1:9", timeout=5).health()
    assert isinstance(err.value, ConnectionError)


def test_index_lifecycle(server):
    url, _ = server
    c = latte.Client(url, api_key=ADMIN)
    made = c.create_index("life", model=str(MODEL), nbits=4)
    assert made["name"] == "life" and made["status"] == "pending" and made["nbits"] == 4
    assert "life" in [i["name"] for i in c.list_indexes()]
    assert c.index_info("life")["status"] == "pending"
    with pytest.raises(lclient.ConflictError, match="already exists"):
        c.create_index("life")
    with pytest.raises(lclient.InvalidRequestError, match="nbits must be 1, 2 or 4") as err:
        c.create_index("other", nbits=3)
    assert isinstance(err.value, ValueError) and err.value.status == 400
    c.add_documents("life", ["a", "b"], documents_texts=TEXTS[:2])
    info = c.index_info("life")
    assert info["status"] == "ready" and info["documents"] == 2 and info["model"] == str(MODEL)
    c.delete_index("life")
    assert "life" not in [i["name"] for i in c.list_indexes()]
    with pytest.raises(lclient.NotFoundError) as err:
        c.index_info("life")
    assert isinstance(err.value, LookupError) and err.value.status == 404


def test_embeddings_documents_filters_and_hybrid_equal_the_in_process_index(server, model, tmp_path):
    url, _ = server
    c = latte.Client(url, api_key=ADMIN)
    ids = [f"t{i}" for i in range(len(TEXTS))]
    meta = [metadata_of(i) for i in range(len(TEXTS))]
    docs = model.encode(TEXTS, is_query=False)
    queries = model.encode(QUERIES, is_query=True)
    # The server's defaults (nbits 2, 32 k-means points per centroid, seed 42) in the in-process index.
    local = indexes.PLAID(index_folder=str(tmp_path), index_name="emb", nbits=2, max_points_per_centroid=32)
    local.add_documents(ids, docs, documents_texts=TEXTS, metadata=meta)
    c.create_index("emb")
    added = c.add_documents("emb", ids, documents_embeddings=docs, documents_texts=TEXTS, metadata=meta)
    assert added == {"added": len(ids), "replaced": [], "created": True, "documents": len(ids)}

    same_hits(c.search("emb", queries_embeddings=queries, k=5), local(queries, k=5))
    for flt in ({"lang": "rust"}, {"year": {"$gte": 2020}, "tags.level": {"$in": [0, 2]}}):
        same_hits(c.search("emb", queries_embeddings=queries, k=5, filter=flt), local(queries, k=5, filter=flt))
    same_hits(
        c.search("emb", queries_embeddings=queries, k=4, filter='{"lang": "python"}', return_documents=True),
        local(queries, k=4, filter={"lang": "python"}, return_documents=True),
    )
    # Hybrid: the query texts for BM25 beside the embeddings for MaxSim.
    same_hits(
        c.search("emb", queries=QUERIES, queries_embeddings=queries, k=6, hybrid=True),
        local(queries, k=6, queries_texts=QUERIES),
    )
    same_hits(
        c.search("emb", queries=QUERIES, queries_embeddings=queries, k=6, fusion="linear", alpha=0.3,
                 filter={"lang": "rust"}, return_documents=True),
        local(queries, k=6, queries_texts=QUERIES, fusion="linear", alpha=0.3, filter={"lang": "rust"},
              return_documents=True),
    )
    assert c.get_documents("emb", ["t3", "missing"]) == local.get_documents(["t3", "missing"])
    assert c.get_documents("emb", ["t3"])[0]["metadata"] == meta[3]

    # Replacing documents is reported the same way.
    got = c.add_documents("emb", ["t1", "t99"], documents_embeddings=[docs[2], docs[3]], metadata=[{"lang": "go"}, None])
    local.add_documents(["t1", "t99"], [docs[2], docs[3]], metadata=[{"lang": "go"}, None])
    assert got["replaced"] == local.last_add_report["replaced"] == ["t1"]
    assert got["documents"] == len(local) == len(ids) + 1
    same_hits(c.search("emb", queries_embeddings=queries, k=5, filter={"lang": "go"}),
              local(queries, k=5, filter={"lang": "go"}))

    # Delete by filter, then by ids.
    gone = c.remove_documents("emb", filter={"lang": "python"})
    local.remove_documents(filter={"lang": "python"})
    assert gone["deleted"] == local.last_delete_report["deleted"] > 0
    assert gone["remaining"] == len(local)
    gone = c.remove_documents("emb", ["t0", "nope"])
    local.remove_documents(["t0", "nope"])
    assert gone["deleted"] == 1 and gone["not_found"] == local.last_delete_report["not_found"] == ["nope"]
    same_hits(c.search("emb", queries_embeddings=queries, k=5, return_documents=True),
              local(queries, k=5, return_documents=True))

    # Invalid requests carry the server's message.
    with pytest.raises(lclient.InvalidRequestError, match="k must be between 1 and") as err:
        c.search("emb", queries_embeddings=queries, k=0)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match=r"filter: .*\$foo"):
        c.search("emb", queries_embeddings=queries, filter={"year": {"$foo": 1}})
    with pytest.raises(lclient.NotFoundError, match="no index named"):
        c.search("nowhere", queries_embeddings=queries)
    with pytest.raises(lclient.AuthenticationError, match="scope write"):
        latte.Client(url, api_key=READER).remove_documents("emb", ["t2"])
    # A read key searches.
    same_hits(latte.Client(url, api_key=READER).search("emb", queries_embeddings=queries, k=3), local(queries, k=3))


def test_texts_encoded_by_the_server_encode_and_rerank(server, model, tmp_path):
    url, _ = server
    c = latte.Client(url, api_key=ADMIN)
    ids = [f"b{i}" for i in range(len(TEXTS))]
    meta = [metadata_of(i) for i in range(len(TEXTS))]
    c.create_index("books", model=str(MODEL))
    added = c.add_documents("books", ids, documents_texts=TEXTS, documents_titles=["T"] * len(TEXTS), metadata=meta)
    assert added["created"] and added["added"] == len(TEXTS)

    # encode equals latte.models.ColBERT.encode.
    for texts, is_query in ((QUERIES, True), (TEXTS[:4], False)):
        remote = c.encode(texts, is_query=is_query)
        here = model.encode(texts, is_query=is_query)
        assert len(remote) == len(here)
        for r, h in zip(remote, here):
            assert r.dtype == np.float32 and r.shape == h.shape
            assert np.abs(r - h).max() <= 1e-5
    # rerank equals latte.rank.rerank on the model's embeddings.
    remote = c.rerank(QUERIES[0], TEXTS)
    here = rank.rerank(
        documents_ids=[list(range(len(TEXTS)))],
        queries_embeddings=model.encode(QUERIES[:1], is_query=True),
        documents_embeddings=[model.encode(TEXTS, is_query=False)],
    )[0]
    assert [r["index"] for r in remote] == [h["id"] for h in here]
    assert [r["score"] for r in remote] == pytest.approx([h["score"] for h in here], abs=1e-4)

    # Text queries, encoded by the server, rank as the in-process index on the model's embeddings.
    local = indexes.PLAID(index_folder=str(tmp_path), index_name="books", nbits=2, max_points_per_centroid=32)
    local.add_documents(ids, model.encode(TEXTS, is_query=False), documents_texts=TEXTS,
                        documents_titles=["T"] * len(TEXTS), metadata=meta)
    q = model.encode(QUERIES, is_query=True)
    same_hits(c.search("books", queries=QUERIES, k=5), local(q, k=5), tol=1e-4)
    same_hits(
        c.search("books", queries=QUERIES, k=5, hybrid=True, filter={"lang": "rust"}, return_documents=True),
        local(q, k=5, queries_texts=QUERIES, filter={"lang": "rust"}, return_documents=True),
        tol=1e-4,
    )
    hit = c.search("books", queries=QUERIES[0], k=1, return_documents=True)[0][0]
    assert hit["title"] == "T" and hit["text"] == TEXTS[int(hit["id"][1:])]

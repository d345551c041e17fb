"""latte.ray on a real local Ray cluster: a head node and a second node, each a separate set of processes with
one CPU, on this machine. Skipped when Ray is not installed (CI installs ``ray[data]``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import latte  # noqa: E402
import latte.ray as lray  # noqa: E402
from latte import indexes, models, retrieve  # noqa: E402
from conftest import MODEL_FIXTURES, ROOT, latte_binary  # noqa: E402

MODEL = MODEL_FIXTURES / "models" / "bert_pylate"
DEMO = ROOT / "data" / "demo"


def read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes (separate raylet and worker processes), one CPU each; workers import this `latte`."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    node_args = {"num_cpus": 1, "object_store_memory": 150 * 1024 * 1024, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=node_args)
    c.add_node(**{k: v for k, v in node_args.items() if k != "include_dashboard"})
    c.wait_for_nodes()
    package_root = str(Path(latte.__file__).resolve().parents[1])
    ray.init(
        address=c.address,
        runtime_env={"env_vars": {"PYTHONPATH": package_root, "RAY_USAGE_STATS_ENABLED": "0"}},
        log_to_driver=False,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def corpus():
    # The first 160 demo passages: enough for two shards of ~80 documents, and quick to encode on 2 cores.
    rows = read_jsonl(DEMO / "corpus.jsonl")[:160]
    # The text `latte encode` reads from a BEIR corpus: "{title} {text}", stripped.
    return [{"_id": r["_id"], "text": f"{r.get('title', '')} {r['text']}".strip()} for r in rows]


@pytest.fixture(scope="module")
def encoded(cluster, corpus):
    """The demo corpus encoded on the cluster by two encoder workers, as {id: embeddings}."""
    ds = ray.data.from_items(corpus, override_num_blocks=4)
    out = lray.encode(ds, str(MODEL), batch_size=32, concurrency=2, num_cpus=0.5)
    rows = out.take_all()
    assert len(rows) == len(corpus)
    return {str(r["_id"]): np.asarray(r["embeddings"], dtype=np.float32) for r in rows}


@pytest.fixture(scope="module")
def query_embeddings():
    queries = [q["text"] for q in read_jsonl(DEMO / "queries.jsonl")]
    return models.ColBERT(str(MODEL)).encode(queries, is_query=True)


def test_cluster_has_two_nodes(cluster):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    assert all(n["Resources"].get("CPU") == 1 for n in nodes)


def test_encode_matches_single_process_and_cli(encoded, corpus, tmp_path):
    model = models.ColBERT(str(MODEL))
    texts = [r["text"] for r in corpus]
    single = model.encode(texts, is_query=False)
    assert set(encoded) == {r["_id"] for r in corpus}
    for r, want in zip(corpus, single):
        got = encoded[r["_id"]]
        assert got.dtype == np.float32 and got.shape == want.shape, r["_id"]
        # Bit for bit where the kernels are independent of the batch's shape (AVX-512); the AVX2 path can round
        # a row differently in batches of other shapes (seen: 1.8e-7 on a Zen 3).
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=r["_id"])

    binary = latte_binary()
    if not binary.exists():
        pytest.skip(f"no latte CLI at {binary} to compare with")
    subset = tmp_path / "corpus.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in corpus[:40]), encoding="utf-8")
    npz, ids = tmp_path / "cli.npz", tmp_path / "cli.ids"
    subprocess.run(
        [str(binary), "encode", "--model", str(MODEL), "-i", str(subset), "-o", str(npz), "--ids-output", str(ids)],
        check=True,
        capture_output=True,
    )
    cli_ids = ids.read_text(encoding="utf-8").split("\n")[:-1]
    with np.load(npz) as arrays:
        for j, i in enumerate(cli_ids):
            np.testing.assert_allclose(encoded[i], arrays[f"arr_{j}"], rtol=0, atol=1e-6, err_msg=i)


def test_encode_names_a_missing_column(cluster):
    ds = ray.data.from_items([{"_id": "a", "body": "no text column"}])
    with pytest.raises(Exception, match="no column 'text'"):
        lray.encode(ds, str(MODEL), num_cpus=0.5).take_all()


def test_write_embeddings_parts_read_by_latte_index(cluster, encoded, corpus, tmp_path):
    ids = sorted(encoded)[:60]
    text = {r["_id"]: r["text"] for r in corpus}
    rows = [{"_id": i, "embeddings": encoded[i], "text": text[i], "book": i.split("/")[0], "n": j} for j, i in enumerate(ids)]
    ds = ray.data.from_items(rows, override_num_blocks=3)
    parts = lray.write_embeddings(ds, tmp_path / "parts", metadata_columns=["text", "book", "n"])
    assert len(parts) == 3
    seen = {}
    for base in parts:
        part_ids = (tmp_path / "parts" / f"{base}.ids").read_text(encoding="utf-8").split("\n")[:-1]
        meta = read_jsonl(tmp_path / "parts" / f"{base}.jsonl")
        assert [m["_id"] for m in meta] == part_ids
        for m in meta:
            assert m == {"_id": m["_id"], "text": text[m["_id"]], "book": m["_id"].split("/")[0], "n": ids.index(m["_id"])}
        with np.load(tmp_path / "parts" / f"{base}.npz") as arrays:
            assert len(arrays.files) == len(part_ids)
            for j, i in enumerate(part_ids):
                seen[i] = arrays[f"arr_{j}"]
    assert sorted(seen) == ids
    for i in ids:
        np.testing.assert_array_equal(seen[i], encoded[i])

    binary = latte_binary()
    if not binary.exists():
        pytest.skip(f"no latte CLI at {binary} to index the parts with")
    index = tmp_path / "cli-index"
    for base in parts:
        part = tmp_path / "parts" / base
        subprocess.run(
            [
                str(binary), "index", "--index", str(index), "--embeddings", f"{part}.npz",
                "--ids", f"{part}.ids", "--metadata", f"{part}.jsonl",
            ],
            check=True,
            capture_output=True,
        )
    assert len(indexes.PLAID(index_folder=str(tmp_path), index_name="cli-index")) == len(ids)
    (tmp_path / "get.ids").write_text(ids[7] + "\n", encoding="utf-8")
    got = subprocess.run(
        [str(binary), "get", "--index", str(index), "--ids", str(tmp_path / "get.ids")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    doc = json.loads(got)
    assert doc["_id"] == ids[7] and doc["text"] == text[ids[7]]
    assert doc["metadata"] == {"book": ids[7].split("/")[0], "n": 7}


def test_codec_sample_is_bounded_and_independent_of_the_blocks(cluster, encoded, tmp_path):
    # (Before the tests that hold the `sharded` fixture's actors: their CPUs would leave a build's staging
    # tasks, one CPU each, nowhere to run on this two-CPU cluster.)
    ids = sorted(encoded)
    got = []
    for blocks in (3, 5):
        ds = ray.data.from_items([{"_id": i, "embeddings": encoded[i]} for i in ids], override_num_blocks=blocks)
        manifest = lray.build_sharded(ds, tmp_path / f"b{blocks}", num_shards=2, num_cpus=0.5, codec_sample=40)
        assert manifest["codec"]["sample_documents"] == 40
        got.append(indexes.Codec.from_index(str(tmp_path / f"b{blocks}" / "shard-00001")))
    assert got[0] == got[1]
    chosen = sorted(ids, key=lambda i: lray.sample_key(i, 42))[:40]
    tokens = sum(e.shape[0] for e in encoded.values())
    assert got[0] == indexes.train_codec(
        [encoded[i] for i in chosen], num_centroids=latte._latte.default_num_centroids(tokens)
    )


@pytest.fixture(scope="module")
def sharded(cluster, encoded, tmp_path_factory):
    """The demo corpus in a 2-shard index (built from a Ray dataset) and in one PLAID index built with the
    codec the shards share."""
    root = tmp_path_factory.mktemp("sharded")
    ids = sorted(encoded)
    ds = ray.data.from_items([{"_id": i, "embeddings": encoded[i]} for i in ids], override_num_blocks=4)
    manifest = lray.build_sharded(ds, root / "index", num_shards=2, model=str(MODEL), num_cpus=0.5)
    codec = indexes.Codec.from_index(str(root / "index" / "shard-00000"))
    single = indexes.PLAID(index_folder=str(root), index_name="single", codec=codec)
    single.add_documents(ids, [encoded[i] for i in ids])
    index = lray.ShardedIndex(root / "index", actor_options={"num_cpus": 0.25}, timeout=60)
    yield manifest, index, single, ids
    index.close()


def test_build_sharded_routes_by_stable_hash(sharded):
    manifest, index, _, ids = sharded
    assert manifest == lray.read_manifest(index.path)
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000", "shard-00001"]
    counts = [sum(1 for i in ids if lray.shard_of(i, 2) == s) for s in range(2)]
    assert [s["documents"] for s in manifest["shards"]] == counts
    assert all(c > 0 for c in counts) and sum(counts) == len(ids)
    assert manifest["model"] == str(MODEL) and manifest["dim"] == models.ColBERT(str(MODEL)).get_sentence_embedding_dimension()
    info = index.shards()
    assert [s["documents"] for s in info] == counts
    # Each shard's index holds exactly the ids routed to it.
    for s in range(2):
        plaid = indexes.PLAID(index_folder=index.path, index_name=lray._shard_name(s))
        searcher = plaid._open()
        assert all((i in searcher) == (lray.shard_of(i, 2) == s) for i in ids)
    assert len(index) == len(ids)


def test_shards_share_one_codec_trained_on_the_whole_dataset(sharded, encoded):
    manifest, index, single, ids = sharded
    info = manifest["codec"]
    assert info["shared"] is True and info["documents"] == len(ids)
    assert info["tokens"] == sum(e.shape[0] for e in encoded.values())
    assert info["num_centroids"] == latte._latte.default_num_centroids(info["tokens"])
    # 160 documents: one index's build samples them all, and so does the shared codec.
    assert info["sample_documents"] == len(ids)
    codecs = [indexes.Codec.from_index(os.path.join(index.path, n)) for n in index.names]
    assert codecs[0] == codecs[1] and codecs[0].num_centroids == info["num_centroids"]
    assert codecs[0].nbits == manifest["index"]["nbits"]
    # The codec is the one training on those documents (key order) gives.
    order = sorted(ids, key=lambda i: lray.sample_key(i, manifest["index"]["seed"]))
    want = indexes.train_codec(
        [encoded[i] for i in order],
        nbits=manifest["index"]["nbits"],
        kmeans_niters=manifest["index"]["kmeans_niters"],
        max_points_per_centroid=manifest["index"]["max_points_per_centroid"],
        seed=manifest["index"]["seed"],
        num_centroids=info["num_centroids"],
    )
    assert codecs[0] == want


def test_sharded_search_equals_single_index(sharded, query_embeddings):
    _, index, single, _ = sharded
    got = index.search(queries_embeddings=query_embeddings, k=10)
    want = single(query_embeddings, k=10)
    assert len(got) == len(want) == len(query_embeddings)
    same = 0
    for g, w in zip(got, want):
        assert len(g) == len(w) == 10
        assert all(set(h) == {"id", "score"} for h in g)
        # Scores rank by rank within 1e-5 for every query (ties may swap equal-scoring ids).
        for a, b in zip(g, w):
            assert abs(a["score"] - b["score"]) <= 1e-5, (a, b)
        if [h["id"] for h in g] == [h["id"] for h in w]:
            same += 1
    # The shards share the single index's codec: the same lists are probed, so the top 10 is the same.
    assert same == len(want), f"top-10 equal for {same} of {len(want)} queries"
    # Through latte.retrieve, and with text queries encoded by the model named in the manifest.
    assert retrieve.ColBERT(index=index).retrieve(query_embeddings[:3], k=10) == got[:3]
    texts = [q["text"] for q in read_jsonl(DEMO / "queries.jsonl")[:3]]
    assert index.search(queries=texts, k=10) == got[:3]


def test_sharded_add_and_remove_reach_the_right_shard(sharded, encoded, query_embeddings):
    _, index, _, ids = sharded
    before = [s["documents"] for s in index.shards()]
    new_ids = [f"new/{j}" for j in range(6)]
    new_embs = [encoded[ids[j]] * 1.0 for j in range(6)]
    index.add_documents(new_ids, new_embs)
    after = [s["documents"] for s in index.shards()]
    for s in range(2):
        assert after[s] - before[s] == sum(1 for i in new_ids if lray.shard_of(i, 2) == s)
    assert lray.read_manifest(index.path)["shards"][0]["documents"] == after[0]
    # A copy of a document scores as the document: both come first for the document as a query.
    top = index.search(queries_embeddings=[encoded[ids[0]]], k=2)[0]
    assert {h["id"] for h in top} == {ids[0], "new/0"}
    index.remove_documents(new_ids + ["not-in-the-index"])
    assert [s["documents"] for s in index.shards()] == before
    assert all(h["id"] not in new_ids for h in index.search(queries_embeddings=query_embeddings[:5], k=10)[0])


def test_sharded_filtered_search_equals_the_filtered_single_index(sharded, encoded, query_embeddings):
    _, index, single, ids = sharded
    # Documents with metadata, added to both (the shards were built from embeddings alone).
    new_ids = [f"meta/{j}" for j in range(24)]
    new_embs = [encoded[ids[j]] for j in range(24)]
    meta = [{"part": "a" if j % 3 == 0 else "b", "n": j} for j in range(24)]
    index.add_documents(new_ids, new_embs, metadata=meta)
    single.add_documents(new_ids, new_embs, metadata=meta)
    try:
        cases = [
            ({"part": "a"}, lambda m: m["part"] == "a"),
            ('{"n": {"$gte": 10}, "part": "b"}', lambda m: m["n"] >= 10 and m["part"] == "b"),
        ]
        for flt, pred in cases:
            allowed = {i for i, m in zip(new_ids, meta) if pred(m)}
            got = index.search(queries_embeddings=query_embeddings, k=5, filter=flt)
            want = single(query_embeddings, k=5, filter=flt)
            assert len(got) == len(want) == len(query_embeddings)
            for g, w in zip(got, want):
                assert len(g) == 5 and {h["id"] for h in g} <= allowed
                assert [h["id"] for h in g] == [h["id"] for h in w]
                for a, b in zip(g, w):
                    assert abs(a["score"] - b["score"]) <= 1e-5, (a, b)
            assert retrieve.ColBERT(index=index).retrieve(query_embeddings[:2], k=5, filter=flt) == got[:2]
        with pytest.raises(ValueError, match=r"\$foo"):
            index.search(queries_embeddings=query_embeddings[:1], k=5, filter={"n": {"$foo": 1}})
    finally:
        index.remove_documents(filter={"n": {"$exists": True}})
        single.remove_documents(new_ids)
    assert len(index) == len(ids)
    assert index.search(queries_embeddings=query_embeddings[:1], k=5, filter={"part": "a"}) == [[]]


def test_killed_shard_actor_is_restarted_and_searches_wait(sharded, query_embeddings):
    _, index, _, _ = sharded
    want = index.search(queries_embeddings=query_embeddings, k=10)
    victim = index.shards()[1]
    # Freeze the actor's process, send a search (it is then in flight, unanswered), and kill the process.
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        pending = index.search_async(queries_embeddings=query_embeddings, k=10)
    finally:
        os.kill(victim["pid"], signal.SIGKILL)
    # Ray restarts the actor, which reopens its shard; the search waits for it and is complete.
    assert pending.result() == want
    assert index.last_missing_shards == []
    again = index.shards()[1]
    assert again["pid"] != victim["pid"] and again["documents"] == victim["documents"]
    # A search sent right after a kill (while the actor restarts) also waits and is complete.
    ray.kill(index.actor(1), no_restart=False)
    assert index.search(queries_embeddings=query_embeddings, k=10) == want
    assert index.shards()[1]["pid"] not in (victim["pid"], again["pid"])


def test_unavailable_shard_is_named_unless_partial_allowed(sharded, query_embeddings):
    _, index, _, _ = sharded
    queries = query_embeddings[:8]
    want = index.search(queries_embeddings=queries, k=10)
    victim = index.shards()[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        # A shard that does not answer in time (it is frozen; the other answers 8 queries well within 6 s): an
        # error naming it, never a partial result.
        with pytest.raises(lray.ShardUnavailableError, match="shard-00000") as err:
            index.search(queries_embeddings=queries, k=10, timeout=6)
        assert err.value.shard == "shard-00000"
        # With allow_partial, the other shard's results, and the missing shard named.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            partial = index.search(queries_embeddings=queries, k=10, timeout=6, allow_partial=True)
        assert index.last_missing_shards == ["shard-00000"]
        assert any(issubclass(w.category, lray.PartialResultWarning) and "shard-00000" in str(w.message) for w in caught)
        assert all(lray.shard_of(h["id"], 2) == 1 for q in partial for h in q)
        expected = [[h for h in q if lray.shard_of(h["id"], 2) == 1] for q in want]
        assert [q[: len(e)] for q, e in zip(partial, expected)] == expected
    finally:
        os.kill(victim["pid"], signal.SIGKILL)
    # After the kill Ray restarts the actor and the index is whole again.
    assert index.search(queries_embeddings=queries, k=10) == want
    assert index.last_missing_shards == []


def test_manifest_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="latte-shards.json"):
        lray.read_manifest(tmp_path)
    (tmp_path / lray.MANIFEST).write_text(json.dumps({"format": "other"}), encoding="utf-8")
    with pytest.raises(ValueError, match="format: expected 'latte-sharded-index', got 'other'"):
        lray.read_manifest(tmp_path)
    bad = {"format": "latte-sharded-index", "version": 1, "num_shards": 2, "shards": [{"name": "shard-00000"}]}
    (tmp_path / lray.MANIFEST).write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match="num_shards"):
        lray.read_manifest(tmp_path)


def test_shard_of_is_stable_and_spreads():
    # blake2b-64 of the UTF-8 id, little-endian, mod n: fixed values, independent of Python's hash seed.
    import hashlib

    for i in ["a", "doc-1", "nomicon/aliasing.html#2225", "ü"]:
        want = int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") % 7
        assert lray.shard_of(i, 7) == want
    assert lray.shard_of(12, 3) == lray.shard_of("12", 3)
    counts = np.bincount([lray.shard_of(f"d{j}", 4) for j in range(4000)], minlength=4)
    assert counts.min() > 800
    with pytest.raises(ValueError, match="num_shards"):
        lray.shard_of("a", 0)

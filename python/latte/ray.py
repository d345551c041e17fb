"""Scale-out on Ray: distributed encoding with Ray Data and sharded PLAID indexes served by Ray actors.

Installed with the extra ``pip install 'latte-colbert[ray]'`` (it brings ``ray[data]``); import it as
``import latte.ray``. Every Ray worker must be able to import ``latte`` (install the package on each node,
or pass a ``runtime_env``).

- :func:`encode`: a Ray Dataset of texts → the same rows plus an ``embeddings`` column (one float32
  ``(tokens, dim)`` array per row), through ``map_batches`` with a callable class that loads the model once
  per worker. The embeddings are those of :meth:`latte.models.ColBERT.encode` in one process.
- :func:`write_embeddings`: writes such a dataset as ``.npz`` + ``.ids`` part files from the workers that hold
  the blocks (nothing is gathered on one node); each part is what ``latte index --embeddings PART.npz --ids
  PART.ids`` reads.
- :func:`build_sharded`: one PLAID index per shard, built by one Ray task per shard; documents are routed by
  a stable hash of their id (:func:`shard_of`), so adds and deletes reach the right shard later. Every shard
  is built with one codec (centroids and residual codec) trained once on a sample drawn across the dataset
  and passed to the shard tasks through Ray's object store. A manifest (``latte-shards.json``) names the
  shards, the model and the shared codec.
- :class:`ShardedIndex`: one Ray actor per shard (each opens its shard memory-mapped), a query batch fanned
  out to every shard and each query's top-``k`` merged by score. Scores are comparable across shards because
  every shard's final rerank is an exact MaxSim from the stored half-precision embeddings, and with the shared
  codec the merged top-``k`` is that of one index built with that codec over all the documents.

The index folder must be visible under the same path from every node that runs a shard task or actor (a
shared or network file system); on one machine any folder works.

Failure behaviour: a shard actor whose process dies is restarted by Ray (``max_restarts``) and reopens its
shard. A search running or submitted during the restart waits for it (up to ``timeout`` seconds) and then
returns the complete result; past the timeout, or when the actor cannot come back, it raises
:class:`ShardUnavailableError` naming the shard. Only with ``allow_partial=True`` does a search return the
results of the shards that answered (the missing ones are named in a :class:`PartialResultWarning` and in
:attr:`ShardedIndex.last_missing_shards`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

import ray

from latte._arrays import matrices

__all__ = [
    "MANIFEST",
    "PartialResultWarning",
    "PendingSearch",
    "ShardUnavailableError",
    "ShardedIndex",
    "build_sharded",
    "encode",
    "read_manifest",
    "sample_key",
    "shard_of",
    "write_embeddings",
]

#: File name of the manifest of a sharded index, in its folder.
MANIFEST = "latte-shards.json"
#: ``format`` field of the manifest.
FORMAT = "latte-sharded-index"
#: Version of the manifest layout this module writes and reads.
VERSION = 1
#: How document ids are routed to shards (recorded in the manifest).
ROUTING = "blake2b-64-le(utf8(id)) mod num_shards"

Result = Dict[str, Any]


class ShardUnavailableError(RuntimeError):
    """A shard did not answer (its actor died and did not come back in time, or failed): names the shard."""

    def __init__(self, shard: str, reason: str) -> None:
        super().__init__(f"shard {shard} is unavailable: {reason}")
        self.shard = shard
        self.reason = reason


class PartialResultWarning(UserWarning):
    """A search with ``allow_partial=True`` returned without the results of some shards (named)."""


# -- routing ----------------------------------------------------------------------------------------------


def shard_of(document_id: Hashable, num_shards: int) -> int:
    """The shard of ``document_id`` among ``num_shards``: the 64-bit little-endian BLAKE2b digest of the UTF-8
    ``str(document_id)``, modulo ``num_shards``. Stable across processes, machines and Python versions."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    digest = hashlib.blake2b(str(document_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


# -- encoding ---------------------------------------------------------------------------------------------


def _column(batch: Mapping[str, Any], name: str, what: str) -> Any:
    if name not in batch:
        raise ValueError(f"{what}: the dataset has no column {name!r} (columns: {sorted(batch)})")
    return batch[name]


def _object_column(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding ``arrays`` (numpy would stack same-shaped arrays into one 3-D array)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


class _Encoder:
    """The ``map_batches`` callable class of :func:`encode`: loads the model once per worker."""

    def __init__(
        self,
        model: str,
        model_kwargs: Dict[str, Any],
        text_column: str,
        id_column: str,
        output_column: str,
        is_query: bool,
        batch_size: int,
        encode_kwargs: Dict[str, Any],
    ) -> None:
        from latte.models import ColBERT

        self.model = ColBERT(model, **model_kwargs)
        self.text_column = text_column
        self.id_column = id_column
        self.output_column = output_column
        self.is_query = is_query
        self.batch_size = batch_size
        self.encode_kwargs = encode_kwargs

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        _column(batch, self.id_column, "encode: id_column")
        texts = _column(batch, self.text_column, "encode: text_column")
        values: List[str] = []
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(
                    f"encode: column {self.text_column!r} must hold strings, got {type(t).__name__} ({t!r:.80})"
                )
            values.append(t)
        embeddings = self.model.encode(
            values,
            is_query=self.is_query,
            batch_size=self.batch_size,
            show_progress_bar=False,
            **self.encode_kwargs,
        )
        out = dict(batch)
        out[self.output_column] = _object_column(embeddings)
        return out


def encode(
    dataset: "ray.data.Dataset",
    model: Union[str, "os.PathLike[str]"],
    text_column: str = "text",
    id_column: str = "_id",
    is_query: bool = False,
    batch_size: int = 32,
    concurrency: Union[int, Tuple[int, int]] = 1,
    num_cpus: float = 1,
    model_kwargs: Optional[Dict[str, Any]] = None,
    embeddings_column: str = "embeddings",
    **encode_kwargs: Any,
) -> "ray.data.Dataset":
    """Encodes the texts of ``dataset`` with ``model`` on Ray workers (lazily, as every Ray Data transform).

    Returns ``dataset`` with one more column, ``embeddings``: per row a float32 ``(tokens, dim)`` array,
    equal to ``latte.models.ColBERT(model, **model_kwargs).encode(texts, is_query=is_query)`` in one process.
    ``model`` is a model folder (present on every node) or a Hugging Face Hub id; ``model_kwargs`` go to
    :class:`latte.models.ColBERT` (``query_length``, ``document_length``, ...) and ``encode_kwargs`` to its
    ``encode`` (``pool_factor``, ``prompt_name``, ...). ``batch_size`` is both the Ray batch and the model's
    batch; ``concurrency`` is the number of encoder workers (or a ``(min, max)`` range), each reserving
    ``num_cpus``. ``id_column`` must exist (it identifies the rows for :func:`write_embeddings` and
    :func:`build_sharded`).
    """
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(
            "encode: model must be a model folder or Hub id (str), got "
            f"{type(model).__name__}; every worker loads the model itself"
        )
    if batch_size < 1:
        raise ValueError(f"encode: batch_size must be at least 1, got {batch_size}")
    if not id_column:
        raise ValueError("encode: id_column must name a column")
    return dataset.map_batches(
        _Encoder,
        fn_constructor_kwargs={
            "model": os.fspath(model),
            "model_kwargs": dict(model_kwargs or {}),
            "text_column": text_column,
            "id_column": id_column,
            "output_column": embeddings_column,
            "is_query": bool(is_query),
            "batch_size": batch_size,
            "encode_kwargs": dict(encode_kwargs),
        },
        batch_format="numpy",
        batch_size=batch_size,
        compute=_actor_pool(concurrency),
        num_cpus=num_cpus,
    )


def _actor_pool(concurrency: Union[int, Tuple[int, int]]) -> Any:
    """Ray Data's actor pool for ``concurrency`` workers (an int, or a ``(min, max)`` range)."""
    if isinstance(concurrency, tuple):
        low, high = concurrency
        if not 1 <= low <= high:
            raise ValueError(f"encode: concurrency range must be 1 <= min <= max, got {concurrency}")
        return ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    if concurrency < 1:
        raise ValueError(f"encode: concurrency must be at least 1, got {concurrency}")
    return ray.data.ActorPoolStrategy(size=concurrency)


# -- sharded files ----------------------------------------------------------------------------------------


def _ids_and_embeddings(
    batch: Mapping[str, Any], id_column: str, embeddings_column: str, what: str
) -> Tuple[List[str], List[np.ndarray]]:
    ids = [str(i) for i in _column(batch, id_column, f"{what}: id_column")]
    embs = matrices(list(_column(batch, embeddings_column, f"{what}: embeddings_column")), embeddings_column)
    for i in ids:
        if not i or "\n" in i or "\r" in i:
            raise ValueError(f"{what}: document id {i!r} is empty or holds a line break (ids are stored one per line)")
    if len(ids) != len(embs):
        raise ValueError(f"{what}: {len(ids)} ids but {len(embs)} embeddings in one batch")
    return ids, embs


def _write_part(
    folder: str, ids: List[str], embs: List[np.ndarray], metadata: Optional[List[Dict[str, Any]]] = None
) -> str:
    """Writes ``part-<digest>.npz`` (``arr_0 … arr_{n-1}``, float32), ``part-<digest>.ids`` (one id a line) and,
    with ``metadata``, ``part-<digest>.jsonl`` (one ``{"_id", ...}`` object a line) atomically; the name is a
    digest of the ids, so the same rows give the same files. Returns the base name."""
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.blake2b("\n".join(ids).encode("utf-8"), digest_size=10).hexdigest()
    base = f"part-{digest}"
    tmp = f".{base}.{uuid.uuid4().hex}"
    np.savez(os.path.join(folder, tmp + ".npz"), *[np.ascontiguousarray(e, dtype=np.float32) for e in embs])
    with open(os.path.join(folder, tmp + ".ids"), "w", encoding="utf-8") as f:
        f.writelines(f"{i}\n" for i in ids)
    suffixes = [".ids", ".npz"]
    if metadata is not None:
        with open(os.path.join(folder, tmp + ".jsonl"), "w", encoding="utf-8") as f:
            for i, fields in zip(ids, metadata):
                f.write(json.dumps({"_id": i, **fields}, ensure_ascii=False) + "\n")
        suffixes.insert(0, ".jsonl")
    for suffix in suffixes:
        os.replace(os.path.join(folder, tmp + suffix), os.path.join(folder, base + suffix))
    return base


def _json_value(value: Any, what: str) -> Any:
    """A JSON-ready copy of one cell of a numpy batch (numpy scalars and arrays become Python values)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_json_value(v, what) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, dict):
        return {str(k): _json_value(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, what) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(f"{what}: a value of type {type(value).__name__} cannot be stored as JSON metadata")


def _write_batch(
    batch: Dict[str, Any],
    root: str,
    id_column: str,
    embeddings_column: str,
    num_shards: Optional[int],
    metadata_columns: Sequence[str] = (),
) -> Dict[str, Any]:
    """Writes one batch: one part file in ``root`` (``num_shards`` None) or one per shard it touches."""
    ids, embs = _ids_and_embeddings(batch, id_column, embeddings_column, "write")
    metadata: Optional[List[Dict[str, Any]]] = None
    if metadata_columns:
        columns = {c: _column(batch, c, "write: metadata_columns") for c in metadata_columns}
        metadata = [
            {c: _json_value(values[row], f"write: column {c!r}") for c, values in columns.items()}
            for row in range(len(ids))
        ]
    groups: Dict[int, List[int]] = {}
    for row, i in enumerate(ids):
        groups.setdefault(-1 if num_shards is None else shard_of(i, num_shards), []).append(row)
    shards, parts, counts, tokens = [], [], [], []
    for shard, rows in sorted(groups.items()):
        folder = root if shard < 0 else os.path.join(root, _shard_name(shard))
        meta = None if metadata is None else [metadata[r] for r in rows]
        parts.append(_write_part(folder, [ids[r] for r in rows], [embs[r] for r in rows], meta))
        shards.append(shard)
        counts.append(len(rows))
        tokens.append(sum(int(embs[r].shape[0]) for r in rows))
    return {
        "shard": np.array(shards, dtype=np.int64),
        "part": np.array(parts),
        "documents": np.array(counts, dtype=np.int64),
        "tokens": np.array(tokens, dtype=np.int64),
    }


def write_embeddings(
    dataset: "ray.data.Dataset",
    path: Union[str, "os.PathLike[str]"],
    id_column: str = "_id",
    embeddings_column: str = "embeddings",
    metadata_columns: Sequence[str] = (),
) -> List[str]:
    """Writes an encoded dataset as part files in the folder ``path``, from the workers that hold its blocks.

    Each part is ``part-<digest>.npz`` (arrays ``arr_0 … arr_{n-1}``, float32 ``(tokens, dim)``, the layout
    ``latte encode`` writes and ``latte index --embeddings`` reads) and ``part-<digest>.ids`` (the ids, one a
    line, same order). With ``metadata_columns`` (e.g. ``["title", "text", "lang"]``) a third file,
    ``part-<digest>.jsonl``, holds one ``{"_id", column: value, ...}`` object per document: what
    ``latte index --embeddings ... --metadata`` stores (``title`` and ``text`` as the document's text, the other
    fields as metadata for ``latte search --filter``). Returns the base names of the parts written, sorted.
    ``path`` must be visible to the workers (a shared file system on a cluster).
    """
    root = os.path.abspath(os.fspath(path))
    os.makedirs(root, exist_ok=True)
    write = functools.partial(
        _write_batch,
        root=root,
        id_column=id_column,
        embeddings_column=embeddings_column,
        num_shards=None,
        metadata_columns=tuple(metadata_columns),
    )
    rows = dataset.map_batches(write, batch_format="numpy").take_all()
    return sorted(str(r["part"]) for r in rows)


def _read_parts(folder: str, parts: Iterable[str]) -> Tuple[List[str], List[np.ndarray]]:
    ids: List[str] = []
    embs: List[np.ndarray] = []
    for base in sorted(set(parts)):
        with open(os.path.join(folder, base + ".ids"), encoding="utf-8") as f:
            part_ids = [line.rstrip("\n") for line in f]
        with np.load(os.path.join(folder, base + ".npz")) as npz:
            part_embs = [npz[f"arr_{j}"] for j in range(len(npz.files))]
        if len(part_ids) != len(part_embs):
            raise ValueError(
                f"{os.path.join(folder, base)}: {len(part_ids)} ids but {len(part_embs)} arrays; they must match"
            )
        ids.extend(part_ids)
        embs.extend(part_embs)
    return ids, embs


# -- building ---------------------------------------------------------------------------------------------


def _index_settings(
    nbits: int, kmeans_niters: int, max_points_per_centroid: int, seed: int, pool_factor: int
) -> Dict[str, Any]:
    if nbits not in (1, 2, 4):
        raise ValueError(f"nbits must be 1, 2 or 4, got {nbits}")
    return {
        "nbits": nbits,
        "kmeans_niters": kmeans_niters,
        "max_points_per_centroid": max_points_per_centroid,
        "seed": seed,
        "pool_factor": pool_factor,
    }


#: How the documents the shared codec is trained on are chosen (recorded in the manifest).
SAMPLING = "the sample_documents ids with the smallest blake2b-64-le(utf8(id), salt=seed as 16 bytes little-endian)"
#: Tokens held out of k-means for the residual codec when a codec is trained (as the Rust build does).
_HELDOUT_TOKENS = 50_000


def sample_key(document_id: Hashable, seed: int) -> int:
    """The key that orders documents for the shared codec's training sample: the 64-bit little-endian BLAKE2b
    digest of the UTF-8 ``str(document_id)`` salted with ``seed``. :func:`build_sharded` trains on the
    documents with the smallest keys, so the sample depends only on the ids and the seed."""
    salt = int(seed).to_bytes(16, "little", signed=False)
    digest = hashlib.blake2b(str(document_id).encode("utf-8"), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "little")


def _codec_plan(
    documents: int, tokens: int, settings: Dict[str, Any], sample_cap: Optional[int]
) -> Tuple[int, int]:
    """``(num_centroids, sample_documents)`` of the shared codec of ``documents`` documents holding ``tokens``
    tokens: the number of centroids one index over them would get, and as many documents as one index's
    build samples (``1 + 16·sqrt(120·n)``) but no more than hold its k-means training set plus the held-out
    tokens (``num_centroids × max_points_per_centroid + 50,000``), nor ``sample_cap``."""
    from latte import _latte

    pooled = max(1, tokens // max(1, int(settings["pool_factor"])))
    k = int(_latte.default_num_centroids(pooled))
    budget = k * int(settings["max_points_per_centroid"]) + _HELDOUT_TOKENS
    per_doc = pooled / max(1, documents)
    n = min(documents, int(1 + 16 * (120 * documents) ** 0.5), max(1, int(-(-budget // per_doc))))
    if sample_cap is not None:
        n = min(n, sample_cap)
    return k, max(1, n)


def _sample_candidates(staging: str, shard: int, parts: List[str], seed: int, below: int) -> List[Tuple[int, str, str]]:
    """The staged documents of one shard whose :func:`sample_key` is below ``below``: ``(key, id, part)``."""
    folder = os.path.join(staging, _shard_name(shard))
    out: List[Tuple[int, str, str]] = []
    for base in sorted(set(parts)):
        with open(os.path.join(folder, base + ".ids"), encoding="utf-8") as f:
            for line in f:
                i = line.rstrip("\n")
                key = sample_key(i, seed)
                if key < below:
                    out.append((key, i, base))
    return out


def _train_shared_codec(
    staging: str, chosen: List[Tuple[int, int, str, str]], settings: Dict[str, Any], num_centroids: int
) -> Any:
    """Trains the shared codec on the chosen documents (``(key, shard, id, part)``, read from the staged parts
    in key order) with ``num_centroids`` centroids; returns a :class:`latte.indexes.Codec`."""
    from latte.indexes import train_codec

    by_part: Dict[Tuple[int, str], List[str]] = {}
    for _, shard, i, base in chosen:
        by_part.setdefault((shard, base), []).append(i)
    found: Dict[str, np.ndarray] = {}
    for (shard, base), wanted in sorted(by_part.items()):
        stem = os.path.join(staging, _shard_name(shard), base)
        with open(stem + ".ids", encoding="utf-8") as f:
            position = {line.rstrip("\n"): j for j, line in enumerate(f)}
        with np.load(stem + ".npz") as npz:
            for i in wanted:
                found[i] = npz[f"arr_{position[i]}"]
    sample = [found[i] for _, _, i, _ in chosen]
    return train_codec(
        sample,
        nbits=settings["nbits"],
        kmeans_niters=settings["kmeans_niters"],
        max_points_per_centroid=settings["max_points_per_centroid"],
        seed=settings["seed"],
        num_centroids=num_centroids,
        pool_factor=settings["pool_factor"],
    )


def _build_shard(
    root: str, shard: int, staging: str, parts: List[str], settings: Dict[str, Any], codec: Any = None
) -> Dict[str, Any]:
    """Builds shard ``shard`` of the index in ``root`` from its staged parts (documents sorted by id, so the
    shard does not depend on how the dataset was split into blocks), with the shared ``codec`` when given."""
    from latte.indexes import PLAID

    name = _shard_name(shard)
    ids, embs = _read_parts(os.path.join(staging, name), parts)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    for a, b in zip(order, order[1:]):
        if ids[a] == ids[b]:
            raise ValueError(f"build_sharded: duplicate document id {ids[a]!r} (ids must be unique)")
    index = PLAID(index_folder=root, index_name=name, override=True, codec=codec, **settings)
    if order:
        index.add_documents([ids[i] for i in order], [embs[i] for i in order])
    return {
        "shard": shard,
        "documents": len(order),
        "dim": int(embs[0].shape[1]) if embs else None,
        "num_centroids": None if codec is None else int(codec.num_centroids),
    }


def _write_manifest(root: str, manifest: Dict[str, Any]) -> None:
    tmp = os.path.join(root, f".{MANIFEST}.{uuid.uuid4().hex}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(root, MANIFEST))


def read_manifest(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """The manifest of the sharded index in the folder ``path`` (checked: format, version, shard names)."""
    file = os.path.join(os.fspath(path), MANIFEST)
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: missing (expected a sharded index built by latte.ray.build_sharded)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{file}: format: expected {FORMAT!r}, got {got!r}")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{file}: version: expected {VERSION}, got {manifest.get('version')!r}")
    n = manifest.get("num_shards")
    shards = manifest.get("shards")
    if not isinstance(n, int) or n < 1 or not isinstance(shards, list) or len(shards) != n:
        raise ValueError(
            f"{file}: num_shards: expected a positive int equal to the length of shards, got {n!r} and "
            f"{len(shards) if isinstance(shards, list) else shards!r}"
        )
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or s.get("name") != _shard_name(i):
            raise ValueError(f"{file}: shards[{i}].name: expected {_shard_name(i)!r}, got {s!r:.80}")
    return manifest


def build_sharded(
    dataset: "ray.data.Dataset",
    path: Union[str, "os.PathLike[str]"],
    num_shards: int,
    id_column: str = "_id",
    embeddings_column: str = "embeddings",
    model: Optional[Union[str, "os.PathLike[str]"]] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    nbits: int = 4,
    kmeans_niters: int = 4,
    max_points_per_centroid: int = 256,
    seed: int = 42,
    pool_factor: int = 1,
    num_cpus: float = 1,
    override: bool = False,
    codec_sample: Optional[int] = None,
) -> Dict[str, Any]:
    """Builds a sharded PLAID index in the folder ``path`` from a dataset of ids and embeddings (the columns
    :func:`encode` writes) and returns its manifest.

    Each row goes to shard :func:`shard_of` ``(id, num_shards)``. The workers holding the dataset's blocks
    write each shard's rows as part files under ``path/_staging/`` (nothing is gathered on the driver), then
    one Ray task per shard (``num_cpus`` each, spread over the nodes) builds that shard's PLAID index in
    ``path/shard-NNNNN`` with the settings of :class:`latte.indexes.PLAID` (``nbits``, ``kmeans_niters``,
    ``max_points_per_centroid``, ``seed``, ``pool_factor``), and the staging files are removed. ``model`` (and
    ``model_kwargs``) are recorded in the manifest so that :meth:`ShardedIndex.search` can encode text
    queries. ``override=True`` replaces an existing index at ``path``; otherwise one there is an error.

    Every shard is built with one shared codec (centroids and residual codec), so the shards encode every
    token as one index over the whole dataset built with that codec would, and their merged results are
    that index's. It is trained once, by one Ray task, on a deterministic sample drawn across all shards:
    the documents with the smallest :func:`sample_key` (as many as one index's build samples, no more than
    hold its k-means training set, and at most ``codec_sample`` when given), with the number of centroids
    one index over all the documents would get; it reaches the shard tasks through Ray's object store. The
    manifest's ``codec`` entry records it (``shared``, ``num_centroids``, ``sample_documents``, ...).
    """
    if num_shards < 1:
        raise ValueError(f"build_sharded: num_shards must be at least 1, got {num_shards}")
    settings = _index_settings(nbits, kmeans_niters, max_points_per_centroid, seed, pool_factor)
    root = os.path.abspath(os.fspath(path))
    if os.path.exists(os.path.join(root, MANIFEST)):
        if not override:
            raise FileExistsError(f"{root}: already holds a sharded index (pass override=True to replace it)")
        shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)
    staging = os.path.join(root, "_staging")
    shutil.rmtree(staging, ignore_errors=True)
    write = functools.partial(
        _write_batch, root=staging, id_column=id_column, embeddings_column=embeddings_column, num_shards=num_shards
    )
    written = dataset.map_batches(write, batch_format="numpy").take_all()
    parts: Dict[int, List[str]] = {i: [] for i in range(num_shards)}
    documents = tokens = 0
    for row in written:
        parts[int(row["shard"])].append(str(row["part"]))
        documents += int(row["documents"])
        tokens += int(row["tokens"])
    codec_ref, codec_info = None, None
    if documents:
        codec_ref, codec_info = _shared_codec(staging, parts, documents, tokens, settings, num_cpus, codec_sample)
    build = ray.remote(_build_shard).options(num_cpus=num_cpus, scheduling_strategy="SPREAD", max_retries=0)
    refs = [build.remote(root, i, staging, parts[i], settings, codec_ref) for i in range(num_shards)]
    built = sorted(ray.get(refs), key=lambda r: r["shard"])
    shutil.rmtree(staging, ignore_errors=True)
    if codec_info is not None:
        # What the trained codec has (fewer centroids than planned when the sample holds fewer tokens).
        codec_info["num_centroids"] = built[0]["num_centroids"]
    dims = {r["dim"] for r in built if r["dim"] is not None}
    if len(dims) > 1:
        raise ValueError(f"build_sharded: the embeddings have several dimensions {sorted(dims)}; expected one")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_shards": num_shards,
        "routing": ROUTING,
        "shards": [{"name": _shard_name(r["shard"]), "documents": r["documents"]} for r in built],
        "dim": dims.pop() if dims else None,
        "model": None if model is None else os.fspath(model),
        "model_kwargs": dict(model_kwargs or {}),
        "index": settings,
        "codec": codec_info,
    }
    _write_manifest(root, manifest)
    return manifest


def _shared_codec(
    staging: str,
    parts: Dict[int, List[str]],
    documents: int,
    tokens: int,
    settings: Dict[str, Any],
    num_cpus: float,
    sample_cap: Optional[int],
) -> Tuple[Any, Dict[str, Any]]:
    """Draws the codec's sample (one task per shard lists its candidates; the driver keeps the ids with the
    smallest keys) and trains the codec in one task. Returns the codec's object ref and its manifest entry."""
    if sample_cap is not None and sample_cap < 1:
        raise ValueError(f"build_sharded: codec_sample must be at least 1, got {sample_cap}")
    seed = int(settings["seed"])
    num_centroids, n = _codec_plan(documents, tokens, settings, sample_cap)
    # Keys are uniform: a bound a little above the n-th smallest key's expected value leaves a few more than
    # n candidates (the ids only, never the embeddings, come to the driver); the bound is raised if too few.
    fraction = n / documents
    task = ray.remote(_sample_candidates).options(num_cpus=num_cpus, scheduling_strategy="SPREAD", max_retries=0)
    chosen: List[Tuple[int, int, str, str]] = []
    while True:
        below = 1 << 64 if fraction >= 1 else int(min(1.0, fraction * 1.1 + 32 / documents) * (1 << 64))
        found = ray.get([task.remote(staging, i, parts[i], seed, below) for i in range(len(parts))])
        chosen = sorted((key, shard, i, base) for shard, rows in enumerate(found) for key, i, base in rows)
        if len(chosen) >= n or below >= 1 << 64:
            break
        fraction = min(1.0, fraction * 2)
    chosen = chosen[:n]
    train = ray.remote(_train_shared_codec).options(num_cpus=num_cpus, max_retries=0)
    codec_ref = train.remote(staging, chosen, settings, num_centroids)
    info = {
        "shared": True,
        "num_centroids": num_centroids,
        "nbits": settings["nbits"],
        "sample_documents": len(chosen),
        "documents": documents,
        "tokens": tokens,
        "sampling": SAMPLING,
    }
    return codec_ref, info


# -- serving ----------------------------------------------------------------------------------------------


class _ShardActor:
    """One shard of a :class:`ShardedIndex`: its PLAID index opened (memory-mapped) in a Ray actor."""

    def __init__(
        self, root: str, name: str, settings: Dict[str, Any], search: Dict[str, Any], shared_codec: bool = False
    ) -> None:
        from latte.indexes import PLAID

        self.name = name
        self.index = PLAID(
            index_folder=root,
            index_name=name,
            n_ivf_probe=search["n_ivf_probe"],
            n_full_scores=search["n_full_scores"],
            **settings,
        )
        if shared_codec and not self.index.is_indexed:
            # A shard still without documents is created, at its first add, with the codec the others share.
            self.index.codec = _sibling_codec(root, name)
        # Open the shard now (not at the first query), so that a restarted actor is ready when it answers.
        self.documents = len(self.index)
        self.started = time.time()

    def info(self) -> Dict[str, Any]:
        """Name, live documents, process id, node and start time of this shard's actor."""
        ctx = ray.get_runtime_context()
        return {
            "name": self.name,
            "documents": len(self.index),
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "started": self.started,
        }

    def search(
        self, queries: List[np.ndarray], k: int, subset: Optional[List[List[str]]], filter: Optional[Any]
    ) -> List[List[Tuple[str, float]]]:
        if not self.index.is_indexed:
            return [[] for _ in queries]
        kwargs: Dict[str, Any] = {"k": k, "subset": subset}
        if filter is not None:
            kwargs["filter"] = filter
        hits = self.index(queries, **kwargs)
        return [[(str(h["id"]), float(h["score"])) for h in q] for q in hits]

    def add(
        self,
        ids: List[Hashable],
        embeddings: List[np.ndarray],
        metadata: Optional[List[Any]],
        fields: Optional[Dict[str, Any]] = None,
        update: bool = False,
    ) -> int:
        """Adds (or, with ``update``, updates in place) documents; ``fields``: ``documents_texts`` /
        ``documents_titles`` lists for these documents."""
        kwargs: Dict[str, Any] = dict(fields or {})
        if metadata is not None:
            kwargs["metadata"] = metadata
        if update:
            self.index.update_documents(ids, embeddings, **kwargs)
        else:
            self.index.add_documents(ids, embeddings, **kwargs)
        return len(self.index)

    def remove(self, ids: List[Hashable]) -> int:
        self.index.remove_documents(ids)
        return len(self.index) if self.index.is_indexed else 0

    def remove_matching(self, filter: str) -> int:
        """Removes the documents of this shard whose metadata matches ``filter`` (JSON text)."""
        if self.index.is_indexed:
            self.index.remove_documents(filter=filter)
        return len(self.index) if self.index.is_indexed else 0


def _sibling_codec(root: str, name: str) -> Any:
    """The shared codec, read from the first other shard of ``root`` that holds an index (None if none does)."""
    from latte import _latte
    from latte.indexes import Codec

    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry != name and entry.startswith("shard-") and _latte.plaid_exists(path):
            return Codec.from_index(path)
    return None


class PendingSearch:
    """A search sent to every shard of a :class:`ShardedIndex` (from :meth:`ShardedIndex.search_async`)."""

    def __init__(self, index: "ShardedIndex", refs: List[Any], n_queries: int, k: int, partial: bool, timeout: float):
        self._index = index
        self._refs = refs
        self._n = n_queries
        self._k = k
        self._partial = partial
        self._timeout = timeout

    def result(self) -> List[List[Result]]:
        """Waits for every shard (up to the timeout) and returns the merged results, as
        :meth:`ShardedIndex.search`; raises :class:`ShardUnavailableError` naming a shard that did not answer
        unless partial results were allowed."""
        index = self._index
        answers = index._gather(self._refs, allow_partial=self._partial, timeout=self._timeout)
        index.last_missing_shards = [n for n, a in zip(index.names, answers) if a is None]
        if index.last_missing_shards:
            warnings.warn(
                f"search: results without shards {index.last_missing_shards} (allow_partial=True)",
                PartialResultWarning,
                stacklevel=2,
            )
        out: List[List[Result]] = []
        for qi in range(self._n):
            merged = [hit for a in answers if a is not None for hit in a[qi]]
            merged.sort(key=lambda h: -h[1])
            out.append([{"id": i, "score": s} for i, s in merged[: self._k]])
        return out


class ShardedIndex:
    """A sharded PLAID index (built by :func:`build_sharded`) served by one Ray actor per shard.

    Needs a connected Ray (``ray.init(...)``). Actors are created with ``max_restarts`` (default: always
    restart) and ``actor_options`` (default ``{"num_cpus": 1}``, spread over the nodes). ``timeout`` is how
    long a search waits for every shard, restarts included, before :class:`ShardUnavailableError`;
    ``allow_partial=True`` makes searches return the shards that answered instead (see the module doc).
    ``n_ivf_probe`` and ``n_full_scores`` are the per-shard search settings of :class:`latte.indexes.PLAID`,
    with its defaults: the shards share one codec (:func:`build_sharded`), so with the same settings they
    probe the lists one index with that codec would and the merged top ``k`` is that index's.
    Ids come back as ``str``. Use it as a context manager, or call :meth:`close`, to stop the actors.
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        allow_partial: bool = False,
        timeout: float = 120.0,
        max_restarts: int = -1,
        actor_options: Optional[Dict[str, Any]] = None,
        n_ivf_probe: int = 8,
        n_full_scores: int = 8192,
    ) -> None:
        if not ray.is_initialized():
            raise RuntimeError("ShardedIndex needs a connected Ray: call ray.init(...) first")
        self.path = os.path.abspath(os.fspath(path))
        self.manifest = read_manifest(self.path)
        self.allow_partial = allow_partial
        self.timeout = timeout
        self.names: List[str] = [s["name"] for s in self.manifest["shards"]]
        self.num_shards: int = int(self.manifest["num_shards"])
        #: Shards missing from the last search (only ever non-empty with ``allow_partial``).
        self.last_missing_shards: List[str] = []
        self._model: Optional[Any] = None
        options: Dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
        options.update(actor_options or {})
        options["max_restarts"] = max_restarts
        options["max_task_retries"] = 0
        remote = ray.remote(_ShardActor).options(**options)
        search = {"n_ivf_probe": n_ivf_probe, "n_full_scores": n_full_scores}
        settings = dict(self.manifest["index"])
        shared = bool((self.manifest.get("codec") or {}).get("shared"))
        self._actors: List[Any] = [remote.remote(self.path, name, settings, search, shared) for name in self.names]
        self._closed = False
        # Wait until every shard is open, so that errors in a shard surface here, named.
        self._gather([a.info.remote() for a in self._actors], allow_partial=False, timeout=timeout)

    # -- helpers ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ShardedIndex is closed")

    def _gather(self, refs: List[Any], allow_partial: bool, timeout: Optional[float]) -> List[Any]:
        """The result of each shard's call (``None`` for a shard that failed, when ``allow_partial``)."""
        # Wait for all the answers together (fetched to this node), then read each.
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=True)
        arrived = set(ready)
        out: List[Any] = []
        for name, ref in zip(self.names, refs):
            if ref not in arrived:
                if not allow_partial:
                    raise ShardUnavailableError(name, f"no answer within {timeout} s")
                try:
                    ray.cancel(ref)
                except (TypeError, ValueError, ray.exceptions.RayError):
                    pass  # nothing to cancel: the answer is simply not used
                out.append(None)
                continue
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as err:
                if not allow_partial:
                    raise ShardUnavailableError(name, f"its actor died ({type(err).__name__})") from err
                out.append(None)
        return out

    def _route(self, ids: List[str]) -> Dict[int, List[int]]:
        groups: Dict[int, List[int]] = {}
        for row, i in enumerate(ids):
            groups.setdefault(shard_of(i, self.num_shards), []).append(row)
        return groups

    def _encode_queries(self, queries: List[str]) -> List[np.ndarray]:
        if self._model is None:
            model = self.manifest.get("model")
            if not model:
                raise ValueError(
                    f"{self.path}: the manifest names no model; pass queries_embeddings, or build the index "
                    "with build_sharded(..., model=...)"
                )
            from latte.models import ColBERT

            self._model = ColBERT(model, **self.manifest.get("model_kwargs", {}))
        embeddings: List[np.ndarray] = self._model.encode(queries, is_query=True, show_progress_bar=False)
        return embeddings

    # -- search -------------------------------------------------------------------------------------------

    def search(
        self,
        queries_embeddings: Any = None,
        k: int = 10,
        filter: Optional[Any] = None,
        queries: Optional[Union[str, List[str]]] = None,
        subset: Optional[Union[List[Hashable], List[List[Hashable]]]] = None,
        allow_partial: Optional[bool] = None,
        timeout: Optional[float] = None,
    ) -> List[List[Result]]:
        """Per query, up to ``k`` ``{"id", "score"}`` dicts, best first, as ``latte.retrieve.ColBERT(...).retrieve``.

        ``queries_embeddings``: one ``(tokens, dim)`` array per query; or ``queries``: texts, encoded with the
        model named in the manifest. The batch goes once into Ray's object store and every shard searches it;
        each query's hits are merged by score (ties keep shard order). ``filter`` is passed to every shard's
        search as in the single index; ``subset`` as :class:`latte.indexes.PLAID`'s. ``allow_partial`` and
        ``timeout`` override the index's settings for this call.
        """
        return self.search_async(
            queries_embeddings=queries_embeddings,
            k=k,
            filter=filter,
            queries=queries,
            subset=subset,
            allow_partial=allow_partial,
            timeout=timeout,
        ).result()

    def search_async(
        self,
        queries_embeddings: Any = None,
        k: int = 10,
        filter: Optional[Any] = None,
        queries: Optional[Union[str, List[str]]] = None,
        subset: Optional[Union[List[Hashable], List[List[Hashable]]]] = None,
        allow_partial: Optional[bool] = None,
        timeout: Optional[float] = None,
    ) -> "PendingSearch":
        """Sends the search to every shard and returns at once; :meth:`PendingSearch.result` waits for the
        answers and merges them (arguments as :meth:`search`; ``timeout`` counts from ``result()``)."""
        self._check_open()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if (queries_embeddings is None) == (queries is None):
            raise ValueError("search: give exactly one of queries_embeddings and queries")
        if queries is not None:
            texts = [queries] if isinstance(queries, str) else list(queries)
            q = self._encode_queries(texts)
        else:
            q = matrices(queries_embeddings, "queries_embeddings")
        if filter is not None:
            from latte.indexes import _filter_json

            # Checked (and turned into JSON text) once here, so a bad filter fails before any shard runs.
            filter = _filter_json(filter, check=True)
        subsets = None
        if subset is not None:
            from latte.indexes import _subset_lists

            subsets = _subset_lists(subset, len(q))
        partial = self.allow_partial if allow_partial is None else allow_partial
        queries_ref = ray.put(q)
        # Searches are read-only: Ray retries one on the restarted actor of a shard that died (that is the
        # wait during a restart); with allow_partial a dead shard is skipped at once instead.
        retries = 0 if partial else -1
        refs = [
            a.search.options(max_task_retries=retries).remote(queries_ref, k, subsets, filter)
            for a in self._actors
        ]
        return PendingSearch(self, refs, len(q), k, partial, self.timeout if timeout is None else timeout)

    def __call__(
        self,
        queries_embeddings: Any,
        k: int = 10,
        subset: Optional[Union[List[Hashable], List[List[Hashable]]]] = None,
        filter: Optional[Any] = None,
    ) -> List[List[Result]]:
        """Same as :meth:`search` (so ``latte.retrieve.ColBERT(index=sharded)`` works)."""
        return self.search(queries_embeddings=queries_embeddings, k=k, subset=subset, filter=filter)

    # -- writes -------------------------------------------------------------------------------------------

    def add_documents(
        self,
        documents_ids: Union[Hashable, List[Hashable]],
        documents_embeddings: Any,
        metadata: Optional[List[Any]] = None,
        documents_texts: Optional[List[Optional[str]]] = None,
        documents_titles: Optional[List[Optional[str]]] = None,
        **kwargs: Any,
    ) -> "ShardedIndex":
        """Adds documents, each to the shard of its id (:func:`shard_of`); a shard without an index yet is
        created from its first documents. ``metadata``, ``documents_texts`` and ``documents_titles`` (one
        entry per document, as :meth:`latte.indexes.PLAID.add_documents` takes them) go to the shards with
        their documents; an id the index holds is replaced."""
        return self._write(documents_ids, documents_embeddings, metadata, documents_texts, documents_titles, False)

    def _write(
        self,
        documents_ids: Union[Hashable, List[Hashable]],
        documents_embeddings: Any,
        metadata: Optional[List[Any]],
        texts: Optional[List[Optional[str]]],
        titles: Optional[List[Optional[str]]],
        update: bool,
    ) -> "ShardedIndex":
        self._check_open()
        from latte.indexes import _id_list

        ids = [str(i) for i in _id_list(documents_ids)]
        embs = matrices(documents_embeddings, "documents_embeddings")
        if len(ids) != len(embs):
            raise ValueError(
                f"documents_ids has {len(ids)} ids but documents_embeddings has {len(embs)} documents: they must match"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("documents_ids: an id repeats; ids must be unique")
        per_doc: Dict[str, List[Any]] = {}
        for what, values in (("metadata", metadata), ("documents_texts", texts), ("documents_titles", titles)):
            if values is not None:
                values = list(values)
                if len(values) != len(ids):
                    raise ValueError(f"{what} has {len(values)} entries for {len(ids)} documents: they must match")
                per_doc[what] = values
        groups = self._route(ids)
        refs = {}
        for shard, rows in sorted(groups.items()):
            fields = {w: [v[r] for r in rows] for w, v in per_doc.items() if w != "metadata"}
            meta = [per_doc["metadata"][r] for r in rows] if "metadata" in per_doc else None
            refs[shard] = self._actors[shard].add.remote(
                [ids[r] for r in rows], [embs[r] for r in rows], meta, fields, update
            )
        self._settle(refs)
        return self

    def remove_documents(
        self, documents_ids: Optional[Union[Hashable, List[Hashable]]] = None, filter: Optional[Any] = None
    ) -> "ShardedIndex":
        """Removes documents by id from their shards (ids the index does not hold are ignored), or, with
        ``filter``, every document whose metadata matches it, from every shard: give one of the two."""
        self._check_open()
        from latte.indexes import _filter_json, _id_list

        if (documents_ids is None) == (filter is None):
            raise ValueError("remove_documents: give exactly one of documents_ids and filter")
        if filter is not None:
            text = _filter_json(filter, check=True)
            self._settle({s: a.remove_matching.remote(text) for s, a in enumerate(self._actors)})
            return self
        ids = [str(i) for i in _id_list(documents_ids)]
        groups = self._route(ids)
        refs = {
            shard: self._actors[shard].remove.remote([ids[r] for r in rows]) for shard, rows in sorted(groups.items())
        }
        self._settle(refs)
        return self

    def update_documents(
        self,
        documents_ids: Union[Hashable, List[Hashable]],
        documents_embeddings: Any,
        metadata: Optional[List[Any]] = None,
        documents_texts: Optional[List[Optional[str]]] = None,
        documents_titles: Optional[List[Optional[str]]] = None,
    ) -> "ShardedIndex":
        """Replaces documents in place (those not in the index are added), as
        :meth:`latte.indexes.PLAID.update_documents`: fields left out keep their stored values."""
        return self._write(documents_ids, documents_embeddings, metadata, documents_texts, documents_titles, True)

    def _settle(self, refs: Dict[int, Any]) -> None:
        """Waits for writes to shards (never retried: a shard that died mid-write is named in the error) and
        records the new document counts in the manifest."""
        counts: Dict[int, int] = {}
        for shard, ref in refs.items():
            try:
                counts[shard] = int(ray.get(ref, timeout=self.timeout))
            except ray.exceptions.GetTimeoutError:
                raise ShardUnavailableError(self.names[shard], f"the write did not finish within {self.timeout} s") from None
            except ray.exceptions.RayActorError as err:
                raise ShardUnavailableError(
                    self.names[shard], f"its actor died during the write ({type(err).__name__}); check the shard"
                ) from err
        for shard, n in counts.items():
            self.manifest["shards"][shard]["documents"] = n
        _write_manifest(self.path, self.manifest)

    # -- inspection and lifetime --------------------------------------------------------------------------

    def shards(self) -> List[Dict[str, Any]]:
        """Per shard: ``name``, live ``documents``, the actor's ``pid``, ``node_id`` and ``started`` time."""
        self._check_open()
        answers: List[Dict[str, Any]] = self._gather(
            [a.info.remote() for a in self._actors], allow_partial=False, timeout=self.timeout
        )
        return answers

    def actor(self, shard: Union[int, str]) -> Any:
        """The Ray actor handle serving ``shard`` (an index or a name such as ``"shard-00001"``)."""
        i = self.names.index(shard) if isinstance(shard, str) else int(shard)
        return self._actors[i]

    def __len__(self) -> int:
        return sum(int(s["documents"]) for s in self.shards())

    def close(self) -> None:
        """Stops the shard actors (the index on disk stays)."""
        if not self._closed:
            for a in self._actors:
                ray.kill(a, no_restart=True)
            self._closed = True

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

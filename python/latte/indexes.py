"""PyLate's ``indexes`` module on latte's engine.

:class:`PLAID` is latte's on-disk PLAID index (k-means centroids, residual codes, inverted lists, an exact
final rerank from a half-precision copy); :class:`Exact` is an in-memory brute-force MaxSim index.
``WARP``, ``Voyager``, ``ScaNN`` and ``TachiomIndex`` accept PyLate's constructor arguments and run on
latte's PLAID engine: they are end-to-end indexes (calling one returns ranked ``{"id", "score"}`` lists).

Document ids may be any hashable value: they are stored as ``str(id)``; ids added through the same
Python object come back with their original type, ids read from an index reopened later come back as
``str``. The GIL is released while indexing and searching.

Documents, filters and hybrid search (:class:`PLAID` and the indexes built on it): ``add_documents`` takes
each document's text (``documents_texts``), title (``documents_titles``) and a JSON object of metadata
(``metadata``, a list of dicts as fast-plaid's and next-plaid's ``metadata=``), kept in the index's
document store (SQLite, ``documents.sqlite``). Calling the index takes ``filter=`` (a MongoDB-style JSON
filter as a dict or a JSON string: ``{"lang": "rust", "year": {"$gte": 2020}}``; operators ``$eq $ne $gt
$gte $lt $lte $in $nin $exists $and $or $not``, dotted keys for nested fields), ``queries_texts=`` for
hybrid search (BM25 over the stored text fused with MaxSim) or, without embeddings, BM25 alone, and
``return_documents=True`` to get each hit's stored ``title``, ``text`` and ``metadata``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Union

import numpy as np

from latte import _latte
from latte._arrays import matrices

__all__ = ["PLAID", "Exact", "WARP", "Voyager", "ScaNN", "TachiomIndex", "Codec", "train_codec"]

#: A PLAID index's trained centroids and residual codec (``latte._latte.Codec``): several indexes built with one
#: (``PLAID(codec=...)``, ``latte index --codec-from``) encode every token the same way. Picklable; also
#: ``Codec.from_index(path)``, ``Codec.load(path)`` / ``codec.save(path)``.
Codec = _latte.Codec

RerankResult = Dict[str, Any]


def _subset_lists(subset: Any, n_queries: int) -> Optional[List[List[str]]]:
    """PyLate's ``subset``: one id list for every query, or one list per query."""
    if subset is None:
        return None
    subset = list(subset)
    if subset and all(isinstance(s, (list, tuple, set, np.ndarray)) for s in subset):
        if len(subset) != n_queries:
            raise ValueError(
                f"subset: got {len(subset)} id lists for {n_queries} queries; give one list per query "
                "or a single list for all of them"
            )
        return [[str(i) for i in s] for s in subset]
    return [[str(i) for i in subset]]



def _json_default(value: Any) -> Any:
    """numpy scalars and arrays in metadata become their Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"a value of type {type(value).__name__} cannot be stored as JSON")


def _filter_json(filter: Any, check: bool = False) -> Optional[str]:
    """A filter (a dict, or its JSON text) as JSON text for the engine; ``None`` stays ``None``. With
    ``check``, the filter is also parsed now (the engine parses it anyway when it uses it)."""
    text = _filter_text(filter)
    if check and text is not None:
        _latte.check_filter(text)
    return text


def _filter_text(filter: Any) -> Optional[str]:
    if filter is None:
        return None
    if isinstance(filter, bytes):
        filter = filter.decode("utf-8")
    if isinstance(filter, str):
        return filter
    if not isinstance(filter, Mapping):
        raise ValueError(f"filter: expected a dict or a JSON string, got {type(filter).__name__}")
    try:
        return json.dumps(filter, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as err:
        raise ValueError(f"filter: cannot be written as JSON: {err}") from None


def _per_document(values: Any, what: str, ids: Sequence[str], single: type) -> Optional[List[Any]]:
    """``values`` as one entry per document (a lone ``single`` value counts for a single document)."""
    if values is None:
        return None
    if isinstance(values, single):
        values = [values]
    values = list(values)
    if len(values) != len(ids):
        raise ValueError(
            f"{what} has {len(values)} entries for {len(ids)} documents: give one per document (None for none)"
        )
    return values


def _document_fields(
    ids: Sequence[str], texts: Any, titles: Any, metadata: Any
) -> Dict[str, Optional[List[Optional[str]]]]:
    """The ``titles``, ``texts`` and ``metadata`` (JSON text) keywords of the engine's add/create."""
    out: Dict[str, Optional[List[Optional[str]]]] = {}
    for key, what, values in (("texts", "documents_texts", texts), ("titles", "documents_titles", titles)):
        values = _per_document(values, what, ids, str)
        if values is not None:
            for i, v in enumerate(values):
                if v is not None and not isinstance(v, str):
                    raise ValueError(
                        f"{what}[{i}] (document {ids[i]!r}): expected a str or None, got {type(v).__name__}"
                    )
        out[key] = values
    entries = _per_document(metadata, "metadata", ids, Mapping)
    if entries is not None:
        encoded: List[Optional[str]] = []
        for i, m in enumerate(entries):
            if m is None:
                encoded.append(None)
                continue
            if not isinstance(m, Mapping):
                raise ValueError(
                    f"metadata[{i}] (document {ids[i]!r}): expected a dict (a JSON object), got {type(m).__name__}"
                )
            try:
                encoded.append(json.dumps(dict(m), allow_nan=False, default=_json_default))
            except (TypeError, ValueError) as err:
                raise ValueError(f"metadata[{i}] (document {ids[i]!r}): cannot be stored as JSON: {err}") from None
        out["metadata"] = encoded
    else:
        out["metadata"] = None
    return out


def _stored(row: Any, original: Any) -> Optional[Dict[str, Any]]:
    """A stored document from the engine's ``(id, title, text, metadata JSON)`` row."""
    if row is None:
        return None
    _, title, text, meta = row
    return {
        "id": original,
        "title": title,
        "text": text,
        "metadata": None if meta is None else json.loads(meta),
    }


def _no_store(what: str) -> ValueError:
    return ValueError(
        f"{what}: Exact keeps no document store (text, metadata, filters and BM25 need one); "
        "use latte.indexes.PLAID"
    )


def _id_list(documents_ids: Union[Hashable, List[Hashable]]) -> List[Hashable]:
    """``documents_ids`` as a list: one id (a ``str``, ``bytes`` or other non-iterable) becomes a list of one."""
    if isinstance(documents_ids, (str, bytes)) or not hasattr(documents_ids, "__iter__"):
        return [documents_ids]
    return list(documents_ids)  # type: ignore[arg-type]

class PLAID:
    """PyLate's ``indexes.PLAID`` on latte's PLAID engine (an index folder at ``index_folder/index_name``).

    Keywords as PyLate 1.6. Mapped to latte: ``nbits`` (1, 2 or 4), ``kmeans_niters`` (Lloyd iterations),
    ``max_points_per_centroid`` (k-means sample cap per centroid), ``seed``, ``n_ivf_probe`` (inverted lists
    probed per query token) and ``n_full_scores`` (candidates kept after the first pass); when these two are
    left at PyLate's defaults (8 and 8192), latte's measured defaults for the requested ``k`` apply.
    Accepted without effect: ``use_fast``, ``n_samples_kmeans``, ``use_triton``, ``batch_size``,
    ``num_threads`` (latte uses all cores), ``show_progress``, ``device`` (CPU), ``low_memory`` and the
    Stanford backend's keywords. latte's extra keyword ``pool_factor`` pools document tokens at index time;
    ``codec`` (a :class:`Codec`, e.g. from :func:`train_codec` or ``Codec.from_index``) builds the index with
    those centroids and that residual codec instead of training them (its ``nbits`` replaces ``nbits``), so
    that indexes sharing it (the shards of one collection) encode every token the same way.

    Beyond PyLate: documents carry text and metadata (``add_documents(..., documents_texts=...,
    metadata=...)``), calls take ``filter=``, ``queries_texts=`` (hybrid or BM25 search) and
    ``return_documents=``, :meth:`get_documents` reads the stored documents and :meth:`remove_documents`
    deletes by ``filter=`` too (see the module's documentation).
    """

    def __init__(
        self,
        index_folder: str = "indexes",
        index_name: str = "colbert",
        override: bool = False,
        use_fast: bool = True,
        nbits: int = 4,
        kmeans_niters: int = 4,
        max_points_per_centroid: int = 256,
        n_samples_kmeans: Optional[int] = None,
        seed: int = 42,
        use_triton: Optional[bool] = None,
        n_ivf_probe: int = 8,
        n_full_scores: int = 8192,
        batch_size: int = 1 << 18,
        num_threads: Optional[int] = None,
        show_progress: bool = True,
        device: Optional[Union[str, List[str]]] = None,
        low_memory: bool = False,
        pool_factor: int = 1,
        codec: Optional[Codec] = None,
        **kwargs: Any,
    ) -> None:
        if codec is not None:
            if not isinstance(codec, Codec):
                raise ValueError(f"codec: expected a latte.indexes.Codec, got {type(codec).__name__}")
            nbits = codec.nbits
        if nbits not in (1, 2, 4):
            raise ValueError(f"nbits must be 1, 2 or 4, got {nbits}")
        self.index_folder = index_folder
        self.index_name = index_name
        self.index_path = os.path.join(index_folder, index_name)
        self.nbits = nbits
        self.kmeans_niters = kmeans_niters
        self.max_points_per_centroid = max_points_per_centroid
        self.seed = seed
        self.n_ivf_probe = n_ivf_probe
        self.n_full_scores = n_full_scores
        self.pool_factor = pool_factor
        self.codec = codec
        self._ids: Dict[str, Hashable] = {}
        self._searcher: Optional[Any] = None
        self._lock = threading.RLock()
        #: What the last :meth:`add_documents` did: ``{"added", "replaced", "created"}`` (``None`` before).
        self.last_add_report: Optional[Dict[str, Any]] = None
        #: What the last :meth:`remove_documents` did: ``{"deleted", "not_found"}`` (``None`` before).
        self.last_delete_report: Optional[Dict[str, Any]] = None
        if override and os.path.exists(self.index_path):
            shutil.rmtree(self.index_path)

    # -- helpers ------------------------------------------------------------------------------------------

    def _open(self) -> Any:
        with self._lock:
            if self._searcher is None:
                if not _latte.plaid_exists(self.index_path):
                    raise ValueError(
                        f"the index at {self.index_path} holds no documents: call add_documents first"
                    )
                self._searcher = _latte.Plaid(self.index_path)
            return self._searcher

    def _ids_in(self, documents_ids: Any) -> List[str]:
        documents_ids = _id_list(documents_ids)
        return [str(i) for i in documents_ids]

    def _original(self, id_: str) -> Hashable:
        return self._ids.get(id_, id_)

    # -- PyLate API ---------------------------------------------------------------------------------------

    @property
    def is_indexed(self) -> bool:
        """Whether the index folder holds an index."""
        return bool(_latte.plaid_exists(self.index_path))

    def add_documents(
        self,
        documents_ids: Union[Hashable, List[Hashable]],
        documents_embeddings: Any,
        batch_size: int = 2000,
        documents_texts: Optional[Sequence[Optional[str]]] = None,
        documents_titles: Optional[Sequence[Optional[str]]] = None,
        metadata: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
        **kwargs: Any,
    ) -> "PLAID":
        """Adds documents (ids and ``(tokens, dim)`` embeddings); the first call builds the index.

        ``documents_texts`` and ``documents_titles`` (one ``str`` or ``None`` per document) are stored and
        searched by BM25 (``queries_texts=`` when calling the index); ``metadata`` (one dict or ``None`` per
        document, JSON-serialisable: numpy scalars are converted) is what ``filter=`` matches. The names
        follow PyLate's ``documents_*`` keywords and fast-plaid's / next-plaid's ``metadata=``.

        Adding an id the index already holds replaces that document: its vectors, text and metadata
        together. The ids replaced are reported in :attr:`last_add_report` (``{"added", "replaced",
        "created"}``); the method returns the index itself, as PyLate's.
        """
        documents_ids = _id_list(documents_ids)
        originals = list(documents_ids)
        ids = [str(i) for i in originals]
        embs = matrices(documents_embeddings, "documents_embeddings")
        fields = _document_fields(ids, documents_texts, documents_titles, metadata)
        with self._lock:
            if _latte.plaid_exists(self.index_path):
                added, replaced = _latte.plaid_add(self.index_path, ids, embs, **fields)
                created = False
            else:
                added = _latte.plaid_create(
                    self.index_path,
                    ids,
                    embs,
                    nbits=self.nbits,
                    kmeans_niters=self.kmeans_niters,
                    kmeans_points_per_centroid=self.max_points_per_centroid,
                    seed=self.seed,
                    pool_factor=self.pool_factor,
                    codec=self.codec,
                    **fields,
                )
                replaced, created = [], True
            self._ids.update(zip(ids, originals))
            self._searcher = None
            self.last_add_report = {
                "added": added,
                "replaced": [self._original(i) for i in replaced],
                "created": created,
            }
        return self

    def remove_documents(
        self,
        documents_ids: Optional[Union[Hashable, List[Hashable]]] = None,
        filter: Optional[Union[Mapping[str, Any], str]] = None,
    ) -> "PLAID":
        """Removes documents by id (ids the index does not hold are ignored, as PyLate), or every document
        whose metadata matches ``filter`` (a dict or JSON string, as when searching): give one of the two.
        :attr:`last_delete_report` says what happened (``{"deleted", "not_found"}``)."""
        if (documents_ids is None) == (filter is None):
            raise ValueError("remove_documents: give exactly one of documents_ids and filter")
        with self._lock:
            if filter is not None:
                text = _filter_json(filter)
                if not _latte.plaid_exists(self.index_path):
                    self.last_delete_report = {"deleted": 0, "not_found": []}
                    return self
                deleted, _ = _latte.plaid_delete_matching(self.index_path, text)
                self._searcher = None
                self.last_delete_report = {"deleted": deleted, "not_found": []}
                return self
            ids = self._ids_in(documents_ids)
            if not _latte.plaid_exists(self.index_path):
                self.last_delete_report = {"deleted": 0, "not_found": [self._original(i) for i in ids]}
                return self
            searcher = self._open()
            unique = list(dict.fromkeys(ids))
            known = [i for i in unique if i in searcher]
            missing = [self._original(i) for i in unique if i not in searcher]
            if known:
                _latte.plaid_delete(self.index_path, known)
                for i in known:
                    self._ids.pop(i, None)
                self._searcher = None
            self.last_delete_report = {"deleted": len(known), "not_found": missing}
        return self

    def update_documents(
        self,
        documents_ids: Union[Hashable, List[Hashable]],
        documents_embeddings: Any,
        documents_texts: Optional[Sequence[Optional[str]]] = None,
        documents_titles: Optional[Sequence[Optional[str]]] = None,
        metadata: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
    ) -> "PLAID":
        """Replaces documents in place (those not in the index are added). A field left out
        (``documents_texts``, ``documents_titles``, ``metadata``) keeps each document's stored value; a
        field given replaces it (``None`` entries clear it)."""
        documents_ids = _id_list(documents_ids)
        ids = [str(i) for i in documents_ids]
        with self._lock:
            if self.is_indexed and None in (documents_texts, documents_titles, metadata):
                stored = self._open().get_documents(ids)
                old = [_stored(r, i) or {"title": None, "text": None, "metadata": None} for r, i in zip(stored, ids)]
                if documents_texts is None:
                    documents_texts = [d["text"] for d in old]
                if documents_titles is None:
                    documents_titles = [d["title"] for d in old]
                if metadata is None:
                    metadata = [d["metadata"] for d in old]
            self.add_documents(
                list(documents_ids),
                documents_embeddings,
                documents_texts=documents_texts,
                documents_titles=documents_titles,
                metadata=metadata,
            )
        return self

    def get_documents(self, documents_ids: Union[Hashable, List[Hashable]]) -> List[Optional[Dict[str, Any]]]:
        """The stored documents, in the order asked: per id a dict ``{"id", "title", "text", "metadata"}``
        (``None`` for a field not stored), or ``None`` for an id the index does not hold."""
        ids = self._ids_in(documents_ids)
        if not self.is_indexed:
            return [None for _ in ids]
        rows = self._open().get_documents(ids)
        return [_stored(r, self._original(i)) for r, i in zip(rows, ids)]

    def __len__(self) -> int:
        return len(self._open()) if self.is_indexed else 0

    def __call__(
        self,
        queries_embeddings: Any = None,
        k: int = 10,
        subset: Optional[Union[List[Hashable], List[List[Hashable]]]] = None,
        filter: Optional[Union[Mapping[str, Any], str]] = None,
        queries_texts: Optional[Union[str, Sequence[str]]] = None,
        fusion: Optional[str] = None,
        alpha: Optional[float] = None,
        rrf_k: Optional[float] = None,
        return_documents: bool = False,
    ) -> List[List[RerankResult]]:
        """Searches: per query, up to ``k`` ``{"id", "score"}`` dicts, best first.

        * ``subset`` restricts the results to those ids (one list for all queries, or one per query).
        * ``filter`` (a dict or JSON string, e.g. ``{"lang": "rust", "year": {"$gte": 2020}}``) keeps the
          documents whose metadata matches; the search scores them exactly when they are few and runs PLAID
          restricted to them otherwise, so recall holds at every selectivity.
        * ``queries_texts`` (one text per query) with ``queries_embeddings``: hybrid search, BM25 over the
          stored titles and texts fused with MaxSim, ``fusion="rrf"`` (reciprocal rank fusion, rank offset
          ``rrf_k`` = 60, the default) or ``fusion="linear"`` (``alpha`` × normalised MaxSim + (1 − ``alpha``)
          × normalised BM25, ``alpha`` = 0.5 by default); scores are then the fused ones. ``queries_texts``
          without ``queries_embeddings``: BM25 alone (scores are BM25's). Filters apply to both lists.
        * ``return_documents=True`` adds each hit's stored ``title``, ``text`` and ``metadata`` (``None``
          when not stored).
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        texts = None
        if queries_texts is not None:
            texts = [queries_texts] if isinstance(queries_texts, str) else [str(t) for t in queries_texts]
        filter_text = _filter_json(filter)
        if queries_embeddings is None:
            if texts is None:
                raise ValueError("give queries_embeddings, queries_texts (BM25 alone), or both (hybrid search)")
            if subset is not None:
                raise ValueError("subset cannot be combined with BM25 search; restrict the documents with filter")
            if fusion is not None or alpha is not None or rrf_k is not None:
                raise ValueError("fusion, alpha and rrf_k apply to hybrid search: give queries_embeddings too")
            hits = self._open().bm25(texts, k, filter_text)
        else:
            queries = matrices(queries_embeddings, "queries_embeddings")
            subsets = _subset_lists(subset, len(queries))
            searcher = self._open()
            probe = None if self.n_ivf_probe == 8 else self.n_ivf_probe
            full = None if self.n_full_scores == 8192 else self.n_full_scores
            if filter_text is None and texts is None and fusion is None and alpha is None and rrf_k is None:
                hits = searcher.search(queries, k, subsets, probe, full)
            else:
                hits = searcher.search_documents(
                    queries,
                    k,
                    filter=filter_text,
                    subset=subsets,
                    texts=texts,
                    fusion=fusion,
                    alpha=alpha,
                    rrf_k=rrf_k,
                    n_ivf_probe=probe,
                    n_full_scores=full,
                )
        results = [[{"id": self._original(i), "score": float(s)} for i, s in q] for q in hits]
        if return_documents:
            flat = [str(i) for q in hits for i, _ in q]
            rows = dict(zip(flat, self._open().get_documents(flat))) if flat else {}
            for q in results:
                for hit in q:
                    doc = _stored(rows.get(str(hit["id"])), hit["id"]) or {}
                    hit["title"] = doc.get("title")
                    hit["text"] = doc.get("text")
                    hit["metadata"] = doc.get("metadata")
        return results

    def get_documents_embeddings(self, documents_ids: Any) -> Any:
        """Not available (as in PyLate's PLAID)."""
        raise NotImplementedError("PLAID does not return stored document embeddings")


def train_codec(
    documents_embeddings: Any,
    nbits: int = 4,
    kmeans_niters: int = 4,
    max_points_per_centroid: int = 256,
    seed: int = 42,
    num_centroids: Optional[int] = None,
    pool_factor: int = 1,
) -> Codec:
    """Trains the centroids and residual codec :class:`PLAID` would train on these documents with these
    settings, without building an index; ``PLAID(codec=...)`` then builds indexes with it. Given a sample of
    a larger collection, pass ``num_centroids`` for the whole collection
    (``latte._latte.default_num_centroids(total_tokens)`` is the default a build would pick)."""
    embs = matrices(documents_embeddings, "documents_embeddings")
    return _latte.Codec.train(
        embs,
        nbits=nbits,
        kmeans_niters=kmeans_niters,
        kmeans_points_per_centroid=max_points_per_centroid,
        seed=seed,
        num_centroids=num_centroids,
        pool_factor=pool_factor,
    )


class Exact:
    """An in-memory exact index: brute-force MaxSim against every document (latte's ``ExactIndex``).

    Not a PyLate class: the ground truth to compare approximate indexes with. Same methods as :class:`PLAID`.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._index = _latte.Exact()
        self._order: List[str] = []
        self._ids: Dict[str, Hashable] = {}
        self._lock = threading.RLock()

    def add_documents(
        self,
        documents_ids: Union[Hashable, List[Hashable]],
        documents_embeddings: Any,
        batch_size: int = 2000,
        documents_texts: Any = None,
        documents_titles: Any = None,
        metadata: Any = None,
        **kwargs: Any,
    ) -> "Exact":
        """Adds documents (ids and ``(tokens, dim)`` embeddings). ``Exact`` keeps no document store:
        ``documents_texts``, ``documents_titles`` and ``metadata`` raise ``ValueError`` (use :class:`PLAID`)."""
        for what, value in (("documents_texts", documents_texts), ("documents_titles", documents_titles), ("metadata", metadata)):
            if value is not None:
                raise _no_store(what)
        documents_ids = _id_list(documents_ids)
        originals = list(documents_ids)
        ids = [str(i) for i in originals]
        embs = matrices(documents_embeddings, "documents_embeddings")
        with self._lock:
            self._index.add(ids, embs)
            self._order.extend(ids)
            self._ids.update(zip(ids, originals))
        return self

    def remove_documents(
        self, documents_ids: Optional[Union[Hashable, List[Hashable]]] = None, filter: Any = None
    ) -> "Exact":
        """Removes documents by id; unknown ids are ignored (``filter`` raises ``ValueError``: no store)."""
        if filter is not None:
            raise _no_store("filter")
        if documents_ids is None:
            raise ValueError("remove_documents: give documents_ids")
        documents_ids = _id_list(documents_ids)
        with self._lock:
            known = set(self._ids)
            drop = [i for i in dict.fromkeys(str(d) for d in documents_ids) if i in known]
            if drop:
                self._index.remove(drop)
                gone = set(drop)
                self._order = [i for i in self._order if i not in gone]
                for i in drop:
                    del self._ids[i]
        return self

    def update_documents(
        self, documents_ids: Union[Hashable, List[Hashable]], documents_embeddings: Any
    ) -> "Exact":
        """Replaces the embeddings of documents (those not in the index are added)."""
        documents_ids = _id_list(documents_ids)
        with self._lock:
            self.remove_documents(list(documents_ids))
            self.add_documents(list(documents_ids), documents_embeddings)
        return self

    def get_documents(self, documents_ids: Any) -> Any:
        """Not available: ``Exact`` keeps no document store (``ValueError``; use :class:`PLAID`)."""
        raise _no_store("get_documents")

    def __len__(self) -> int:
        return len(self._index)

    def __call__(
        self,
        queries_embeddings: Any,
        k: int = 10,
        subset: Optional[Union[List[Hashable], List[List[Hashable]]]] = None,
        filter: Any = None,
        queries_texts: Any = None,
        return_documents: bool = False,
        **kwargs: Any,
    ) -> List[List[RerankResult]]:
        """Exact top-``k`` per query as ``{"id", "score"}`` dicts, best first (``subset`` as PLAID's).
        ``filter``, ``queries_texts`` and ``return_documents`` raise ``ValueError``: ``Exact`` keeps no
        document store."""
        for what, value in (("filter", filter), ("queries_texts", queries_texts), ("return_documents", return_documents or None)):
            if value is not None:
                raise _no_store(what)
        if kwargs:
            raise TypeError(f"Exact.__call__ got unexpected keyword arguments {sorted(kwargs)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = matrices(queries_embeddings, "queries_embeddings")
        if len(self._index) == 0:
            raise ValueError("the index holds no documents: call add_documents first")
        subsets = _subset_lists(subset, len(queries))
        if subsets is None:
            hits = self._index.search(queries, k)
            return [[{"id": self._ids.get(i, i), "score": float(s)} for i, s in q] for q in hits]
        with self._lock:
            order = list(self._order)
            scores = self._index.scores(queries)
        out = []
        for qi in range(len(queries)):
            allowed = set(subsets[0] if len(subsets) == 1 else subsets[qi])
            cols = [j for j, i in enumerate(order) if i in allowed]
            row = scores[qi, cols]
            best = np.argsort(-row, kind="stable")[:k]
            out.append([{"id": self._ids[order[cols[b]]], "score": float(row[b])} for b in best])
        return out


_temporary: List[str] = []


@atexit.register
def _remove_temporary() -> None:
    for path in _temporary:
        shutil.rmtree(path, ignore_errors=True)


class WARP(PLAID):
    """PyLate's ``indexes.WARP`` arguments, run on latte's PLAID engine (not the WARP engine).

    ``nbits``, ``kmeans_niters``, ``max_points_per_centroid``, ``seed`` and ``n_ivf_probe`` map as in
    :class:`PLAID`; the WARP-specific tuning keywords are accepted without effect.
    """

    def __init__(
        self,
        index_folder: str = "indexes",
        index_name: str = "warp",
        override: bool = False,
        nbits: int = 4,
        kmeans_niters: int = 4,
        max_points_per_centroid: int = 256,
        n_samples_kmeans: Optional[int] = None,
        seed: int = 42,
        use_triton: Optional[bool] = None,
        min_outliers: int = 50,
        max_growth_rate: float = 0.1,
        n_ivf_probe: Optional[int] = 32,
        bound: Optional[int] = None,
        t_prime: Optional[int] = 100000,
        max_candidates: Optional[int] = None,
        centroid_score_threshold: Optional[float] = None,
        batch_size: int = 8192,
        num_threads: Optional[int] = 1,
        show_progress: bool = True,
        device: Optional[str] = None,
        dtype: Any = None,
        mmap: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            index_folder=index_folder,
            index_name=index_name,
            override=override,
            nbits=nbits,
            kmeans_niters=kmeans_niters,
            max_points_per_centroid=max_points_per_centroid,
            seed=seed,
            n_ivf_probe=8 if n_ivf_probe is None else n_ivf_probe,
        )


class Voyager(PLAID):
    """PyLate's ``indexes.Voyager`` arguments, run on latte's PLAID engine (not an HNSW index).

    Unlike PyLate's Voyager (token-level neighbours), calling it returns ranked ``{"id", "score"}`` lists
    directly; :class:`latte.retrieve.ColBERT` handles both. ``embedding_size``, ``M``, ``ef_construction``
    and ``ef_search`` are accepted without effect.
    """

    def __init__(
        self,
        index_folder: str = "indexes",
        index_name: str = "colbert",
        override: bool = False,
        embedding_size: int = 128,
        M: int = 64,
        ef_construction: int = 200,
        ef_search: int = 200,
        **kwargs: Any,
    ) -> None:
        super().__init__(index_folder=index_folder, index_name=index_name, override=override, nbits=4)


class ScaNN(PLAID):
    """PyLate's ``indexes.ScaNN`` arguments, run on latte's PLAID engine.

    Without ``index_folder`` the index lives in a temporary folder removed at exit (PyLate's ScaNN keeps it
    in memory). The ScaNN tuning keywords are accepted without effect.
    """

    def __init__(
        self,
        index_name: Optional[str] = "ScaNN_index",
        embedding_size: int = 128,
        num_neighbors: Optional[int] = 10,
        num_leaves: Optional[int] = None,
        num_leaves_to_search: Optional[int] = None,
        dimensions_per_block: Optional[int] = 2,
        anisotropic_quantization_threshold: Optional[float] = 0.2,
        training_sample_size: Optional[int] = None,
        verbose: Union[bool, str] = "none",
        use_autopilot: bool = False,
        store_embeddings: bool = True,
        index_folder: Optional[str] = None,
        override: bool = False,
        verbose_level: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if index_folder is None:
            index_folder = tempfile.mkdtemp(prefix="latte-scann-")
            _temporary.append(index_folder)
        super().__init__(
            index_folder=index_folder,
            index_name=index_name or "ScaNN_index",
            override=override,
            nbits=4,
        )


class TachiomIndex(PLAID):
    """PyLate's ``indexes.TachiomIndex`` arguments, run on latte's PLAID engine (not PQ + HNSW).

    ``pq_seed`` seeds latte's k-means; the other tuning keywords are accepted without effect.
    """

    def __init__(
        self,
        index_folder: str = "indexes",
        index_name: str = "tachiom",
        override: bool = False,
        center_dataset: bool = True,
        total_centroids: Optional[int] = None,
        tac_n_iter: int = 10,
        tac_micro_threshold: Optional[int] = None,
        tac_small_threshold: Optional[int] = None,
        pq_sample_size: int = 10000000,
        pq_n_iter: int = 10,
        normalize: bool = True,
        pq_seed: int = 42,
        hnsw_m: int = 32,
        ef_construction: int = 1500,
        k_centroids: int = 20,
        k_docs_to_score: int = 500,
        ef_search: Optional[int] = None,
        alpha: Optional[float] = 0.45,
        beta: Optional[int] = None,
        lambda_: Optional[float] = None,
        num_threads: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            index_folder=index_folder,
            index_name=index_name,
            override=override,
            nbits=4,
            seed=pq_seed,
        )

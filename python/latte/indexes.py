"""PyLate's ``indexes`` module on latte's engine.

:class:`PLAID` is latte's on-disk PLAID index (k-means centroids, residual codes, inverted lists, an exact
final rerank from a half-precision copy); :class:`Exact` is an in-memory brute-force MaxSim index.
``WARP``, ``Voyager``, ``ScaNN`` and ``TachiomIndex`` accept PyLate's constructor arguments and run on
latte's PLAID engine: they are end-to-end indexes (calling one returns ranked ``{"id", "score"}`` lists).

Document ids may be any hashable value: they are stored as ``str(id)``; ids added through the same
Python object come back with their original type, ids read from an index reopened later come back as
``str``. The GIL is released while indexing and searching.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from typing import Any, Dict, Hashable, List, Optional, Union

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
        **kwargs: Any,
    ) -> "PLAID":
        """Adds documents (ids and ``(tokens, dim)`` embeddings); the first call builds the index."""
        documents_ids = _id_list(documents_ids)
        originals = list(documents_ids)
        ids = [str(i) for i in originals]
        embs = matrices(documents_embeddings, "documents_embeddings")
        with self._lock:
            if _latte.plaid_exists(self.index_path):
                try:
                    _latte.plaid_add(self.index_path, ids, embs)
                except ValueError as err:
                    # latte keeps the ids of deleted documents until the index is compacted: when an id
                    # is only held by deleted documents, compact and add again (PyLate allows re-adding).
                    searcher = self._open()
                    if "duplicate document id" not in str(err) or any(i in searcher for i in ids):
                        raise
                    _latte.plaid_compact(self.index_path)
                    self._searcher = None
                    _latte.plaid_add(self.index_path, ids, embs)
            else:
                _latte.plaid_create(
                    self.index_path,
                    ids,
                    embs,
                    nbits=self.nbits,
                    kmeans_niters=self.kmeans_niters,
                    kmeans_points_per_centroid=self.max_points_per_centroid,
                    seed=self.seed,
                    pool_factor=self.pool_factor,
                    codec=self.codec,
                )
            self._ids.update(zip(ids, originals))
            self._searcher = None
        return self

    def remove_documents(self, documents_ids: Union[Hashable, List[Hashable]]) -> "PLAID":
        """Removes documents by id; ids the index does not hold are ignored (as PyLate)."""
        ids = self._ids_in(documents_ids)
        with self._lock:
            if not _latte.plaid_exists(self.index_path):
                return self
            searcher = self._open()
            known = [i for i in dict.fromkeys(ids) if i in searcher]
            if known:
                _latte.plaid_delete(self.index_path, known)
                for i in known:
                    self._ids.pop(i, None)
                self._searcher = None
        return self

    def update_documents(
        self, documents_ids: Union[Hashable, List[Hashable]], documents_embeddings: Any
    ) -> "PLAID":
        """Replaces the embeddings of documents (those not in the index are added)."""
        documents_ids = _id_list(documents_ids)
        with self._lock:
            self.remove_documents(list(documents_ids))
            self.add_documents(list(documents_ids), documents_embeddings)
        return self

    def __len__(self) -> int:
        return len(self._open()) if self.is_indexed else 0

    def __call__(
        self,
        queries_embeddings: Any,
        k: int = 10,
        subset: Optional[Union[List[Hashable], List[List[Hashable]]]] = None,
    ) -> List[List[RerankResult]]:
        """Searches: per query, up to ``k`` ``{"id", "score"}`` dicts, best first. ``subset`` restricts the
        results to those ids (one list for all queries, or one per query)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = matrices(queries_embeddings, "queries_embeddings")
        subsets = _subset_lists(subset, len(queries))
        searcher = self._open()
        probe = None if self.n_ivf_probe == 8 else self.n_ivf_probe
        full = None if self.n_full_scores == 8192 else self.n_full_scores
        hits = searcher.search(queries, k, subsets, probe, full)
        return [[{"id": self._original(i), "score": float(s)} for i, s in q] for q in hits]

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
        **kwargs: Any,
    ) -> "Exact":
        """Adds documents (ids and ``(tokens, dim)`` embeddings)."""
        documents_ids = _id_list(documents_ids)
        originals = list(documents_ids)
        ids = [str(i) for i in originals]
        embs = matrices(documents_embeddings, "documents_embeddings")
        with self._lock:
            self._index.add(ids, embs)
            self._order.extend(ids)
            self._ids.update(zip(ids, originals))
        return self

    def remove_documents(self, documents_ids: Union[Hashable, List[Hashable]]) -> "Exact":
        """Removes documents by id; unknown ids are ignored."""
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

    def __len__(self) -> int:
        return len(self._index)

    def __call__(
        self,
        queries_embeddings: Any,
        k: int = 10,
        subset: Optional[Union[List[Hashable], List[List[Hashable]]]] = None,
    ) -> List[List[RerankResult]]:
        """Exact top-``k`` per query as ``{"id", "score"}`` dicts, best first (``subset`` as PLAID's)."""
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

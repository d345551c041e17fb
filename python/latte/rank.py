"""PyLate's ``rank`` module on latte's engine: :func:`rerank` sorts candidates by exact MaxSim."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from latte import _latte
from latte._arrays import matrices

__all__ = ["rerank", "RerankResult"]

RerankResult = Dict[str, Any]


def rerank(
    documents_ids: List[List[Any]],
    queries_embeddings: Any,
    documents_embeddings: List[Any],
    device: Optional[str] = None,
) -> List[List[RerankResult]]:
    """Sorts each query's candidates by MaxSim, best first, as PyLate's ``rank.rerank``.

    ``documents_ids[i]`` and ``documents_embeddings[i]`` are query ``i``'s candidates. As in PyLate
    (candidates zero-padded to the longest one), a candidate's per-token maximum is at least 0 when it is
    shorter than the longest candidate. Returns per query a list of ``{"id", "score"}`` dicts; ids are
    returned as given. The GIL is released while scoring; ``device`` is ignored (CPU).
    """
    queries = matrices(queries_embeddings, "queries_embeddings")
    if len(documents_ids) != len(queries) or len(documents_embeddings) != len(queries):
        raise ValueError(
            f"{len(queries)} queries, {len(documents_ids)} id lists and {len(documents_embeddings)} "
            "embedding lists: they must match"
        )
    docs = [
        matrices(d, f"documents_embeddings[{i}]") if len(d) else []
        for i, d in enumerate(documents_embeddings)
    ]
    for i, (ids, d) in enumerate(zip(documents_ids, docs)):
        if len(ids) != len(d):
            raise ValueError(f"query {i}: {len(ids)} ids but {len(d)} documents")
    ranked = _latte.rerank(queries, docs)
    return [
        [{"id": ids[j], "score": float(s)} for j, s in r] for ids, r in zip(documents_ids, ranked)
    ]

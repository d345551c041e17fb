"""PyLate's ``scores`` module on latte's engine: late-interaction (MaxSim) scores."""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np

from latte import _latte
from latte._arrays import matrices

__all__ = ["colbert_scores", "colbert_scores_pairwise"]


def _is_torch(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "cpu")


def _batch(x: Any, what: str) -> np.ndarray:
    """A ``[n, tokens, dim]`` float32 array; a list of ``(tokens, dim)`` arrays is zero-padded."""
    if _is_torch(x):
        x = x.detach().cpu().float().numpy()
    if isinstance(x, np.ndarray) and x.ndim == 3:
        return np.ascontiguousarray(x, dtype=np.float32)
    mats = matrices(x, what)
    if not mats:
        raise ValueError(f"{what}: no embeddings")
    longest = max(m.shape[0] for m in mats)
    dim = mats[0].shape[1]
    out = np.zeros((len(mats), longest, dim), dtype=np.float32)
    for i, m in enumerate(mats):
        if m.shape[1] != dim:
            raise ValueError(f"{what}[{i}]: expected dimension {dim}, got {m.shape[1]}")
        out[i, : m.shape[0]] = m
    return out


def _mask(m: Any, what: str) -> Optional[np.ndarray]:
    if m is None:
        return None
    if _is_torch(m):
        m = m.detach().cpu().float().numpy()
    a = np.ascontiguousarray(m, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D mask, got shape {a.shape}")
    return a


def colbert_scores(
    queries_embeddings: Any,
    documents_embeddings: Any,
    queries_mask: Any = None,
    documents_mask: Any = None,
) -> Any:
    """PyLate's ``colbert_scores``: ``(n_queries, n_documents)`` MaxSim scores.

    Inputs are ``[n, tokens, dim]`` arrays (or lists of ``(tokens, dim)`` arrays, zero-padded). Masks
    multiply the similarities (a masked token contributes 0), as PyLate's. Returns a float32 numpy array,
    or a torch tensor when the queries are one. The GIL is released while scoring.
    """
    torch_in = _is_torch(queries_embeddings)
    q = _batch(queries_embeddings, "queries_embeddings")
    d = _batch(documents_embeddings, "documents_embeddings")
    if q.shape[2] != d.shape[2]:
        raise ValueError(
            f"documents_embeddings: expected dimension {q.shape[2]} (that of the queries), got {d.shape[2]}"
        )
    out = _latte.colbert_scores(
        q, d, _mask(queries_mask, "queries_mask"), _mask(documents_mask, "documents_mask")
    )
    if torch_in:
        import torch  # type: ignore[import-not-found, unused-ignore]

        return torch.from_numpy(out)
    return out


def colbert_scores_pairwise(queries_embeddings: Any, documents_embeddings: Any) -> Any:
    """PyLate's ``colbert_scores_pairwise``: MaxSim of ``queries[i]`` against ``documents[i]``, shape ``(n,)``."""
    q = matrices(queries_embeddings, "queries_embeddings")
    d = matrices(documents_embeddings, "documents_embeddings")
    if len(q) != len(d):
        raise ValueError(f"{len(q)} queries but {len(d)} documents: they must match")
    ranked: List[List[Any]] = _latte.rerank(q, [[x] for x in d])
    return np.array([r[0][1] for r in ranked], dtype=np.float32)

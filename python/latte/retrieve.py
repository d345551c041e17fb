"""PyLate's ``retrieve`` module on latte's engine: :class:`ColBERT` retrieves with an index."""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Mapping, Optional, Union

__all__ = ["ColBERT"]


class ColBERT:
    """PyLate's ``retrieve.ColBERT``: ranked results from an index.

    Every latte index is end-to-end (it returns final MaxSim-ranked results), so ``retrieve`` calls the
    index directly; ``k_token``, ``device`` and ``batch_size`` are accepted for PyLate compatibility and
    have no effect.
    """

    def __init__(self, index: Any) -> None:
        self.index = index

    def retrieve(
        self,
        queries_embeddings: Any,
        k: int = 10,
        k_token: Optional[int] = None,
        device: Optional[str] = None,
        batch_size: Optional[int] = None,
        subset: Optional[Union[List[Hashable], List[List[Hashable]]]] = None,
        filter: Optional[Union[Mapping[str, Any], str]] = None,
        **kwargs: Any,
    ) -> List[List[Dict[str, Any]]]:
        """Per query, up to ``k`` ``{"id", "score"}`` dicts, best first (``subset`` restricts the ids).

        ``filter`` (a metadata filter, as :class:`latte.indexes.PLAID` takes it) and any further keyword
        (``queries_texts``, ``fusion``, ``alpha``, ``return_documents``) are passed to the index; left out,
        the index is called exactly as PyLate calls it."""
        if filter is not None:
            kwargs["filter"] = filter
        results: List[List[Dict[str, Any]]] = self.index(queries_embeddings, k=k, subset=subset, **kwargs)
        return results

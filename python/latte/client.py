"""A client for ``latte serve`` (the HTTP API of latte) using only the standard library for HTTP.

:class:`Client` wraps every route of the server: indexes (list, create, describe, delete), documents (add
as texts the server encodes or as embeddings, with titles and metadata; delete by ids or filter; read),
search (texts or embeddings, ``k``, metadata filters, hybrid BM25 + MaxSim), encode and rerank, health.

Results have the shapes of the in-process API: search returns, per query, ``{"id", "score"}`` dicts best
first (with ``title``, ``text`` and ``metadata`` when ``return_documents=True``), as
:class:`latte.indexes.PLAID` does; ``encode`` returns float32 ``(tokens, dim)`` numpy arrays, as
:meth:`latte.models.ColBERT.encode`.

Errors: the server answers ``{"error": {"code", "message"}}``; each becomes an :class:`HTTPError` (a
:class:`latte.LatteError`) carrying ``status``, ``code`` and the server's ``message``: 400 (and other
invalid requests) is also a ``ValueError`` (:class:`InvalidRequestError`), 404 also a ``LookupError``
(:class:`NotFoundError`), 401 and 403 :class:`AuthenticationError`, 409 :class:`ConflictError`, 503
:class:`UnavailableError` (with ``retry_after``). A server that cannot be reached raises
:class:`UnreachableError` (also a ``ConnectionError``). The API key travels in the ``Authorization: Bearer``
header; it never appears in ``repr(client)`` or in an error.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from latte._latte import LatteError
from latte.indexes import _json_default

__all__ = [
    "Client",
    "HTTPError",
    "InvalidRequestError",
    "AuthenticationError",
    "NotFoundError",
    "ConflictError",
    "UnavailableError",
    "UnreachableError",
]


class HTTPError(LatteError):
    """An error answered by the server: ``status`` (HTTP), ``code`` (stable, e.g. ``invalid_request``) and
    ``message`` (the server's, saying what was expected and what was got)."""

    def __init__(self, status: int, code: str, message: str, method: str = "", path: str = "") -> None:
        self.status = status
        self.code = code
        self.message = message
        self.method = method
        self.path = path
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}{status} {code}: {message}")


class InvalidRequestError(HTTPError, ValueError):
    """400 (and 413, 415, 422): the request has a value the server cannot use."""


class AuthenticationError(HTTPError):
    """401 (no key, or a key the server does not know) or 403 (the key's scope is too small)."""


class NotFoundError(HTTPError, LookupError):
    """404: no such index, document, model or route."""


class ConflictError(HTTPError):
    """409: the name is taken, the index has no documents yet, or another process holds its lock."""


class UnavailableError(HTTPError):
    """503: the server is overloaded or the request timed out; ``retry_after`` seconds (or ``None``)."""

    retry_after: Optional[float] = None


class UnreachableError(LatteError, ConnectionError):
    """The server could not be reached (refused, reset, timed out) or did not answer JSON."""


_BY_STATUS = {401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError, 409: ConflictError, 503: UnavailableError}


def _rows(matrix: Any, what: str) -> List[List[float]]:
    """A ``(tokens, dim)`` matrix as JSON rows (float32 values written exactly)."""
    a = np.asarray(matrix, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a (tokens, dim) matrix, got an array of shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: holds a value that is not a finite number")
    rows: List[List[float]] = a.tolist()
    return rows


def _matrices(values: Any, what: str) -> List[List[List[float]]]:
    if isinstance(values, np.ndarray) and values.ndim == 2:
        values = [values]
    return [_rows(m, f"{what}[{i}]") for i, m in enumerate(values)]


def _hit(h: Mapping[str, Any], documents: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {"id": h["id"], "score": float(h["score"])}
    if documents:
        for key in ("title", "text", "metadata"):
            out[key] = h.get(key)
    return out


class Client:
    """A client of one ``latte serve`` at ``url`` (e.g. ``http://127.0.0.1:8080``).

    ``api_key``: sent as ``Authorization: Bearer KEY`` when the server has ``--api-keys`` (never shown by
    ``repr`` or errors). ``timeout``: seconds to wait for each answer. Safe to share between threads (each
    call is one independent request).
    """

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"url: expected http://HOST:PORT or https://HOST:PORT, got {url!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.__key = api_key

    def __repr__(self) -> str:
        key = "<hidden>" if self.__key else None
        return f"Client(url={self.url!r}, api_key={key}, timeout={self.timeout!r})"

    # -- transport ----------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            try:
                data = json.dumps(body, allow_nan=False, default=_json_default).encode("utf-8")
            except (TypeError, ValueError) as err:
                raise ValueError(f"{method} {path}: the request cannot be written as JSON: {err}") from None
            headers["Content-Type"] = "application/json"
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as res:
                raw = res.read()
        except urllib.error.HTTPError as err:
            raise self._error(err, method, path) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UnreachableError(f"{method} {self.url}{path}: cannot reach the server: {reason}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise UnreachableError(f"{method} {self.url}{path}: the answer is not JSON") from None

    @staticmethod
    def _error(err: urllib.error.HTTPError, method: str, path: str) -> HTTPError:
        status = err.code
        code, message = "http_error", err.reason or f"HTTP {status}"
        try:
            detail = json.loads(err.read())["error"]
            code, message = str(detail["code"]), str(detail["message"])
        except (ValueError, KeyError, TypeError, OSError):
            pass
        if status in _BY_STATUS:
            cls = _BY_STATUS[status]
        elif 400 <= status < 500:
            cls = InvalidRequestError
        else:
            cls = HTTPError
        out = cls(status, code, message, method, path)
        if isinstance(out, UnavailableError):
            retry = err.headers.get("Retry-After") if err.headers else None
            try:
                out.retry_after = float(retry) if retry is not None else None
            except ValueError:
                out.retry_after = None
        return out

    @staticmethod
    def _name(name: str) -> str:
        return urllib.parse.quote(str(name), safe="")

    # -- operations ---------------------------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """``GET /health``: ``{"status": "ok", "version", "indexes", "models", "dtypes"}`` (needs no key)."""
        out: Dict[str, Any] = self._request("GET", "/health")
        return out

    # -- indexes ------------------------------------------------------------------------------------------

    def list_indexes(self) -> List[Dict[str, Any]]:
        """``GET /indexes``: every index as :meth:`index_info` describes it."""
        out: List[Dict[str, Any]] = self._request("GET", "/indexes")["indexes"]
        return out

    def create_index(
        self,
        name: str,
        model: Optional[str] = None,
        nbits: Optional[int] = None,
        model_options: Optional[Mapping[str, Any]] = None,
    ) -> Dict[str, Any]:
        """``POST /indexes``: a new, pending index (built by its first documents). ``model`` (a folder or Hub
        id the server loads) encodes its texts; leave it out for an index fed embeddings only. ``nbits``: 1,
        2 or 4 (server default 2). Returns its summary."""
        body: Dict[str, Any] = {"name": name}
        if model is not None:
            body["model"] = model
        if nbits is not None:
            body["nbits"] = nbits
        if model_options is not None:
            body["model_options"] = dict(model_options)
        out: Dict[str, Any] = self._request("POST", "/indexes", body)
        return out

    def index_info(self, name: str) -> Dict[str, Any]:
        """``GET /indexes/{name}``: status (``ready`` or ``pending``), model, document and token counts,
        dimension, nbits, centroids, sizes and build configuration."""
        out: Dict[str, Any] = self._request("GET", f"/indexes/{self._name(name)}")
        return out

    def delete_index(self, name: str) -> None:
        """``DELETE /indexes/{name}``: removes the index and its files."""
        self._request("DELETE", f"/indexes/{self._name(name)}")

    # -- documents ----------------------------------------------------------------------------------------

    def add_documents(
        self,
        index: str,
        documents_ids: Sequence[Any],
        documents_embeddings: Optional[Any] = None,
        documents_texts: Optional[Sequence[Optional[str]]] = None,
        documents_titles: Optional[Sequence[Optional[str]]] = None,
        metadata: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
    ) -> Dict[str, Any]:
        """``POST /indexes/{name}/documents``: adds documents, as texts the server encodes with the index's
        model (``documents_texts`` without ``documents_embeddings``) or as ``(tokens, dim)`` embeddings
        (any texts are then only stored). ``metadata``: one dict (or ``None``) per document. An id the index
        holds is replaced. Returns ``{"added", "replaced", "created", "documents"}``."""
        ids = [str(i) for i in documents_ids]
        n = len(ids)
        columns: Dict[str, Optional[List[Any]]] = {}
        for key, what, values in (
            ("text", "documents_texts", documents_texts),
            ("title", "documents_titles", documents_titles),
            ("metadata", "metadata", metadata),
        ):
            if values is not None:
                values = list(values)
                if len(values) != n:
                    raise ValueError(f"{what} has {len(values)} entries for {n} documents: give one per document")
            columns[key] = values
        embeddings = None
        if documents_embeddings is not None:
            embeddings = _matrices(documents_embeddings, "documents_embeddings")
            if len(embeddings) != n:
                raise ValueError(f"documents_embeddings has {len(embeddings)} documents for {n} ids: they must match")
        elif documents_texts is None:
            raise ValueError("add_documents: give documents_embeddings or documents_texts (encoded by the server)")
        docs = []
        for i, doc_id in enumerate(ids):
            doc: Dict[str, Any] = {"id": doc_id}
            for key, values in columns.items():
                if values is not None and values[i] is not None:
                    if key == "metadata" and not isinstance(values[i], Mapping):
                        raise ValueError(
                            f"metadata[{i}] (document {doc_id!r}): expected a dict, got {type(values[i]).__name__}"
                        )
                    doc[key] = dict(values[i]) if key == "metadata" else values[i]
            if embeddings is not None:
                doc["embeddings"] = embeddings[i]
            docs.append(doc)
        out: Dict[str, Any] = self._request("POST", f"/indexes/{self._name(index)}/documents", {"documents": docs})
        return out

    def remove_documents(
        self,
        index: str,
        documents_ids: Optional[Sequence[Any]] = None,
        filter: Optional[Union[Mapping[str, Any], str]] = None,
    ) -> Dict[str, Any]:
        """``DELETE /indexes/{name}/documents``: by ids or by a metadata ``filter`` (a dict or JSON text),
        one of the two. Returns ``{"deleted", "remaining", "compacted", "not_found"}``."""
        if (documents_ids is None) == (filter is None):
            raise ValueError("remove_documents: give exactly one of documents_ids and filter")
        body: Dict[str, Any] = {}
        if documents_ids is not None:
            body["ids"] = [str(i) for i in documents_ids]
        else:
            body["filter"] = json.loads(filter) if isinstance(filter, str) else dict(filter)  # type: ignore[arg-type]
        out: Dict[str, Any] = self._request("DELETE", f"/indexes/{self._name(index)}/documents", body)
        return out

    def get_documents(self, index: str, documents_ids: Sequence[Any]) -> List[Optional[Dict[str, Any]]]:
        """``GET /indexes/{name}/documents/{id}`` for each id: ``{"id", "title", "text", "metadata"}``
        (``None`` for a field not stored), or ``None`` for an id the index does not hold."""
        out: List[Optional[Dict[str, Any]]] = []
        for doc_id in documents_ids:
            path = f"/indexes/{self._name(index)}/documents/{self._name(str(doc_id))}"
            try:
                doc = self._request("GET", path)
            except NotFoundError as err:
                if err.code == "not_found" and "no document" in err.message:
                    out.append(None)
                    continue
                raise
            out.append({"id": doc["id"], "title": doc.get("title"), "text": doc.get("text"), "metadata": doc.get("metadata")})
        return out

    # -- search -------------------------------------------------------------------------------------------

    def search(
        self,
        index: str,
        queries: Optional[Union[str, Sequence[str]]] = None,
        queries_embeddings: Optional[Any] = None,
        k: int = 10,
        filter: Optional[Union[Mapping[str, Any], str]] = None,
        hybrid: bool = False,
        fusion: Optional[str] = None,
        alpha: Optional[float] = None,
        rrf_k: Optional[float] = None,
        return_documents: bool = False,
    ) -> List[List[Dict[str, Any]]]:
        """``POST /indexes/{name}/search``: per query, up to ``k`` ``{"id", "score"}`` dicts, best first.

        ``queries``: texts (encoded by the index's model); or ``queries_embeddings``: one ``(tokens, dim)``
        matrix per query. ``filter``: a metadata filter (dict or JSON text). ``hybrid=True`` fuses MaxSim
        with BM25 over the stored text (needs ``queries``; with ``queries_embeddings`` too, those are used
        for MaxSim): ``fusion`` ``"rrf"`` (default, rank offset ``rrf_k``) or ``"linear"`` (MaxSim weight
        ``alpha``); giving ``fusion``, ``alpha`` or ``rrf_k`` implies ``hybrid``. ``return_documents=True``
        adds each hit's ``title``, ``text`` and ``metadata`` (``None`` when not stored).
        """
        body: Dict[str, Any] = {"k": k}
        if queries is not None:
            body["queries"] = [queries] if isinstance(queries, str) else [str(q) for q in queries]
        if queries_embeddings is not None:
            body["query_embeddings"] = _matrices(queries_embeddings, "queries_embeddings")
        if filter is not None:
            body["filter"] = json.loads(filter) if isinstance(filter, str) else dict(filter)
        settings = {key: v for key, v in (("fusion", fusion), ("alpha", alpha), ("rrf_k", rrf_k)) if v is not None}
        if settings:
            body["hybrid"] = settings
        elif hybrid:
            body["hybrid"] = True
        if return_documents:
            body["return"] = ["title", "text", "metadata"]
        res = self._request("POST", f"/indexes/{self._name(index)}/search", body)
        return [[_hit(h, return_documents) for h in q] for q in res["results"]]

    # -- models -------------------------------------------------------------------------------------------

    def encode(
        self, texts: Union[str, Sequence[str]], is_query: bool = True, model: Optional[str] = None
    ) -> List[np.ndarray]:
        """``POST /encode``: per text a float32 ``(tokens, dim)`` array, as
        :meth:`latte.models.ColBERT.encode`. ``model``: a loaded model (default: the server's first)."""
        body: Dict[str, Any] = {"texts": [texts] if isinstance(texts, str) else list(texts), "is_query": bool(is_query)}
        if model is not None:
            body["model"] = model
        res = self._request("POST", "/encode", body)
        return [np.asarray(e, dtype=np.float32).reshape(len(e), -1) for e in res["embeddings"]]

    def rerank(self, query: str, documents: Sequence[str], model: Optional[str] = None) -> List[Dict[str, Any]]:
        """``POST /rerank``: the documents sorted by MaxSim against the query, best first, as
        ``{"index", "score"}`` dicts (``index``: the position in ``documents``)."""
        body: Dict[str, Any] = {"query": query, "documents": list(documents)}
        if model is not None:
            body["model"] = model
        res = self._request("POST", "/rerank", body)
        return [{"index": int(r["index"]), "score": float(r["score"])} for r in res["results"]]

"""Type stubs of the native module ``latte._latte`` (see crates/latte-py/src/lib.rs)."""

from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

_F32 = npt.NDArray[np.float32]

class LatteError(Exception):
    """Base class of the errors latte raises that are neither FileNotFoundError nor ValueError."""

class DenseModule:
    """A Dense module (latte_models::Dense), initialised as ``torch.nn.Linear`` from ``seed``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation_function: str = "torch.nn.modules.linear.Identity",
        use_residual: bool = False,
        seed: int = 42,
    ) -> None: ...
    def config(self) -> Dict[str, Any]:
        """``in_features``, ``out_features``, ``bias``, ``activation_function``, ``use_residual``."""

def train(
    model: Model,
    train: str,
    config: str,
    queries: Optional[str] = None,
    documents: Optional[str] = None,
    eval_triplets: Optional[str] = None,
    eval_distillation: Optional[str] = None,
    eval_beir: Optional[str] = None,
    eval_split: str = "dev",
    resume: Optional[str] = None,
) -> str:
    """Runs ``latte train``'s trainer (``config``: JSON of TrainConfig keys); returns the output folder."""

class Model:
    """A loaded ColBERT model (latte_models::ColBERT)."""

    @staticmethod
    def load(
        model: str,
        query_prefix: Optional[str] = None,
        document_prefix: Optional[str] = None,
        query_length: Optional[int] = None,
        document_length: Optional[int] = None,
        attend_to_expansion_tokens: Optional[bool] = None,
        do_query_expansion: Optional[bool] = None,
        skiplist_words: Optional[List[str]] = None,
        truncate_dim: Optional[int] = None,
        embedding_size: Optional[int] = None,
        bias: bool = False,
        local_files_only: bool = False,
        cache_folder: Optional[str] = None,
        revision: Optional[str] = None,
        token: Optional[str] = None,
    ) -> "Model":
        """Loads a model from a folder or a Hugging Face Hub id."""
    def encode(
        self,
        texts: List[str],
        is_query: bool,
        batch_size: int = 32,
        show_progress: Optional[bool] = None,
        prompt_name: Optional[str] = None,
        prompt: Optional[str] = None,
        normalize: bool = True,
        pool_factor: int = 1,
        protected_tokens: int = 1,
    ) -> List[_F32]:
        """One float32 ``tokens × dim`` array per text, in input order (GIL released)."""
    @staticmethod
    def from_modules(
        transformer: str,
        denses: List["DenseModule"],
        query_prefix: Optional[str] = None,
        document_prefix: Optional[str] = None,
        query_length: Optional[int] = None,
        document_length: Optional[int] = None,
        attend_to_expansion_tokens: Optional[bool] = None,
        do_query_expansion: Optional[bool] = None,
        skiplist_words: Optional[List[str]] = None,
    ) -> "Model":
        """Builds a model from a local Transformer folder (see ``resolve_model``) and Dense modules."""
    def push_dense(self, dense: "DenseModule") -> None:
        """Appends a Dense module (its input must match the current output dimension)."""
    def save(self, path: str) -> None:
        """Saves the model as a PyLate folder."""
    def __len__(self) -> int: ...
    def remove_module(self, index: int) -> None:
        """Removes module ``index`` (1 is the first Dense)."""
    def set_dtype(self, dtype: str) -> None:
        """Precision of the encoder's linear layers in inference: ``f32``, ``bf16`` or ``int8``."""
    def dtype(self) -> str:
        """``f32``, ``bf16`` or ``int8``."""
    def output_dim(self) -> int:
        """Output dimension of the token embeddings."""
    def settings(self) -> Dict[str, Any]:
        """The resolved ColBERT settings."""

def resolve_model(
    model: str,
    local_files_only: bool = False,
    cache_folder: Optional[str] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
) -> str:
    """The local folder of ``model``: a folder as it is, or a Hub id fetched into (or read from) the cache."""

class Plaid:
    """A PLAID index opened for search (a snapshot: reopen after writes)."""

    def __init__(self, path: str) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, id: str) -> bool: ...
    def dim(self) -> int:
        """Embedding dimension."""
    def search(
        self,
        queries: List[_F32],
        k: int = 10,
        subset: Optional[List[List[str]]] = None,
        n_ivf_probe: Optional[int] = None,
        n_full_scores: Optional[int] = None,
        exact: bool = False,
    ) -> List[List[Tuple[str, float]]]:
        """Per query, ``(id, score)`` pairs best first (GIL released)."""
    def has_store(self) -> bool:
        """Whether the index has a document store (text, metadata, filters, BM25)."""
    def ids_matching(self, filter: str) -> List[str]:
        """Ids of the live documents whose metadata matches ``filter`` (JSON text)."""
    def get_documents(self, ids: List[str]) -> List[Optional[Tuple[str, Optional[str], Optional[str], Optional[str]]]]:
        """Per id ``(id, title, text, metadata as JSON text)``, or ``None`` for an id not held."""
    def search_documents(
        self,
        queries: List[_F32],
        k: int = 10,
        filter: Optional[str] = None,
        subset: Optional[List[List[str]]] = None,
        texts: Optional[List[str]] = None,
        fusion: Optional[str] = None,
        alpha: Optional[float] = None,
        rrf_k: Optional[float] = None,
        n_ivf_probe: Optional[int] = None,
        n_full_scores: Optional[int] = None,
    ) -> List[List[Tuple[str, float]]]:
        """Filtered (``filter``: JSON text) and hybrid (``texts``: BM25 beside MaxSim, fused by ``fusion``
        ``rrf`` or ``linear``) search; per query ``(id, score)`` pairs best first (GIL released)."""
    def bm25(self, texts: List[str], k: int = 10, filter: Optional[str] = None) -> List[List[Tuple[str, float]]]:
        """BM25 alone over the stored titles and texts; per query ``(id, score)`` pairs best first."""

class Exact:
    """An in-memory exact (brute-force MaxSim) index."""

    def __init__(self) -> None: ...
    def add(self, ids: List[str], embeddings: List[_F32]) -> None:
        """Adds documents (all or none)."""
    def remove(self, ids: List[str]) -> None:
        """Removes documents (fails on an unknown id)."""
    def __len__(self) -> int: ...
    def scores(self, queries: List[_F32]) -> _F32:
        """``[n_queries, n_documents]`` MaxSim scores, documents in insertion order."""
    def search(self, queries: List[_F32], k: int) -> List[List[Tuple[str, float]]]:
        """Per query, ``(id, score)`` pairs best first."""

def colbert_scores(
    queries: _F32,
    documents: _F32,
    queries_mask: Optional[_F32] = None,
    documents_mask: Optional[_F32] = None,
) -> _F32:
    """PyLate ``colbert_scores`` on ``[n, tokens, dim]`` arrays."""

def rerank(queries: List[_F32], documents: List[List[_F32]]) -> List[List[Tuple[int, float]]]:
    """Per query, ``(candidate position, score)`` best first."""

def plaid_create(
    path: str,
    ids: List[str],
    embeddings: List[_F32],
    nbits: int = 2,
    kmeans_niters: int = 4,
    kmeans_points_per_centroid: int = 32,
    seed: int = 42,
    num_centroids: Optional[int] = None,
    pool_factor: int = 1,
    titles: Optional[List[Optional[str]]] = None,
    texts: Optional[List[Optional[str]]] = None,
    metadata: Optional[List[Optional[str]]] = None,
    codec: Optional["Codec"] = None,
) -> int:
    """Creates a PLAID index (with the documents' titles, texts and metadata as JSON text, one entry per
    id; with ``codec``'s centroids and residual codec when given, instead of training them); returns the
    number of documents indexed."""

class Codec:
    """A PLAID index's trained centroids and residual codec, shared by indexes built with it (picklable)."""

    def __init__(
        self, centroids: _F32, cutoffs: List[float], weights: List[float], cluster_threshold: float, nbits: int
    ) -> None: ...
    @staticmethod
    def train(
        embeddings: List[_F32],
        nbits: int = 2,
        kmeans_niters: int = 4,
        kmeans_points_per_centroid: int = 32,
        seed: int = 42,
        num_centroids: Optional[int] = None,
        pool_factor: int = 1,
    ) -> "Codec":
        """Trains a codec on documents or a sample of them (then give ``num_centroids`` for the collection)."""
    @staticmethod
    def from_index(path: str) -> "Codec":
        """The codec of the PLAID index in ``path``."""
    @staticmethod
    def load(path: str) -> "Codec":
        """Reads a codec file written by :meth:`save`."""
    def save(self, path: str) -> None:
        """Writes the codec to a file."""
    @property
    def dim(self) -> int: ...
    @property
    def nbits(self) -> int: ...
    @property
    def num_centroids(self) -> int: ...
    @property
    def centroids(self) -> _F32:
        """``num_centroids × dim`` float32 (the half-precision values an index stores)."""
    @property
    def cutoffs(self) -> List[float]: ...
    @property
    def weights(self) -> List[float]: ...
    @property
    def cluster_threshold(self) -> float: ...

def default_num_centroids(tokens: int) -> int:
    """The default number of centroids of an index of ``tokens`` token vectors."""

def plaid_add(
    path: str,
    ids: List[str],
    embeddings: List[_F32],
    titles: Optional[List[Optional[str]]] = None,
    texts: Optional[List[Optional[str]]] = None,
    metadata: Optional[List[Optional[str]]] = None,
) -> Tuple[int, List[str]]:
    """Adds documents (an id the index holds is replaced); returns how many and the replaced ids."""

def plaid_delete(path: str, ids: List[str]) -> int:
    """Deletes documents; returns how many."""

def check_filter(filter: str) -> None:
    """Checks a metadata filter (JSON text); ``ValueError`` naming the position of what is wrong."""

def plaid_delete_matching(path: str, filter: str) -> Tuple[int, int]:
    """Deletes the documents whose metadata matches ``filter`` (JSON text); returns (deleted, remaining)."""

def plaid_compact(path: str) -> None:
    """Rewrites the index without its deleted documents."""

def plaid_exists(path: str) -> bool:
    """Whether ``path`` holds a latte index."""

def evaluate(
    run: List[Tuple[str, List[Tuple[str, float]]]],
    qrels: List[Tuple[str, List[Tuple[str, int]]]],
    metrics: List[str],
) -> List[Tuple[str, float]]:
    """Metric means (ranx definitions)."""

def load_beir(
    path: str, split: str = "test"
) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]], List[Tuple[str, List[Tuple[str, int]]]]]:
    """One split of a BEIR folder: documents, judged queries and judgments."""

def stack(arrays: List[_F32]) -> _F32:
    """Stacks equally shaped matrices into ``[n, rows, dim]``."""

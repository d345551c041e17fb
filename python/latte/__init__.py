"""latte: PyLate's API (ColBERT late-interaction retrieval) on latte's Rust engine.

Modules mirror PyLate 1.6's: :mod:`latte.models` (``ColBERT``), :mod:`latte.indexes` (``PLAID``, ``Exact``
and PyLate's other index names on latte's engine), :mod:`latte.retrieve` (``ColBERT``), :mod:`latte.rank`
(``rerank``), :mod:`latte.evaluation` (``evaluate``, ``load_beir_folder``) and :mod:`latte.scores`
(``colbert_scores``), plus :func:`train` (latte's trainer, the one behind ``latte train``) and :class:`Client`
(an HTTP client of ``latte serve``, :mod:`latte.client`). Errors are ``FileNotFoundError``, ``ValueError`` or
:class:`LatteError`.
"""

from latte._latte import LatteError, __version__
from latte import client, evaluation, indexes, models, rank, retrieve, scores, training
from latte.client import Client
from latte.training import train

__all__ = [
    "Client",
    "LatteError",
    "__version__",
    "client",
    "evaluation",
    "indexes",
    "models",
    "rank",
    "retrieve",
    "scores",
    "train",
    "training",
]

"""PyLate's ``models`` module on latte's engine: :class:`ColBERT` loads, encodes and saves ColBERT models.

Everything runs on latte's Rust engine on the CPU: no torch is needed (when torch is installed,
``convert_to_tensor=True`` returns torch tensors sharing the numpy buffers).
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np

from latte import _latte

__all__ = ["ColBERT", "Dense", "Transformer"]


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hugging Face Hub id (``name`` or ``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


# Short activation names accepted by :class:`Dense` (lower-case torch class names) → torch class paths.
_ACTIVATIONS: Dict[str, str] = {
    "identity": "torch.nn.modules.linear.Identity",
    **{
        name.lower(): f"torch.nn.modules.activation.{name}"
        for name in (
            "ReLU", "ReLU6", "LeakyReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish", "Sigmoid",
            "LogSigmoid", "Tanh", "Tanhshrink", "Softplus", "Softsign", "Hardtanh", "Hardsigmoid",
            "Hardswish", "Hardshrink", "Softshrink",
        )
    },
}

# Names accepted for ``ColBERT(dtype=...)`` → latte's dtype names.
_DTYPES: Dict[str, str] = {
    "float32": "f32",
    "f32": "f32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "int8": "int8",
}
# latte's dtype names → the names ``ColBERT.dtype`` reports.
_DTYPE_NAMES: Dict[str, str] = {"f32": "float32", "bf16": "bfloat16", "int8": "int8"}


def _dtype_name(dtype: Any) -> str:
    """latte's name (``f32``, ``bf16``, ``int8``) of ``dtype``: a string, or a torch / numpy dtype."""
    if isinstance(dtype, str) or str(dtype).startswith("torch."):
        key = str(dtype)
    else:
        try:
            key = np.dtype(dtype).name
        except TypeError:
            key = str(dtype)
    key = key.lower()
    if key.startswith("torch."):
        key = key[len("torch."):]
    if key not in _DTYPES:
        raise ValueError(
            "dtype: expected one of 'float32', 'bfloat16', 'int8' (or 'f32', 'bf16'), "
            f"got {dtype!r}"
        )
    return _DTYPES[key]


# Seeds of new Dense layers: a process-wide sequence from 42, so that a script building the same modules in
# the same order gets the same weights (as PyLate under ``torch.manual_seed``).
_DENSE_SEEDS: Iterator[int] = itertools.count(42)


def _activation_name(activation: Any) -> str:
    """The torch class path of ``activation``: a ``torch.nn`` module instance, a class, a class path or a short name."""
    if isinstance(activation, str):
        return _ACTIVATIONS.get(activation.lower(), activation)
    cls = activation if isinstance(activation, type) else type(activation)
    module = getattr(cls, "__module__", "")
    if not module.startswith("torch.nn"):
        raise ValueError(
            "activation_function: expected a torch.nn activation (instance or class), its class path "
            f"('torch.nn.modules.activation.GELU') or a short name ('gelu'), got {activation!r}"
        )
    return f"{module}.{cls.__qualname__}"


class Transformer:
    """The body of a ColBERT model, as sentence-transformers' ``models.Transformer``: a Hugging Face encoder
    (``config.json``, weights, tokenizer) given as anything :class:`ColBERT` accepts: a local folder or a
    Hugging Face Hub id (fetched into the Hub cache; with ``local_files_only=True`` or ``HF_HUB_OFFLINE=1``
    only the cache is read). Use it as the first of ``ColBERT(modules=[...])``.

    ``max_seq_length`` and the other sentence-transformers arguments are accepted and without effect: latte
    truncates to ``query_length`` / ``document_length``.
    """

    def __init__(
        self,
        model_name_or_path: str,
        max_seq_length: Optional[int] = None,
        cache_dir: Optional[str] = None,
        revision: Optional[str] = None,
        local_files_only: bool = False,
        token: Optional[Union[bool, str]] = None,
        **kwargs: Any,
    ) -> None:
        name = os.fspath(model_name_or_path)
        expanded = os.path.expanduser(name)
        if os.path.isdir(expanded):
            path = expanded
        elif os.path.exists(expanded):
            raise FileNotFoundError(
                f"Transformer: {name} is a file; expected a model folder or a Hugging Face Hub id"
            )
        elif _looks_like_path(name):
            raise FileNotFoundError(f"Transformer: no model folder at {name}")
        else:
            path = os.fspath(
                _latte.resolve_model(
                    name,
                    local_files_only=local_files_only,
                    cache_folder=cache_dir or kwargs.get("cache_folder"),
                    revision=revision,
                    token=token if isinstance(token, str) else None,
                )
            )
        self.model_name_or_path = path
        self.max_seq_length = max_seq_length

    def get_word_embedding_dimension(self) -> int:
        """The hidden size of the encoder (``hidden_size`` / ``d_model`` / ``dim`` of its ``config.json``)."""
        config_path = os.path.join(self.model_name_or_path, "config.json")
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{config_path}: missing (expected the encoder's Hugging Face config)") from None
        for key in ("hidden_size", "d_model", "dim"):
            if isinstance(config.get(key), int):
                return int(config[key])
        raise ValueError(f"{config_path}: no hidden_size, d_model or dim (expected the encoder's hidden size)")

    def __repr__(self) -> str:
        return f"Transformer({{'model_name_or_path': {self.model_name_or_path!r}}})"


class Dense:
    """PyLate's ``models.Dense``: ``act(linear(x))`` on every token embedding, plus ``x`` (or a bias-free
    projection of it when the sizes differ) when ``use_residual``.

    ``activation_function`` is a ``torch.nn`` activation instance (when torch is installed), its class path
    (``"torch.nn.modules.activation.GELU"``) or a short name (``"gelu"``, ``"identity"``). Weights are drawn as
    ``torch.nn.Linear``'s default initialisation (uniform ±1/√in_features) from ``seed``; without a seed,
    from a process-wide sequence starting at 42 (deterministic for a given construction order).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation_function: Any = "identity",
        use_residual: bool = False,
        seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Dense: {name} must be a positive int, got {value!r}")
        if seed is None:
            seed = next(_DENSE_SEEDS)
        self._dense = _latte.DenseModule(
            in_features,
            out_features,
            bias=bool(bias),
            activation_function=_activation_name(activation_function),
            use_residual=bool(use_residual),
            seed=seed,
        )
        config = self._dense.config()
        self.in_features: int = config["in_features"]
        self.out_features: int = config["out_features"]
        self.bias: bool = config["bias"]
        self.activation_function: str = config["activation_function"]
        self.use_residual: bool = config["use_residual"]

    def get_config_dict(self) -> Dict[str, Any]:
        """The configuration PyLate stores in ``N_Dense/config.json``."""
        return dict(self._dense.config())

    def __repr__(self) -> str:
        return f"Dense({self.get_config_dict()!r})"


class ColBERT:
    """A ColBERT model, as PyLate 1.6's ``pylate.models.ColBERT``, running on latte.

    Loads PyLate / sentence-transformers folders, stanford-nlp ColBERT checkpoints and bare Hugging Face
    encoders (locally or from the Hugging Face Hub), with PyLate's settings resolution: an explicit
    argument wins over the model's configuration, which wins over PyLate's defaults.

    Accepted and without effect on latte (documented differences): ``device`` (latte runs on the CPU),
    ``trust_remote_code`` (latte never runs remote code; it reads supported architectures itself),
    ``model_kwargs``, ``tokenizer_kwargs``, ``config_kwargs``, ``model_card_data``, ``similarity_fn_name``
    (always MaxSim), ``truncation``, ``add_special_tokens``. Unlike PyLate, ``truncate_dim`` is applied: token
    embeddings keep their first ``truncate_dim`` dimensions and are re-normalised (Matryoshka).

    ``dtype`` (latte's own keyword) sets the precision of the encoder's linear layers in inference:
    ``"float32"`` (default), ``"bfloat16"`` (bf16 weights and activations, f32 accumulation) or ``"int8"``
    (dynamic quantisation); ``"f32"`` / ``"bf16"`` and ``torch.float32`` / ``torch.bfloat16`` are accepted
    too. Embeddings, normalisation, attention and the Dense projections stay float32; training needs float32.

    Modular construction, as PyLate's models page: ``ColBERT(modules=[Transformer(path), Dense(...), ...],
    query_length=32, document_length=300)``; ``append``, ``del model[i]``, ``len(model)`` and ``print(model)``
    work on the modules. ``save`` writes a PyLate folder that ``ColBERT(path)`` (and PyLate) load.
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        modules: Optional[List[Any]] = None,
        device: Optional[str] = None,
        prompts: Optional[Dict[str, str]] = None,
        default_prompt_name: Optional[str] = None,
        similarity_fn_name: Optional[str] = None,
        cache_folder: Optional[str] = None,
        trust_remote_code: bool = False,
        revision: Optional[str] = None,
        local_files_only: bool = False,
        token: Optional[Union[bool, str]] = None,
        use_auth_token: Optional[Union[bool, str]] = None,
        truncate_dim: Optional[int] = None,
        embedding_size: Optional[int] = None,
        bias: bool = False,
        query_prefix: Optional[str] = None,
        document_prefix: Optional[str] = None,
        add_special_tokens: bool = True,
        truncation: bool = True,
        query_length: Optional[int] = None,
        document_length: Optional[int] = None,
        attend_to_expansion_tokens: Optional[bool] = None,
        skiplist_words: Optional[List[str]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        tokenizer_kwargs: Optional[Dict[str, Any]] = None,
        config_kwargs: Optional[Dict[str, Any]] = None,
        model_card_data: Optional[Any] = None,
        do_query_expansion: Optional[bool] = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        if token is None and isinstance(use_auth_token, str):
            token = use_auth_token
        latte_dtype = _dtype_name(dtype) if dtype is not None else None
        self.device = "cpu"
        self.prompts: Dict[str, str] = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        if modules is not None:
            self._model: _latte.Model = self._from_modules(
                modules,
                embedding_size=embedding_size,
                bias=bias,
                query_prefix=query_prefix,
                document_prefix=document_prefix,
                query_length=query_length,
                document_length=document_length,
                attend_to_expansion_tokens=attend_to_expansion_tokens,
                do_query_expansion=do_query_expansion,
                skiplist_words=skiplist_words,
            )
            self.model_name_or_path = modules[0].model_name_or_path
            if latte_dtype is not None:
                self._model.set_dtype(latte_dtype)
            self._read_settings()
            return
        if model_name_or_path is None:
            raise ValueError("model_name_or_path is required (a model folder or a Hugging Face Hub id)")
        name = os.fspath(model_name_or_path)
        expanded = os.path.expanduser(name)
        if not os.path.exists(expanded) and _looks_like_path(name):
            raise FileNotFoundError(f"no model folder at {name}")
        if os.path.exists(expanded):
            name = expanded
        self.model_name_or_path = name
        self._model = _latte.Model.load(
            name,
            query_prefix=query_prefix,
            document_prefix=document_prefix,
            query_length=query_length,
            document_length=document_length,
            attend_to_expansion_tokens=attend_to_expansion_tokens,
            do_query_expansion=do_query_expansion,
            skiplist_words=skiplist_words,
            truncate_dim=truncate_dim,
            embedding_size=embedding_size,
            bias=bias,
            local_files_only=local_files_only,
            cache_folder=cache_folder,
            revision=revision,
            token=token if isinstance(token, str) else None,
        )
        if latte_dtype is not None:
            self._model.set_dtype(latte_dtype)
        self._read_settings()

    @staticmethod
    def _from_modules(
        modules: List[Any], embedding_size: Optional[int], bias: bool, **settings: Any
    ) -> "_latte.Model":
        """The native model of ``modules``: a :class:`Transformer` then :class:`Dense` layers."""
        modules = list(modules)
        if not modules or not isinstance(modules[0], Transformer):
            raise ValueError(
                "modules: expected a latte.models.Transformer first, then latte.models.Dense layers; got "
                f"{[type(m).__name__ for m in modules]}"
            )
        for i, m in enumerate(modules[1:], start=1):
            if not isinstance(m, Dense):
                raise ValueError(f"modules[{i}]: expected a latte.models.Dense, got {type(m).__name__}")
        model = _latte.Model.from_modules(
            modules[0].model_name_or_path, [m._dense for m in modules[1:]], **settings
        )
        if embedding_size is not None and model.output_dim() != embedding_size:
            model.push_dense(Dense(model.output_dim(), embedding_size, bias=bias)._dense)
        return model

    def _read_settings(self) -> None:
        """Copies the resolved settings of the native model onto the PyLate attributes."""
        settings = self._model.settings()
        self.query_prefix: str = settings["query_prefix"]
        self.document_prefix: str = settings["document_prefix"]
        self.query_length: int = settings["query_length"]
        self.document_length: int = settings["document_length"]
        self.do_query_expansion: bool = settings["do_query_expansion"]
        self.attend_to_expansion_tokens: bool = settings["attend_to_expansion_tokens"]
        self.skiplist_words: List[str] = settings["skiplist_words"]
        self.truncate_dim: Optional[int] = settings["truncate_dim"]

    @property
    def dtype(self) -> str:
        """Precision of the encoder's linear layers in inference: ``"float32"`` (the default), ``"bfloat16"``
        or ``"int8"`` (set with ``ColBERT(..., dtype=...)``)."""
        return _DTYPE_NAMES[self._model.dtype()]

    def get_sentence_embedding_dimension(self) -> int:
        """Dimension of the token embeddings ``encode`` returns."""
        return self._model.output_dim()

    def encode(
        self,
        sentences: Union[str, List[str], List[List[str]]],
        prompt_name: Optional[str] = None,
        prompt: Optional[str] = None,
        batch_size: int = 32,
        show_progress_bar: Optional[bool] = None,
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        padding: bool = False,
        device: Optional[str] = None,
        normalize_embeddings: bool = True,
        is_query: bool = True,
        pool_factor: int = 1,
        protected_tokens: int = 1,
    ) -> Any:
        """Encodes texts into per-token embeddings, as PyLate's ``encode``.

        Returns one float32 ``(tokens, dim)`` array per text, in input order (a single ``str`` gives one
        array; a list of lists gives one list per inner list). Documents (``is_query=False``) lose their
        padding and skiplist tokens; queries keep all ``query_length`` tokens when expanding. The GIL is
        released while encoding. ``padding=True`` zero-pads to the longest text and returns arrays of shape
        ``(1, max_tokens, dim)`` as PyLate does. ``pool_factor > 1`` pools document tokens (Ward clustering,
        as PyLate). ``convert_to_tensor=True`` (or ``convert_to_numpy=False``) returns torch tensors and needs
        torch. Only ``precision="float32"`` is supported; ``device`` is ignored (CPU).
        """
        if precision != "float32":
            raise ValueError(f"precision {precision!r} is not supported by latte; expected 'float32'")
        if sentences and not isinstance(sentences, str) and isinstance(sentences[0], (list, tuple)):
            return [
                self.encode(
                    list(group),
                    prompt_name=prompt_name,
                    prompt=prompt,
                    batch_size=batch_size,
                    show_progress_bar=show_progress_bar,
                    precision=precision,
                    convert_to_numpy=convert_to_numpy,
                    convert_to_tensor=convert_to_tensor,
                    padding=padding,
                    device=device,
                    normalize_embeddings=normalize_embeddings,
                    is_query=is_query,
                    pool_factor=pool_factor,
                    protected_tokens=protected_tokens,
                )
                for group in sentences
            ]
        single = isinstance(sentences, str)
        texts: List[Any] = [sentences] if single else list(sentences)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"sentences[{i}]: expected a str, got {type(t).__name__}")
        if prompt is None:
            if prompt_name is not None and prompt_name in self.prompts:
                prompt = self.prompts[prompt_name]
                prompt_name = None
            elif prompt_name is None and self.default_prompt_name in self.prompts:
                prompt = self.prompts[self.default_prompt_name]
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if pool_factor < 1:
            raise ValueError(f"pool_factor must be at least 1, got {pool_factor}")
        out: List[Any] = self._model.encode(
            texts,
            is_query,
            batch_size=batch_size,
            show_progress=bool(show_progress_bar),
            prompt_name=prompt_name,
            prompt=prompt,
            normalize=normalize_embeddings,
            pool_factor=pool_factor,
            protected_tokens=protected_tokens,
        )
        if padding and out:
            longest = max(a.shape[0] for a in out)
            padded = []
            for a in out:
                p = np.zeros((1, longest, a.shape[1]), dtype=np.float32)
                p[0, : a.shape[0]] = a
                padded.append(p)
            out = padded
        if convert_to_tensor or not convert_to_numpy:
            import torch  # type: ignore[import-not-found, unused-ignore]  # only when tensors are asked for

            out = [torch.from_numpy(a) for a in out]
        return out[0] if single else out

    def save(self, path: str, *args: Any, **kwargs: Any) -> None:
        """Saves the model as a PyLate folder at ``path`` (created, or replaced when it exists)."""
        self._model.save(os.fspath(path))

    def save_pretrained(self, path: str, *args: Any, **kwargs: Any) -> None:
        """Same as :meth:`save` (PyLate / sentence-transformers name)."""
        self.save(path)

    def append(self, module: Dense) -> None:
        """Appends a :class:`Dense` layer (its ``in_features`` must match the current output dimension)."""
        if not isinstance(module, Dense):
            raise ValueError(f"append: expected a latte.models.Dense, got {type(module).__name__}")
        self._model.push_dense(module._dense)

    def __len__(self) -> int:
        """Number of modules (the Transformer and each Dense)."""
        return len(self._model)

    def __delitem__(self, index: int) -> None:
        """Removes a Dense module (index 0, the Transformer, cannot be removed)."""
        if index < 0:
            index += len(self)
        if index < 0:
            raise IndexError("module index out of range")
        self._model.remove_module(index)

    def __str__(self) -> str:
        return str(self._model)

    def __repr__(self) -> str:
        return str(self._model)

"""PyLate's ``models`` module on latte's engine: :class:`ColBERT` loads, encodes and saves ColBERT models.

Everything runs on latte's Rust engine on the CPU: no torch is needed (when torch is installed,
``convert_to_tensor=True`` returns torch tensors sharing the numpy buffers).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import numpy as np

from latte import _latte

__all__ = ["ColBERT"]


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hugging Face Hub id (``name`` or ``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


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

    Modular construction (``modules=[...]``) is not available yet and raises ``NotImplementedError``.
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
        **kwargs: Any,
    ) -> None:
        if modules is not None:
            raise NotImplementedError(
                "latte.models.ColBERT(modules=[...]) is not available yet; load a model by name or path"
            )
        if model_name_or_path is None:
            raise ValueError("model_name_or_path is required (a model folder or a Hugging Face Hub id)")
        name = os.fspath(model_name_or_path)
        expanded = os.path.expanduser(name)
        if not os.path.exists(expanded) and _looks_like_path(name):
            raise FileNotFoundError(f"no model folder at {name}")
        if os.path.exists(expanded):
            name = expanded
        if token is None and isinstance(use_auth_token, str):
            token = use_auth_token
        self.model_name_or_path = name
        self.device = "cpu"
        self.prompts: Dict[str, str] = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
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
        settings = self._model.settings()
        self.query_prefix: str = settings["query_prefix"]
        self.document_prefix: str = settings["document_prefix"]
        self.query_length: int = settings["query_length"]
        self.document_length: int = settings["document_length"]
        self.do_query_expansion: bool = settings["do_query_expansion"]
        self.attend_to_expansion_tokens: bool = settings["attend_to_expansion_tokens"]
        self.skiplist_words: List[str] = settings["skiplist_words"]
        self.truncate_dim: Optional[int] = settings["truncate_dim"]

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
        texts = [sentences] if single else list(sentences)
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
            import torch  # only when tensors are asked for

            out = [torch.from_numpy(a) for a in out]
        return out[0] if single else out

    def save(self, path: str, *args: Any, **kwargs: Any) -> None:
        """Saves the model as a PyLate folder at ``path`` (created, or replaced when it exists)."""
        self._model.save(os.fspath(path))

    def save_pretrained(self, path: str, *args: Any, **kwargs: Any) -> None:
        """Same as :meth:`save` (PyLate / sentence-transformers name)."""
        self.save(path)

    def __len__(self) -> int:
        return len(self._model)

    def __delitem__(self, index: int) -> None:
        if index < 0:
            index += len(self)
        if index < 0:
            raise IndexError("module index out of range")
        self._model.remove_module(index)

    def __str__(self) -> str:
        return str(self._model)

    def __repr__(self) -> str:
        return str(self._model)
